"""Unit tests of the stream-json event models, `parse_event`, and the line encoders."""

from __future__ import annotations

from typing import Any

import orjson
import pydantic
import pytest

from claudepool.errors import CorruptFrame
from claudepool.protocol.cli_events import (
    AssistantEvent,
    AssistantMessage,
    CliEvent,
    ControlRequestEvent,
    ControlResponseBody,
    ControlResponseEvent,
    ConversationReset,
    RateLimitEvent,
    ResultEvent,
    StreamEvent,
    SystemApiRetry,
    SystemEvent,
    SystemInit,
    UnknownEvent,
    Usage,
    UserEvent,
    encode_command,
    encode_control_error,
    encode_control_request,
    encode_user_message,
    parse_event,
)
from claudepool.protocol.framing import LineFramer, decode_object

# -- real lines captured from the `claude` CLI 2.1.328 ------------------------------------------

CONTROL_RESPONSE_SUCCESS = (
    '{"type":"control_response","response":{"subtype":"success","request_id":"r1","response":{"commands":[]}}}'
)
CONTROL_RESPONSE_ERROR = '{"type":"control_response","response":{"subtype":"error","request_id":"r9","error":"Unsupported control request subtype: nonsense","error_code":"unsupported_request"}}'  # noqa: E501
CONVERSATION_RESET = '{"type":"conversation_reset","new_conversation_id":"7a1e0fcb-529d-4e9d-9d4a-2847e114b8c5","uuid":"7a1e0fcb-529d-4e9d-9d4a-2847e114b8c5","trigger":"clear","user_message_uuid":"b11f3322-6086-4a43-88ff-151f0176bb5a","timestamp":"2026-11-24T05:02:18.079Z","session_id":"331240ba-1774-4d6c-91e4-82862a30f81c"}'  # noqa: E501
SYSTEM_API_RETRY = '{"type":"system","subtype":"api_retry","attempt":1,"max_retries":1,"retry_delay_ms":505,"error_status":529,"error":"overloaded","session_id":"19bf68ab-cdfb-420f-9f22-ca6ebfb07a4d","uuid":"f085022d-c8e4-4bcc-a6bf-5a4160e15e9e"}'  # noqa: E501
RESULT_API_ERROR = '{"type":"result","subtype":"success","is_error":true,"duration_api_ms":9,"stop_reason":"stop_sequence","session_id":"19bf68ab","total_cost_usd":0.0091814,"usage":{"input_tokens":0,"cache_creation_input_tokens":0,"cache_read_input_tokens":0,"output_tokens":0,"server_tool_use":{"web_search_requests":0}},"terminal_reason":"api_error","api_error_status":529,"result":"API Error: 529 overloaded","num_turns":1}'  # noqa: E501
RESULT_ERROR_DURING_EXECUTION = '{"type":"result","subtype":"error_during_execution","is_error":true,"stop_reason":null,"session_id":"19bf68ab","total_cost_usd":0.0075,"usage":{"input_tokens":0,"output_tokens":0},"terminal_reason":"aborted_streaming","errors":["[ede_diagnostic] result_type=user"]}'  # noqa: E501
RESULT_LOCAL_CLEAR = '{"type":"result","subtype":"success","is_error":false,"result":"","local_command":"clear","session_id":"74c2f0b0","total_cost_usd":0,"usage":{},"num_turns":0}'  # noqa: E501
STREAM_TEXT_DELTA = '{"type":"stream_event","event":{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"ok: hello there"}},"session_id":"331240ba","parent_tool_use_id":null,"uuid":"c7517509","api_message_id":"msg_fake_000000"}'  # noqa: E501
SYSTEM_BACKGROUND_TASKS = (
    '{"type":"system","subtype":"background_tasks_changed","tasks":[],"uuid":"5f82a533","session_id":"331240ba"}'
)

