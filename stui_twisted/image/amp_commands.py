"""The AMP contract between the server (supervisor) and the image child.

AMP limits one value to 64 KiB, while code, stored bindings and results can be
megabytes, so every payload travels as L{ChunkedJSON}.  Every command
answers one C{reply} envelope, C{{"ok": true, "result": ...}} or
C{{"ok": false, "error_type": ..., "message": ..., "details": {...}}}, so
error details (which include persistence deltas) are not squeezed into AMP's
size-limited error boxes either.
"""

from __future__ import annotations

import json

from twisted.internet import defer
from twisted.protocols import amp

from stui_twisted.protocol.jsoncodec import COMPACT_ALLOW_NAN

CHUNK_BYTES = 60_000

#: wire name -> Python identifier (AMP converts the name of every argument of every box)
_IDENTIFIERS: dict[bytes, str] = {}


def _identifier(name: bytes) -> str:
    """C{amp._wireNameToPythonIdentifier(name)}, converted once per name."""
    identifier = _IDENTIFIERS.get(name)
    if identifier is None:
        identifier = _IDENTIFIERS[name] = amp._wireNameToPythonIdentifier(name)
    return identifier


def _is_plain(argument: amp.Argument) -> bool:
    """Whether C{argument} boxes one value under its name as L{amp.Argument} does."""
    kind = type(argument)
    return (
        kind.toBox is amp.Argument.toBox
        and kind.fromBox is amp.Argument.fromBox
        and kind.retrieve is amp.Argument.retrieve
    )


def _names(arguments: list) -> list[tuple[bytes, str, amp.Argument, bool]]:
    return [
        (wire, _identifier(wire), argument, _is_plain(argument)) for wire, argument in arguments
    ]


def _to_box(names: list, objects: dict, strings, proto):
    """L{amp._objectsToStrings}, with the names converted once."""
    objects = dict(objects)
    for wire, identifier, argument, plain in names:
        if not plain:
            argument.toBox(wire, strings, objects, proto)
        elif argument.optional:
            value = objects.pop(identifier, None)
            if value is not None:
                strings[wire] = argument.toStringProto(value, proto)
        else:
            strings[wire] = argument.toStringProto(objects.pop(identifier), proto)
    return strings


def _from_box(names: list, strings, proto) -> dict:
    """L{amp._stringsToObjects}, with the names converted once."""
    objects: dict = {}
    strings = strings.copy()
    for wire, identifier, argument, plain in names:
        if not plain:
            argument.fromBox(wire, strings, objects, proto)
            continue
        value = strings.pop(wire, None)
        if value is not None:
            objects[identifier] = argument.fromStringProto(value, proto)
        elif argument.optional:
            objects[identifier] = None
        else:
            raise KeyError(wire)
    return objects


class Command(amp.Command):
    """L{amp.Command} that converts its argument names once, not in every box.

    AMP turns each wire name into its Python identifier for every argument of
    every box, and once more for the check of C{makeArguments}: a third of
    boxing an L{Evaluate} call (issue 21).  The boxes are AMP's.
    """

    @classmethod
    def _names(cls) -> tuple[list, list, frozenset]:
        names = cls.__dict__.get("_argument_names")
        if names is None:
            arguments = _names(cls.arguments)
            names = (arguments, _names(cls.response), frozenset(n[1] for n in arguments))
            cls._argument_names = names
        return names

    @classmethod
    def makeArguments(cls, objects, proto):  # noqa: N802 - AMP's name
        arguments, _response, allowed = cls._names()
        for name in objects:
            if name not in allowed:
                raise amp.InvalidSignature(f"{name} is not a valid argument")
        return _to_box(arguments, objects, cls.commandType(), proto)

    @classmethod
    def makeResponse(cls, objects, proto):  # noqa: N802 - AMP's name
        try:
            response_type = cls.responseType()
        except BaseException:
            return defer.fail()
        return _to_box(cls._names()[1], objects, response_type, proto)

    @classmethod
    def parseArguments(cls, box, protocol):  # noqa: N802 - AMP's name
        return _from_box(cls._names()[0], box, protocol)

    @classmethod
    def parseResponse(cls, box, protocol):  # noqa: N802 - AMP's name
        return _from_box(cls._names()[1], box, protocol)


