"""Strict wire types (issue item 6): every field of every wire model refuses a value of the wrong JSON
type with 400 ``bad_request`` naming the field, on HTTP and on the socket, and never echoes the value.

The cases marked ``coerced`` are values pydantic's lax mode would have turned into the right type
(``"yes"`` and ``1`` into ``true``, ``"30"`` into ``30.0``): they are what strict mode is for. The
others (a number for a string, a string for a literal) are refused by lax mode too; they are here so
that every field is covered."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import orjson
import pytest

from claudepool.protocol.wire import FRAME_MODELS, LedgerQuery, PromptRequest, UsageQuery
from tests.daemon_fixtures import ADMIN_KEY, KEYS, RunningDaemon, make_daemon
from tests.test_unix_api import FrameClient, connect

__all__ = ["make_daemon"]

MakeDaemon = Callable[..., Awaitable[RunningDaemon]]

SECRET = "SECRET-PROMPT-TEXT-4242"
# Wrong values for a field of each type: (value, coerced by lax mode).
WRONG_FOR_STR = [(987654321, False), (True, False), (["x"], False), ({"k": "v"}, False), (1.5, False)]
WRONG_FOR_OPTIONAL_STR = WRONG_FOR_STR
WRONG_FOR_BOOL = [("yes", True), (1, True), ("true", True), (0, True), (1.0, True), ("SECRET-no", False),
                  (None, False), ([True], False)]
WRONG_FOR_FLOAT = [("30", True), (True, True), ("SECRET-30", False), ([30], False), ({"s": 30}, False)]
WRONG_FOR_LITERAL = [(1, False), (True, False), (["batch"], False), (None, False)]
WRONG_FOR_LIST = [("SECRET-out/*.txt", False), ({"path": "a"}, False), (5, False), (True, False), (None, False)]

PROMPT_FIELDS: dict[str, list[tuple[Any, bool]]] = {
    "prompt": [*WRONG_FOR_STR, (None, False)],
    "session": WRONG_FOR_OPTIONAL_STR,
    "profile": WRONG_FOR_OPTIONAL_STR,
    "model": WRONG_FOR_OPTIONAL_STR,
    "system": WRONG_FOR_OPTIONAL_STR,
    "kind": WRONG_FOR_OPTIONAL_STR,
    "max_budget_usd": WRONG_FOR_FLOAT,
    "stream": WRONG_FOR_BOOL,
    "timeout_s": WRONG_FOR_FLOAT,
    "priority": WRONG_FOR_LITERAL,
    "files": WRONG_FOR_LIST,
    "return_files": WRONG_FOR_LIST,
}


def cases(fields: dict[str, list[tuple[Any, bool]]]) -> list[Any]:
    return [pytest.param(name, value, id=f"{name}-{'coerced-' if coerced else ''}{orjson.dumps(value).decode()}")
            for name, values in fields.items() for value, coerced in values]


def test_every_field_is_covered() -> None:
    assert set(PROMPT_FIELDS) == set(PromptRequest.model_fields)
    assert {name.partition("-")[0] for name in LEDGER_QUERIES} == {*LedgerQuery.model_fields, "unknown", "twice"}
    assert {name.partition("-")[0] for name in USAGE_QUERIES} == {*UsageQuery.model_fields, "unknown", "twice"} - {
        "tenant"}


def assert_names_field_without_value(error: dict[str, Any], field: str, value: Any) -> None:
    message = error["message"]
    assert error["code"] == "bad_request", error
    assert message.startswith("invalid request: "), message
    assert f"{field}:" in message, message  # names the field
    assert SECRET not in message
    assert "input_value" not in message
    if isinstance(value, str):
        assert repr(value) not in message and orjson.dumps(value).decode() not in message, message


def assert_refused_before_admission(d: RunningDaemon) -> None:
    """Counted as a refused request at most (a prompt that could not be read), never run."""
    outcomes = d.requests_by_outcome()
    assert set(outcomes) <= {"bad_request"}
    assert outcomes.total() <= 1
    assert all(pool.stats.leases == 0 for pool in d.daemon.all_pools().values())


@contextlib.asynccontextmanager
async def http(d: RunningDaemon) -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(base_url=d.url, headers={"Authorization": f"Bearer {KEYS['acme']}"}) as s:
        yield s


async def quiet_daemon(make_daemon: MakeDaemon) -> RunningDaemon:
    """No warm worker: nothing here may reach one (and the daemon starts in a few milliseconds)."""
    return await make_daemon(pool={"min_idle": 0})


# -- HTTP ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("field", "value"), cases(PROMPT_FIELDS))
async def test_http_prompt_refuses_a_wrong_type(make_daemon: MakeDaemon, field: str, value: Any) -> None:
    d = await quiet_daemon(make_daemon)
    body = {"prompt": SECRET, field: value}
    async with http(d) as s, s.post("/v1/prompt", data=orjson.dumps(body)) as resp:
        assert resp.status == 400
        answer = await resp.json()
    assert_names_field_without_value(answer["error"], field, value)
    assert_refused_before_admission(d)


@pytest.mark.parametrize(("field", "value"), cases({"profile": WRONG_FOR_OPTIONAL_STR,
                                                    "system": WRONG_FOR_OPTIONAL_STR}))
async def test_http_session_create_refuses_a_wrong_type(make_daemon: MakeDaemon, field: str, value: Any) -> None:
    d = await quiet_daemon(make_daemon)
    async with http(d) as s, s.post("/v1/sessions", data=orjson.dumps({field: value})) as resp:
        assert resp.status == 400
        answer = await resp.json()
    assert_names_field_without_value(answer["error"], field, value)
    assert await d.daemon.store.session_list("acme") == []


Query = tuple[str, str | list[str]] | None
LEDGER_QUERIES: dict[str, Query] = {
    "limit-": ("limit", "SECRET-ten"), "limit-float": ("limit", "1.5"), "limit-negative": ("limit", "-5"),
    "since-": ("since", "SECRET-yesterday"), "since-nan": ("since", "nan"), "since-inf": ("since", "inf"),
    "tenant-": None,  # a string, whatever it says: covered by the scope tests
    "unknown-": ("SECRETFIELD", "1"), "twice-": ("limit", ["1", "2"]),
}
USAGE_QUERIES: dict[str, Query] = {
    "window-": ("window", "SECRET-week"), "window-int": ("window", "1"),
    "date-": ("date", "SECRET-yesterday"), "date-month-for-day": ("date", "2026-11"),
    "unknown-": ("SECRETFIELD", "1"), "twice-": ("tenant", ["acme", "beta"]),
}


def query_cases(table: dict[str, Query]) -> list[Any]:
    return [pytest.param(*case, id=name.rstrip("-")) for name, case in table.items() if case is not None]


async def get_query(d: RunningDaemon, path: str, field: str, value: str | list[str]) -> tuple[int, Any]:
    values = value if isinstance(value, list) else [value]
    async with http(d) as s, s.get(path, params=[(field, v) for v in values]) as resp:
        return resp.status, await resp.json()


@pytest.mark.parametrize(("field", "value"), query_cases(LEDGER_QUERIES))
async def test_http_ledger_refuses_a_bad_parameter(make_daemon: MakeDaemon, field: str, value: Any) -> None:
    d = await quiet_daemon(make_daemon)
    status, answer = await get_query(d, "/v1/ledger", field, value)
    assert status == 400
    assert_names_field_without_value(answer["error"], field, value)


@pytest.mark.parametrize(("field", "value"), query_cases(USAGE_QUERIES))
async def test_http_usage_refuses_a_bad_parameter(make_daemon: MakeDaemon, field: str, value: Any) -> None:
    d = await quiet_daemon(make_daemon)
    status, answer = await get_query(d, "/v1/usage", field, value)
    assert status == 400
    if field == "date":  # a string, so its format is checked where the window is known
        assert answer["error"]["code"] == "bad_request"
        assert "date must be YYYY-MM-DD" in answer["error"]["message"]
        assert value not in answer["error"]["message"]
    else:
        assert_names_field_without_value(answer["error"], field, value)


@pytest.mark.parametrize("path", ["/v1/sessions", "/v1/sessions/s_0123456789abcdef"])
async def test_http_session_queries_refuse_unknown_and_repeated_parameters(make_daemon: MakeDaemon, path: str) -> None:
    d = await quiet_daemon(make_daemon)
    for field, value in (("SECRETFIELD", "1"), ("tenant", ["acme", "beta"])):
        status, answer = await get_query(d, path, field, value)
        assert status == 400, answer
        assert_names_field_without_value(answer["error"], field, value)


async def test_http_well_typed_values_still_pass(make_daemon: MakeDaemon) -> None:
    """Strict does not mean stricter than the schema: an integer timeout is a number, an empty
    query value is no value, and query numbers parse."""
    d = await make_daemon()
    async with http(d) as s:
        async with s.post("/v1/prompt", data=orjson.dumps({"prompt": "[[reply:ok]]", "timeout_s": 30,
                                                           "stream": False, "session": None})) as resp:
            assert resp.status == 200, await resp.text()
        async with s.get("/v1/ledger", params={"limit": "10", "since": "0", "tenant": ""}) as resp:
            assert resp.status == 200, await resp.text()
            assert len((await resp.read()).splitlines()) == 1
        async with s.get("/v1/usage", params={"window": "month", "date": ""}) as resp:
            assert resp.status == 200, await resp.text()
        async with s.post("/v1/sessions", data=b"") as resp:
            assert resp.status == 201, await resp.text()


# -- the socket ------------------------------------------------------------------------------------


FRAME_FIELDS: dict[str, tuple[dict[str, Any], dict[str, list[tuple[Any, bool]]]]] = {
    "prompt": ({"op": "prompt", "key": KEYS["acme"], "prompt": SECRET},
               {**PROMPT_FIELDS, "key": WRONG_FOR_STR}),
    "cancel": ({"op": "cancel", "target": "r1"}, {"target": WRONG_FOR_STR}),
    "status": ({"op": "status", "key": KEYS["acme"]}, {"key": WRONG_FOR_STR}),
    "usage": ({"op": "usage", "key": ADMIN_KEY},
              {"key": WRONG_FOR_STR, "tenant": WRONG_FOR_OPTIONAL_STR, "window": WRONG_FOR_LITERAL,
               "date": WRONG_FOR_OPTIONAL_STR}),
    "session.create": ({"op": "session.create", "key": KEYS["acme"]},
                       {"key": WRONG_FOR_STR, "profile": WRONG_FOR_OPTIONAL_STR,
                        "system": WRONG_FOR_OPTIONAL_STR}),
    "session.delete": ({"op": "session.delete", "key": KEYS["acme"], "session": "s_0123456789abcdef"},
                       {"key": WRONG_FOR_STR, "session": WRONG_FOR_STR}),
}
WRONG_FOR_OBJECT = [("SECRET-job", False), (5, False), (["x"], False), (True, False)]
WRONG_FOR_OBJECTS = [("SECRET-jobs", False), ({"prompt": "x"}, False), (True, False), (5, False)]
WRONG_FOR_STATUS = [(1, False), (True, False), (["queued"], False), ("SECRET-done", False)]
WRONG_FOR_LIMIT = [("5", True), (1.5, False), (0, False), (100_000, False), (None, False)]
for _op in ("job.submit", "job.bulk", "job.get", "job.list", "job.cancel"):
    FRAME_FIELDS[_op] = ({"op": _op, "key": KEYS["acme"], "job_id": "job_0123"}, {
        "key": WRONG_FOR_STR, "job": WRONG_FOR_OBJECT, "jobs": WRONG_FOR_OBJECTS,
        "idempotency_key": [*WRONG_FOR_OPTIONAL_STR, ("", False)], "job_id": WRONG_FOR_OPTIONAL_STR,
        "tenant": WRONG_FOR_OPTIONAL_STR, "status": WRONG_FOR_STATUS, "since": WRONG_FOR_FLOAT,
        "limit": WRONG_FOR_LIMIT})
for _, _fields in FRAME_FIELDS.values():  # every frame has an id and an op
    _fields.update(id=WRONG_FOR_STR, op=WRONG_FOR_LITERAL)


def test_every_frame_field_is_covered() -> None:
    assert set(FRAME_FIELDS) == set(FRAME_MODELS)
    for op, (_, fields) in FRAME_FIELDS.items():
        assert set(fields) == set(FRAME_MODELS[op].model_fields), op


def frame_cases() -> list[Any]:
    return [pytest.param(op, field, value,
                         id=f"{op}-{field}-{'coerced-' if coerced else ''}{orjson.dumps(value).decode()}")
            for op, (_, fields) in FRAME_FIELDS.items() for field, values in fields.items()
            for value, coerced in values]


@pytest.mark.parametrize(("op", "field", "value"), frame_cases())
async def test_socket_frame_refuses_a_wrong_type(make_daemon: MakeDaemon, op: str, field: str, value: Any) -> None:
    d = await quiet_daemon(make_daemon)
    base, _ = FRAME_FIELDS[op]
    async with connect(d) as c:
        await c.send({"id": "f1", **base, field: value})
        error = await c.next()
        # Answered under the frame's id, when it has a valid one.
        assert (error["id"], error["event"]) == (None if field == "id" else "f1", "error"), error
        if field == "op":
            assert error["message"].startswith("invalid request: op: "), error
        else:
            assert_names_field_without_value(error, field, value)
        await barrier_only(c)
    assert_refused_before_admission(d)
    assert await d.daemon.store.session_list(None) == []


async def barrier_only(c: FrameClient) -> None:
    """Nothing but the one error came back: a refused frame is never also started."""
    await c.barrier()
    assert [f["event"] for f in c.frames] == ["error", "cancelled"], c.frames


async def test_an_unknown_op_is_refused_without_echoing_it(make_daemon: MakeDaemon) -> None:
    d = await quiet_daemon(make_daemon)
    async with connect(d) as c:
        await c.send({"id": "u1", "op": "SECRET-OP", "key": KEYS["acme"]}, {"id": "u2", "key": KEYS["acme"]})
        unknown, missing = await c.next(), await c.next()
    assert (unknown["id"], unknown["code"]) == ("u1", "bad_request")
    assert "SECRET-OP" not in unknown["message"]
    assert "'prompt', 'cancel', 'status', 'usage', 'session.create', 'session.delete'" in unknown["message"]
    assert (missing["id"], missing["message"]) == ("u2", "invalid request: op: Field required")


async def test_a_frame_id_that_is_not_a_valid_id_is_never_echoed_as_the_answer_id(make_daemon: MakeDaemon) -> None:
    d = await quiet_daemon(make_daemon)
    async with connect(d) as c:
        for bad_id in ("x" * 129, "with space", "", "\u00e9t\u00e9", "trailing-newline\n"):
            await c.send({"id": bad_id, "op": "status", "key": KEYS["acme"]})
            error = await c.next()
            assert (error["id"], error["code"]) == (None, "bad_request"), error
            assert error["message"].startswith("invalid request: id: ")
