"""The C{--tls} listener: Twisted's C{ssl:} strports, plus C{caCertsDir} for client certificates.

Twisted's server-side C{ssl:} parser knows C{privateKey}, C{certKey},
C{extraCertChain}, C{dhParameters}, C{interface} and C{backlog}, but not
C{caCertsDir} (that exists only for client endpoints).  L{server_endpoint}
keeps the plain strports path for every description without C{caCertsDir};
with it, it builds the C{SSL4ServerEndpoint} itself, with
C{CertificateOptions(trustRoot=trustRootFromCertificates(<the CAs>))}, which
verifies the client's certificate and refuses a client that has none.

Every C{*.pem} (and C{*.crt}) file in C{caCertsDir} is read; a file may hold
several certificates.  A directory with no readable CA certificate, or a key
or certificate that cannot be loaded, stops start-up with a
L{TLSConfigError} naming the file.

Every TLS listener is TCP with L{HalfCloseableTLSFactory} on top (not
C{reactor.listenSSL}): Twisted's TLS layer closes the connection as soon as
the client's input ends (its close_notify, or a TCP FIN), before the replies to
what it sent are written.  The half-closeable layer passes end of input on to
the line protocol (C{readConnectionLost}), which answers what it read, and
only then closes.
"""

from __future__ import annotations

import os

from OpenSSL.SSL import Error as OpenSSLError
from OpenSSL.SSL import WantReadError, ZeroReturnError
from twisted.internet import defer, endpoints, interfaces, ssl
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper
from twisted.protocols.tls import BufferingTLSTransport, TLSMemoryBIOFactory
from twisted.python.failure import Failure
from twisted.python.filepath import FilePath
from zope.interface import implementer

from stui_twisted.config import split_description

log = Logger()

CA_SUFFIXES = (".pem", ".crt")


class TLSConfigError(ValueError):
    """The C{--tls} description names files that cannot be used."""


def _options(parts: list[str]) -> tuple[list[str], dict[str, str]]:
    positional: list[str] = []
    named: dict[str, str] = {}
    for part in parts:
        key, sep, value = part.partition("=")
        if sep:
            named[key] = value
        else:
            positional.append(part)
    return positional, named


def _read(path: str, what: str) -> bytes:
    try:
        return FilePath(path).getContent()
    except OSError as exc:
        raise TLSConfigError(f"--tls: cannot read {what} {path}: {exc.strerror or exc}") from None


def _pem_certificates(data: bytes, path: str) -> list[ssl.Certificate]:
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding

    try:
        parsed = x509.load_pem_x509_certificates(data)
    except ValueError as exc:
        raise TLSConfigError(f"--tls: {path} holds no valid PEM certificate ({exc})") from None
    return [ssl.Certificate.loadPEM(cert.public_bytes(Encoding.PEM)) for cert in parsed]


def load_ca_certificates(directory: str) -> list[ssl.Certificate]:
    """Every CA certificate in the C{*.pem}/C{*.crt} files of C{directory}."""
    try:
        names = sorted(os.listdir(directory))
    except OSError as exc:
        raise TLSConfigError(
            f"--tls: cannot read caCertsDir {directory}: {exc.strerror or exc}"
        ) from None
    certificates: list[ssl.Certificate] = []
    for name in names:
        if not name.endswith(CA_SUFFIXES):
            continue
        path = os.path.join(directory, name)
        certificates.extend(_pem_certificates(_read(path, "CA certificate"), path))
    if not certificates:
        raise TLSConfigError(
            f"--tls: caCertsDir {directory} has no CA certificates (*.pem or *.crt files)"
        )
    return certificates


def client_cert_options(named: dict[str, str]) -> ssl.CertificateOptions:
    """C{CertificateOptions} for the server key/cert that require a CA-signed client cert."""
    if "privateKey" not in named:
        raise TLSConfigError("--tls: an ssl: listener needs privateKey=FILE")
    key_path = named["privateKey"]
    cert_path = named.get("certKey", key_path)
    cert_pem = _read(cert_path, "certificate")
    key_pem = _read(key_path, "private key")
    try:
        private = ssl.PrivateCertificate.loadPEM(cert_pem + b"\n" + key_pem)
    except Exception as exc:  # OpenSSL raises several unrelated types here
        raise TLSConfigError(
            f"--tls: cannot load the key {key_path} with the certificate {cert_path}: {exc}"
        ) from None
    extra = []
    if "extraCertChain" in named:
        chain_path = named["extraCertChain"]
        extra = [c.original for c in _pem_certificates(_read(chain_path, "chain"), chain_path)]
    dh = None
    if "dhParameters" in named:
        dh = ssl.DiffieHellmanParameters.fromFile(FilePath(named["dhParameters"]))
    cas = load_ca_certificates(named["caCertsDir"])
    return ssl.CertificateOptions(
        privateKey=private.privateKey.original,
        certificate=private.original,
        extraCertChain=extra or None,
        dhParameters=dh,
        trustRoot=ssl.trustRootFromCertificates(cas),
    )


