"""Session files on disk: format, MACs, durable writes, the index."""
