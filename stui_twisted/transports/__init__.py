"""Byte framing for line-JSON over TCP/TLS and ZeroMQ, and the connection registry."""
