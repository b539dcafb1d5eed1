"""Tests against the real image child process, without a server."""