REAL_LINES: dict[str, tuple[str, type[Any]]] = {
    "control_response_success": (CONTROL_RESPONSE_SUCCESS, ControlResponseEvent),
    "control_response_error": (CONTROL_RESPONSE_ERROR, ControlResponseEvent),
    "conversation_reset": (CONVERSATION_RESET, ConversationReset),
    "system_api_retry": (SYSTEM_API_RETRY, SystemApiRetry),
    "result_api_error": (RESULT_API_ERROR, ResultEvent),
    "result_error_during_execution": (RESULT_ERROR_DURING_EXECUTION, ResultEvent),
    "result_local_clear": (RESULT_LOCAL_CLEAR, ResultEvent),
    "stream_text_delta": (STREAM_TEXT_DELTA, StreamEvent),
    "system_background_tasks": (SYSTEM_BACKGROUND_TASKS, SystemEvent),
}

SECRET = "sk-ant-api03-SECRET-do-not-log-7f3a9c"


def parse_line(line: str) -> CliEvent:
    return parse_event(decode_object(line.encode()))


# -- dispatch by type ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(REAL_LINES))
def test_real_cli_lines_map_to_their_models(name: str) -> None:
    line, model = REAL_LINES[name]
    event = parse_line(line)
    assert type(event) is model


def test_real_cli_lines_survive_the_framer_in_one_stream() -> None:
    stream = "".join(line + "\n" for line, _ in REAL_LINES.values()).encode()
    framer = LineFramer(4096)
    events: list[CliEvent] = []
    for i in range(0, len(stream), 17):
        events.extend(parse_event(decode_object(line)) for line in framer.feed(stream[i : i + 17]))
    assert [type(e) for e in events] == [model for _, model in REAL_LINES.values()]
    assert framer.finish() == b""


MINIMAL: dict[str, tuple[dict[str, Any], type[Any]]] = {
    "system_init": ({"type": "system", "subtype": "init"}, SystemInit),
    "system_api_retry": ({"type": "system", "subtype": "api_retry"}, SystemApiRetry),
    "system_status": ({"type": "system", "subtype": "status"}, SystemEvent),
    "system_compact_boundary": ({"type": "system", "subtype": "compact_boundary"}, SystemEvent),
    "system_no_subtype": ({"type": "system"}, SystemEvent),
    "assistant": ({"type": "assistant", "message": {}}, AssistantEvent),
    "user": ({"type": "user"}, UserEvent),
    "stream_event": ({"type": "stream_event"}, StreamEvent),
    "result": ({"type": "result"}, ResultEvent),
    "control_request": ({"type": "control_request", "request_id": "q1"}, ControlRequestEvent),
    "control_response": (
        {"type": "control_response", "response": {"subtype": "success", "request_id": "r1"}},
        ControlResponseEvent,
    ),
    "conversation_reset": ({"type": "conversation_reset"}, ConversationReset),
    "rate_limit_event": ({"type": "rate_limit_event"}, RateLimitEvent),
    "unknown": ({"type": "brand_new_event"}, UnknownEvent),
    "missing_type": ({}, UnknownEvent),
}


@pytest.mark.parametrize("name", sorted(MINIMAL))
def test_each_type_maps_to_its_model(name: str) -> None:
    obj, model = MINIMAL[name]
    event = parse_event(obj)
    assert type(event) is model


@pytest.mark.parametrize("name", sorted(MINIMAL))
def test_extra_fields_are_tolerated_on_every_model(name: str) -> None:
    obj, model = MINIMAL[name]
    extra = {"zz_future_field": {"nested": [1, "two", None]}, "zz_flag": True}
    event = parse_event({**obj, **extra})
    assert type(event) is model
    assert event.model_extra is not None
    assert event.model_extra["zz_future_field"] == {"nested": [1, "two", None]}
    assert event.model_extra["zz_flag"] is True


def test_parse_event_does_not_mutate_its_input() -> None:
    obj: dict[str, Any] = {"type": 7, "a": 1}
    parse_event(obj)
    assert obj == {"type": 7, "a": 1}


# -- system -------------------------------------------------------------------------------------


def test_system_init_fields() -> None:
    event = parse_event(
        {
            "type": "system",
            "subtype": "init",
            "session_id": "s-1",
            "model": "claude-sonnet-4-5",
            "cwd": "/tmp/w",
            "tools": ["Bash", "Read"],
            "mcp_servers": [],
            "permissionMode": "default",
        }
    )
    assert isinstance(event, SystemInit)
    assert event.type == "system"
    assert event.subtype == "init"
    assert event.session_id == "s-1"
    assert event.model == "claude-sonnet-4-5"
    assert event.cwd == "/tmp/w"
    assert event.tools == ["Bash", "Read"]
    assert event.model_extra == {"mcp_servers": [], "permissionMode": "default"}


