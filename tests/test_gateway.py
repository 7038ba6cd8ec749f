"""The gateway over real sockets, with workers on the fake CLI (issue 12): each worker's credential
reaches a stand-in provider that answers bytes the test chose, so what the worker gets back can be
compared byte for byte; refusals, the lease a call is billed to, errors and broken-off streams.

The test plays the worker's CLI: it reads the worker's credential and the gateway's address from
the worker's /proc environ (as any tool of the worker could) and calls with them.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web

from claudepool.daemon.metrics import TenantLabels
from claudepool.gateway.call_usage import CallUsageMeter
from claudepool.gateway.credentials import CREDENTIAL_PREFIX
from claudepool.gateway.forward import IDLE_ERROR_EVENT
from claudepool.pool.lease import Lease
from claudepool.pool.profile import Profile
from claudepool.pool.timeouts import WorkerTimeouts
from claudepool.store.memory import MemoryStore
from claudepool.tenancy.budgets import PricingTable
from claudepool.tenancy.limits import RateLimiter
from claudepool.tenancy.metering import Meter, RequestContext
from claudepool.tenancy.settings import MeteringSettings, default_prices
from tests.gateway_fixtures import TENANTS, MakeStack, Stack, lease_for, make_stack, worker_environ
from tests.helpers import closed_port_url, until

__all__ = ["make_stack"]

KEY = "sk-ant-api03-provider-key-0123456789"


@dataclass
class Answer:
    status: int = 200
    headers: dict[str, str] = field(default_factory=lambda: {"content-type": "text/event-stream"})
    chunks: list[bytes] = field(default_factory=lambda: [b"event: ping\ndata: {}\n\n"])
    pause_s: float = 0.0  # between chunks
    then: str = "end"  # "end", "hang" (never finish), "abort" (drop the connection)
    content_length: bool = False
    delay_s: float = 0.0  # before the headers


@dataclass
class Received:
    method: str
    path_qs: str
    headers: dict[str, str]
    body: bytes
    peer: Any  # the caller's address: one connection, one port


class RawUpstream:
    """A stand-in provider: answers each call with the next `Answer`, records what it received, and
    notes when a caller went away mid-answer (its handler is cancelled)."""

    def __init__(self) -> None:
        self.answers: list[Answer] = []
        self.received: list[Received] = []
        self.cut = asyncio.Event()
        self.url = ""
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        host, port = self._runner.addresses[0][:2]
        self.url = f"http://{host}:{port}"

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        peer = request.transport.get_extra_info("peername") if request.transport is not None else None
        self.received.append(Received(request.method, request.path_qs,
                                      {k.lower(): v for k, v in request.headers.items()}, await request.read(), peer))
        answer = self.answers.pop(0) if self.answers else Answer()
        response = web.StreamResponse(status=answer.status, headers=answer.headers)
        if answer.content_length:
            response.content_length = sum(map(len, answer.chunks))
        try:
            await asyncio.sleep(answer.delay_s)
            await response.prepare(request)
            for i, chunk in enumerate(answer.chunks):
                if i and answer.pause_s:
                    await asyncio.sleep(answer.pause_s)
                await response.write(chunk)
            if answer.then == "hang":
                await asyncio.Event().wait()
            if answer.then == "abort":
                assert request.transport is not None
                request.transport.abort()
                return response
            await response.write_eof()
        except asyncio.CancelledError:
            self.cut.set()
            raise
        return response


@pytest.fixture
async def provider() -> AsyncIterator[RawUpstream]:
    raw = RawUpstream()
    await raw.start()
    yield raw
    await raw.stop()


@pytest.fixture
def profile(make_fake_profile: Callable[..., Profile]) -> Profile:
    return make_fake_profile(name="default")


async def call(base_url: str, credential: str | None, path: str = "/v1/messages?beta=true", method: str = "POST",
               body: bytes = b'{"model":"m","stream":true}', **headers: str) -> tuple[int, dict[str, str], bytes]:
    hdrs = {"content-type": "application/json", "anthropic-version": "2023-06-01", **headers}
    if credential is not None:
        hdrs["x-api-key"] = credential
    async with aiohttp.ClientSession(auto_decompress=False) as session, session.request(
        method, base_url + path, data=body, headers=hdrs
    ) as resp:
        return resp.status, {k.lower(): v for k, v in resp.headers.items()}, await resp.read()


def credential_of(lease: Lease) -> tuple[str, str]:
    env = worker_environ(lease.worker.pid)
    return env["ANTHROPIC_BASE_URL"], env["ANTHROPIC_API_KEY"]


async def in_turn(stack: Stack, tenant: str = "acme", request_id: str = "req-1") -> tuple[Lease, str, str]:
    """A lease whose worker runs a turn that never ends by itself (the fake CLI's [[hang]]), as the CLI
    is while it waits for the provider; and that worker's gateway address and credential."""
    lease = await lease_for(stack.pool, tenant, request_id)
    lease.run_turn("[[hang]]")  # written at once: the worker is in its turn from here
    url, credential = credential_of(lease)
    return lease, url, credential


async def test_a_stream_is_relayed_byte_for_byte_with_the_providers_credential_in_place_of_the_workers(
    make_stack: MakeStack, profile: Profile, provider: RawUpstream
) -> None:
    # Chunk boundaries inside an event and inside a UTF-8 character, CRLF line ends: nothing may move.
    sse = ("event: message_start\r\ndata: {\"type\":\"message_start\"}\r\n\r\n"
           "event: content_block_delta\ndata: {\"delta\":{\"text\":\"h\u00e9llo \u2603\"}}\n\n").encode()
    chunks = [sse[:7], sse[7:40], sse[40:-9], sse[-9:-8], sse[-8:]]
    provider.answers.append(Answer(headers={
        "content-type": "text/event-stream", "request-id": "req_upstream_1", "retry-after": "3",
        "anthropic-ratelimit-requests-remaining": "41", "x-should-retry": "false",
        "set-cookie": "session=provider", "x-envoy-upstream-service-time": "12"}, chunks=chunks, pause_s=0.02))
    stack = await make_stack(profile, provider.url, key=KEY)
    lease, url, credential = await in_turn(stack)
    assert credential.startswith(CREDENTIAL_PREFIX) and KEY not in worker_environ(lease.worker.pid).values()
    body = b'{"model":"m","stream":true,"messages":[{"role":"user","content":"\xc3\xa9"}]}'
    status, headers, relayed = await call(
        url, credential, body=body, **{"anthropic-beta": "claude-code-20250219", "x-stainless-retry-count": "0",
                                       "x-claudepool-tenant": "beta", "authorization": "Bearer forged",
                                       "cookie": "c=1"})
    assert status == 200
    assert relayed == sse
    # The provider's headers that matter to the CLI pass; the others stay behind.
    assert headers["request-id"] == "req_upstream_1" and headers["retry-after"] == "3"
    assert headers["anthropic-ratelimit-requests-remaining"] == "41" and headers["x-should-retry"] == "false"
    assert "set-cookie" not in headers and "x-envoy-upstream-service-time" not in headers
    [got] = provider.received
    assert (got.method, got.path_qs, got.body) == ("POST", "/v1/messages?beta=true", body)
    assert got.headers["x-api-key"] == KEY
    assert got.headers["anthropic-version"] == "2023-06-01"
    assert got.headers["anthropic-beta"] == "claude-code-20250219"
    assert got.headers["x-stainless-retry-count"] == "0"
    assert got.headers["accept-encoding"] == "identity"
    for dropped in ("authorization", "x-claudepool-tenant", "cookie"):
        assert dropped not in got.headers
    assert credential not in str(got.headers)
    # Billed to the lease's request, whatever the worker's headers claimed; the hook saw every byte.
    [rec] = stack.recorder.calls
    assert (rec.attribution.tenant, rec.attribution.request_id, rec.attribution.worker) == (
        "acme", "req-1", lease.worker.id)
    assert (rec.status, rec.outcome, rec.upstream_request_id) == (200, "ok", "req_upstream_1")
    assert bytes(stack.recorder.relayed[rec.id]) == sse and stack.recorder.bodies[rec.id] == body
    assert stack.sample("claudepool_gateway_calls_total", tenant="acme", outcome="ok") == 1
    assert stack.sample("claudepool_gateway_calls_total", tenant="beta", outcome="ok") == 0
    lease.release()


async def test_a_json_answer_keeps_its_length_and_the_connection_is_reused(
    make_stack: MakeStack, profile: Profile, provider: RawUpstream
) -> None:
    answer = orjson.dumps({"id": "msg_1", "type": "message", "content": [{"type": "text", "text": "ok"}],
                           "usage": {"input_tokens": 3, "output_tokens": 1}})
    for _ in range(3):
        provider.answers.append(Answer(headers={"content-type": "application/json"}, chunks=[answer],
                                       content_length=True))
    stack = await make_stack(profile, provider.url, key=KEY)
    lease, url, credential = await in_turn(stack)
    for _ in range(3):
        status, headers, relayed = await call(url, credential, body=b'{"model":"m"}')
        assert (status, relayed, headers["content-length"]) == (200, answer, str(len(answer)))
    assert [r.headers["x-api-key"] for r in provider.received] == [KEY] * 3
    # One shared session: the three calls went over one kept-alive connection to the provider.
    assert len({r.peer for r in provider.received}) == 1
    lease.release()


@pytest.mark.parametrize(("status", "kind"), [(429, "rate_limit_error"), (529, "overloaded_error"),
                                              (400, "invalid_request_error"), (500, "api_error")])
async def test_the_providers_errors_pass_through_unchanged(
    make_stack: MakeStack, profile: Profile, provider: RawUpstream, status: int, kind: str
) -> None:
    error = orjson.dumps({"type": "error", "error": {"type": kind, "message": "from the provider"}})
    provider.answers.append(Answer(status=status, chunks=[error], headers={
        "content-type": "application/json", "retry-after": "17", "request-id": "req_err",
        "anthropic-ratelimit-tokens-remaining": "0", "x-should-retry": "true"}))
    stack = await make_stack(profile, provider.url, key=KEY)
    lease, url, credential = await in_turn(stack)
    got_status, headers, body = await call(url, credential)
    assert (got_status, body) == (status, error)
    assert (headers["retry-after"], headers["request-id"]) == ("17", "req_err")
    assert headers["anthropic-ratelimit-tokens-remaining"] == "0" and headers["x-should-retry"] == "true"
    [rec] = stack.recorder.calls
    assert (rec.status, rec.outcome) == (status, "upstream_error")
    lease.release()


def error_of(body: bytes) -> dict[str, Any]:
    parsed: dict[str, Any] = orjson.loads(body)
    assert parsed["type"] == "error"
    return parsed["error"]  # type: ignore[no-any-return]


async def test_refusals_are_answered_as_the_provider_would_and_counted_by_reason(
    make_stack: MakeStack, profile: Profile, provider: RawUpstream
) -> None:
    stack = await make_stack(profile, provider.url, key=KEY, min_idle=2, max_workers=2)
    await stack.pool.wait_ready(30, idle=2)

    async def refused(credential: str | None, reason: str, status: int, kind: str,
                      path: str = "/v1/messages", method: str = "POST") -> None:
        before = stack.sample("claudepool_gateway_refusals_total", reason=reason)
        got, headers, body = await call(url, credential, path=path, method=method)
        assert (got, error_of(body)["type"], headers["x-should-retry"]) == (status, kind, "false")
        assert stack.sample("claudepool_gateway_refusals_total", reason=reason) == (before or 0) + 1

    lease, url, credential = await in_turn(stack)
    await refused(None, "missing_credential", 401, "authentication_error")
    await refused("cpw-" + "x" * 43, "unknown_credential", 401, "authentication_error")
    await refused(KEY, "unknown_credential", 401, "authentication_error")  # the provider's key opens nothing
    for method, path in (("GET", "/v1/models"), ("POST", "/v1/messages/batches"), ("POST", "/v1/complete"),
                         ("GET", "/v1/messages"), ("POST", "/v1/organizations/usage_report/messages"),
                         ("POST", "/v1/messages/"), ("POST", "/V1/MESSAGES")):
        await refused(credential, "endpoint", 404, "not_found_error", path=path, method=method)
    # A leased worker outside its turn: the CLI calls only within one, so this is something else.
    idle = next(w for w in stack.pool.workers() if w is not lease.worker)
    idle_credential = worker_environ(idle.pid)["ANTHROPIC_API_KEY"]
    await refused(idle_credential, "no_lease", 403, "permission_error")  # idle: it serves nobody
    second = await lease_for(stack.pool, "beta", "req-2")
    assert second.worker is idle
    await refused(idle_credential, "not_in_turn", 403, "permission_error")
    assert provider.received == [] and stack.recorder.calls == []  # nothing reached the provider
    second.release()
    lease.release()


async def test_a_credential_is_refused_once_its_worker_has_exited(
    make_stack: MakeStack, profile: Profile, provider: RawUpstream
) -> None:
    stack = await make_stack(profile, provider.url, key=KEY)
    lease, url, credential = await in_turn(stack)
    assert (await call(url, credential))[0] == 200
    assert stack.sample("claudepool_gateway_credentials") == 1
    worker = lease.worker
    lease.release()
    await stack.pool.close()
    assert worker.returncode is not None
    status, _, body = await call(url, credential)
    assert (status, error_of(body)["type"]) == (401, "authentication_error")
    assert stack.sample("claudepool_gateway_refusals_total", reason="unknown_credential") == 1
    assert stack.sample("claudepool_gateway_credentials") == 0
    assert len(provider.received) == 1


async def test_a_released_lease_still_draining_its_turn_owns_its_workers_calls(
    make_stack: MakeStack, make_fake_profile: Callable[..., Profile], provider: RawUpstream
) -> None:
    # A worker that ignores the interrupt keeps its abandoned turn running until the interrupt times out.
    profile = make_fake_profile("ignore_interrupt", name="default")
    stack = await make_stack(profile, provider.url, key=KEY,
                             timeouts=WorkerTimeouts(interrupt_timeout_s=30, close_kill_timeout_s=5))
    lease, url, credential = await in_turn(stack, "beta", "req-draining")
    lease.release()  # the client went away mid-turn: the pool drains the turn
    assert stack.pool.lease_of(lease.worker) is lease
    assert (await call(url, credential))[0] == 200
    [rec] = stack.recorder.calls
    assert (rec.attribution.tenant, rec.attribution.request_id) == ("beta", "req-draining")


async def test_an_unreachable_provider_is_a_5xx_the_cli_retries(
    make_stack: MakeStack, profile: Profile
) -> None:
    with closed_port_url() as nowhere:
        stack = await make_stack(profile, nowhere, key=KEY)
        lease, url, credential = await in_turn(stack)
        status, headers, body = await call(url, credential)
    assert (status, error_of(body)["type"], headers["x-should-retry"]) == (502, "api_error", "true")
    [rec] = stack.recorder.calls
    assert (rec.outcome, rec.status) == ("unreachable", 502)
    assert stack.sample("claudepool_gateway_calls_total", tenant="acme", outcome="unreachable") == 1
    lease.release()


async def test_a_worker_that_leaves_mid_stream_stops_the_providers_stream(
    make_stack: MakeStack, profile: Profile, provider: RawUpstream
) -> None:
    provider.answers.append(Answer(chunks=[b"event: message_start\ndata: {}\n\n"], then="hang"))
    stack = await make_stack(profile, provider.url, key=KEY)
    lease, url, credential = await in_turn(stack)
    async with aiohttp.ClientSession() as session:
        resp = await session.post(url + "/v1/messages", data=b"{}", headers={"x-api-key": credential})
        assert await resp.content.readany() == b"event: message_start\ndata: {}\n\n"
        resp.close()  # the worker goes away (an interrupt, a kill)
        async with asyncio.timeout(5):
            await provider.cut.wait()  # the gateway closed its call to the provider at once
    await until(lambda: len(stack.recorder.calls) == 1)
    assert stack.recorder.calls[0].outcome == "client_gone"
    lease.release()


async def test_a_provider_that_breaks_off_breaks_off_the_answer(
    make_stack: MakeStack, profile: Profile, provider: RawUpstream
) -> None:
    provider.answers.append(Answer(chunks=[b"event: message_start\ndata: {}\n\n"], then="abort"))
    stack = await make_stack(profile, provider.url, key=KEY)
    lease, url, credential = await in_turn(stack)
    with pytest.raises(aiohttp.ClientPayloadError):
        await call(url, credential)  # not a complete answer: the CLI sees the break as it would have
    [rec] = stack.recorder.calls
    assert rec.outcome == "upstream_cut"
    lease.release()


IDLE_S = 0.5


@pytest.mark.parametrize("cut", [True, False], ids=["idle-cut", "no-cut-negative-control"])
async def test_a_stream_idle_mid_answer_ends_with_an_overloaded_error_event(
    make_stack: MakeStack, profile: Profile, provider: RawUpstream, cut: bool
) -> None:
    start = b"event: message_start\ndata: {}\n\n"
    provider.answers.append(Answer(chunks=[start], then="hang"))
    stack = await make_stack(profile, provider.url, key=KEY, gateway_options={"idle_timeout_s": IDLE_S if cut else 0})
    lease, url, credential = await in_turn(stack)
    if not cut:
        with pytest.raises(TimeoutError):  # without the cut the answer waits for as long as the provider
            await asyncio.wait_for(call(url, credential), 10 * IDLE_S)
        lease.release()
        return
    status, _, relayed = await asyncio.wait_for(call(url, credential), 10 * IDLE_S)
    assert (status, relayed) == (200, start + IDLE_ERROR_EVENT)
    assert b'"type":"overloaded_error"' in relayed
    await asyncio.wait_for(provider.cut.wait(), 5)  # the provider's stream was closed, not left open
    [rec] = stack.recorder.calls
    assert rec.outcome == "upstream_idle"
    assert stack.sample("claudepool_gateway_calls_total", tenant="acme", outcome="upstream_idle") == 1
    lease.release()


@pytest.mark.parametrize("answer", [Answer(chunks=[], then="hang"), Answer(delay_s=30)],
                         ids=["headers-then-nothing", "no-headers"])
async def test_a_provider_idle_before_its_answer_began_is_a_5xx_the_cli_retries(
    make_stack: MakeStack, profile: Profile, provider: RawUpstream, answer: Answer
) -> None:
    provider.answers.append(answer)
    stack = await make_stack(profile, provider.url, key=KEY, gateway_options={"idle_timeout_s": IDLE_S})
    lease, url, credential = await in_turn(stack)
    status, headers, relayed = await asyncio.wait_for(call(url, credential), 10 * IDLE_S)
    assert (status, headers["x-should-retry"]) == (504, "true")
    assert orjson.loads(relayed)["type"] == "error"
    [rec] = stack.recorder.calls
    assert (rec.outcome, rec.status) == ("upstream_idle", 504)
    lease.release()


async def test_a_non_streamed_call_may_wait_longer_than_the_idle_timeout_for_its_answer(
    make_stack: MakeStack, profile: Profile, provider: RawUpstream
) -> None:
    # Its headers come with the whole body, which takes as long as the answer is long.
    provider.answers.append(Answer(headers={"content-type": "application/json"}, chunks=[b"{}"], delay_s=3 * IDLE_S))
    stack = await make_stack(profile, provider.url, key=KEY, gateway_options={"idle_timeout_s": IDLE_S})
    lease, url, credential = await in_turn(stack)
    status, _, relayed = await asyncio.wait_for(call(url, credential, body=b'{"model":"m"}'), 10 * IDLE_S)
    assert (status, relayed) == (200, b"{}")
    lease.release()


async def test_a_body_over_the_bound_is_refused_before_the_provider(
    make_stack: MakeStack, profile: Profile, provider: RawUpstream
) -> None:
    stack = await make_stack(profile, provider.url, key=KEY, gateway_options={"max_request_bytes": 1024})
    lease, url, credential = await in_turn(stack)
    assert (await call(url, credential, body=b"x" * 1024))[0] == 200
    status, _, body = await call(url, credential, body=b"x" * 1025)
    assert (status, error_of(body)["type"]) == (413, "request_too_large")
    assert stack.sample("claudepool_gateway_refusals_total", reason="too_large") == 1
    assert len(provider.received) == 1
    lease.release()


def test_the_module_doctests_pass() -> None:
    import doctest

    from claudepool.gateway import attribution, credentials, metrics, settings

    for module in (attribution, credentials, metrics, settings):
        assert doctest.testmod(module).failed == 0, module.__name__


async def test_a_call_the_worker_abandons_mid_stream_is_billed_with_what_its_stream_reported(
    make_stack: MakeStack, profile: Profile, provider: RawUpstream
) -> None:
    """A tenant cannot make a call free by interrupting it: the input side is known from the first
    event, and the output from the last ``message_delta`` that came through."""
    start = {"type": "message_start", "message": {"id": "msg_cut", "model": "m", "usage": {
        "input_tokens": 1200, "cache_read_input_tokens": 300, "output_tokens": 1}}}
    delta = {"type": "message_delta", "delta": {"stop_reason": None}, "usage": {"output_tokens": 40}}
    chunks = [b"event: message_start\ndata: " + orjson.dumps(start) + b"\n\n",
              b"event: message_delta\ndata: " + orjson.dumps(delta) + b"\n\n"]
    provider.answers.append(Answer(chunks=chunks, then="hang"))
    stack = await make_stack(profile, provider.url, key=KEY)
    assert stack.gateway is not None
    store = MemoryStore()
    meter = Meter(store, RateLimiter(), PricingTable.of(default_prices()), MeteringSettings())
    stack.gateway.hooks.add(CallUsageMeter(meter.pricing, stack.registry, TenantLabels(TENANTS, max_labels=10),
                                           tenants=TENANTS, meter=meter))
    lease, url, credential = await in_turn(stack)
    assert isinstance(lease.context, RequestContext)
    async with aiohttp.ClientSession() as session:
        resp = await session.post(url + "/v1/messages", data=b'{"stream": true}', headers={"x-api-key": credential})
        assert await resp.content.readexactly(sum(map(len, chunks))) == b"".join(chunks)
        resp.close()  # the worker goes away mid-answer (an interrupt, a kill)
        async with asyncio.timeout(5):
            await provider.cut.wait()
    runner = asyncio.create_task(meter.run())
    try:
        await until(lambda: lease.context.calls == 1 and lease.context.calls_in_flight == 0 and meter.backlog == 0)
        [record] = await store.ledger("acme")
    finally:
        runner.cancel()
        await asyncio.gather(runner, return_exceptions=True)
    assert (record.kind, record.outcome, record.message_id) == ("call", "interrupted", "msg_cut")
    assert (record.input_tokens, record.cache_read_input_tokens, record.output_tokens) == (1200, 300, 40)
    assert record.cost_usd == pytest.approx(meter.pricing.cost("m", input_tokens=1200, output_tokens=40,
                                                               cache_read_input_tokens=300)) and record.cost_usd > 0
    lease.release()
