"""The pool driving the real `claude` CLI against the loopback fake Messages API.

These tests check the CLI behaviours of DESIGN.md part 2 that the pool depends on, end to end. They
need the real CLI (``.ci/run`` installs it) and fail, never skip, without it.
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from claudepool.errors import TurnStalled, WorkerDied
from claudepool.pool.lease import Lease
from claudepool.pool.pool import Pool
from claudepool.pool.profile import Profile
from claudepool.pool.timeouts import WorkerTimeouts
from claudepool.pool.worker import TurnResult, Worker
from claudepool.protocol.cli_events import CliEvent, StreamEvent, SystemApiRetry
from claudepool.testing.fake_upstream import FakeUpstream
from tests.helpers import collect, until

pytestmark = pytest.mark.real_cli

TIMEOUTS = WorkerTimeouts(ready_timeout_s=30, turn_idle_timeout_s=30, interrupt_timeout_s=5, reset_timeout_s=10)


@pytest.fixture
def pool_defaults() -> dict[str, Any]:
    return {"min_idle": 1, "max_workers": 1, "lease_timeout_s": 30, "timeouts": TIMEOUTS}


async def turn(lease: Lease, prompt: str, **kw: float) -> tuple[list[CliEvent], TurnResult]:
    return await collect(lease.run_turn(prompt, **kw), timeout_s=60)


async def test_warm_start_makes_no_upstream_request(
    make_pool: Callable[..., Pool], real_profile: Callable[..., Profile], upstream: FakeUpstream
) -> None:
    pool = make_pool(real_profile(), min_idle=2, max_workers=2)
    await pool.start()
    await pool.wait_ready(60)
    assert pool.counts()["idle"] == 2
    # With the quiet environment the CLI phones nowhere at start-up.
    assert upstream.requests == []


async def test_many_turns_one_upstream_call_each(
    make_pool: Callable[..., Pool], real_profile: Callable[..., Profile], upstream: FakeUpstream
) -> None:
    pool = make_pool(real_profile(), min_idle=1, max_workers=2)
    for i in range(6):
        async with pool.lease(f"tenant-{i % 2}") as lease:
            events, result = await turn(lease, f"question {i} [[reply:answer {i}]]")
        assert result.text == f"answer {i}"
        assert not result.is_error
        assert result.cost_usd > 0
        deltas = "".join(t for e in events if isinstance(e, StreamEvent) and (t := e.text_delta()))
        assert deltas == f"answer {i}"
    await until(lambda: pool.stats.resets == 6, timeout_s=20)  # every release was reset...
    assert len(upstream.message_requests()) == 6  # ...and exactly one model call per turn


async def test_usage_and_cost_match_the_upstream(
    make_pool: Callable[..., Pool], real_profile: Callable[..., Profile], upstream: FakeUpstream
) -> None:
    reported: list[TurnResult] = []
    pool = make_pool(real_profile(), on_turn_result=lambda lease, result: reported.append(result))
    async with pool.lease("acme") as lease:
        _, first = await turn(lease, "one [[reply:a]]")
        _, second = await turn(lease, "two [[reply:b]]")
    sent = [r.usage for r in upstream.message_requests()]
    assert all(u is not None for u in sent)
    for result, usage in zip((first, second), sent, strict=True):
        assert usage is not None
        assert result.usage.input_tokens == usage["input_tokens"]
        assert result.usage.cache_read_input_tokens == usage["cache_read_input_tokens"]
        assert result.usage.cache_creation_input_tokens == usage["cache_creation_input_tokens"]
        assert result.usage.output_tokens == usage["output_tokens"]
    # The CLI reports a running total; each result carries only its own turn's share.
    assert first.cost_usd > 0
    assert second.cost_usd > 0
    assert reported == [first, second]  # what metering is told


async def test_interrupt_mid_stream(
    make_pool: Callable[..., Pool], real_profile: Callable[..., Profile]
) -> None:
    pool = make_pool(real_profile())
    async with pool.lease("acme") as lease:
        items: list[CliEvent | TurnResult] = []
        async with asyncio.timeout(30):
            async for item in lease.run_turn("stream then stall [[stall]]"):
                items.append(item)
                if isinstance(item, StreamEvent) and item.text_delta():
                    await lease.interrupt()
        result = items[-1]
        assert isinstance(result, TurnResult)
        assert result.is_error
        assert result.subtype == "error_during_execution"
    async with pool.lease("next") as lease:
        _, after = await turn(lease, "[[reply:recovered]]")
    assert after.text == "recovered"


async def test_watchdog_interrupts_a_stalled_upstream(
    make_pool: Callable[..., Pool], real_profile: Callable[..., Profile]
) -> None:
    pool = make_pool(real_profile())
    async with pool.lease("acme") as lease:
        with pytest.raises(TurnStalled, match="interrupted"):
            await turn(lease, "[[stall]]", idle_timeout_s=1.5)
        pid = lease.worker.pid
    async with pool.lease("next") as lease:
        assert lease.worker.pid == pid  # the CLI honoured the interrupt, so the worker lives on
        _, after = await turn(lease, "[[reply:fine]]")
    assert after.text == "fine"


async def test_upstream_529_ends_as_error_and_is_reset(
    make_pool: Callable[..., Pool], real_profile: Callable[..., Profile], upstream: FakeUpstream
) -> None:
    pool = make_pool(real_profile(upstream_max_retries=1))
    async with pool.lease("tenant-a") as lease:
        events, failed = await turn(lease, "FAILED-PROMPT-SECRET [[status:529]]")
    assert failed.is_error
    assert failed.subtype == "success"  # is_error is the truth, not subtype
    assert failed.terminal_reason == "api_error"
    assert failed.api_error_status == 529
    assert any(isinstance(e, SystemApiRetry) and e.error_status == 529 for e in events)
    before = len(upstream.requests)
    async with pool.lease("tenant-b") as lease:
        _, ok = await turn(lease, "[[reply:clean]]")
    assert ok.text == "clean"
    # Without the reset the failed prompt would ride along in tenant B's request.
    assert not any(r.contains("FAILED-PROMPT-SECRET") for r in upstream.requests[before:])


async def test_worker_crash_mid_turn(
    make_pool: Callable[..., Pool], real_profile: Callable[..., Profile]
) -> None:
    pool = make_pool(real_profile())
    async with pool.lease("acme") as lease:
        pid = lease.worker.pid
        assert pid is not None

        async def kill_mid_stream() -> None:
            async with asyncio.timeout(30):
                async for item in lease.run_turn("[[stall]]"):
                    if isinstance(item, StreamEvent) and item.text_delta():
                        os.kill(pid, signal.SIGKILL)

        with pytest.raises(WorkerDied):
            await kill_mid_stream()
    async with pool.lease("next") as lease:
        assert lease.worker.pid != pid
        _, after = await turn(lease, "[[reply:replaced]]")
    assert after.text == "replaced"
    assert pool.stats.retired["failed"] == 1


async def test_safe_profile_writes_no_transcripts(
    make_pool: Callable[..., Pool], real_profile: Callable[..., Profile]
) -> None:
    pool = make_pool(real_profile())
    async with pool.lease("acme") as lease:
        await turn(lease, "hello [[reply:hi]]")
        home = Path(lease.worker.profile.environ(home=Path("/h"), tmpdir=Path("/t"))["HOME"])
        assert home == Path("/h")
        assert lease.worker.home is not None
        worker_dir = lease.worker.home.parent
        # The CLI may delete temporary files while we walk: a vanished entry is not a transcript.
        transcripts = [name for _, _, files in os.walk(worker_dir / "home") for name in files
                       if name.endswith(".jsonl")]
    assert transcripts == []


@pytest.mark.parametrize("reset_enabled", [True, False], ids=["with-reset", "reset-disabled"])
async def test_isolation_proof_secret_never_reaches_the_next_tenant(
    make_pool: Callable[..., Pool],
    real_profile: Callable[..., Profile],
    upstream: FakeUpstream,
    monkeypatch: pytest.MonkeyPatch,
    reset_enabled: bool,
) -> None:
    """Tenant A plants a secret; no upstream request made while serving tenant B may contain it.

    With the reset disabled the same scenario must leak, which proves the check can fail.
    """
    if not reset_enabled:
        async def no_reset(self: Worker) -> None:
            self.dirty = False  # claim to be clean without sending /clear

        monkeypatch.setattr(Worker, "reset", no_reset)
    secret = "ZEBRA-7731-CONFIDENTIAL"
    pool = make_pool(real_profile(), min_idle=1, max_workers=1)
    async with pool.lease("tenant-a") as lease:
        pid_a = lease.worker.pid
        _, planted = await turn(lease, f"Remember this account number: {secret} [[reply:noted]]")
        assert planted.text == "noted"
    assert upstream.requests_containing(secret)  # A's own request did carry it

    await until(lambda: pool.idle_count == 1, timeout_s=20)  # the eager reset (if any) is done before B arrives
    serving_b_from = len(upstream.requests)
    async with pool.lease("tenant-b") as lease:
        assert lease.worker.pid == pid_a  # same process: only the reset stands between them
        _, answer = await turn(lease, "What account number do you know? [[echo]]")
    during_b = upstream.requests[serving_b_from:]
    assert len(during_b) == 1
    leaked = [r for r in during_b if r.contains(secret)]
    if reset_enabled:
        assert leaked == []
        assert secret not in answer.text
    else:
        assert leaked, "with the reset disabled the secret must reach tenant B's request"
        assert secret in answer.text