def test_system_init_defaults() -> None:
    event = parse_event({"type": "system", "subtype": "init"})
    assert isinstance(event, SystemInit)
    assert (event.session_id, event.model, event.cwd, event.tools) == ("", "", "", [])


def test_system_api_retry_real_line() -> None:
    event = parse_line(SYSTEM_API_RETRY)
    assert isinstance(event, SystemApiRetry)
    assert event.subtype == "api_retry"
    assert event.attempt == 1
    assert event.max_retries == 1
    assert event.retry_delay_ms == 505
    assert event.error_status == 529
    assert event.error == "overloaded"
    assert event.model_extra is not None
    assert event.model_extra["session_id"] == "19bf68ab-cdfb-420f-9f22-ca6ebfb07a4d"
    assert event.model_extra["uuid"] == "f085022d-c8e4-4bcc-a6bf-5a4160e15e9e"


def test_system_api_retry_defaults() -> None:
    event = parse_event({"type": "system", "subtype": "api_retry"})
    assert isinstance(event, SystemApiRetry)
    assert (event.attempt, event.max_retries, event.retry_delay_ms) == (0, 0, 0)
    assert event.error_status is None
    assert event.error is None


def test_other_system_subtype_real_line() -> None:
    event = parse_line(SYSTEM_BACKGROUND_TASKS)
    assert type(event) is SystemEvent
    assert event.type == "system"
    assert event.subtype == "background_tasks_changed"
    assert event.model_extra == {"tasks": [], "uuid": "5f82a533", "session_id": "331240ba"}


def test_system_without_subtype_has_empty_subtype() -> None:
    event = parse_event({"type": "system", "data": 1})
    assert type(event) is SystemEvent
    assert event.subtype == ""


# -- assistant and user -------------------------------------------------------------------------


def _assistant(content: list[dict[str, Any]], **extra: Any) -> AssistantEvent:
    event = parse_event({"type": "assistant", "message": {"id": "msg_1", "content": content}, **extra})
    assert isinstance(event, AssistantEvent)
    return event


def test_assistant_event_fields() -> None:
    event = parse_event(
        {
            "type": "assistant",
            "message": {
                "id": "msg_01",
                "model": "claude-x",
                "role": "assistant",
                "content": [{"type": "text", "text": "hi"}],
                "usage": {"input_tokens": 3, "output_tokens": 5, "cache_read_input_tokens": 7},
            },
            "session_id": "s-2",
            "parent_tool_use_id": "toolu_1",
        }
    )
    assert isinstance(event, AssistantEvent)
    assert isinstance(event.message, AssistantMessage)
    assert event.message.id == "msg_01"
    assert event.message.model == "claude-x"
    assert event.message.model_extra == {"role": "assistant"}
    assert event.session_id == "s-2"
    assert event.parent_tool_use_id == "toolu_1"
    assert isinstance(event.message.usage, Usage)
    assert event.message.usage.context_tokens == 10
    assert event.message.usage.output_tokens == 5


def test_assistant_message_usage_is_optional() -> None:
    event = _assistant([])
    assert event.message.usage is None
    assert event.parent_tool_use_id is None


def test_assistant_text_joins_text_blocks_only() -> None:
    event = _assistant(
        [
            {"type": "thinking", "thinking": "hmm"},
            {"type": "text", "text": "Hello, "},
            {"type": "tool_use", "id": "toolu_1", "name": "Bash", "input": {"text": "not me"}},
            {"type": "text", "text": "world"},
            {"type": "future_block", "text": " (not a text block)"},
            {"type": "text"},
        ]
    )
    assert event.text() == "Hello, world"


def test_assistant_text_empty_content() -> None:
    assert _assistant([]).text() == ""
    assert _assistant([{"type": "tool_use", "id": "t", "name": "Read", "input": {}}]).text() == ""


def test_assistant_text_skips_non_string_text() -> None:
    assert _assistant([{"type": "text", "text": None}, {"type": "text", "text": "ok"}]).text() == "ok"


