"""Job webhooks (issue 15): signed, retried, and only to allow-listed hosts, against real loopback receivers.

Each protection has a test that fails without it: the signature's checks (`verify`), the allow-list
at send time, redirects not followed, no proxy from the environment, the bounded read of an answer,
the bound on attempts in flight, and cancellation passing through the back-off."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from pydantic import ValidationError

from claudepool.errors import BadRequest, Draining
from claudepool.jobs.settings import WebhookSettings
from claudepool.jobs.webhooks import (
    EVENT_ID_HEADER,
    SIGNATURE_HEADER,
    DeliveryState,
    WebhookSender,
    check_url,
    retry_delay_s,
    sign,
    verify,
)
from tests.helpers import closed_port_url, until

SECRET = b"whsec-Tq83Lm02xWvK4sHd"
PAYLOAD = b'{"id":"job_1","state":"succeeded","result":{"text":"hi"}}'
Answer = Callable[[web.Request], Awaitable[web.StreamResponse]]


def status(code: int, headers: dict[str, str] | None = None, body: bytes = b"") -> Answer:
    async def answer(request: web.Request) -> web.StreamResponse:
        return web.Response(status=code, headers=headers, body=body)
    return answer


@dataclass
class Seen:
    headers: dict[str, str]
    body: bytes
    at_s: float  # monotonic


@dataclass
class Receiver:
    """A tenant's webhook endpoint on loopback: answers from ``script`` in turn (then 200), records all."""

    host: str = "127.0.0.1"
    script: list[Answer] = field(default_factory=list)
    seen: list[Seen] = field(default_factory=list)
    in_flight: int = 0
    max_in_flight: int = 0
    release: asyncio.Event = field(default_factory=asyncio.Event)  # lets hanging answers end at teardown
    url: str = ""

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.seen.append(Seen(dict(request.headers), await request.read(), time.monotonic()))
        answer = self.script.pop(0) if self.script else status(200)
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            return await answer(request)
        finally:
            self.in_flight -= 1

    async def hang(self, request: web.Request) -> web.StreamResponse:
        await self.release.wait()
        return web.Response(status=200)


@contextlib.asynccontextmanager
async def serving(receiver: Receiver) -> AsyncIterator[Receiver]:
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", receiver.handle)
    runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=1)
    await runner.setup()
    site = web.TCPSite(runner, receiver.host, 0)
    await site.start()
    port = runner.addresses[0][1]
    receiver.url = f"http://{receiver.host}:{port}/hooks/cp"
    try:
        yield receiver
    finally:
        receiver.release.set()
        async with asyncio.timeout(10):
            await runner.cleanup()


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    async with serving(Receiver()) as started:
        yield started


MakeSender = Callable[..., Awaitable[WebhookSender]]


@pytest.fixture
async def make_sender() -> AsyncIterator[MakeSender]:
    senders: list[WebhookSender] = []

    async def make(allowed_hosts: list[str] | None = None, *, clock: Callable[[], float] = time.time,
                   **overrides: float) -> WebhookSender:
        settings = WebhookSettings.model_validate({"allowed_hosts": allowed_hosts or ["127.0.0.1"],
                                                   "first_retry_s": 0.001, "max_retry_s": 0.01, "timeout_s": 5,
                                                   **overrides})
        sender = WebhookSender(settings, clock=clock, rng=random.Random(15))
        await sender.start()
        senders.append(sender)
        return sender

    yield make
    for sender in senders:
        await sender.close(5)


class States:
    """An ``on_state`` that records what the caller would persist."""

    def __init__(self) -> None:
        self.states: list[DeliveryState] = []
        self.at_s: list[float] = []  # wall clock, as the sender's default clock
        self.pending = asyncio.Event()

    async def __call__(self, state: DeliveryState) -> None:
        self.states.append(state)
        self.at_s.append(time.time())
        if state.state == "pending":
            self.pending.set()

    def summary(self) -> list[tuple[str, int, int | None]]:
        return [(s.state, s.attempts, s.last_status) for s in self.states]


async def deliver(sender: WebhookSender, url: str, on_state: States | None = None,
                  event_id: str = "job_1") -> DeliveryState:
    async with asyncio.timeout(30):
        return await sender.deliver(url, SECRET, event_id, PAYLOAD, on_state=on_state)


