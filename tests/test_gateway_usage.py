"""Reading a model call's usage from the response bytes the gateway forwards (issue 12).

The streams here are the API's documented event sequence; one is produced by the loopback fake
upstream over real HTTP, and its bytes, split at every position, must read the same as whole.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from claudepool.gateway.usage import CallUsage, StreamUsage, usage_of_body
from claudepool.testing.fake_upstream import FakeUpstream


def sse(event: str, data: Any, *, eol: bytes = b"\n") -> bytes:
    return b"event: " + event.encode() + eol + b"data: " + orjson.dumps(data) + eol + eol


START: dict[str, Any] = {"type": "message_start", "message": {
    "id": "msg_01", "type": "message", "role": "assistant", "model": "claude-sonnet-4-5", "content": [],
    "stop_reason": None, "usage": {"input_tokens": 25, "cache_read_input_tokens": 1000,
                                   "cache_creation_input_tokens": 300, "output_tokens": 1,
                                   "cache_creation": {"ephemeral_5m_input_tokens": 100,
                                                      "ephemeral_1h_input_tokens": 200}}}}
TEXT_START = {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}
DELTA_TEXT = {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Hello"}}
MESSAGE_DELTA = {"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                 "usage": {"output_tokens": 15}}
WHOLE = (sse("message_start", START) + sse("content_block_start", TEXT_START) + sse("ping", {"type": "ping"})
         + sse("content_block_delta", DELTA_TEXT) + sse("content_block_stop", {"type": "content_block_stop",
                                                                               "index": 0})
         + sse("message_delta", MESSAGE_DELTA) + sse("message_stop", {"type": "message_stop"}))


def read(*chunks: bytes) -> CallUsage:
    stream = StreamUsage()
    for i, chunk in enumerate(chunks):
        stream.feed(chunk, now=float(i))
    return stream.usage


def counts(usage: CallUsage) -> CallUsage:
    """The usage without its timing (which chunk a content block began in differs by chunking)."""
    return dataclasses.replace(usage, first_content_at=None)


def test_a_whole_stream_reports_both_sides_and_the_cache_split() -> None:
    u = read(WHOLE)
    assert (u.message_id, u.model, u.stop_reason, u.complete) == ("msg_01", "claude-sonnet-4-5", "end_turn", True)
    assert (u.input_tokens, u.output_tokens, u.cache_read_tokens) == (25, 15, 1000)
    assert (u.cache_write_5m_tokens, u.cache_write_1h_tokens, u.cache_write_tokens) == (100, 200, 300)
    assert u.skipped_events == 0


@given(st.lists(st.integers(min_value=0, max_value=len(WHOLE)), max_size=12))
def test_any_chunking_reads_the_same(cuts: list[int]) -> None:
    edges = [0, *sorted(cuts), len(WHOLE)]
    assert counts(read(*(WHOLE[a:b] for a, b in itertools.pairwise(edges)))) == counts(read(WHOLE))


def test_crlf_line_ends_read_the_same() -> None:
    crlf = b"".join(sse(e, d, eol=b"\r\n") for e, d in [("message_start", START), ("message_delta", MESSAGE_DELTA),
                                                         ("message_stop", {"type": "message_stop"})])
    assert read(crlf) == counts(read(WHOLE))  # (this stream has no content block)


def test_a_stream_cut_mid_way_bills_what_it_reported_so_far() -> None:
    cut = WHOLE.index(b"event: message_delta")
    u = read(WHOLE[:cut])
    assert (u.input_tokens, u.cache_read_tokens, u.output_tokens, u.complete) == (25, 1000, 1, False)
    half_event = read(WHOLE[:cut + 30])  # the message_delta event has not ended: it is not counted
    assert half_event.output_tokens == 1


def test_cumulative_input_counts_in_message_delta_replace_the_start_ones() -> None:
    delta = {"type": "message_delta", "delta": {"stop_reason": "tool_use"},
             "usage": {"input_tokens": 30, "cache_creation_input_tokens": 350, "output_tokens": 40}}
    u = read(sse("message_start", START) + sse("message_delta", delta))
    assert (u.input_tokens, u.output_tokens, u.stop_reason) == (30, 40, "tool_use")
    # The total is authoritative; the 1-hour part stays as the start reported it.
    assert (u.cache_write_5m_tokens, u.cache_write_1h_tokens) == (150, 200)


def test_writes_without_a_breakdown_are_five_minute_ones() -> None:
    start = {"type": "message_start", "message": {"id": "m", "usage": {"input_tokens": 1, "output_tokens": 1,
                                                                       "cache_creation_input_tokens": 70}}}
    u = read(sse("message_start", start))
    assert (u.cache_write_5m_tokens, u.cache_write_1h_tokens) == (70, 0)


def test_an_error_event_is_reported_and_unknown_events_are_ignored() -> None:
    error = {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}
    u = read(sse("message_start", START) + sse("future_event", {"x": 1}) + sse("error", error))
    assert (u.error_type, u.complete, u.skipped_events, u.input_tokens) == ("overloaded_error", False, 0, 25)


def test_time_to_first_token_is_when_the_first_content_block_began() -> None:
    head, tail = WHOLE.split(b"event: content_block_start", 1)
    u = read(head, b"event: content_block_start" + tail)
    assert u.first_content_at == 1.0


def test_an_oversize_event_is_skipped_and_the_buffer_stays_bounded() -> None:
    stream = StreamUsage(max_event_bytes=1000)
    stream.feed(sse("message_start", START), now=0.0)
    big = sse("content_block_delta", {"type": "content_block_delta", "delta": {"text": "x" * 10_000}})
    for i in range(0, len(big), 700):
        stream.feed(big[i:i + 700], now=1.0)
        assert len(stream._buffer) <= 1000 + 700
    stream.feed(sse("message_delta", MESSAGE_DELTA) + sse("message_stop", {"type": "message_stop"}), now=2.0)
    u = stream.usage
    assert (u.skipped_events, u.output_tokens, u.complete) == (1, 15, True)


def test_garbage_data_is_counted_not_raised() -> None:
    u = read(b"event: message_delta\ndata: {not json\n\n" + sse("message_start", START))
    assert (u.skipped_events, u.input_tokens) == (1, 25)


def test_a_json_body_reports_its_usage() -> None:
    body = orjson.dumps({**START["message"], "stop_reason": "end_turn",
                         "usage": {"input_tokens": 9, "output_tokens": 4, "cache_read_input_tokens": 2}})
    u = usage_of_body(body)
    assert (u.message_id, u.input_tokens, u.output_tokens, u.cache_read_tokens, u.complete) == ("msg_01", 9, 4, 2, True)
    assert usage_of_body(b'{"type":"error","error":{"type":"api_error"}}').complete is False
    assert usage_of_body(b"not json") == CallUsage()


@pytest.fixture
async def upstream() -> AsyncIterator[FakeUpstream]:
    fake = FakeUpstream()
    await fake.start()
    yield fake
    await fake.stop()


@pytest.mark.parametrize("chunks", ["[[chunks:5]] hello there, a longer answer", "short"])
async def test_the_fake_upstreams_stream_reads_as_the_usage_it_reported(upstream: FakeUpstream, chunks: str) -> None:
    request = {"model": "claude-test", "max_tokens": 100, "stream": True,
               "system": [{"type": "text", "text": "be brief " * 50, "cache_control": {"type": "ephemeral"}}],
               "messages": [{"role": "user", "content": chunks}]}
    for _ in range(2):  # the second call reads the cache the first one wrote
        async with aiohttp.ClientSession() as http, http.post(f"{upstream.base_url}/v1/messages",
                                                              json=request) as resp:
            raw = await resp.read()
        recorded = upstream.message_requests()[-1].usage
        assert recorded is not None
        u = read(raw)
        assert u.complete
        assert (u.input_tokens, u.output_tokens, u.cache_read_tokens, u.cache_write_tokens) == (
            recorded["input_tokens"], recorded["output_tokens"], recorded["cache_read_input_tokens"],
            recorded["cache_creation_input_tokens"])
        # Byte by byte, as a slow connection delivers it.
        assert counts(read(*(raw[i:i + 1] for i in range(len(raw))))) == counts(read(raw))
    assert u.cache_read_tokens > 0