@implementer(interfaces.IHalfCloseableProtocol)
class HalfCloseableTLSProtocol(BufferingTLSTransport):
    """The server side of one TLS connection that survives the client's end of input.

    When the client sends close_notify, or its TCP connection half-closes, a
    half-closeable application protocol is told (C{readConnectionLost}) and
    may go on writing; when it calls C{loseConnection}, close_notify is sent
    and the TCP connection closed.  An application protocol that is not
    half-closeable gets Twisted's usual behaviour (the connection closes).
    """

    _input_ended = False

    def _half_closeable(self):
        return interfaces.IHalfCloseableProtocol(self.wrappedProtocol, None)

    def _end_of_input(self) -> None:
        if self._input_ended:
            return
        self._input_ended = True
        self._half_closeable().readConnectionLost()

    def readConnectionLost(self) -> None:  # noqa: N802
        """TCP FIN from the client (the reactor stopped reading)."""
        if self._lostTLSConnection:
            return
        if not self._handshakeDone or self._half_closeable() is None:
            self.transport.loseConnection()
            return
        self._end_of_input()

    def writeConnectionLost(self) -> None:  # noqa: N802
        self.transport.loseConnection()

    def _flushReceiveBIO(self) -> None:  # noqa: N802
        # TLSMemoryBIOProtocol._flushReceiveBIO, except that close_notify from
        # the client is end of input for a half-closeable protocol.
        while not self._lostTLSConnection and not self._input_ended:
            try:
                data = self._tlsConnection.recv(2**15)
            except WantReadError:
                break
            except ZeroReturnError:
                if self._half_closeable() is None:
                    self._shutdownTLS()
                    self._tlsShutdownFinished(None)
                else:
                    self._end_of_input()
            except OpenSSLError:
                self._tlsShutdownFinished(Failure())
            else:
                if not self._aborted:
                    ProtocolWrapper.dataReceived(self, data)
        self._flushSendBIO()

    def loseConnection(self) -> None:  # noqa: N802
        super().loseConnection()
        if self._input_ended and self.disconnecting:
            # The client sends nothing more, its close_notify included (it
            # may have sent only a FIN): close once our data is written.
            self.transport.loseConnection()


class HalfCloseableTLSFactory(TLSMemoryBIOFactory):
    """A server-side L{TLSMemoryBIOFactory} of L{HalfCloseableTLSProtocol}s."""

    protocol = HalfCloseableTLSProtocol

    def buildProtocol(self, addr):  # noqa: N802
        wrapped = self.wrappedFactory.buildProtocol(addr)
        if wrapped is None:  # refused (max_connections): the port closes the socket
            return None
        return self.protocol(self, wrapped)


class HalfCloseableSSL4ServerEndpoint(endpoints.SSL4ServerEndpoint):
    """C{SSL4ServerEndpoint} that listens with L{HalfCloseableTLSFactory} over TCP."""

    def listen(self, protocolFactory):  # noqa: N802
        return defer.execute(
            self._reactor.listenTCP,
            self._port,
            HalfCloseableTLSFactory(self._sslContextFactory, False, protocolFactory),
            backlog=self._backlog,
            interface=self._interface,
        )

    @classmethod
    def from_endpoint(cls, reactor, endpoint: endpoints.SSL4ServerEndpoint):
        return cls(
            reactor,
            endpoint._port,
            endpoint._sslContextFactory,
            backlog=endpoint._backlog,
            interface=endpoint._interface,
        )


def server_endpoint(reactor, description: str):
    """The server endpoint of a C{--tcp}/C{--tls} strports description.

    Descriptions without C{caCertsDir} go to C{endpoints.serverFromString}
    unchanged.  C{ssl:PORT:privateKey=K:certKey=C:caCertsDir=DIR[:interface=I]
    [:backlog=N][:extraCertChain=F][:dhParameters=F]} becomes an
    C{SSL4ServerEndpoint} that requires a client certificate signed by a CA in DIR.
    """
    parts = split_description(description)
    positional, named = _options(parts[1:])
    if parts[0].lower() != "ssl" or "caCertsDir" not in named:
        endpoint = endpoints.serverFromString(reactor, description)
        if isinstance(endpoint, endpoints.SSL4ServerEndpoint):
            return HalfCloseableSSL4ServerEndpoint.from_endpoint(reactor, endpoint)
        return endpoint
    known = {
        "privateKey",
        "certKey",
        "caCertsDir",
        "interface",
        "backlog",
        "extraCertChain",
        "dhParameters",
        "port",
    }
    unknown = sorted(set(named) - known)
    if unknown:
        raise TLSConfigError(
            f"--tls: option {unknown[0]!r} is not supported together with caCertsDir "
            f"(supported: {', '.join(sorted(known))})"
        )
    port_text = named.get("port") or (positional[0] if positional else "")
    try:
        port = int(port_text)
    except ValueError:
        raise TLSConfigError(f"--tls: port must be a number, not {port_text!r}") from None
    options = client_cert_options(named)
    log.info(
        "tls requires client certificates signed by a CA in {directory}",
        directory=named["caCertsDir"],
    )
    return HalfCloseableSSL4ServerEndpoint(
        reactor,
        port,
        options,
        backlog=int(named.get("backlog", 50)),
        interface=named.get("interface", ""),
    )
