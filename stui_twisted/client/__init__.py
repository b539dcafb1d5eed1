"""``stui-client``: a terminal client for the stui-twisted server.

A plain synchronous program (no Twisted): :mod:`.transport` speaks line-JSON over
TCP/TLS or ZeroMQ, :mod:`.session` implements requests, authentication, sessions and
reconnection, :mod:`.state` keeps which session was used last, :mod:`.formatting`
renders replies, :mod:`.repl` is the prompt_toolkit REPL and :mod:`.__main__` the
command line.  See ``docs/client.md``.
"""

from stui_twisted.client.session import CredentialSource, ServerError, StuiClient
from stui_twisted.client.transport import ConnectionLost, parse_server_url

__all__ = ["ConnectionLost", "CredentialSource", "ServerError", "StuiClient", "parse_server_url"]
