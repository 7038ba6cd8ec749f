"""The HTTP front end end to end: a real daemon on a real port, the fake CLI behind it."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from tests.daemon_fixtures import ADMIN_KEY, KEYS, RunningDaemon, make_daemon
from tests.helpers import until

__all__ = ["make_daemon"]

MakeDaemon = Callable[..., Awaitable[RunningDaemon]]
RESULT_FIELDS = {"id", "tenant", "session", "text", "is_error", "stop_reason", "usage", "cost_usd", "duration_ms",
                 "queue_ms", "model"}


def auth(tenant: str = "acme") -> dict[str, str]:
    return {"Authorization": f"Bearer {KEYS[tenant]}"}


async def post(url: str, body: Any, headers: dict[str, str] | None = None) -> tuple[int, dict[str, Any],
                                                                                    dict[str, str]]:
    data = body if isinstance(body, bytes) else orjson.dumps(body)
    async with aiohttp.ClientSession() as session, session.post(
        f"{url}/v1/prompt", data=data, headers=headers if headers is not None else auth()
    ) as resp:
        return resp.status, orjson.loads(await resp.read()), dict(resp.headers)


async def sse(url: str, body: dict[str, Any], tenant: str = "acme") -> list[tuple[str, dict[str, Any]]]:
    events: list[tuple[str, dict[str, Any]]] = []
    async with aiohttp.ClientSession() as session, session.post(
        f"{url}/v1/prompt", data=orjson.dumps({**body, "stream": True}), headers=auth(tenant)
    ) as resp:
        assert resp.status == 200, await resp.text()
        assert resp.content_type == "text/event-stream"
        event = ""
        async for raw in resp.content:
            line = raw.decode().rstrip("\r\n")
            if line.startswith("event:"):
                event = line[6:].strip()
            elif line.startswith("data:"):
                events.append((event, orjson.loads(line[5:])))
    return events


async def test_json_prompt_answers_with_the_documented_fields(make_daemon: MakeDaemon) -> None:
    d = await make_daemon()
    status, body, _ = await post(d.url, {"prompt": "hello [[reply:HELLO]]"})
    assert status == 200
    assert set(body) == RESULT_FIELDS
    assert body["text"] == "HELLO"
    assert body["tenant"] == "acme"
    assert body["session"] is None
    assert body["is_error"] is False
    assert body["stop_reason"] == "end_turn"
    assert set(body["usage"]) == {"input_tokens", "output_tokens", "cache_read_input_tokens",
                                  "cache_creation_input_tokens"}
    assert body["usage"]["output_tokens"] > 0
    assert body["cost_usd"] > 0
    assert body["duration_ms"] >= body["queue_ms"] >= 0


async def test_sse_streams_deltas_then_exactly_one_result(make_daemon: MakeDaemon) -> None:
    d = await make_daemon()
    events = await sse(d.url, {"prompt": "[[reply:one two three four five six]]"})
    kinds = [e for e, _ in events]
    assert kinds.count("result") == 1
    assert kinds[-1] == "result"
    assert kinds.count("delta") >= 2  # the fake streams in 8-character pieces
    text = "".join(data["text"] for event, data in events if event == "delta")
    assert text == events[-1][1]["text"] == "one two three four five six"


async def test_model_errors_are_results_with_is_error(make_daemon: MakeDaemon) -> None:
    d = await make_daemon()
    status, body, _ = await post(d.url, {"prompt": "[[api_error:529]]"})
    assert status == 200
    assert body["is_error"] is True


@pytest.mark.parametrize(
    ("headers", "body", "status", "code"),
    [
        ({}, {"prompt": "x"}, 401, "unauthorized"),
        ({"Authorization": "Bearer wrong"}, {"prompt": "x"}, 401, "unauthorized"),
        ({"Authorization": f"Bearer {ADMIN_KEY}"}, {"prompt": "x"}, 401, "unauthorized"),
        (None, {"prompt": "x", "profile": "other"}, 403, "forbidden"),
        (None, {"prompt": "x", "profile": "nope"}, 404, "not_found"),
        (None, {"prompt": "x", "session": "s-1"}, 404, "not_found"),
        (None, b"{not json", 400, "bad_request"),
        (None, {"promt": "typo"}, 400, "bad_request"),
        (None, {"prompt": ""}, 400, "bad_request"),
        (None, {"prompt": "x", "timeout_s": -1}, 400, "bad_request"),
        (None, {"prompt": "x" * 5000}, 413, "prompt_too_large"),
    ],
    ids=["no-key", "bad-key", "admin-key-is-no-tenant", "profile-not-allowed", "unknown-profile",
         "unknown-session", "bad-json", "unknown-field", "empty-prompt", "bad-timeout", "too-large"],
)
async def test_errors_have_statuses_and_codes(
    make_daemon: MakeDaemon, headers: dict[str, str] | None, body: Any, status: int, code: str
) -> None:
    d = await make_daemon(server={"max_prompt_bytes": 4096})
    got, answer, _ = await post(d.url, body, headers)
    assert got == status
    assert answer == {"error": {"code": code, "message": answer["error"]["message"]}}
    assert answer["error"]["message"]


async def test_body_larger_than_the_limit_is_413_before_being_read(make_daemon: MakeDaemon) -> None:
    d = await make_daemon(server={"max_prompt_bytes": 1024})
    status, body, _ = await post(d.url, {"prompt": "y" * 200_000})
    assert status == 413
    assert body["error"]["code"] == "prompt_too_large"


async def test_validation_errors_never_echo_the_prompt(make_daemon: MakeDaemon) -> None:
    d = await make_daemon()
    _, body, _ = await post(d.url, {"prompt": "SECRET-PROMPT-TEXT", "stream": "maybe"})
    assert body["error"]["code"] == "bad_request"
    assert "SECRET-PROMPT-TEXT" not in body["error"]["message"]


async def test_timeout_is_504_and_the_worker_is_reset(make_daemon: MakeDaemon) -> None:
    d = await make_daemon()
    status, body, _ = await post(d.url, {"prompt": "[[hang]]", "timeout_s": 0.5})
    assert status == 504
    assert body["error"]["code"] == "timeout"
    pool = d.pool()
    await until(lambda: pool.stats.abandoned_turns == 1 and pool.stats.resets == 1)
    status, body, _ = await post(d.url, {"prompt": "[[reply:after]]"})
    assert (status, body["text"]) == (200, "after")


async def test_full_pool_is_503_with_retry_after(make_daemon: MakeDaemon) -> None:
    d = await make_daemon(pool={"max_workers": 1, "lease_timeout_s": 0.3})
    hanging = asyncio.create_task(post(d.url, {"prompt": "[[hang]]", "timeout_s": 3}))
    await until(lambda: d.pool().counts()["leased"] == 1)
    status, body, headers = await post(d.url, {"prompt": "x"})
    assert status == 503
    assert body["error"]["code"] == "pool_timeout"
    assert headers["Retry-After"] == "1"
    assert (await hanging)[0] == 504


async def test_worker_crash_mid_stream_ends_with_one_error_event(make_daemon: MakeDaemon) -> None:
    d = await make_daemon()
    events = await sse(d.url, {"prompt": "[[crash]] [[reply:partial answer here]]"})
    kinds = [e for e, _ in events]
    assert kinds[0] == "delta"
    assert kinds[-1] == "error"
    assert kinds.count("error") == 1
    assert "result" not in kinds
    assert events[-1][1]["code"] == "worker_died"


async def test_error_before_any_output_is_a_plain_http_error_even_when_streaming(make_daemon: MakeDaemon) -> None:
    d = await make_daemon(pool={"max_workers": 1, "lease_timeout_s": 0.3})
    hanging = asyncio.create_task(post(d.url, {"prompt": "[[hang]]", "timeout_s": 2}))
    await until(lambda: d.pool().counts()["leased"] == 1)
    async with aiohttp.ClientSession() as session, session.post(
        f"{d.url}/v1/prompt", data=orjson.dumps({"prompt": "x", "stream": True}), headers=auth(),
    ) as resp:
        assert resp.status == 503
        assert resp.headers["Retry-After"] == "1"
        assert (await resp.json())["error"]["code"] == "pool_timeout"
    assert (await hanging)[0] == 504


async def test_client_disconnect_mid_stream_interrupts_and_resets(make_daemon: MakeDaemon) -> None:
    d = await make_daemon()
    pool = d.pool()
    async with aiohttp.ClientSession() as session, session.post(
        f"{d.url}/v1/prompt", data=orjson.dumps({"prompt": "[[sleep:5]] " + "long answer " * 20, "stream": True}),
        headers=auth(),
    ) as resp:
        first = await resp.content.readline()
        assert first.startswith(b"event: delta")
    # The connection is closed: the handler is cancelled, the turn abandoned and the worker reset.
    await until(lambda: pool.stats.abandoned_turns == 1 and pool.stats.resets == 1, 10)
    await d.idle()
    assert d.daemon.service.in_flight == 0


async def test_many_concurrent_clients(make_daemon: MakeDaemon) -> None:
    d = await make_daemon(pool={"max_workers": 3, "min_idle": 2})

    async def one(i: int) -> str:
        tenant = "acme" if i % 2 else "beta"
        if i % 3 == 0:
            events = await sse(d.url, {"prompt": f"[[reply:answer-{i}]]"}, tenant)
            return str(events[-1][1]["text"])
        async with aiohttp.ClientSession() as session, session.post(
            f"{d.url}/v1/prompt", data=orjson.dumps({"prompt": f"[[reply:answer-{i}]]"}), headers=auth(tenant)
        ) as resp:
            body = await resp.json()
            assert body["tenant"] == tenant
            return str(body["text"])

    async with asyncio.timeout(60):
        answers = await asyncio.gather(*(one(i) for i in range(30)))
    assert answers == [f"answer-{i}" for i in range(30)]


async def test_health_ready_metrics_and_pool_status(make_daemon: MakeDaemon) -> None:
    d = await make_daemon()
    await post(d.url, {"prompt": "count me"})
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{d.url}/healthz") as resp:
            assert (resp.status, await resp.json()) == (200, {"status": "ok"})
        async with session.get(f"{d.url}/readyz") as resp:
            ready = await resp.json()
            assert resp.status == 200
            assert ready["ready"] is True
            assert ready["pools"]["default"]["healthy"] is True
            # A profile started on demand (min_idle 0) has nothing warm and does not hold readiness back.
            assert (ready["pools"]["other"]["warm"], ready["pools"]["other"]["healthy"]) == (0, True)
        text = await d.metrics_text()
        assert 'claudepool_requests_total{outcome="ok",tenant="acme"} 1.0' in text
        assert 'claudepool_workers{profile="default",state="idle"}' in text
        async with session.get(f"{d.url}/v1/pool") as resp:
            assert resp.status == 401
        async with session.get(f"{d.url}/v1/pool", headers=auth()) as resp:
            assert resp.status == 403
            assert (await resp.json())["error"]["code"] == "forbidden"
        async with session.get(f"{d.url}/v1/pool", headers={"Authorization": f"Bearer {ADMIN_KEY}"}) as resp:
            status = await resp.json()
            assert resp.status == 200
        workers = status["pools"]["default"]["workers"]
        assert workers
        assert {"id", "state", "pid", "profile", "turns", "age_s", "pss_bytes"} <= set(workers[0])
        assert status["queue"] == {"waiting": 0}
        d.daemon.service.draining = True
        async with session.get(f"{d.url}/readyz") as resp:
            assert resp.status == 503
            assert (await resp.json())["draining"] is True
        status_code, body, headers = await post(d.url, {"prompt": "late"})
        assert (status_code, body["error"]["code"], headers["Retry-After"]) == (503, "draining", "5")


async def test_metrics_are_for_the_scraper_never_for_a_tenant(make_daemon: MakeDaemon, tmp_path: Path) -> None:
    # /metrics names every configured tenant with its traffic and spend: no tenant may read it.
    d = await make_daemon(metrics={"key": "scrape-key-0123"})
    await post(d.url, {"prompt": "count me"}, auth("beta"))

    async def scrape_with(url: str, headers: dict[str, str]) -> tuple[int, str]:
        async with aiohttp.ClientSession() as session, session.get(f"{url}/metrics", headers=headers) as resp:
            return resp.status, await resp.text()

    assert (await scrape_with(d.url, {}))[0] == 401
    status, text = await scrape_with(d.url, auth("acme"))
    assert (status, "beta" in text) == (403, False)
    for key in ("scrape-key-0123", ADMIN_KEY):
        status, text = await scrape_with(d.url, {"Authorization": f"Bearer {key}"})
        assert (status, 'tenant="beta"' in text) == (200, True)
    # Where no tenant can reach the listener, an operator may open it.
    public = await make_daemon(metrics={"public": True}, server={"socket": str(tmp_path / "public.sock")})
    status, text = await scrape_with(public.url, {})
    assert (status, "claudepool_requests_total" in text) == (200, True)


async def test_unknown_route_and_method_are_json_errors(make_daemon: MakeDaemon) -> None:
    d = await make_daemon()
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{d.url}/nope") as resp:
            assert resp.status == 404
            assert (await resp.json())["error"]["code"] == "not_found"
        async with session.get(f"{d.url}/v1/prompt") as resp:
            assert resp.status == 405
            assert (await resp.json())["error"]["code"] == "method_not_allowed"
