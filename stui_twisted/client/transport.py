"""Blocking transports from the terminal client to a stui-twisted server.

Three kinds of server URL are understood (see L{parse_server_url}):

C{tcp://HOST:PORT}
    line-JSON over a plain TCP connection: one JSON object per C{\\n}-terminated line.
C{tls://HOST:PORT}
    the same framing inside TLS; the server certificate and host name are verified
    with the L{ssl} module against C{--cafile} or the system trust store.
C{zmq://HOST:PORT}
    a ZeroMQ DEALER socket; each request is sent as the single frame C{[payload]}
    and each reply (and, after C{subscribe}, each event) arrives as C{[message]}.
    Without the empty delimiter frame the server knows it is a DEALER that takes
    pushed events (docs/protocol.md: with the delimiter it is treated as REQ).

Every transport offers the same small interface: L{connect}, L{send}
(one request object), L{receive} (one reply object, or C{None} on timeout),
L{peer_closed} (a cheap, non-blocking check used while the client is idle)
and L{close}.  A broken connection is reported as L{ConnectionLost}.
"""

from __future__ import annotations

import contextlib
import json
import socket
import ssl
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

DEFAULT_SERVER_URL = "tcp://127.0.0.1:7555"
SCHEMES = ("tcp", "tls", "zmq")
RECEIVE_CHUNK_BYTES = 65536
SEND_TIMEOUT_SECONDS = 10.0


class ConnectionLost(Exception):
    """The connection to the server is gone (refused, reset, closed or timed out)."""


class ProtocolViolation(ConnectionLost):
    """The server sent something that is not a JSON object; the stream is unusable."""


