"""The listener service every stream transport (TCP, TLS, metrics) runs under."""

from __future__ import annotations

from twisted.application import internet
from twisted.logger import Logger

log = Logger()


class ListenerService(internet.StreamServerEndpointService):
    """A strports listener that logs the address it actually bound.

    The log line (C{tcp listening on 127.0.0.1:7555}) tells operators and
    tests which port an ephemeral C{tcp:0} description received.  A port that
    cannot be bound stops start-up with an error instead of running deaf.
    """

    _raiseSynchronously = True

    def __init__(self, name: str, endpoint, factory, description: str = "") -> None:
        super().__init__(endpoint, factory)
        self.listener_name = name
        self.description = description
        self.port = None

    def privilegedStartService(self) -> None:  # noqa: N802
        super().privilegedStartService()
        self._waitingForPort.addCallback(self._listening)

    def _listening(self, port):
        self.port = port
        address = port.getHost()
        log.info(
            "{name} listening on {host}:{port}",
            name=self.listener_name,
            host=getattr(address, "host", address),
            port=getattr(address, "port", ""),
        )
        return port