# -- the signature --------------------------------------------------------------------------------


async def test_a_delivery_is_signed_and_verifies_with_the_tenants_secret(
    receiver: Receiver, make_sender: MakeSender
) -> None:
    states = States()
    state = await deliver(await make_sender(), receiver.url, states, event_id="job_01HZX")
    assert (state.state, state.attempts, state.last_status) == ("delivered", 1, 200)
    assert state.delivered_at is not None and state.next_attempt_at is None
    assert states.states == [state]
    [seen] = receiver.seen
    assert seen.body == PAYLOAD
    assert seen.headers["Content-Type"] == "application/json"
    assert seen.headers[EVENT_ID_HEADER] == "job_01HZX"
    header = seen.headers[SIGNATURE_HEADER]
    assert verify(SECRET, header, seen.body)
    assert not verify(b"whsec-another-tenant", header, seen.body)
    assert not verify(SECRET, header, seen.body.replace(b"hi", b"ho"))


def test_sign_is_hmac_sha256_over_timestamp_dot_body() -> None:
    # Pinned: this is what the README tells receivers to compute.
    assert sign(b"whsec", b'{"id": "job_1"}', timestamp=1764763200) == (
        "t=1764763200,v1=6c5f229a47ea2f266753ea1bacc216f20ddcb5ca70b3ff490c8a9130924ca1c9")


def test_verify_rejects_a_stale_or_future_timestamp_as_a_replay() -> None:
    header = sign(SECRET, PAYLOAD, timestamp=1_000_000)
    assert verify(SECRET, header, PAYLOAD, now=1_000_000 + 299)
    assert verify(SECRET, header, PAYLOAD, now=1_000_000 - 299)
    assert not verify(SECRET, header, PAYLOAD, now=1_000_000 + 301)
    assert not verify(SECRET, header, PAYLOAD, now=1_000_000 - 301)
    assert not verify(SECRET, header, PAYLOAD, now=1_000_000 + 61, tolerance_s=60)
    assert not verify(SECRET, sign(SECRET, PAYLOAD, timestamp=int(time.time()) - 3600), PAYLOAD)  # the real clock


def test_verify_rejects_a_signature_moved_to_another_timestamp() -> None:
    # A replayer who rewrites t= to pass the tolerance: the timestamp is signed too.
    header = sign(SECRET, PAYLOAD, timestamp=1_000_000)
    assert verify(SECRET, header, PAYLOAD, now=1_000_200)
    moved = header.replace("t=1000000", "t=1000200")
    assert not verify(SECRET, moved, PAYLOAD, now=1_000_200)


GOOD = sign(SECRET, PAYLOAD, timestamp=1_000_000)


@pytest.mark.parametrize("header", [
    "", "garbage", "t=1000000", GOOD.split(",")[1], GOOD[:-1], GOOD + "0", "t=abc," + GOOD.split(",")[1],
    # Around a digest that is right: only the parser can refuse these.
    GOOD + ",v0=1", " " + GOOD, GOOD + " ", GOOD + "\n", "x" + GOOD, GOOD.replace(",", ";"), GOOD.replace(",", ", "),
    GOOD.replace("t=", "t=+"), GOOD.replace("t=1", "t=１"),
])
def test_verify_rejects_a_malformed_header(header: str) -> None:
    assert verify(SECRET, GOOD, PAYLOAD, now=1_000_000)
    assert not verify(SECRET, header, PAYLOAD, now=1_000_000)


def test_verify_rejects_a_valid_shape_with_an_uppercase_digest() -> None:
    header = sign(SECRET, PAYLOAD, timestamp=1_000_000)
    t, v1 = header.split(",")
    assert verify(SECRET, header, PAYLOAD, now=1_000_000)
    assert not verify(SECRET, f"{t},{v1.upper().replace('V1=', 'v1=')}", PAYLOAD, now=1_000_000)


# -- retries ---------------------------------------------------------------------------------------


