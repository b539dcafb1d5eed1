"""The wire: envelopes, error types, time formatting."""