def test_user_event_fields() -> None:
    message = {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "ok"}]}
    event = parse_event({"type": "user", "message": message, "session_id": "s-3", "parent_tool_use_id": None})
    assert isinstance(event, UserEvent)
    assert event.message == message
    assert event.session_id == "s-3"
    assert event.parent_tool_use_id is None  # modelled since issue 13: a subagent's results are not streamed
    assert event.model_extra == {}


# -- stream_event -------------------------------------------------------------------------------


def _stream(event: dict[str, Any], parent_tool_use_id: str | None = None) -> StreamEvent:
    parsed = parse_event({"type": "stream_event", "event": event, "parent_tool_use_id": parent_tool_use_id})
    assert isinstance(parsed, StreamEvent)
    return parsed


def test_stream_event_real_line() -> None:
    event = parse_line(STREAM_TEXT_DELTA)
    assert isinstance(event, StreamEvent)
    assert event.session_id == "331240ba"
    assert event.parent_tool_use_id is None
    assert event.event["index"] == 0
    assert event.text_delta() == "ok: hello there"
    assert event.model_extra == {"uuid": "c7517509", "api_message_id": "msg_fake_000000"}


def test_text_delta_of_a_text_delta() -> None:
    event = _stream({"type": "content_block_delta", "index": 1, "delta": {"type": "text_delta", "text": "abc"}})
    assert event.text_delta() == "abc"


