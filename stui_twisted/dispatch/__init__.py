"""Requests to commands: the connection interface, the dispatcher and the command table."""
