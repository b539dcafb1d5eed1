"""C{stui-client}: a terminal client for the stui-twisted server.

A plain synchronous program (no Twisted): L{.transport} speaks line-JSON over
TCP/TLS or ZeroMQ, L{.session} implements requests, authentication, sessions and
reconnection, L{.state} keeps which session was used last, L{.formatting}
renders replies, L{.repl} is the prompt_toolkit REPL and L{.__main__} the
command line.  See C{docs/client.md}.
"""

from stui_twisted.client.session import CredentialSource, ServerError, StuiClient
from stui_twisted.client.transport import ConnectionLost, parse_server_url

__all__ = ["ConnectionLost", "CredentialSource", "ServerError", "StuiClient", "parse_server_url"]
