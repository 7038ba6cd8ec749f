"""`claudepool run` and `claudepool status` as subprocesses against an in-process daemon."""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.daemon_fixtures import ADMIN_KEY, KEYS, RunningDaemon, make_daemon
from tests.helpers import closed_port_url

__all__ = ["make_daemon"]

MakeDaemon = Callable[..., Awaitable[RunningDaemon]]


@dataclass
class Done:
    code: int
    out: str
    err: str


async def claudepool(*args: str, env: dict[str, str] | None = None, timeout_s: float = 30.0) -> Done:
    """Run ``python -m claudepool ARGS`` without blocking the loop the daemon runs on."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("CLAUDEPOOL_")}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "claudepool", *args, cwd=REPO, env={**base, **(env or {})},
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    try:
        async with asyncio.timeout(timeout_s):
            out, err = await proc.communicate()
    except BaseException:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode is not None
    return Done(proc.returncode, out.decode(), err.decode())


def where(d: RunningDaemon, transport: str) -> list[str]:
    return ["--socket", d.socket] if transport == "socket" else ["--url", d.url]


@pytest.fixture(params=["socket", "url"])
def transport(request: pytest.FixtureRequest) -> str:
    value: str = request.param
    return value


async def test_run_prints_the_answer(make_daemon: MakeDaemon, transport: str) -> None:
    d = await make_daemon()
    done = await claudepool("run", *where(d, transport), "--key", KEYS["acme"],
                            "say it [[reply:the whole answer, streamed in pieces]]")
    assert (done.code, done.out, done.err) == (0, "the whole answer, streamed in pieces\n", "")
    assert d.pool().stats.turns == 1


async def test_run_takes_the_key_from_the_environment(make_daemon: MakeDaemon) -> None:
    d = await make_daemon()
    done = await claudepool("run", "--socket", d.socket, "[[reply:keyed by env]]",
                            env={"CLAUDEPOOL_KEY": KEYS["beta"]})
    assert (done.code, done.out, done.err) == (0, "keyed by env\n", "")
    # --key wins over the environment.
    done = await claudepool("run", "--socket", d.socket, "--key", "wrong-key", "[[reply:x]]",
                            env={"CLAUDEPOOL_KEY": KEYS["beta"]})
    assert done.code == 1
    assert "unauthorized" in done.err


async def test_run_with_profile_and_timeout_options(make_daemon: MakeDaemon) -> None:
    d = await make_daemon()
    done = await claudepool("run", "--socket", d.socket, "--key", KEYS["acme"], "--profile", "lean",
                            "--timeout", "10", "[[reply:lean answer]]")
    assert (done.code, done.out) == (0, "lean answer\n")
    assert d.pool("lean").stats.turns == 1
    done = await claudepool("run", "--socket", d.socket, "--key", KEYS["acme"], "--timeout", "0.5", "[[hang]]")
    assert done.code == 1
    assert "claudepool: timeout:" in done.err


async def test_run_prints_the_answer_when_the_profile_streams_no_deltas(make_daemon: MakeDaemon,
                                                                        transport: str) -> None:
    """A profile with ``include_partial_messages = false`` yields no text deltas, only the result:
    `claudepool run` must still print the answer."""
    d = await make_daemon(profiles={"default": {"include_partial_messages": False}})
    done = await claudepool("run", *where(d, transport), "--key", KEYS["acme"], "[[reply:answer without deltas]]")
    assert (done.code, done.out) == (0, "answer without deltas\n")


async def test_run_with_a_wrong_key_fails(make_daemon: MakeDaemon, transport: str) -> None:
    d = await make_daemon()
    done = await claudepool("run", *where(d, transport), "--key", "nobody-holds-this", "[[reply:x]]")
    assert done.code == 1
    assert done.out == ""
    assert done.err.startswith("claudepool: unauthorized: ")
    assert "Traceback" not in done.err
    assert d.pool().stats.leases == 0


async def test_run_with_a_forbidden_profile_fails(make_daemon: MakeDaemon) -> None:
    d = await make_daemon()
    done = await claudepool("run", "--socket", d.socket, "--key", KEYS["beta"], "--profile", "lean", "x")
    assert done.code == 1
    assert done.err.startswith("claudepool: forbidden: ")


async def test_run_reports_a_model_error(make_daemon: MakeDaemon, transport: str) -> None:
    d = await make_daemon()
    done = await claudepool("run", *where(d, transport), "--key", KEYS["acme"], "[[api_error:529]]")
    assert done.code == 1
    assert "the model call failed" in done.err
    assert "529" in done.err
    assert done.out.strip() == ""


async def test_status_with_the_admin_key_prints_the_workers(make_daemon: MakeDaemon, transport: str) -> None:
    d = await make_daemon(profiles={"lean": {"min_idle": 1}, "other": {"min_idle": 1}})
    done = await claudepool("status", *where(d, transport), "--key", ADMIN_KEY)
    assert done.code == 0, done.err
    lines = done.out.splitlines()
    header = lines[0].split()
    assert header[:2] == ["WORKER", "STATE"]
    assert header == ["WORKER", "STATE", "PID", "PROFILE", "TURNS", "AGE_S", "PSS_MIB"]
    rows = [line.split() for line in lines[1:-1]]
    default_rows = [r for r in rows if r[3] == "default"]
    assert {r[3] for r in rows} == {"default", "lean", "other"}
    pids = {w["pid"] for w in d.pool().snapshot()}
    assert {int(r[2]) for r in default_rows} == pids
    assert {r[1] for r in default_rows} == {"idle"}
    assert lines[-1] == "waiting: 0  in flight: 0  draining: False"


async def test_status_with_a_tenant_key_prints_readiness(make_daemon: MakeDaemon, transport: str) -> None:
    """`status` documents "the workers (admin key) or readiness (tenant key)", for --socket and --url."""
    d = await make_daemon()
    done = await claudepool("status", *where(d, transport), "--key", KEYS["acme"])
    assert done.code == 0, done.err
    lines = done.out.splitlines()
    assert lines[0] == "ready: True"
    assert "  default: healthy=True warm=1 idle=1" in lines
    assert "WORKER" not in done.out


async def test_status_with_a_wrong_key_fails(make_daemon: MakeDaemon, transport: str) -> None:
    d = await make_daemon()
    done = await claudepool("status", *where(d, transport), "--key", "nobody-holds-this")
    assert done.code == 1
    assert done.err.startswith("claudepool: unauthorized: ")
    assert done.out == ""


@pytest.mark.parametrize("command", [["run", "hello"], ["status"]])
async def test_missing_key_is_a_usage_error(tmp_path: Path, command: list[str]) -> None:
    done = await claudepool(command[0], "--socket", str(tmp_path / "unused.sock"), *command[1:])
    assert done.code == 2
    assert "a key is needed: --key or $CLAUDEPOOL_KEY" in done.err
    assert done.out == ""


async def test_socket_and_url_are_mutually_exclusive(tmp_path: Path) -> None:
    done = await claudepool("run", "--socket", str(tmp_path / "x.sock"), "--url", "http://127.0.0.1:1",
                            "--key", "k", "hello")
    assert done.code == 2
    assert "not allowed with argument" in done.err


@pytest.mark.parametrize("command", ["run", "status"])
async def test_no_daemon_is_a_one_line_error(tmp_path: Path, transport: str, command: str) -> None:
    with closed_port_url() as url:
        target = ["--socket", str(tmp_path / "nobody-listens.sock")] if transport == "socket" else ["--url", url]
        done = await claudepool(command, *target, "--key", "k", "--connect-timeout", "0.2",
                                *(["hello"] if command == "run" else []))
    assert done.code == 1
    assert done.err.startswith("claudepool: unavailable: "), done.err
    assert "Traceback" not in done.err
