"""Streams, subscriptions and per-connection outboxes (events.md §1-§2).

The L{EventHub} numbers events per stream, keeps session events in their
durable L{EventLog} and the team's last 1,000 in memory, and hands each new
event to the L{Outbox} of every subscribed conversation.  An outbox writes
only while its transport accepts data; what waits is bounded (events and
bytes), and past the bound it is replaced by one C{dropped} marker per stream,
so a slow or vanished subscriber costs bounded memory and nobody else waits.
A session's log file is first read in a thread (L{EventHub.load}, which the
session service awaits before it uses a session); what is published to it
meanwhile waits and is numbered after the file's last seq.
"""

from __future__ import annotations

import time
from collections import deque

from twisted.internet import defer, threads
from twisted.logger import Logger

from stui_twisted.events.log import MAX_OUTPUT_TEXT, EventLog, log_path, remove_log
from stui_twisted.protocol.jsoncodec import COMPACT_ALLOW_NAN
from stui_twisted.protocol.timefmt import iso_timestamp

TEAM = "team"
TEAM_KEPT = 1000


def _timestamp(seconds: float) -> str:
    return iso_timestamp(seconds)


def encode_event(message: dict) -> bytes:
    return COMPACT_ALLOW_NAN.encode(message).encode("utf-8", "surrogatepass")


def clip_text(text: str, limit: int = MAX_OUTPUT_TEXT) -> str:
    if len(text) <= limit:
        return text
    return text[:limit] + f"… [{len(text) - limit} more characters]"


class Outbox:
    """The events waiting to be written to one conversation."""

    def __init__(self, connection, *, max_events: int, max_bytes: int, on_close=None) -> None:
        self.connection = connection
        self._on_close = on_close
        self.max_events = max_events
        self.max_bytes = max_bytes
        self.pending: deque[tuple[str, str | None, int, bytes]] = deque()
        self.bytes = 0
        self.streams: set[str] = set()  # stream keys subscribed here
        self.closed = False
        self.dropped = 0  # events dropped so far (statistics)
        # stream key -> [session_id, from_seq, to_seq] of dropped events not yet reported
        self._dropped: dict[str, list] = {}

    def writable(self) -> bool:
        check = getattr(self.connection, "events_writable", None)
        return True if check is None else check()

    def push(self, key: str, session_id: str | None, seq: int, data: bytes) -> None:
        if self.closed:
            return
        if not self.pending and not self._dropped and self.writable():
            self.connection.sendEvent(data)
            return
        self.pending.append((key, session_id, seq, data))
        self.bytes += len(data)
        if len(self.pending) > self.max_events or self.bytes > self.max_bytes:
            self._drop()

    def _drop(self) -> None:
        """Forget everything pending; remember its seq range per stream for the marker."""
        for key, session_id, seq, _data in self.pending:
            span = self._dropped.setdefault(key, [session_id, seq, seq])
            span[2] = seq
        self.dropped += len(self.pending)
        self.pending.clear()
        self.bytes = 0

    def close(self) -> None:
        """The conversation went away: forget what waits and every subscription."""
        if self._on_close is not None:
            on_close, self._on_close = self._on_close, None
            on_close()
        self.closed = True
        self.pending.clear()
        self._dropped.clear()
        self.bytes = 0

    def drain(self) -> None:
        """Write what waits, while the transport takes it: markers first, then events."""
        while self._dropped and not self.closed and self.writable():
            key = next(iter(self._dropped))
            session_id, first, last = self._dropped.pop(key)
            marker = {
                "event": "dropped",
                "stream": TEAM if key == TEAM else "session",
                "session_id": session_id,
                "from_seq": first,
                "to_seq": last,
            }
            self.connection.sendEvent(encode_event(marker))
        while self.pending and not self._dropped and not self.closed and self.writable():
            _key, _sid, _seq, data = self.pending.popleft()
            self.bytes -= len(data)
            self.connection.sendEvent(data)


class _Stream:
    def __init__(self, key: str, log: EventLog) -> None:
        self.key = key
        self.log = log
        self.subscribers: dict[int, Outbox] = {}
        self.waiters: list[defer.Deferred] = []
        self.loaded = log.path is None  # its file was read (a file-less log has none)
        self.loading: defer.Deferred | None = None
        self.load_waiters: list[defer.Deferred] = []
        self.queued: list[tuple[str, dict, float]] = []  # published while it loaded
        # connection id -> [client id, access] of subscribers that are not the owner
        self.watchers: dict[int, list[str]] = {}

    def watching(self, client_id: str) -> bool:
        """Whether a conversation of C{client_id} still watches this stream."""
        return any(who == client_id for who, _access in self.watchers.values())