def test_text_delta_of_an_empty_text_delta_is_empty_string() -> None:
    event = _stream({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": ""}})
    assert event.text_delta() == ""


@pytest.mark.parametrize(
    "delta",
    [
        {"type": "input_json_delta", "partial_json": '{"a":'},
        {"type": "thinking_delta", "thinking": "hmm"},
        {"type": "signature_delta", "signature": "sig"},
        {"type": "citations_delta", "text": "looks like text"},
    ],
)
def test_text_delta_of_a_non_text_delta_is_none(delta: dict[str, Any]) -> None:
    event = _stream({"type": "content_block_delta", "index": 0, "delta": delta})
    assert event.text_delta() is None


@pytest.mark.parametrize(
    "inner",
    [
        {"type": "message_start", "message": {"id": "msg_1"}},
        {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": "hi"}},
        {"type": "content_block_stop", "index": 0},
        {"type": "message_delta", "delta": {"type": "text_delta", "text": "sneaky"}},
        {"type": "message_stop"},
        {},
    ],
)
def test_text_delta_of_a_non_delta_event_is_none(inner: dict[str, Any]) -> None:
    assert _stream(inner).text_delta() is None


@pytest.mark.parametrize("delta", ["x", None, 3, ["text_delta"]])
def test_text_delta_of_a_malformed_delta_is_none(delta: Any) -> None:
    assert _stream({"type": "content_block_delta", "index": 0, "delta": delta}).text_delta() is None


def test_text_delta_inside_a_subagent_is_none() -> None:
    event = _stream(
        {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "from a subagent"}},
        parent_tool_use_id="toolu_01abc",
    )
    assert event.parent_tool_use_id == "toolu_01abc"
    assert event.text_delta() is None


def test_text_delta_with_missing_or_non_string_text_is_none() -> None:
    assert _stream({"type": "content_block_delta", "delta": {"type": "text_delta"}}).text_delta() is None
    assert _stream({"type": "content_block_delta", "delta": {"type": "text_delta", "text": 5}}).text_delta() is None
    assert _stream({"type": "content_block_delta"}).text_delta() is None
    assert _stream({"type": "content_block_delta", "delta": None}).text_delta() is None


# -- result -------------------------------------------------------------------------------------


def test_result_api_error_is_error_despite_success_subtype() -> None:
    event = parse_line(RESULT_API_ERROR)
    assert isinstance(event, ResultEvent)
    assert event.subtype == "success"
    assert event.is_error is True
    assert event.terminal_reason == "api_error"
    assert event.api_error_status == 529
    assert event.result == "API Error: 529 overloaded"
    assert event.stop_reason == "stop_sequence"
    assert event.session_id == "19bf68ab"
    assert event.total_cost_usd == pytest.approx(0.0091814)
    assert event.num_turns == 1
    assert event.duration_ms == 0
    assert event.usage.input_tokens == 0
    assert event.usage.output_tokens == 0
    assert event.usage.context_tokens == 0
    assert event.usage.model_extra == {"server_tool_use": {"web_search_requests": 0}}
    assert event.model_extra == {"duration_api_ms": 9}


def test_result_error_during_execution_real_line() -> None:
    event = parse_line(RESULT_ERROR_DURING_EXECUTION)
    assert isinstance(event, ResultEvent)
    assert event.subtype == "error_during_execution"
    assert event.is_error is True
    assert event.stop_reason is None
    assert event.result is None
    assert event.terminal_reason == "aborted_streaming"
    assert event.api_error_status is None
    assert event.total_cost_usd == pytest.approx(0.0075)
    assert event.usage.input_tokens == 0
    assert event.usage.output_tokens == 0
    assert event.model_extra == {"errors": ["[ede_diagnostic] result_type=user"]}


def test_result_local_clear_real_line() -> None:
    event = parse_line(RESULT_LOCAL_CLEAR)
    assert isinstance(event, ResultEvent)
    assert event.is_error is False
    assert event.subtype == "success"
    assert event.result == ""
    assert event.local_command == "clear"
    assert event.session_id == "74c2f0b0"
    assert event.total_cost_usd == 0.0
    assert isinstance(event.total_cost_usd, float)
    assert event.num_turns == 0
    assert event.usage == Usage()


def test_result_with_real_usage() -> None:
    event = parse_event(
        {
            "type": "result",
            "subtype": "success",
            "is_error": False,
            "result": "done",
            "duration_ms": 1234.5,
            "usage": {
                "input_tokens": 10,
                "output_tokens": 20,
                "cache_read_input_tokens": 300,
                "cache_creation_input_tokens": 4000,
            },
        }
    )
    assert isinstance(event, ResultEvent)
    assert event.usage.context_tokens == 4310
    assert event.usage.output_tokens == 20
    assert event.duration_ms == 1234.5
    assert event.local_command is None


def test_result_defaults() -> None:
    event = parse_event({"type": "result"})
    assert isinstance(event, ResultEvent)
    assert event.is_error is False
    assert event.subtype == ""
    assert event.result is None
    assert event.usage == Usage()
    assert event.total_cost_usd == 0.0
    assert event.terminal_reason is None


# -- control ------------------------------------------------------------------------------------


def test_control_response_success_real_line() -> None:
    event = parse_line(CONTROL_RESPONSE_SUCCESS)
    assert isinstance(event, ControlResponseEvent)
    assert isinstance(event.response, ControlResponseBody)
    assert event.response.subtype == "success"
    assert event.response.request_id == "r1"
    assert event.response.response == {"commands": []}
    assert event.response.error is None


def test_control_response_error_real_line() -> None:
    event = parse_line(CONTROL_RESPONSE_ERROR)
    assert isinstance(event, ControlResponseEvent)
    assert event.response.subtype == "error"
    assert event.response.request_id == "r9"
    assert event.response.error == "Unsupported control request subtype: nonsense"
    assert event.response.response is None
    assert event.response.model_extra == {"error_code": "unsupported_request"}


def test_control_request_from_the_cli() -> None:
    request = {"subtype": "can_use_tool", "tool_name": "Bash", "input": {"command": "ls"}}
    event = parse_event({"type": "control_request", "request_id": "cli-7", "request": request})
    assert isinstance(event, ControlRequestEvent)
    assert event.request_id == "cli-7"
    assert event.request == request


def test_conversation_reset_real_line() -> None:
    event = parse_line(CONVERSATION_RESET)
    assert isinstance(event, ConversationReset)
    assert event.new_conversation_id == "7a1e0fcb-529d-4e9d-9d4a-2847e114b8c5"
    assert event.trigger == "clear"
    assert event.model_extra is not None
    assert event.model_extra["session_id"] == "331240ba-1774-4d6c-91e4-82862a30f81c"
    assert event.model_extra["user_message_uuid"] == "b11f3322-6086-4a43-88ff-151f0176bb5a"
    assert event.model_extra["timestamp"] == "2026-11-24T05:02:18.079Z"


def test_rate_limit_event() -> None:
    info = {"status": "allowed", "resetsAt": 1764000000, "rateLimitType": "five_hour"}
    event = parse_event({"type": "rate_limit_event", "rate_limit_info": info, "uuid": "u1"})
    assert isinstance(event, RateLimitEvent)
    assert event.rate_limit_info == info
    assert event.model_extra == {"uuid": "u1"}


def test_rate_limit_event_without_info() -> None:
    event = parse_event({"type": "rate_limit_event"})
    assert isinstance(event, RateLimitEvent)
    assert event.rate_limit_info is None


# -- unknown ------------------------------------------------------------------------------------


def test_unknown_type_keeps_type_and_extra_fields() -> None:
    event = parse_event({"type": "tool_progress", "tool_use_id": "t1", "elapsed": 2.5, "nested": {"a": [1]}})
    assert type(event) is UnknownEvent
    assert event.type == "tool_progress"
    assert event.model_extra == {"tool_use_id": "t1", "elapsed": 2.5, "nested": {"a": [1]}}


def test_missing_type_becomes_unknown() -> None:
    event = parse_event({"hello": "world"})
    assert type(event) is UnknownEvent
    assert event.type == ""
    assert event.model_extra == {"hello": "world"}


@pytest.mark.parametrize("kind", [None, 7, 1.5, True, ["result"], {"t": "result"}])
def test_non_string_type_becomes_unknown(kind: Any) -> None:
    event = parse_event({"type": kind, "payload": 1})
    assert type(event) is UnknownEvent
    assert event.type == ""
    assert event.model_extra == {"payload": 1}


def test_type_matching_is_case_sensitive() -> None:
    event = parse_event({"type": "Result", "usage": "not checked"})
    assert type(event) is UnknownEvent
    assert event.type == "Result"


# -- malformed known events ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("obj", "field"),
    [
        ({"type": "result", "usage": "nope"}, "usage"),
        ({"type": "result", "usage": {"input_tokens": "lots"}}, "usage.input_tokens"),
        ({"type": "result", "is_error": "maybe"}, "is_error"),
        ({"type": "result", "total_cost_usd": "free"}, "total_cost_usd"),
        ({"type": "control_response"}, "response"),
        ({"type": "control_response", "response": {"subtype": "success"}}, "response.request_id"),
        ({"type": "control_response", "response": "ok"}, "response"),
        ({"type": "control_request", "request": {}}, "request_id"),
        ({"type": "assistant"}, "message"),
        ({"type": "assistant", "message": {"content": "text"}}, "message.content"),
        ({"type": "assistant", "message": {"usage": [1]}}, "message.usage"),
        ({"type": "stream_event", "event": ["x"]}, "event"),
        ({"type": "user", "message": "hi"}, "message"),
        ({"type": "system", "subtype": "init", "tools": "Bash"}, "tools"),
        ({"type": "system", "subtype": "api_retry", "attempt": "first"}, "attempt"),
        ({"type": "system", "subtype": 5}, "subtype"),
        ({"type": "conversation_reset", "new_conversation_id": 123}, "new_conversation_id"),
        ({"type": "rate_limit_event", "rate_limit_info": "full"}, "rate_limit_info"),
    ],
)
def test_wrongly_shaped_known_event_raises_corrupt_frame_naming_the_field(obj: dict[str, Any], field: str) -> None:
    with pytest.raises(CorruptFrame) as info:
        parse_event(obj)
    message = str(info.value)
    assert repr(obj["type"]) in message
    assert field in message.split("bad fields: ", 1)[1]


def test_corrupt_frame_names_each_bad_field() -> None:
    with pytest.raises(CorruptFrame) as info:
        parse_event({"type": "result", "usage": "nope", "num_turns": "many"})
    message = str(info.value)
    assert "usage" in message
    assert "num_turns" in message


def test_corrupt_frame_does_not_echo_field_values() -> None:
    with pytest.raises(CorruptFrame) as info:
        parse_event({"type": "result", "usage": SECRET, "result": ["x", SECRET]})
    assert SECRET not in str(info.value)
    assert "usage" in str(info.value)


def test_events_are_frozen() -> None:
    event = parse_line(RESULT_API_ERROR)
    assert isinstance(event, ResultEvent)
    with pytest.raises(pydantic.ValidationError):
        event.is_error = False  # type: ignore[misc]
    assert event.is_error is True


# -- Usage --------------------------------------------------------------------------------------


def test_usage_defaults_to_zero() -> None:
    usage = Usage()
    assert (usage.input_tokens, usage.output_tokens) == (0, 0)
    assert (usage.cache_read_input_tokens, usage.cache_creation_input_tokens) == (0, 0)
    assert usage.context_tokens == 0


def test_usage_context_tokens_sums_all_input_kinds_but_not_output() -> None:
    usage = Usage(input_tokens=1, output_tokens=1000, cache_read_input_tokens=20, cache_creation_input_tokens=300)
    assert usage.context_tokens == 321


@pytest.mark.parametrize(
    ("field", "expected"),
    [("input_tokens", 5), ("cache_read_input_tokens", 5), ("cache_creation_input_tokens", 5), ("output_tokens", 0)],
)
def test_usage_context_tokens_per_field(field: str, expected: int) -> None:
    assert Usage.model_validate({field: 5}).context_tokens == expected


def test_usage_add_sums_every_field() -> None:
    a = Usage(input_tokens=1, output_tokens=2, cache_read_input_tokens=3, cache_creation_input_tokens=4)
    b = Usage(input_tokens=10, output_tokens=20, cache_read_input_tokens=30, cache_creation_input_tokens=40)
    total = a + b
    assert isinstance(total, Usage)
    assert total.input_tokens == 11
    assert total.output_tokens == 22
    assert total.cache_read_input_tokens == 33
    assert total.cache_creation_input_tokens == 44
    assert total.context_tokens == a.context_tokens + b.context_tokens
    # Operands are untouched.
    assert a == Usage(input_tokens=1, output_tokens=2, cache_read_input_tokens=3, cache_creation_input_tokens=4)
    assert b.input_tokens == 10


def test_usage_add_zero_is_identity_and_sum_is_commutative() -> None:
    a = Usage(input_tokens=7, output_tokens=8, cache_read_input_tokens=9, cache_creation_input_tokens=6)
    b = Usage(input_tokens=1, cache_creation_input_tokens=2)
    assert a + Usage() == a
    assert a + b == b + a
    assert sum([a, b, a], Usage()) == a + b + a
    assert (a + b + a).input_tokens == 15


def test_usage_keeps_extra_fields_from_the_cli() -> None:
    usage = Usage.model_validate({"input_tokens": 4, "service_tier": "standard", "server_tool_use": {"n": 1}})
    assert usage.input_tokens == 4
    assert usage.model_extra == {"service_tier": "standard", "server_tool_use": {"n": 1}}


# -- encoders -----------------------------------------------------------------------------------


def _single_line(data: bytes) -> Any:
    assert data.endswith(b"\n")
    assert not data.endswith(b"\n\n")
    assert data.count(b"\n") == 1
    assert b"\r" not in data
    return orjson.loads(data)


def test_encode_user_message_text() -> None:
    data = encode_user_message("hello")
    assert isinstance(data, bytes)
    assert _single_line(data) == {"type": "user", "message": {"role": "user", "content": "hello"},
                                  "text_not_typed": True}


@pytest.mark.parametrize("content", ["/model haiku", [{"type": "text", "text": "/heapdump"}]])
def test_encode_user_message_marks_every_prompt_as_text_never_a_command(content: Any) -> None:
    # Issue 10: a tenant's "/model haiku" must reach the model, not run on a shared worker.
    assert _single_line(encode_user_message(content))["text_not_typed"] is True


def test_encode_command_is_the_only_unmarked_line() -> None:
    assert _single_line(encode_command("/clear")) == {"type": "user", "message": {"role": "user", "content": "/clear"}}
    with pytest.raises(ValueError, match="starts with /"):
        encode_command("clear")


def test_encode_user_message_blocks() -> None:
    blocks: list[dict[str, Any]] = [
        {"type": "text", "text": "look at this"},
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}},
    ]
    decoded = _single_line(encode_user_message(blocks))
    assert decoded["type"] == "user"
    assert decoded["message"]["role"] == "user"
    assert decoded["message"]["content"] == blocks


