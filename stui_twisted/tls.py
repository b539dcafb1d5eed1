"""The ``--tls`` listener: Twisted's ``ssl:`` strports, plus ``caCertsDir`` for client certificates.

Twisted's server-side ``ssl:`` parser knows ``privateKey``, ``certKey``,
``extraCertChain``, ``dhParameters``, ``interface`` and ``backlog``, but not
``caCertsDir`` (that exists only for client endpoints).  :func:`server_endpoint`
keeps the plain strports path for every description without ``caCertsDir``;
with it, it builds the ``SSL4ServerEndpoint`` itself, with
``CertificateOptions(trustRoot=trustRootFromCertificates(<the CAs>))``, which
verifies the client's certificate and refuses a client that has none.

Every ``*.pem`` (and ``*.crt``) file in ``caCertsDir`` is read; a file may hold
several certificates.  A directory with no readable CA certificate, or a key
or certificate that cannot be loaded, stops start-up with a
:class:`TLSConfigError` naming the file.
"""

from __future__ import annotations

import os

from twisted.internet import endpoints, ssl
from twisted.logger import Logger
from twisted.python.filepath import FilePath

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
        return endpoints.serverFromString(reactor, description)
    known = {"privateKey", "certKey", "caCertsDir", "interface", "backlog", "extraCertChain",
             "dhParameters", "port"}
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
    return endpoints.SSL4ServerEndpoint(
        reactor,
        port,
        options,
        backlog=int(named.get("backlog", 50)),
        interface=named.get("interface", ""),
    )