async def test_5xx_is_retried_until_delivered_with_a_fresh_signature_each_time(
    receiver: Receiver, make_sender: MakeSender
) -> None:
    receiver.script = [status(500, body=b"boom"), status(503)]
    ticks = iter(range(2_000_000_000, 2_000_000_000 + 10_000, 10))
    states = States()
    state = await deliver(await make_sender(clock=lambda: float(next(ticks))), receiver.url, states)
    assert state.state == "delivered" and state.attempts == 3
    assert states.summary() == [("pending", 1, 500), ("pending", 2, 503), ("delivered", 3, 200)]
    assert states.states[0].last_error == "HTTP 500: boom" and states.states[1].last_error == "HTTP 503"
    assert all(s.next_attempt_at is not None for s in states.states[:2])
    stamps = [int(s.headers[SIGNATURE_HEADER].split(",")[0].removeprefix("t=")) for s in receiver.seen]
    assert stamps == sorted(set(stamps)) and len(stamps) == 3  # a new timestamp per attempt
    assert all(verify(SECRET, s.headers[SIGNATURE_HEADER], s.body, now=t) for s, t in zip(receiver.seen, stamps,
                                                                                          strict=True))
    assert {s.headers[EVENT_ID_HEADER] for s in receiver.seen} == {"job_1"}  # one id: receivers de-duplicate


@pytest.mark.parametrize("code", [408, 429, 500, 502, 504])
async def test_these_answers_are_retried(receiver: Receiver, make_sender: MakeSender, code: int) -> None:
    receiver.script = [status(code)]
    state = await deliver(await make_sender(), receiver.url)
    assert (state.state, state.attempts, len(receiver.seen)) == ("delivered", 2, 2)


@pytest.mark.parametrize("code", [400, 401, 403, 404, 410, 413, 422])
async def test_another_4xx_fails_at_once(receiver: Receiver, make_sender: MakeSender, code: int) -> None:
    receiver.script = [status(code, body=b"no such hook")]
    states = States()
    state = await deliver(await make_sender(), receiver.url, states)
    assert (state.state, state.attempts, state.last_status) == ("failed", 1, code)
    assert state.last_error == f"HTTP {code}: no such hook"
    assert states.states == [state]
    assert len(receiver.seen) == 1


async def test_max_attempts_exhausted_is_failed(receiver: Receiver, make_sender: MakeSender) -> None:
    receiver.script = [status(500)] * 10
    states = States()
    state = await deliver(await make_sender(max_attempts=3), receiver.url, states)
    assert states.summary() == [("pending", 1, 500), ("pending", 2, 500), ("failed", 3, 500)]
    assert state.next_attempt_at is None and state.delivered_at is None
    assert len(receiver.seen) == 3


async def test_connection_errors_are_retried_then_failed(make_sender: MakeSender) -> None:
    states = States()
    with closed_port_url() as url:
        state = await deliver(await make_sender(max_attempts=3), url, states)
    assert states.summary() == [("pending", 1, None), ("pending", 2, None), ("failed", 3, None)]
    assert state.last_error == "could not be reached (ClientConnectorError)"


async def test_a_receiver_that_does_not_answer_times_out_and_is_retried(
    receiver: Receiver, make_sender: MakeSender
) -> None:
    receiver.script = [receiver.hang, receiver.hang]
    states = States()
    state = await deliver(await make_sender(max_attempts=2, timeout_s=0.2), receiver.url, states)
    assert states.summary() == [("pending", 1, None), ("failed", 2, None)]
    assert state.last_error is not None and state.last_error.startswith("timed out")
    assert len(receiver.seen) == 2


async def test_retry_after_is_honoured_up_to_max_retry_s(receiver: Receiver, make_sender: MakeSender) -> None:
    receiver.script = [status(429, {"Retry-After": "0.2"}), status(503, {"Retry-After": "3600"})]
    states = States()
    sender = await make_sender(first_retry_s=0.001, max_retry_s=0.3, clock=lambda: 1_000.0)
    state = await deliver(sender, receiver.url, states)
    assert state.state == "delivered" and state.attempts == 3
    # What the back-off alone (at most 0.001 s, then 0.002 s) would never wait: Retry-After, capped.
    assert [s.next_attempt_at for s in states.states] == [pytest.approx(1_000.2), pytest.approx(1_000.3), None]
    first, second, third = (s.at_s for s in receiver.seen)
    assert second - first >= 0.19 and third - second >= 0.29


