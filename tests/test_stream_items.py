"""What a streaming client sees of a turn (issue 13): the CLI's tool calls and results read from its
stream-json lines, turned into bounded `ToolUse` / `ToolResult` items, and framed for the socket."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from claudepool.protocol.cli_events import AssistantEvent, UserEvent, parse_event
from claudepool.protocol.framing import decode_object
from claudepool.protocol.wire import (
    ModelFallback,
    TextDelta,
    ToolResult,
    ToolUse,
    cut_utf8,
    stream_frame,
    stream_item_of_frame,
    stream_items,
)

# As the real CLI 2.1.328 printed them for `[[tool:Bash:echo hi]]` (trimmed of usage details).
REAL_TOOL_USE = (
    b'{"type":"assistant","message":{"id":"msg_fake_000002","type":"message","role":"assistant",'
    b'"model":"claude-opus-5-5","content":[{"type":"tool_use","id":"toolu_fake_000001","name":"Bash",'
    b'"input":{"command":"echo hi"}}],"stop_reason":null,"stop_sequence":null,"usage":{"input_tokens":0,'
    b'"cache_creation_input_tokens":453,"cache_read_input_tokens":0,"output_tokens":1},"context_management":null},'
    b'"parent_tool_use_id":null,"session_id":"3b728c9f","uuid":"9ff4bf2a","request_id":"req_fake_000000"}'
)
REAL_TOOL_RESULT = (
    b'{"type":"user","message":{"role":"user","content":[{"tool_use_id":"toolu_fake_000001","type":"tool_result",'
    b'"content":"hi","is_error":false}]},"parent_tool_use_id":null,"session_id":"3b728c9f","uuid":"bf05017d",'
    b'"tool_use_result":{"stdout":"hi","stderr":"","interrupted":false,"isImage":false,"noOutputExpected":false},'
    b'"tool_result_meta":[{"id":"toolu_fake_000001","permission_decision":{"decision":"accept","source":"config",'
    b'"reason_type":"rule"}}]}'
)
REAL_TOOL_ERROR = (
    b'{"type":"user","message":{"role":"user","content":[{"type":"tool_result","content":"Exit code 3\\noops",'
    b'"is_error":true,"tool_use_id":"toolu_fake_000001"}]},"parent_tool_use_id":null,"session_id":"38e9df9f",'
    b'"tool_use_result":"Error: Exit code 3\\noops"}'
)


def line(raw: bytes) -> Any:
    return parse_event(decode_object(raw))


def user(content: Any, parent: str | None = None) -> UserEvent:
    event = parse_event({"type": "user", "message": {"role": "user", "content": content},
                         "parent_tool_use_id": parent})
    assert isinstance(event, UserEvent)
    return event


def assistant(content: list[dict[str, Any]], parent: str | None = None) -> AssistantEvent:
    event = parse_event({"type": "assistant", "message": {"content": content}, "parent_tool_use_id": parent})
    assert isinstance(event, AssistantEvent)
    return event


# -- the real CLI's lines -------------------------------------------------------------------------


def test_the_real_clis_tool_call_and_result_become_one_item_each() -> None:
    assert stream_items(line(REAL_TOOL_USE), 2048) == [
        ToolUse(id="toolu_fake_000001", name="Bash", input={"command": "echo hi"})]
    assert stream_items(line(REAL_TOOL_RESULT), 2048) == [
        ToolResult(tool_use_id="toolu_fake_000001", is_error=False, preview="hi", truncated=False)]
    assert stream_items(line(REAL_TOOL_ERROR), 2048) == [
        ToolResult(tool_use_id="toolu_fake_000001", is_error=True, preview="Exit code 3\noops", truncated=False)]


def test_text_deltas_and_other_events_are_what_they_were() -> None:
    delta = parse_event({"type": "stream_event", "event": {"type": "content_block_delta", "index": 0,
                                                           "delta": {"type": "text_delta", "text": "Hel"}}})
    assert stream_items(delta, 8) == [TextDelta(text="Hel")]
    empty = parse_event({"type": "stream_event", "event": {"type": "content_block_delta", "index": 0,
                                                           "delta": {"type": "text_delta", "text": ""}}})
    assert stream_items(empty, 8) == []
    assert stream_items(assistant([{"type": "text", "text": "no tools here"}]), 8) == []
    assert stream_items(user("a plain prompt echoed"), 8) == []
    assert stream_items(user([{"type": "text", "text": "[Request interrupted by user]"}]), 8) == []
    assert stream_items(parse_event({"type": "system", "subtype": "init"}), 8) == []


# -- reading the blocks ---------------------------------------------------------------------------


def test_every_tool_use_block_of_a_message_in_order_and_malformed_ones_left_out() -> None:
    event = assistant([
        {"type": "text", "text": "Let me look."},
        {"type": "tool_use", "id": "t1", "name": "Bash", "input": {"command": "ls"}},
        {"type": "tool_use", "id": 7, "name": "Bash", "input": {}},
        {"type": "tool_use", "id": "t2", "input": {}},
        {"type": "tool_use", "id": "t3", "name": "Read", "input": {"file_path": "/x"}},
    ])
    assert [(b.id, b.name, b.input) for b in event.tool_uses()] == [
        ("t1", "Bash", {"command": "ls"}), ("t3", "Read", {"file_path": "/x"})]


def test_a_result_given_as_blocks_is_flattened_to_text() -> None:
    event = user([
        {"type": "tool_result", "tool_use_id": "t1", "content": [
            {"type": "text", "text": "first"}, {"type": "image", "source": {"data": "…"}},
            {"type": "text", "text": "second"}]},
        {"type": "tool_result", "tool_use_id": "t2"},
        {"type": "tool_result", "tool_use_id": "t3", "content": None, "is_error": "yes"},
        {"type": "tool_result", "content": "no id"},
        "not a block",
    ])
    assert [(b.tool_use_id, b.is_error, b.text) for b in event.tool_results()] == [
        ("t1", False, "first\n[image]\nsecond"), ("t2", False, ""), ("t3", False, "")]


def test_a_subagents_tool_calls_are_not_shown_like_its_text() -> None:
    call = [{"type": "tool_use", "id": "t9", "name": "Bash", "input": {"command": "ls"}}]
    result = [{"type": "tool_result", "tool_use_id": "t9", "content": "x"}]
    assert stream_items(assistant(call, parent="toolu_task"), 64) == []
    assert stream_items(user(result, parent="toolu_task"), 64) == []
    assert len(stream_items(assistant(call), 64)) == len(stream_items(user(result), 64)) == 1


# -- bounds ---------------------------------------------------------------------------------------


# "ab", U+FFFD (what the CLI makes of a byte that is not UTF-8: 3 bytes), "€" (3), "😀" (4): 12 bytes.
TEXT = "ab\ufffd€😀"
CUTS = {0: "", 1: "a", 2: "ab", 3: "ab", 4: "ab", 5: "ab\ufffd", 6: "ab\ufffd", 7: "ab\ufffd", 8: "ab\ufffd€",
        9: "ab\ufffd€", 10: "ab\ufffd€", 11: "ab\ufffd€", 12: TEXT, 13: TEXT}


@pytest.mark.parametrize("bound", sorted(CUTS))
def test_a_cut_keeps_the_whole_characters_that_fit(bound: int) -> None:
    cut, truncated = cut_utf8(TEXT, bound)
    assert cut == CUTS[bound]
    assert len(cut.encode()) <= bound
    assert truncated is (bound < 12)


def test_a_lone_surrogate_cannot_break_the_encoding() -> None:
    cut, truncated = cut_utf8("a\udcffb", 10)  # never from orjson, which refuses them; still no crash
    assert (cut, truncated) == ("a?b", False)
    orjson.dumps(cut)


def test_a_result_preview_is_bounded() -> None:
    result = user([{"type": "tool_result", "tool_use_id": "t1", "content": "€" * 1000}])
    (item,) = stream_items(result, 100)
    assert isinstance(item, ToolResult)
    assert (item.preview, item.truncated) == ("€" * 33, True)


def test_an_input_over_the_bound_becomes_its_json_cut() -> None:
    big = {"command": "echo " + "é" * 100, "description": "long"}
    (item,) = stream_items(assistant([{"type": "tool_use", "id": "t1", "name": "Bash", "input": big}]), 50)
    assert isinstance(item, ToolUse)
    assert item.truncated is True
    assert isinstance(item.input, str)
    assert orjson.dumps(big).decode().startswith(item.input)
    assert 49 <= len(item.input.encode()) <= 50
    exact = {"command": "x" * 10}
    (item,) = stream_items(assistant([{"type": "tool_use", "id": "t2", "name": "Bash", "input": exact}]),
                           len(orjson.dumps(exact)))
    assert isinstance(item, ToolUse)
    assert (item.input, item.truncated) == (exact, False)


def test_an_input_that_is_not_an_object_is_shown_as_its_json() -> None:
    (item,) = stream_items(assistant([{"type": "tool_use", "id": "t1", "name": "X", "input": [1, 2]}]), 50)
    assert isinstance(item, ToolUse)
    assert (item.input, item.truncated) == ("[1,2]", False)
    (item,) = stream_items(assistant([{"type": "tool_use", "id": "t1", "name": "X"}]), 50)
    assert isinstance(item, ToolUse)
    assert item.input == "null"


# -- socket frames --------------------------------------------------------------------------------


@pytest.mark.parametrize("item", [
    TextDelta(text="Hel"),
    ToolUse(id="toolu_1", name="Bash", input={"command": "echo hi"}),
    ToolUse(id="toolu_2", name="Bash", input='{"command":"ech', truncated=True),
    ToolResult(tool_use_id="toolu_1", is_error=True, preview="Exit code 1", truncated=False),
])
def test_socket_frames_carry_every_item_and_read_back(item: TextDelta | ToolUse | ToolResult) -> None:
    raw = stream_frame("r1", item)
    assert raw.endswith(b"\n") and raw.count(b"\n") == 1
    frame = orjson.loads(raw)
    assert (frame["id"], frame["event"]) == ("r1", item.event)
    assert stream_item_of_frame(frame) == item


def test_a_tool_use_frame_names_the_call_tool_use_id_since_id_is_the_frames() -> None:
    frame = orjson.loads(stream_frame("r1", ToolUse(id="toolu_1", name="Bash", input={})))
    assert frame == {"id": "r1", "event": "tool_use", "tool_use_id": "toolu_1", "name": "Bash", "input": {},
                     "truncated": False}
    assert stream_item_of_frame({"id": "r1", "event": "result"}) is None


def test_a_model_fallback_is_streamed_as_its_own_item() -> None:
    event = parse_event({"type": "system", "subtype": "model_fallback", "trigger": "overloaded",
                         "original_model": "claude-opus-4-5", "fallback_model": "claude-sonnet-4-5",
                         "content": "Switched to Sonnet 4.5 due to high demand for Opus 4.5", "uuid": "u"})
    assert stream_items(event, 100) == [ModelFallback(original_model="claude-opus-4-5",
                                                      fallback_model="claude-sonnet-4-5", trigger="overloaded")]
    other = parse_event({"type": "system", "subtype": "status", "status": "compacting"})
    assert stream_items(other, 100) == []