class EventHub:
    """Every stream of the server, and who is subscribed to which."""

    log = Logger()

    def __init__(
        self,
        reactor,
        data_dir: str | None,
        *,
        durability: str = "batch",
        log_limit: int = 1000,
        log_bytes: int = 4 * 1024**2,
        pending_events: int = 1000,
        pending_bytes: int = 8 * 1024**2,
        flush_interval: float = 0.1,
    ) -> None:
        self.reactor = reactor
        self.flush_interval = flush_interval
        self._sync_call = None
        self.data_dir = data_dir
        self.durability = durability
        self.log_limit = log_limit
        self.log_bytes = log_bytes
        self.pending_events = pending_events
        self.pending_bytes = pending_bytes
        self._streams: dict[str, _Stream] = {TEAM: _Stream(TEAM, EventLog(None, limit=TEAM_KEPT))}
        self.presence = None  # the Presence (events/presence.py) once one is made
        # logs of dropped streams still writing what they held: read again after it
        self._closing: dict[str, defer.Deferred] = {}
        self._appended: set[str] = set()  # streams appended to since the last batch sync

    # -- streams -----------------------------------------------------------

    def _stream(self, key: str) -> _Stream:
        """The stream of C{key}, its log read now if it was not yet (the service
        reads it in a thread first, with L{load}; this is for direct callers)."""
        stream = self._streams.get(key) or self._new_stream(key)
        if not stream.loaded:
            self._loaded(stream, stream.log.read())
        return stream

    def _new_stream(self, key: str) -> _Stream:
        path = None if self.data_dir is None else log_path(self.data_dir, key)
        stream = _Stream(key, EventLog(path, limit=self.log_limit, max_bytes=self.log_bytes))
        self._streams[key] = stream
        return stream

    def load(self, key: str) -> defer.Deferred:
        """Fires once C{key}'s log file has been read (in a thread, never the reactor)."""
        stream = self._streams.get(key) or self._new_stream(key)
        if stream.loaded:
            return defer.succeed(None)
        if stream.loading is None:
            closing = self._closing.get(key)
            if closing is None:
                stream.loading = threads.deferToThread(stream.log.read)
            else:  # an earlier copy of this log is still writing its last lines
                stream.loading = loading = defer.Deferred()

                def read_after(_):
                    threads.deferToThread(stream.log.read).chainDeferred(loading)

                closing.addBoth(read_after)
            stream.loading.addCallbacks(
                lambda read: self._loaded(stream, read),
                lambda failure: self._load_failed(stream, failure),
            )
        waiter: defer.Deferred = defer.Deferred()
        stream.load_waiters.append(waiter)
        return waiter

    def _load_failed(self, stream: _Stream, failure) -> None:
        self.log.failure("the event log of a session could not be read", failure)
        self._loaded(stream, ([], False))  # kept in memory; appends are tried again

    def _loaded(self, stream: _Stream, read) -> None:
        if stream.loaded:
            return  # read synchronously meanwhile
        stream.log.load(read)
        stream.loaded = True
        queued, stream.queued = stream.queued, []
        for event, data, at in queued:
            self._publish(stream, event, data, at)
        waiters, stream.load_waiters = stream.load_waiters, []
        for waiter in waiters:
            waiter.callback(None)

    def event_log(self, key: str) -> EventLog:
        return self._stream(key).log

    def publish(self, session_id: str | None, event: str, data: dict) -> dict | None:
        """Number, keep and fan out one event; C{session_id=None} is the team stream.

        On a stream whose log is still being read the event waits for it
        (answers None): numbering goes on from the file's last seq.
        """
        key = TEAM if session_id is None else session_id
        stream = self._streams.get(key) or self._new_stream(key)
        if not stream.loaded:
            stream.queued.append((event, data, time.time()))
            self.load(key)
            return None
        return self._publish(stream, event, data, time.time())

    def _publish(self, stream: _Stream, event: str, data: dict, at: float) -> dict:
        key = stream.key
        session_id = None if key == TEAM else key
        message = {
            "event": event,
            "stream": TEAM if session_id is None else "session",
            "session_id": session_id,
            "seq": stream.log.next_seq(),
            "timestamp": _timestamp(at),
            "data": data,
        }
        if session_id is None:
            del message["session_id"]  # the team stream names no session (events.md §1)
        encoded = stream.log.append(message)  # in memory; written by the next sync
        if session_id is not None:
            # written within the flush interval whatever the policy (under
            # always the service also syncs before the reply that follows)
            self._appended.add(key)
            self.schedule_sync()
        for outbox in list(stream.subscribers.values()):
            outbox.push(key, session_id, message["seq"], encoded)
        waiters, stream.waiters = stream.waiters, []
        for waiter in waiters:
            if not waiter.called:
                waiter.callback(None)
        return message

    def server_stopping(self) -> None:
        """A clean stop begins: tell the team before any connection closes."""
        self.publish(None, "server_stopping", {})

    def sync(self, session_id: str) -> defer.Deferred:
        """Fires when the session's events are on disk (awaited under C{always})."""
        stream = self._streams.get(session_id)
        if stream is None:
            return defer.succeed(None)
        return stream.log.sync()

    def schedule_sync(self) -> None:
        """Fsync every log within C{flush_interval} (after each event under C{batch})."""
        if self._sync_call is None or not self._sync_call.active():
            self._sync_call = self.reactor.callLater(self.flush_interval, self._batch_sync)

    def _batch_sync(self) -> None:
        """Write the logs appended to since the last one (not every stream in
        memory: with 10,000 idle sessions that was half a second a pass)."""
        keys, self._appended = self._appended, set()
        for key in keys:
            stream = self._streams.get(key)
            if stream is not None:
                stream.log.sync().addErrback(self._sync_failed, key)

    def _sync_failed(self, failure, key: str) -> None:
        self.log.failure("an event log could not be written; trying again", failure)
        self._appended.add(key)  # its lines stay pending (EventLog.sync)
        self.schedule_sync()

    def sync_all(self) -> defer.Deferred:
        """Fires when every log's appends are on disk (at shutdown)."""
        return defer.gatherResults(
            [s.log.sync() for k, s in self._streams.items() if k != TEAM and s.log.unwritten],
            consumeErrors=True,
        )

    def clear(self, session_id: str) -> None:
        self._stream(session_id).log.clear()

    def forget(self, session_id: str) -> None:
        """Close a session's log file (the session is gone from memory)."""
        stream = self._streams.get(session_id)
        if stream is not None and stream.loaded and not stream.subscribers:
            self._drop_stream(stream)

    def _drop_stream(self, stream: _Stream) -> None:
        del self._streams[stream.key]
        closing = stream.log.close()
        closing.addErrback(
            lambda failure: self.log.failure("an event log could not be written", failure)
        )
        self._closing[stream.key] = closing

        def closed(_, key=stream.key):
            if self._closing.get(key) is closing:
                del self._closing[key]

        closing.addBoth(closed)
        stream.loaded = True  # a read still running finds it done: nothing is appended
        stream.queued.clear()
        waiters = stream.waiters + stream.load_waiters
        stream.waiters, stream.load_waiters = [], []
        for waiter in waiters:
            if not waiter.called:
                waiter.callback(None)

    def delete(self, session_id: str) -> defer.Deferred:
        """The session is deleted for good: forget its stream and remove its log
        file (in a thread); its subscribers are unsubscribed."""
        stream = self._streams.get(session_id)
        settled: defer.Deferred = defer.succeed(None)
        if stream is not None:
            for outbox in stream.subscribers.values():
                outbox.streams.discard(session_id)
            stream.subscribers.clear()
            self._drop_stream(stream)
            settled = stream.log.sync()  # a compaction in flight finishes first
        if self.data_dir is None:
            return settled
        path = log_path(self.data_dir, session_id)
        return settled.addCallback(lambda _: threads.deferToThread(remove_log, path))

    # -- subscriptions -------------------------------------------------------

    def outbox_of(self, context, connection):
        outbox = getattr(context, "outbox", None)
        if outbox is None:
            outbox = Outbox(
                connection,
                max_events=self.pending_events,
                max_bytes=self.pending_bytes,
                on_close=lambda: self.connection_closed(context),
            )
            context.outbox = outbox
        return outbox

    def subscribe(self, context, connection, key: str, since: int | None, watcher=None) -> dict:
        """Replay (C{seq > since}) then live, in one reactor turn: no gap, no duplicate.

        @param watcher: C{(client id, access)} when the subscriber is not the
            session's owner but a principal it is shared with (access.md):
            the stream gets C{watcher_joined} when that principal's first
            conversation subscribes, and C{watcher_left} when its last one goes.
        """
        stream = self._stream(key)
        log = stream.log
        replay = [] if since is None else log.since_encoded(since)
        pushes = connection is not None and getattr(connection, "accepts_events", lambda: True)()
        if pushes:
            outbox = self.outbox_of(context, connection)
            session_id = None if key == TEAM else key
            for seq, encoded in replay:
                outbox.push(key, session_id, seq, encoded)
            stream.subscribers[context.connection_id] = outbox
            outbox.streams.add(key)
            if watcher is not None:
                self._watcher_joined(stream, context.connection_id, *watcher)
        return {
            "stream": TEAM if key == TEAM else "session",
            "session_id": None if key == TEAM else key,
            "last_seq": log.last_seq,
            "first_seq": log.first_seq,
            "replayed": len(replay) if pushes else 0,
            "truncated": since is not None and log.truncated(since),
            "pushed": pushes,
        }

    def unsubscribe(self, context, key: str) -> bool:
        stream = self._streams.get(key)
        if stream is None or stream.subscribers.pop(context.connection_id, None) is None:
            return False
        outbox = getattr(context, "outbox", None)
        if outbox is not None:
            outbox.streams.discard(key)
        self._watcher_gone(stream, context.connection_id)
        return True

    # -- watchers (access.md: principals a session is shared with) ------------

    def _watcher_joined(self, stream: _Stream, connection_id: int, client_id: str, access: str):
        known = stream.watching(client_id)
        stream.watchers[connection_id] = [client_id, access]
        if not known:
            self.publish(stream.key, "watcher_joined", {"client_id": client_id, "access": access})

    def _watcher_gone(self, stream: _Stream, connection_id: int) -> None:
        entry = stream.watchers.pop(connection_id, None)
        if entry is not None and not stream.watching(entry[0]):
            client_id, access = entry
            self.publish(stream.key, "watcher_left", {"client_id": client_id, "access": access})

    def share_changed(self, session_id: str, client_id: str, access: str | None) -> None:
        """C{client_id}'s share of the session is now C{access} (None: taken away).

        Taken away, every subscription of C{client_id} to the session ends at
        once: C{watcher_left} is published first (so the watcher's own
        conversations receive it as their last event of the stream), then its
        conversations are unsubscribed.
        """
        stream = self._streams.get(session_id)
        if stream is None:
            return
        ids = [cid for cid, (who, _a) in stream.watchers.items() if who == client_id]
        if not ids:
            return
        if access is not None:
            for connection_id in ids:
                stream.watchers[connection_id][1] = access
            return
        last_access = stream.watchers[ids[0]][1]
        self.publish(session_id, "watcher_left", {"client_id": client_id, "access": last_access})
        for connection_id in ids:
            del stream.watchers[connection_id]
            outbox = stream.subscribers.pop(connection_id, None)
            if outbox is not None:
                outbox.streams.discard(session_id)

    def connection_closed(self, context) -> None:
        """Drop every subscription of a conversation that went away."""
        if self.presence is not None:
            self.presence.closed(context)
        outbox = getattr(context, "outbox", None)
        if outbox is None:
            return
        outbox.closed = True
        outbox.pending.clear()
        outbox.bytes = 0
        for key in outbox.streams:
            stream = self._streams.get(key)
            if stream is not None:
                stream.subscribers.pop(context.connection_id, None)
                self._watcher_gone(stream, context.connection_id)
        outbox.streams.clear()
        context.outbox = None

    def subscribers(self, key: str) -> int:
        stream = self._streams.get(key)
        return 0 if stream is None else len(stream.subscribers)

    async def get_events(self, key: str, since: int, limit: int, wait: float) -> dict:
        stream = self._stream(key)
        if wait > 0 and stream.log.last_seq <= since:
            waiter: defer.Deferred = defer.Deferred()
            stream.waiters.append(waiter)
            timer = self.reactor.callLater(wait, lambda: waiter.called or waiter.callback(None))
            try:
                await waiter
            finally:
                if timer.active():
                    timer.cancel()
                if waiter in stream.waiters:
                    stream.waiters.remove(waiter)
            stream = self._streams.get(key, stream)
        log = stream.log
        return {
            "events": log.since(since, limit),
            "last_seq": log.last_seq,
            "first_seq": log.first_seq,
            "truncated": log.truncated(since),
        }