async def test_an_http_date_retry_after_falls_back_to_the_back_off(receiver: Receiver, make_sender: MakeSender) -> None:
    receiver.script = [status(503, {"Retry-After": "Wed, 21 Oct 2015 07:28:00 GMT"})]
    states = States()
    await deliver(await make_sender(first_retry_s=0.001, max_retry_s=60, clock=lambda: 1_000.0), receiver.url, states)
    pending = states.states[0].next_attempt_at
    assert pending is not None and 1_000.0 <= pending <= 1_000.001


def test_the_back_off_is_exponential_with_full_jitter_and_capped() -> None:
    settings = WebhookSettings(first_retry_s=1, max_retry_s=30)
    rng = random.Random(15)
    for attempt, ceiling_s in [(1, 1), (2, 2), (3, 4), (5, 16), (6, 30), (40, 30), (1_000, 30)]:
        delays = [retry_delay_s(attempt, settings, rng=rng) for _ in range(200)]
        assert all(0 <= d <= ceiling_s for d in delays)
        assert min(delays) < ceiling_s / 4 and max(delays) > ceiling_s * 3 / 4  # spread over all of it
    assert retry_delay_s(1, settings, retry_after_s=7) == 7
    assert retry_delay_s(1, settings, retry_after_s=3_600) == 30


# -- where a delivery may go ----------------------------------------------------------------------


async def test_a_redirect_is_not_followed_to_a_host_off_the_list(receiver: Receiver, make_sender: MakeSender) -> None:
    async with serving(Receiver(host="127.0.0.2")) as elsewhere:
        receiver.script = [status(302, {"Location": elsewhere.url})]
        state = await deliver(await make_sender(["127.0.0.1"]), receiver.url)
        assert (state.state, state.attempts, state.last_status) == ("failed", 1, 302)
        assert state.last_error == "HTTP 302: a redirect, never followed"
        assert elsewhere.seen == []
        # The control: the other server was there to be reached.
        async with aiohttp.ClientSession() as session, session.post(elsewhere.url, data=b"{}") as answer:
            assert answer.status == 200
        assert len(elsewhere.seen) == 1


async def test_a_url_off_the_list_is_failed_at_send_time_without_a_request(
    receiver: Receiver, make_sender: MakeSender
) -> None:
    states = States()
    sender = await make_sender(["localhost"])  # the receiver listens on 127.0.0.1: another entry
    state = await deliver(sender, receiver.url, states)
    assert (state.state, state.attempts, state.last_status) == ("failed", 0, None)
    assert state.last_error == "webhook host '127.0.0.1' is not in webhooks.allowed_hosts"
    assert states.states == [state]
    assert receiver.seen == []