class ChunkedJSON(amp.Argument):
    """A JSON value of any size, split over the keys C{name.0}, C{name.1}, ...

    The value is encoded once, cut into chunks below AMP's value limit and
    reassembled (as bytes, so a UTF-8 character cut in two is harmless).
    Strings may hold lone surrogates (C{chr(0xD800)} is a valid Python string,
    and JSON's C{"\\ud800"} decodes to one): they cross as their
    C{surrogatepass} bytes and come back unchanged, where strict UTF-8 would
    fail the whole request.
    """

    def toBox(self, name, strings, objects, proto):
        key = _identifier(name)
        value = objects.pop(key, None)
        if value is None and self.optional:
            return
        encoded = COMPACT_ALLOW_NAN.encode(value).encode("utf-8", "surrogatepass")
        chunks = [
            encoded[start : start + CHUNK_BYTES] for start in range(0, len(encoded), CHUNK_BYTES)
        ]
        for index, chunk in enumerate(chunks):
            strings[name + b"." + str(index).encode("ascii")] = chunk

    def fromBox(self, name, strings, objects, proto):
        parts = []
        while True:
            chunk = strings.pop(name + b"." + str(len(parts)).encode("ascii"), None)
            if chunk is None:
                break
            parts.append(chunk)
        key = _identifier(name)
        if not parts:
            if not self.optional:
                raise KeyError(name)
            objects[key] = None
            return
        objects[key] = json.loads(b"".join(parts).decode("utf-8", "surrogatepass"))


REPLY = [(b"reply", ChunkedJSON())]


class BoxParsingAMP(amp.AMP):
    """L{amp.AMP} that splits what it reads into boxes in one loop.

    AMP's own parser hands every key and every value to C{stringReceived}
    through a state machine, about five Python calls each: a box of
    L{Evaluate} has fifteen strings, and parsing it was a fifth of the
    image's AMP work per evaluation (issue 21).  The wire format is AMP's:
    2-byte big-endian lengths, a key (1-255 bytes) and its value, then a
    zero length.  A key longer than 255 bytes closes the connection as AMP
    does (L{lengthLimitExceeded}).  Nothing on the image's pipes switches
    protocol (L{amp.ProtocolSwitchCommand}) or starts TLS; a switched
    protocol still gets its bytes the way AMP passes them.
    """

    _unparsed = b""
    """The bytes after the last complete key and value: at most one key and value."""
    _partial: amp.AmpBox | None = None
    """The keys and values of a box not yet complete (a large box arrives in many reads)."""

    def dataReceived(self, data: bytes) -> None:
        if self.innerProtocol is not None:
            self.innerProtocol.dataReceived(data)
            return
        # Only what follows the last complete key and value is kept between reads,
        # with the box built so far: an 8 MiB box arriving in 64 KiB reads is
        # parsed once, not re-read (and copied) from its start on every read.
        buffer = self._unparsed + data if self._unparsed else data
        end = len(buffer)
        at = 0
        box = self._partial
        while True:
            if box is None:
                box = amp.AmpBox()
            complete = False
            while at + 2 <= end:
                length = buffer[at] << 8 | buffer[at + 1]
                if not length:
                    complete = True
                    break
                if length > self._MAX_KEY_LENGTH:
                    self._unparsed, self._partial = b"", None
                    self.lengthLimitExceeded(length)
                    return
                key_end = at + 2 + length
                if key_end + 2 > end:
                    break
                value_end = key_end + 2 + (buffer[key_end] << 8 | buffer[key_end + 1])
                if value_end > end:
                    break
                box[buffer[at + 2 : key_end]] = buffer[key_end + 2 : value_end]
                at = value_end
            if not complete:  # the box goes on in a later read
                self._partial = box
                self._unparsed = buffer[at:]
                return
            at += 2
            self._partial, self._unparsed = None, b""
            self.boxReceiver.ampBoxReceived(box)
            box = None
            if self.innerProtocol is not None:  # the box switched protocols
                rest = buffer[at:]
                if rest:
                    self.innerProtocol.dataReceived(rest)
                return


class Ping(Command):
    """Is the child up?  Answers its pid; the first answer marks it ready."""

    arguments = []
    response = [(b"pid", amp.Integer()), (b"python_version", amp.Unicode(optional=True))]