def test_encode_user_message_empty_string_and_empty_list() -> None:
    assert _single_line(encode_user_message(""))["message"] == {"role": "user", "content": ""}
    assert _single_line(encode_user_message([]))["message"] == {"role": "user", "content": []}


TRICKY_PROMPTS = [
    "line one\nline two\n\nline four\n",
    "windows\r\nline\rcarriage",
    "she said \"hi\" and 'bye'",
    "back\\slash \\n not a newline \\u0000 \\",
    "nul\x00byte and other controls \x01\x07\x1b\x7f\t",
    "unicode é ü ß 中文 日本語 עברית",
    "emoji 😀👍🏽👨‍👩‍👧 and flags 🇫🇷",
    "line separators \u2028 and \u2029 and NEL \x85",
    '{"type":"control_request","request_id":"x"}\n{"type":"user"}',
    "",
]


@pytest.mark.parametrize("prompt", TRICKY_PROMPTS)
def test_encode_user_message_tricky_text_round_trips_on_one_line(prompt: str) -> None:
    data = encode_user_message(prompt)
    decoded = _single_line(data)
    assert decoded["message"]["content"] == prompt
    # The CLI splits on newlines: a framer on our own output must see exactly one line.
    framer = LineFramer(1 << 20)
    assert len(framer.feed(data)) == 1
    assert framer.finish() == b""