async def test_no_proxy_is_taken_from_the_environment(
    receiver: Receiver, make_sender: MakeSender, monkeypatch: pytest.MonkeyPatch
) -> None:
    connections: list[bool] = []

    async def proxy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(True)
        writer.close()

    server = await asyncio.start_server(proxy, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        for name in ("HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
            monkeypatch.setenv(name, f"http://127.0.0.1:{port}")
        for name in ("NO_PROXY", "no_proxy"):
            monkeypatch.delenv(name, raising=False)
        state = await deliver(await make_sender(max_attempts=1), receiver.url)
        assert state.state == "delivered" and len(receiver.seen) == 1
        assert connections == []
    finally:
        server.close()
        async with asyncio.timeout(5):
            await server.wait_closed()


ALLOWED = ["127.0.0.1", "hooks.example.com", "[::1]", "Bücher.Example"]


@pytest.mark.parametrize(("url", "message"), [
    ("http://evil.example/", "webhook host 'evil.example' is not in webhooks.allowed_hosts"),
    ("http://hooks.example.com.evil.example/", "not in webhooks.allowed_hosts"),
    ("http://evilhooks.example.com/", "not in webhooks.allowed_hosts"),
    ("http://sub.hooks.example.com/", "not in webhooks.allowed_hosts"),  # exact: no subdomains
    ("http://127.0.0.2:8080/", "webhook host '127.0.0.2' is not in webhooks.allowed_hosts"),
    ("http://127.1/", "not in webhooks.allowed_hosts"),  # what a resolver may read as 127.0.0.1
    ("http://2130706433/", "not in webhooks.allowed_hosts"),
    ("http://[::ffff:127.0.0.1]/", "not in webhooks.allowed_hosts"),
    ("http://localhost/", "webhook host 'localhost' is not in webhooks.allowed_hosts"),
    ("http://user@127.0.0.1/", "webhook URL may not carry a user or password"),
    ("http://user:pw@hooks.example.com/", "webhook URL may not carry a user or password"),
    ("http://:pw@127.0.0.1/", "webhook URL may not carry a user or password"),
    ("file:///etc/passwd", "webhook URL must be http or https, not 'file'"),
    ("ftp://127.0.0.1/x", "webhook URL must be http or https, not 'ftp'"),
    ("gopher://127.0.0.1:6379/_FLUSHALL", "webhook URL must be http or https, not 'gopher'"),
    ("unix:///run/claudepool.sock", "webhook URL must be http or https, not 'unix'"),
    ("//127.0.0.1/x", "webhook URL must be http or https, not 'relative'"),
    ("127.0.0.1/x", "webhook URL must be http or https"),
    ("http:///x", "webhook URL has no host"),
    ("http://127.0.0.1:99999/", "webhook URL is not a valid URL"),
])
def test_check_url_refuses(url: str, message: str) -> None:
    with pytest.raises(BadRequest) as refused:
        check_url(url, ALLOWED)
    assert message in str(refused.value)


@pytest.mark.parametrize(("url", "called"), [
    ("http://127.0.0.1:9/hooks?token=1", "http://127.0.0.1:9/hooks?token=1"),
    ("https://HOOKS.Example.COM/cp", "https://hooks.example.com/cp"),
    ("https://hooks.example.com./cp", "https://hooks.example.com./cp"),
    ("http://[0:0::1]:8080/", "http://[::1]:8080/"),
    ("https://bücher.example/", "https://xn--bcher-kva.example/"),
    ("https://XN--BCHER-KVA.example/", "https://xn--bcher-kva.example/"),
])
def test_check_url_accepts_a_listed_host_however_spelt(url: str, called: str) -> None:
    assert check_url(url, ALLOWED) == called


def test_localhost_and_127_0_0_1_are_distinct_entries() -> None:
    assert check_url("http://localhost:1/", ["localhost"]) == "http://localhost:1/"
    assert check_url("http://127.0.0.1:1/", ["127.0.0.1"]) == "http://127.0.0.1:1/"
    with pytest.raises(BadRequest):
        check_url("http://localhost:1/", ["127.0.0.1"])
    with pytest.raises(BadRequest):
        check_url("http://127.0.0.1:1/", ["localhost"])


def test_an_empty_allow_list_disables_webhooks() -> None:
    with pytest.raises(BadRequest, match="webhooks are disabled"):
        check_url("https://hooks.example.com/", [])


def test_settings_normalise_hosts_and_are_strict() -> None:
    assert WebhookSettings(allowed_hosts=["Hooks.Example.com.", "[::1]", "Bücher.example"]).allowed_hosts == [
        "hooks.example.com", "::1", "xn--bcher-kva.example"]
    with pytest.raises(ValidationError, match="Extra inputs"):
        WebhookSettings.model_validate({"allowed_host": ["x"]})
    with pytest.raises(ValidationError):
        WebhookSettings.model_validate({"timeout_s": "10"})
    with pytest.raises(ValidationError):
        WebhookSettings.model_validate({"allowed_hosts": ["a/b"]})


# -- resources: the answer read, attempts in flight, shutdown -------------------------------------


async def test_at_most_max_response_bytes_of_an_answer_is_read(receiver: Receiver, make_sender: MakeSender) -> None:
    async def endless(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(status=200)
        await response.prepare(request)
        await response.write(b"x" * 4096)  # then nothing, and never the end of the body
        await receiver.release.wait()
        return response

    receiver.script = [endless]
    state = await deliver(await make_sender(max_attempts=1, timeout_s=2, max_response_bytes=1024), receiver.url)
    assert (state.state, state.attempts) == ("delivered", 1)  # reading to the end would have timed out


async def test_attempts_in_flight_are_bounded(receiver: Receiver, make_sender: MakeSender) -> None:
    gate: asyncio.Queue[None] = asyncio.Queue()

    async def held(request: web.Request) -> web.StreamResponse:
        await gate.get()
        return web.Response(status=204)

    receiver.script = [held] * 5
    sender = await make_sender(max_concurrent=2)
    deliveries = [asyncio.create_task(deliver(sender, receiver.url, event_id=f"job_{i}")) for i in range(5)]
    for released in range(5):
        # Each released answer lets exactly one waiting delivery in: never a third at once.
        in_flight, seen = min(2, 5 - released), min(5, released + 2)
        await until(lambda: (receiver.in_flight, len(receiver.seen)) == (in_flight, seen))  # noqa: B023
        gate.put_nowait(None)
    states = await asyncio.gather(*deliveries)
    assert [s.state for s in states] == ["delivered"] * 5
    assert receiver.max_in_flight == 2


async def test_cancellation_during_the_back_off_propagates(receiver: Receiver, make_sender: MakeSender) -> None:
    receiver.script = [status(503, {"Retry-After": "60"})]
    states = States()
    sender = await make_sender(max_retry_s=60, max_concurrent=1)
    task = asyncio.create_task(deliver(sender, receiver.url, states))
    async with asyncio.timeout(10):
        await states.pending.wait()
    task.cancel()
    async with asyncio.timeout(5):
        await asyncio.wait([task])
    assert task.cancelled()
    assert states.summary() == [("pending", 1, 503)] and len(receiver.seen) == 1
    # Its slot is free again (the one there is), and the sender still delivers, then closes.
    assert (await deliver(sender, receiver.url)).state == "delivered"
    async with asyncio.timeout(10):
        await sender.close(5)


async def test_cancellation_mid_attempt_frees_its_slot(receiver: Receiver, make_sender: MakeSender) -> None:
    receiver.script = [receiver.hang]
    sender = await make_sender(max_concurrent=1)
    task = asyncio.create_task(deliver(sender, receiver.url))
    await until(lambda: len(receiver.seen) == 1)
    task.cancel()
    async with asyncio.timeout(5):
        await asyncio.wait([task])
    assert task.cancelled()
    assert (await deliver(sender, receiver.url)).state == "delivered"


async def test_a_closed_sender_refuses_to_deliver(receiver: Receiver, make_sender: MakeSender) -> None:
    sender = await make_sender()
    await sender.close(5)
    with pytest.raises(Draining):
        await deliver(sender, receiver.url)
    assert receiver.seen == []


async def test_the_secret_and_the_urls_token_stay_out_of_the_logs(
    receiver: Receiver, make_sender: MakeSender, caplog: pytest.LogCaptureFixture
) -> None:
    receiver.script = [status(500, body=SECRET), status(400, body=b"bad")]
    with caplog.at_level(logging.DEBUG, logger="claudepool.jobs.webhooks"):
        state = await deliver(await make_sender(), receiver.url + "?token=tok-Zz81Qp", States())
    assert state.state == "failed"
    assert "job_1" in caplog.text and "127.0.0.1" in caplog.text  # the lines are there
    assert SECRET.decode() not in caplog.text and "tok-Zz81Qp" not in caplog.text
    assert SECRET.decode() not in repr(state)


def test_the_readmes_verification_example_accepts_a_signature_and_refuses_a_forgery() -> None:
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    snippet = readme.split("`claudepool.jobs.webhooks.verify`):\n\n```python\n", 1)[1].split("```", 1)[0]
    scope: dict[str, Any] = {}
    exec(snippet, scope)  # the code a tenant copies
    body = b'{"type": "job.ended"}'
    header = sign(b"s3cret", body, timestamp=int(time.time()))
    assert scope["verify"](b"s3cret", header, body)
    assert not scope["verify"](b"s3cret", header, body + b" ")
    assert not scope["verify"](b"other", header, body)
    assert not scope["verify"](b"s3cret", sign(b"s3cret", body, timestamp=int(time.time()) - 3600), body)
