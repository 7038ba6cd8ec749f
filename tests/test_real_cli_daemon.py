"""The daemon end to end on the real CLI and the loopback fake upstream."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
import orjson
import pytest

from claudepool.client import AsyncClient
from claudepool.jobs.client import JobsClient
from claudepool.testing.fake_upstream import FakeUpstream
from tests.daemon_fixtures import KEY, KEYS, DaemonProcess, RunningDaemon, make_daemon, post, start_daemon
from tests.helpers import pid_gone, until
from tests.test_lifecycle import write_config

pytestmark = pytest.mark.real_cli
__all__ = ["make_daemon", "start_daemon"]


@pytest.fixture
async def real_daemon(
    make_daemon: Callable[..., Awaitable[RunningDaemon]], real_claude: str, upstream: FakeUpstream
) -> RunningDaemon:
    return await make_daemon(pool={
        "claude_bin": real_claude, "min_idle": 2, "max_workers": 3, "timeouts": {"ready_timeout_s": 30},
    }, upstream={"base_url": upstream.base_url, "api_key": "sk-ant-test"},
        profiles={"default": {"upstream_max_retries": 0}, "lean": {}, "other": {}})


async def test_json_sse_and_socket_answers(real_daemon: RunningDaemon, upstream: FakeUpstream) -> None:
    async with AsyncClient(key=KEYS["acme"], url=real_daemon.url) as http:
        result = await http.prompt("[[reply:over http]]")
        pieces = [p async for p in http.stream("[[reply:streamed over http]] [[chunks:3]]")]
    assert result.text == "over http"
    assert result.usage.output_tokens > 0
    assert "".join(p for p in pieces if isinstance(p, str)) == "streamed over http"
    async with AsyncClient(key=KEYS["beta"], socket_path=real_daemon.socket) as unix:
        answers = await asyncio.gather(*(unix.prompt(f"[[reply:socket {i}]]") for i in range(3)))
    assert [a.text for a in answers] == [f"socket {i}" for i in range(3)]
    assert {a.tenant for a in answers} == {"beta"}
    assert len(upstream.message_requests()) == 5


async def test_disconnect_mid_stream_resets_the_real_worker(
    real_daemon: RunningDaemon, upstream: FakeUpstream
) -> None:
    pool = real_daemon.pool()
    async with aiohttp.ClientSession() as session, session.post(
        f"{real_daemon.url}/v1/prompt", data=orjson.dumps({"prompt": "DISCONNECT-SECRET [[stall]]", "stream": True}),
        headers={"Authorization": f"Bearer {KEYS['acme']}"},
    ) as resp:
        assert (await resp.content.readline()).startswith(b"event: delta")
    await until(lambda: pool.stats.abandoned_turns == 1 and pool.stats.resets >= 1, 20)
    before = len(upstream.requests)
    async with AsyncClient(key=KEYS["beta"], url=real_daemon.url) as client:
        after = await client.prompt("[[echo]]")
    assert "DISCONNECT-SECRET" not in after.text
    assert not any(r.contains("DISCONNECT-SECRET") for r in upstream.requests[before:])


async def test_drain_lets_a_real_turn_finish(real_daemon: RunningDaemon) -> None:
    async with AsyncClient(key=KEYS["acme"], url=real_daemon.url) as client:
        slow = asyncio.create_task(client.prompt("[[delay_s:1]] [[reply:made it]]"))
        await until(lambda: real_daemon.daemon.service.in_flight == 1, 10)
        real_daemon.daemon.request_stop()
        assert (await slow).text == "made it"
    async with asyncio.timeout(30):
        assert await real_daemon.task == 0


async def test_sigkill_of_a_real_cli_daemon_leaves_no_worker(
    tmp_path: Path, real_claude: str, upstream: FakeUpstream,
    start_daemon: Callable[..., Awaitable[DaemonProcess]],
) -> None:
    extra = f'\n[upstream]\nbase_url = "{upstream.base_url}"\napi_key = "x"\n'
    daemon = await start_daemon("--config", str(write_config(tmp_path, claude_bin=real_claude, extra=extra)))
    stuck = await daemon.start_request("[[stall]]", timeout_s=20)
    pids = await daemon.worker_pids()
    assert len(pids) >= 2
    daemon.proc.send_signal(signal.SIGKILL)
    await daemon.wait_exit()
    await until(lambda: all(pid_gone(pid) for pid in pids), 5)
    stuck.cancel()
    await asyncio.gather(stuck, return_exceptions=True)
    assert KEY


async def test_dev_mode_answers_through_the_real_cli(
    tmp_path: Path, real_claude: str, start_daemon: Callable[..., Awaitable[DaemonProcess]]
) -> None:
    """The README's first command: a bare checkout, `claudepool serve --dev`, then curl."""
    daemon = await start_daemon("--dev", env={
        "XDG_RUNTIME_DIR": str(tmp_path), "CLAUDEPOOL_SERVER__HTTP": "127.0.0.1:0",
        "CLAUDEPOOL_POOL__CLAUDE_BIN": real_claude, "CLAUDEPOOL_POOL__MIN_IDLE": "1",
        "CLAUDEPOOL_POOL__WORKDIR": str(tmp_path / "w"), "ANTHROPIC_API_KEY": "",
    })
    status, body = await post(daemon.url, {"prompt": "hello from the readme"}, key="dev")
    assert status == 200
    assert body["text"] == "ok: hello from the readme"
    async with aiohttp.ClientSession() as session, session.get(
        f"{daemon.url}/metrics", headers={"Authorization": "Bearer dev-admin"}
    ) as resp:
        assert resp.status == 200
        assert 'claudepool_requests_total{outcome="ok",tenant="dev"} 1.0' in await resp.text()
    # Jobs on both lanes, end to end: the batch lane against the dev fake's Message Batches API.
    async with AsyncClient(key="dev", url=daemon.url) as client:
        jobs = JobsClient(client)
        pooled = await jobs.submit("a job from the readme")
        batched = await jobs.submit("a batch job from the readme", lane="batch_api")
        assert (await jobs.wait(pooled["id"], timeout_s=60))["result"]["text"] == "ok: a job from the readme"
        done = await jobs.wait(batched["id"], timeout_s=60)
        assert done["status"] == "succeeded" and done["result"]["batch_id"]
    daemon.proc.send_signal(signal.SIGTERM)
    assert await daemon.wait_exit() == 0