def test_encode_user_message_tricky_text_inside_blocks_round_trips() -> None:
    blocks: list[dict[str, Any]] = [{"type": "text", "text": p} for p in TRICKY_PROMPTS]
    assert _single_line(encode_user_message(blocks))["message"]["content"] == blocks


def test_encode_user_message_large_prompt() -> None:
    prompt = ("x\n" * 200_000) + "end"
    assert _single_line(encode_user_message(prompt))["message"]["content"] == prompt


@pytest.mark.parametrize("content", [("a", "b"), {"type": "text", "text": "a"}, b"bytes", None, 42, 1.5])
def test_encode_user_message_rejects_other_content(content: Any) -> None:
    with pytest.raises(TypeError, match="string or a list"):
        encode_user_message(content)


def test_encode_control_request_minimal() -> None:
    data = encode_control_request("r1", "interrupt")
    assert isinstance(data, bytes)
    assert _single_line(data) == {"type": "control_request", "request_id": "r1", "request": {"subtype": "interrupt"}}


def test_encode_control_request_with_fields() -> None:
    data = encode_control_request("r2", "set_model", model="claude-x", options={"a": [1, None]}, flag=True)
    assert _single_line(data) == {
        "type": "control_request",
        "request_id": "r2",
        "request": {"subtype": "set_model", "model": "claude-x", "options": {"a": [1, None]}, "flag": True},
    }