class Evaluate(Command):
    """Run C{code} as a REPL cell on the session's worker thread.

    C{cell_index} is the history index the evaluation will get; tracebacks
    name the cell C{<cell N>} by it.
    """

    arguments = [
        (b"session_id", amp.Unicode()),
        (b"code", ChunkedJSON()),
        (b"mode", amp.Unicode()),
        (b"timeout", amp.Float(optional=True)),
        (b"cell_index", amp.Integer(optional=True)),
    ]
    response = REPLY


class Interrupt(Command):
    """Stop the session's running evaluation; answers whether one was running."""

    arguments = [(b"session_id", amp.Unicode())]
    response = [(b"interrupted", amp.Boolean())]


class Materialize(Command):
    """Rebuild a session's namespace and registry from stored bindings."""

    arguments = [
        (b"session_id", amp.Unicode()),
        (b"bindings", ChunkedJSON()),
        (b"registry", ChunkedJSON()),
        (b"next_object_id", amp.Integer()),
        (b"timeout", amp.Float(optional=True)),
    ]
    response = REPLY


class MaterializeShared(Command):
    """Rebuild the image-wide C{shared} object from stored bindings."""

    arguments = [(b"bindings", ChunkedJSON())]
    response = REPLY


class Inspect(Command):
    """Describe a registry object or the value of an expression."""

    arguments = [
        (b"session_id", amp.Unicode()),
        (b"object_id", amp.Unicode(optional=True)),
        (b"expression", ChunkedJSON(optional=True)),
        (b"limit", amp.Integer()),
        (b"timeout", amp.Float(optional=True)),
    ]
    response = REPLY


class Complete(Command):
    """Completion candidates for C{code} at C{cursor_pos}."""

    arguments = [
        (b"session_id", amp.Unicode()),
        (b"code", ChunkedJSON()),
        (b"cursor_pos", amp.Integer()),
    ]
    response = REPLY


class Snapshot(Command):
    """Every binding of the session, freshly serialized."""

    arguments = [(b"session_id", amp.Unicode())]
    response = REPLY


class Clear(Command):
    """Forget the session's variables and/or registry objects."""

    arguments = [(b"session_id", amp.Unicode()), (b"parts", ChunkedJSON())]
    response = REPLY


class DropSession(Command):
    """Forget everything about a (closed) session."""

    arguments = [(b"session_id", amp.Unicode())]
    response = REPLY


class Browse(Command):
    """A browse-tool operation (list_classes, browse_class, get_method, system_info)."""

    arguments = [
        (b"session_id", amp.Unicode()),
        (b"operation", amp.Unicode()),
        (b"arguments", ChunkedJSON()),
    ]
    response = REPLY


class Debug(Command):
    """A debugger operation (debugger.md): answered off the session's worker,
    which may be the paused thread."""

    arguments = [
        (b"session_id", amp.Unicode()),
        (b"operation", amp.Unicode()),
        (b"arguments", ChunkedJSON()),
    ]
    response = REPLY


class OutputChunk(Command):
    """Child to server: output a running evaluation wrote (see L{stui_twisted.image.streaming}).

    C{pieces} is a list of C{[name, text]}, C{name} C{"stdout"} or C{"stderr"}.
    """

    arguments = [
        (b"session_id", amp.Unicode()),
        (b"history_index", amp.Integer(optional=True)),
        (b"pieces", ChunkedJSON()),
    ]
    response = []


class RequestInput(Command):
    """From the image to the server: a cell called C{input()} (events.md §5).

    C{cell_index} is the history index of the evaluation.  The answer is
    C{text} (what the client sent), or C{eof} (why nobody can answer: the
    cell's C{input()} raises C{EOFError} with it).
    """

    arguments = [
        (b"session_id", amp.Unicode()),
        (b"cell_index", amp.Integer(optional=True)),
        (b"prompt", ChunkedJSON()),
        (b"password", amp.Boolean()),
    ]
    response = [(b"text", ChunkedJSON(optional=True)), (b"eof", amp.Unicode(optional=True))]


class DebugEvent(Command):
    """Child to server: a session's evaluation paused or resumed in the debugger
    (C{debug_paused} / C{debug_resumed}, debugger.md §2); no answer."""

    arguments = [
        (b"session_id", amp.Unicode()),
        (b"event", amp.Unicode()),
        (b"data", ChunkedJSON()),
    ]
    requiresAnswer = False
