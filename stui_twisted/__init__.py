"""stui-twisted: durable multi-client sessions over one shared, live Python image.

A Twisted daemon (C{twistd stui}) that speaks the STUI command protocol over
line-JSON TCP/TLS and ZeroMQ.  See C{docs/protocol.md} for the wire contract.
"""

__version__ = "0.1.0"
PROTOCOL_VERSION = "1.0"
SERVER_NAME = "stui-twisted"
