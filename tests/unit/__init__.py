"""Unit tests: no process is started (a fake reactor, in-memory or temp-dir stores)."""