def test_encode_control_request_escapes_tricky_values() -> None:
    data = encode_control_request("r\n3", "initialize", note='a "b"\nc\\d\x00😀')
    decoded = _single_line(data)
    assert decoded["request_id"] == "r\n3"
    assert decoded["request"]["note"] == 'a "b"\nc\\d\x00😀'


def test_encode_control_request_parses_back_as_a_control_request() -> None:
    event = parse_event(decode_object(encode_control_request("r4", "interrupt").rstrip(b"\n")))
    assert isinstance(event, ControlRequestEvent)
    assert event.request_id == "r4"
    assert event.request == {"subtype": "interrupt"}


def test_encode_control_error() -> None:
    data = encode_control_error("cli-1", "not supported by claudepool")
    assert isinstance(data, bytes)
    assert _single_line(data) == {
        "type": "control_response",
        "response": {"subtype": "error", "request_id": "cli-1", "error": "not supported by claudepool"},
    }


def test_encode_control_error_parses_back_as_an_error_response() -> None:
    message = 'multi\nline "quoted" \\ error 😀'
    event = parse_event(decode_object(encode_control_error("cli-2", message).rstrip(b"\n")))
    assert isinstance(event, ControlResponseEvent)
    assert event.response.subtype == "error"
    assert event.response.request_id == "cli-2"
    assert event.response.error == message
    assert event.response.response is None