@dataclass(frozen=True)
class ServerAddress:
    """Where the server is: transport scheme, host name and port."""

    scheme: str
    host: str
    port: int

    @property
    def url(self) -> str:
        """The canonical URL, used as the key of the client's saved sessions."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"


def parse_server_url(url: str) -> ServerAddress:
    """Parse C{tcp://HOST:PORT}, C{tls://HOST:PORT} or C{zmq://HOST:PORT}.

    A bare C{HOST:PORT} means TCP.  Raises L{ValueError} with a sentence that
    says what is wrong.
    """
    text = url.strip()
    if "://" not in text:
        text = "tcp://" + text
    parts = urlsplit(text)
    scheme = parts.scheme.lower()
    if scheme not in SCHEMES:
        raise ValueError(
            f"unsupported server URL scheme {parts.scheme!r} in {url!r}; "
            "use tcp://, tls:// or zmq://"
        )
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError(f"server URL {url!r} must be SCHEME://HOST:PORT with nothing after")
    try:
        port = parts.port
    except ValueError as error:
        raise ValueError(f"server URL {url!r} has an invalid port") from error
    if not parts.hostname:
        raise ValueError(f"server URL {url!r} has no host")
    if port is None or port == 0:
        raise ValueError(f"server URL {url!r} needs a port, e.g. {scheme}://127.0.0.1:7555")
    return ServerAddress(scheme, parts.hostname, port)


def encode_request(message: dict[str, Any]) -> bytes:
    """One request as compact UTF-8 JSON (no trailing newline)."""
    return json.dumps(message, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def decode_reply(data: bytes) -> dict[str, Any]:
    """Parse one reply; anything but a JSON object is a L{ProtocolViolation}."""
    try:
        reply = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ProtocolViolation(f"the server sent invalid JSON: {error}") from error
    if not isinstance(reply, dict):
        raise ProtocolViolation("the server sent a JSON value that is not an object")
    return reply


class LineJsonTransport:
    """Line-JSON over TCP, optionally inside verified TLS, on a blocking socket.

    Reads go through a private byte buffer (not C{socket.makefile}) so that a
    C{KeyboardInterrupt} arriving while C{recv} blocks never loses received data.
    """

    def __init__(
        self,
        address: ServerAddress,
        *,
        cafile: str | None = None,
        connect_timeout: float = 5.0,
    ) -> None:
        self.address = address
        self.cafile = cafile
        self.connect_timeout = connect_timeout
        self._socket: socket.socket | None = None
        self._buffer = bytearray()

    @property
    def connected(self) -> bool:
        return self._socket is not None

    def connect(self) -> None:
        """Open the connection (and the TLS handshake for C{tls://})."""
        self.close()
        host, port = self.address.host, self.address.port
        try:
            sock = socket.create_connection((host, port), timeout=self.connect_timeout)
        except OSError as error:
            raise ConnectionLost(
                f"cannot connect to {self.address.url}: {_reason(error)}"
            ) from error
        if self.address.scheme == "tls":
            try:
                context = ssl.create_default_context(cafile=self.cafile)
                sock = context.wrap_socket(sock, server_hostname=host)
            except ssl.SSLCertVerificationError as error:
                sock.close()
                raise ConnectionLost(
                    f"TLS certificate of {self.address.url} is not trusted: "
                    f"{error.verify_message or error}"
                ) from error
            except OSError as error:
                sock.close()
                raise ConnectionLost(
                    f"TLS handshake with {self.address.url} failed: {_reason(error)}"
                ) from error
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._socket = sock
        self._buffer.clear()

    def send(self, message: dict[str, Any]) -> None:
        """Write one request line; raises L{ConnectionLost} if it cannot."""
        sock = self._require_socket()
        try:
            sock.settimeout(SEND_TIMEOUT_SECONDS)
            sock.sendall(encode_request(message) + b"\n")
        except OSError as error:
            self.close()
            raise ConnectionLost(
                f"connection to {self.address.url} lost: {_reason(error)}"
            ) from error

    def receive(self, timeout: float | None) -> dict[str, Any] | None:
        """The next reply object, or C{None} if none arrived within C{timeout} s."""
        sock = self._require_socket()
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            line = self._pop_line()
            if line is not None:
                return decode_reply(line)
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            if remaining == 0.0:
                return None
            try:
                sock.settimeout(remaining)
                data = sock.recv(RECEIVE_CHUNK_BYTES)
            except TimeoutError:
                return None
            except OSError as error:
                self.close()
                raise ConnectionLost(
                    f"connection to {self.address.url} lost: {_reason(error)}"
                ) from error
            if not data:
                self.close()
                raise ConnectionLost(f"the server at {self.address.url} closed the connection")
            self._buffer += data

    def peer_closed(self) -> bool:
        """Non-blocking check: has the server closed or reset the connection?

        Data that is already waiting is kept in the buffer for L{receive}.
        """
        sock = self._socket
        if sock is None:
            return True
        try:
            sock.settimeout(0.0)
            data = sock.recv(RECEIVE_CHUNK_BYTES)
        except (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
            return False
        except OSError:
            self.close()
            return True
        if not data:
            self.close()
            return True
        self._buffer += data
        return False

    def close(self) -> None:
        if self._socket is not None:
            # Closing an already broken socket can fail; there is nothing left to do then.
            with contextlib.suppress(OSError):
                self._socket.close()
            self._socket = None

    def _pop_line(self) -> bytes | None:
        while True:
            newline = self._buffer.find(b"\n")
            if newline < 0:
                return None
            line = bytes(self._buffer[:newline])
            del self._buffer[: newline + 1]
            if line.strip():
                return line

    def _require_socket(self) -> socket.socket:
        if self._socket is None:
            raise ConnectionLost(f"not connected to {self.address.url}")
        return self._socket


class ZmqTransport:
    """A ZeroMQ DEALER socket talking to the server's ROUTER socket.

    ZeroMQ reconnects by itself and never reports a dead peer, so liveness is the
    caller's business (the client pings while it waits; see C{session.py}).
    """

    def __init__(self, address: ServerAddress, **_ignored: Any) -> None:
        import zmq  # imported lazily: only zmq:// users pay for it

        self._zmq = zmq
        self.address = address
        self._socket: Any = None

    @property
    def connected(self) -> bool:
        return self._socket is not None

    def connect(self) -> None:
        self.close()
        zmq = self._zmq
        sock = zmq.Context.instance().socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        try:
            sock.connect(f"tcp://{self.address.host}:{self.address.port}")
        except zmq.ZMQError as error:
            sock.close()
            raise ConnectionLost(f"cannot connect to {self.address.url}: {error}") from error
        self._socket = sock

    def send(self, message: dict[str, Any]) -> None:
        sock = self._require_socket()
        try:
            sock.send_multipart([encode_request(message)], flags=self._zmq.NOBLOCK)
        except self._zmq.ZMQError as error:
            raise ConnectionLost(f"cannot send to {self.address.url}: {error}") from error

    def receive(self, timeout: float | None) -> dict[str, Any] | None:
        sock = self._require_socket()
        milliseconds = None if timeout is None else int(timeout * 1000)
        try:
            if not sock.poll(milliseconds, self._zmq.POLLIN):
                return None
            frames = sock.recv_multipart()
        except self._zmq.ZMQError as error:
            raise ConnectionLost(f"cannot receive from {self.address.url}: {error}") from error
        return decode_reply(frames[-1])

    def peer_closed(self) -> bool:
        """ZeroMQ hides the peer's state; only a missing socket counts as closed."""
        return self._socket is None

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close(linger=0)
            self._socket = None

    def _require_socket(self) -> Any:
        if self._socket is None:
            raise ConnectionLost(f"not connected to {self.address.url}")
        return self._socket


Transport = LineJsonTransport | ZmqTransport


def open_transport(address: ServerAddress, *, cafile: str | None = None) -> Transport:
    """A connected transport for C{address}."""
    transport: Transport
    if address.scheme == "zmq":
        transport = ZmqTransport(address)
    else:
        transport = LineJsonTransport(address, cafile=cafile)
    transport.connect()
    return transport


def _reason(error: OSError) -> str:
    return error.strerror or str(error) or type(error).__name__
