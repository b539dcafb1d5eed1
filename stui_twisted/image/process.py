"""One spawned image process as the supervisor sees it: its pipes, AMP, requests, fate.

L{ImageProcess} is the C{ProcessProtocol} of one image: it carries AMP over the
child's fds 3/4, turns fds 1/2 into bounded log lines, learns of the child's
death from its exit status (then kills its process group and closes the pipes)
and tells its L{supervisor<stui_twisted.image.supervisor.ImageSupervisor>}.
L{Request} is one request sent to one image, settled by its answer or by the
image's death.  L{StaleGeneration} and L{reply_value} are what callers of the
supervisor see of a reply.
"""

from __future__ import annotations

import os
import signal
from typing import TYPE_CHECKING

from twisted.internet import defer, error, protocol
from twisted.internet.interfaces import ITransport
from twisted.protocols import amp
from zope.interface import implementer

from stui_twisted.image import amp_commands as commands
from stui_twisted.image.outputlog import ChildOutputLog
from stui_twisted.protocol.errors import ERROR_TYPES, StuiError
from stui_twisted.transports.immediate import write_now

if TYPE_CHECKING:
    from stui_twisted.image.supervisor import ImageSupervisor


class _ChildAddress:
    """The (address-less) peer of a pipe to the child."""

    def __repr__(self) -> str:
        return "<image child pipe>"


@implementer(ITransport)
class _ChildPipeTransport:
    """Lets an AMP protocol write to one of the child's pipes."""

    def __init__(self, process_transport, child_fd: int) -> None:
        self._process = process_transport
        self._child_fd = child_fd

    def write(self, data: bytes) -> None:
        writer = getattr(self._process, "pipes", {}).get(self._child_fd)
        if writer is None:
            self._process.writeToChild(self._child_fd, data)
        else:
            write_now(writer, data)

    def writeSequence(self, data) -> None:
        self.write(b"".join(data))

    def loseConnection(self) -> None:
        self._process.closeChildFD(self._child_fd)

    def getPeer(self):
        return _ChildAddress()

    def getHost(self):
        return _ChildAddress()


class ServerSideAMP(commands.BoxParsingAMP):
    """The server's end of the AMP channel: it answers what the image asks or tells."""

    def __init__(self, image: ImageProcess) -> None:
        super().__init__()
        self._image = image
        self._supervisor = image.supervisor

    @commands.RequestInput.responder
    def request_input(self, session_id, prompt, password, cell_index=None):
        return self._supervisor.input_requested(session_id, cell_index, prompt, password)

    @commands.DebugEvent.responder
    def debug_event(self, session_id, event, data):
        self._supervisor._debug_event(self._image, session_id, event, data or {})
        return {}

    @commands.OutputChunk.responder
    def output_chunk(self, session_id, pieces, history_index=None):
        self._supervisor._output_written(session_id, history_index, pieces or [])
        return {}


class ImageProcess(protocol.ProcessProtocol):
    """One spawned image: its AMP connection, in-flight requests and fate."""

    def __init__(self, supervisor: ImageSupervisor, generation: int) -> None:
        self.supervisor = supervisor
        self.generation = generation
        self.amp = ServerSideAMP(self)
        self.pid: int | None = None
        self.ready = False
        self.ended = False
        self.started_at: float | None = None
        self.started_at_text: str | None = None
        """C{started_at} as protocol.md writes times, formatted once (ping shows it)."""
        self.in_flight: set[Request] = set()
        self.kill_timer = None
        self._outputs = {
            1: ChildOutputLog(supervisor.log, "stdout", supervisor._reactor.seconds),
            2: ChildOutputLog(supervisor.log, "stderr", supervisor._reactor.seconds),
        }

    def connectionMade(self) -> None:
        self.pid = self.transport.pid
        for output in self._outputs.values():
            output.pid = self.pid
        self.transport.closeStdin()
        self.amp.makeConnection(_ChildPipeTransport(self.transport, 3))

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        if childFD == 4:
            self.amp.dataReceived(data)
        elif childFD in self._outputs:
            self._outputs[childFD].feed(data)

    def processExited(self, reason) -> None:
        """The image itself exited (reaped by its exit status).

        This, not the end of its pipes, is the image's death: a process that
        user code started (C{subprocess.Popen}, C{os.system('... &')},
        C{os.fork()}) may hold copies of the pipes long after the image is
        gone.  Its whole process group is killed, our ends of the pipes are
        closed, and the supervisor learns of the death now.
        """
        if self.ended:
            return
        self.ended = True
        self.kill_group()
        for output in self._outputs.values():
            output.flush()
        self.amp.connectionLost(reason)
        for child_fd in list(getattr(self.transport, "pipes", {})):
            self.transport.closeChildFD(child_fd)
        self.supervisor._image_ended(self, reason)

    def processEnded(self, reason) -> None:
        # Normally processExited has run already; this covers a transport
        # that reports only the end.
        self.processExited(reason)

    def kill_group(self) -> None:
        """Kill every process left in the image's process group.

        The image makes itself a session (and group) leader at start-up, so
        its group id is its pid; Linux does not reuse a pid while a group of
        that id has members, so this never reaches an unrelated process.
        """
        if self.pid is None:
            return
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            return  # the group is empty: nothing the image started is left
        except PermissionError:
            self.supervisor.log.warn("cannot kill process group {pid} of the image", pid=self.pid)

    def signal(self, name: str) -> None:
        """Send a signal unless the process is already gone."""
        if self.ended:
            return
        try:
            self.transport.signalProcess(name)
        except error.ProcessExitedAlready:
            pass


class Request:
    """A request sent to one image; settled by its answer or by the image's death."""

    def __init__(self, image: ImageProcess, description: str) -> None:
        self.image = image
        self.description = description
        self.result = defer.Deferred()
        self.forced_error: StuiError | None = None
        self.stop_watchdog = None

    @property
    def settled(self) -> bool:
        return self.result.called

    def answer(self, outcome) -> None:
        """The child's answer arrived (a response dict or a Failure)."""
        if self.settled:
            return
        if isinstance(outcome, dict):
            self.image.in_flight.discard(self)
            self.result.callback(outcome)
        elif outcome.check(error.ConnectionDone, error.ConnectionLost, amp.ProtocolSwitched):
            return  # the image died: _image_ended settles this request
        else:
            self.image.in_flight.discard(self)
            self.result.errback(outcome)

    def fail(self, failure_value: StuiError) -> None:
        """Settle with an error (the image died or the request was given up)."""
        if not self.settled:
            self.image.in_flight.discard(self)
            self.result.errback(failure_value)


class StaleGeneration(StuiError):
    """C{ImageRestarted} for a request that was never sent: its session is not
    live in the running image.  Safe to retry once the session is rebuilt."""


def reply_value(reply: dict):
    """Unwrap a child reply envelope into its result, or raise its StuiError."""
    if reply.get("ok"):
        return reply.get("result")
    error_type = reply.get("error_type")
    details = reply.get("details") or {}
    if error_type not in ERROR_TYPES:
        details = {"image_error_type": error_type, **details}
        error_type = "InternalError"
    failure_value = StuiError(error_type, reply.get("message") or "the image failed")
    failure_value.details.update(details)
    raise failure_value
