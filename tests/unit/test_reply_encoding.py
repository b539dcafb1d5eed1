"""The fast reply paths of issue 21 give exactly the bytes of the general ones.

Replies are written as text around the encoded result, C{ping}'s result keeps
its constant text, and timestamps are formatted once per millisecond; each is
checked here against the encoding it replaces.
"""

from __future__ import annotations

import json
import math
import random
from datetime import UTC, datetime

import pytest

from stui_twisted.dispatch.commands import PingTexts
from stui_twisted.protocol import envelope, timefmt
from stui_twisted.protocol.envelope import EncodedResult, encode_success, json_text
from stui_twisted.protocol.jsoncodec import COMPACT, COMPACT_ASCII
from tests.helpers import NullImageService, context, make_dispatcher

NOW = 1_764_590_400.123456


def dict_reply(request_id, result, now=NOW) -> bytes:
    """The reply as encoding the whole reply object gives it (the general path)."""
    reply = {
        "id": request_id,
        "status": "success",
        "result": result,
        "timestamp": timefmt.iso_timestamp(now),
    }
    try:
        return COMPACT.encode(reply).encode("utf-8")
    except UnicodeEncodeError:
        return COMPACT_ASCII.encode(reply).encode("ascii")


@pytest.mark.parametrize("request_id", [1, -7, 10**30, 1.5, None, "c-1", "é ✓ \u2028", 'q"\\'])
@pytest.mark.parametrize(
    "result",
    [{}, {"message": "pong"}, {"a": [1, 2.25, None, True], "b": {"c": "ü\n"}}, {"x": -0.0}],
)
def test_spliced_success_is_the_encoded_reply_object(request_id, result):
    assert encode_success(request_id, result, NOW) == dict_reply(request_id, result)


def test_results_the_splice_cannot_take_go_the_general_way():
    surrogate = {"text": "\ud800"}  # not UTF-8: the ASCII form, as before
    assert encode_success(1, surrogate, NOW) == dict_reply(1, surrogate)
    assert encode_success("\udfff", {}, NOW) == dict_reply("\udfff", {})
    nan = {"value": math.nan}  # not JSON: sanitized to its string form, as before
    assert json.loads(encode_success(1, nan, NOW))["result"] == {"value": "nan"}
    with pytest.raises(TypeError):
        encode_success(1, {"value": object()}, NOW)


def test_an_encoded_result_is_spliced_as_its_text():
    result = EncodedResult({"a": 1}, json_text({"a": 1}))
    assert result == {"a": 1}
    assert encode_success(3, result, NOW) == dict_reply(3, {"a": 1})


class _Service(NullImageService):
    """A service whose image status and uptime change between pings."""

    def __init__(self) -> None:
        super().__init__()
        self.status = {"status": "running", "pid": 41, "started_at": "x", "restarts": 0}
        self.up = 0.0

    def uptime(self) -> float:
        return self.up

    def image_status(self) -> dict:
        return dict(self.status)


def test_ping_reply_bytes_are_those_of_its_result_encoded_in_full():
    service = _Service()
    dispatcher = make_dispatcher(service)
    ping = dispatcher.commands()["ping"]
    line = b'{"id": 5, "command": "ping"}'
    for uptime, status in [
        (0.0, {"status": "running", "pid": 41, "started_at": "x", "restarts": 0}),
        (12.345, {"status": "running", "pid": 41, "started_at": "x", "restarts": 0}),
        (1e-7, {"status": "restarting", "pid": None, "started_at": None, "restarts": 1}),
        (86_400.5, {"status": "running", "pid": 42, "started_at": "ÿ", "restarts": 1}),
    ]:
        service.up, service.status = uptime, status
        reply = dispatcher.answer(context(), line)
        result = json.loads(reply)["result"]
        assert result["uptime"] == uptime and result["image"] == status
        assert reply == dict_reply(5, result, dispatcher._clock.seconds())
        assert isinstance(ping.handler(None), EncodedResult)


def test_ping_texts_are_kept_for_a_few_distinct_rests():
    texts = PingTexts()
    for n in range(3 * PingTexts.LIMIT):
        result = {"pid": n, "uptime": n / 3, "z": None}
        assert texts.encoded(result, (n,)).text == json_text(result)
        assert len(texts._texts) <= PingTexts.LIMIT
    first = {"uptime": 2.5, "a": "b"}
    assert texts.encoded(first, ("first",)).text == json_text(first)
    last = {"a": "b", "uptime": 1}
    assert texts.encoded(last, ("last",)).text == json_text(last)


def slow_timestamp(seconds: float) -> str:
    """The formatting that every timestamp had before it was kept per millisecond."""
    whole = math.floor(seconds)
    millis = min(999_999, round((seconds - whole) * 1_000_000)) // 1000
    return datetime.fromtimestamp(whole, UTC).strftime("%Y-%m-%dT%H:%M:%S.") + f"{millis:03d}Z"


def test_timestamps_kept_per_millisecond_are_the_formatted_ones(monkeypatch):
    monkeypatch.setattr(timefmt, "_last_millisecond", (1.0, 0.0, ""))
    rng = random.Random(21)
    base = 1_764_590_400.0
    times = [base + i * 0.0000997 for i in range(30_000)]  # forwards, through many edges
    times += [base + rng.randint(0, 3000) / 1000 + rng.uniform(-2e-6, 2e-6) for _ in range(20_000)]
    times += [base + 0.9995, base + 0.0004995, base + 0.9999999, 0.0, 1e-9, base + 0.1239995]
    for seconds in times:
        assert timefmt.iso_timestamp(seconds) == slow_timestamp(seconds), repr(seconds)
    assert envelope.iso_timestamp is timefmt.iso_timestamp


def test_iso_length_is_the_length_of_the_formatted_timestamp():
    rng = random.Random(5)
    edges = [-30_610_224_000.0, 253_402_300_800.0]  # 1000-01-01, 10000-01-01 (out of range)
    times = [edge + d for edge in edges[:1] for d in (-1.0, -0.0005, 0.0, 0.0004, 1.0)]
    times += [edges[1] - d for d in (0.0005, 0.999, 1.0, 86_400.0)]
    times += [rng.uniform(-6e10, 2.5e11) for _ in range(2000)] + [0.0, 1e-9, 1_764_590_400.9999]
    for seconds in times:
        assert timefmt.iso_length(seconds) == len(slow_timestamp(seconds)), repr(seconds)
