"""Sandboxed workers on the real CLI (issue 13): a tenant's Bash tool, run through the fake
upstream's tool directive, against what the sandbox must keep from it. Every scenario runs twice:
in the default sandbox, and on a profile with ``sandbox = false`` (the negative control), where the
same command must reach what it reaches for, so each check fails without the sandbox."""

from __future__ import annotations

import os
import secrets
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import psutil
import pytest

from claudepool.client import AsyncClient
from claudepool.config import load_settings
from claudepool.daemon.app import Daemon
from claudepool.pool import sandbox
from claudepool.pool.sandbox import SandboxUnavailable
from claudepool.testing.fake_upstream import FakeUpstream
from tests.daemon_fixtures import KEYS, RunningDaemon, make_daemon
from tests.gateway_fixtures import worker_environ

pytestmark = pytest.mark.real_cli
__all__ = ["make_daemon"]

MakeDaemon = Callable[..., Awaitable[RunningDaemon]]
BASH = {"tools": ["Bash"], "allowed_tools": ["Bash"], "upstream_max_retries": 0}


async def daemon(make_daemon: MakeDaemon, claude: str, upstream: FakeUpstream, tmp_path: Path,
                 profiles: dict[str, Any] | None = None, **overrides: Any) -> RunningDaemon:
    """Profile ``default`` sandboxed (as a profile with tools is), ``open`` the same with ``sandbox = false``."""
    return await make_daemon(
        pool={"claude_bin": claude, "min_idle": 2, "max_workers": 2, "timeouts": {"ready_timeout_s": 30}},
        upstream={"base_url": upstream.base_url, "api_key": "sk-ant-test"},
        profiles=profiles or {"default": BASH, "open": {**BASH, "sandbox": False}, "lean": {"min_idle": 0},
                              "other": {"min_idle": 0}},
        tenants={"acme": {"profiles": ["default", "open"]}, "beta": {"profiles": ["default", "open"]}},
        **overrides)


async def run_tool(d: RunningDaemon, command: str, profile: str, tenant: str = "acme") -> str:
    async with AsyncClient(key=KEYS[tenant], url=d.url) as client:
        answer = await client.prompt(f"[[tool:Bash:{command}]]", profile=profile, timeout_s=60)
    return answer.text


@pytest.fixture
def planted(tmp_path: Path) -> Path:
    secret = tmp_path / "state" / "secret.txt"
    secret.parent.mkdir()
    secret.write_text("PLANTED-SECRET-7731")
    return secret


@pytest.mark.parametrize("profile", ["default", "open"])
async def test_a_tool_sees_only_its_own_processes_and_files(
    make_daemon: MakeDaemon, real_claude: str, upstream: FakeUpstream, tmp_path: Path, planted: Path, profile: str
) -> None:
    d = await daemon(make_daemon, real_claude, upstream, tmp_path)
    sandboxed = profile == "default"
    processes = set((await run_tool(d, "ps -eo comm=", profile)).split())
    daemon_pid = await run_tool(d, f"test -e /proc/{os.getpid()}/environ && echo seen || echo hidden", profile)
    secret = await run_tool(d, f"cat {planted} 2>&1", profile)
    workers = await run_tool(d, f"ls {tmp_path / 'w'} 2>&1 | wc -l", profile)
    home = await run_tool(d, "ls /root /home 2>&1", profile)
    transcript = d.daemon.sessions.dir / "beta" / "s-other.jsonl"  # another tenant's session at rest
    transcript.parent.mkdir(parents=True, exist_ok=True)
    transcript.write_text('{"type":"user","message":"BETA-TRANSCRIPT-2210"}\n')
    sessions = await run_tool(d, f"cat {transcript} 2>&1; ls {d.daemon.sessions.dir} 2>&1", profile)
    if sandboxed:
        # Its sandbox's init, the CLI, the gateway relay (and its child for this connection), the tool.
        assert processes <= {"bwrap", "claude.exe", "socat", "bash", "sh", "ps"}, processes
        assert "hidden" in daemon_pid
        assert "PLANTED-SECRET-7731" not in secret and "No such file" in secret
        assert int(workers.split()[-1]) == 1, workers  # its own directory, nothing beside it
        assert "No such file" in home
        assert "BETA-TRANSCRIPT-2210" not in sessions and "No such file" in sessions, sessions
    else:
        assert "python" in " ".join(processes)  # the daemon itself, among the host's processes
        assert "seen" in daemon_pid
        assert "PLANTED-SECRET-7731" in secret
        assert int(workers.split()[-1]) >= 2
        assert "BETA-TRANSCRIPT-2210" in sessions


@pytest.mark.parametrize("profile", ["default", "open"])
async def test_a_tool_reads_no_other_processes_environment_or_command_line(
    make_daemon: MakeDaemon, real_claude: str, upstream: FakeUpstream, tmp_path: Path, profile: str
) -> None:
    d = await daemon(make_daemon, real_claude, upstream, tmp_path)
    await d.idle(2, profile=profile)
    await d.idle(2, profile="default" if profile == "open" else "open")
    # Every worker's credential, each a key to the gateway as that worker (another tenant's lease).
    credentials = {worker_environ(w.pid)["ANTHROPIC_API_KEY"] for name in ("default", "open")
                   for w in d.pool(name).workers()}
    answer = await run_tool(d, "env; for f in /proc/*/environ /proc/*/cmdline; do tr '\\0' '\\n' < $f; done "
                               "2>/dev/null | grep -o 'cpw-\\S*' | sort -u", profile)
    found = {c for c in credentials if c in answer}
    assert "sk-ant-test" not in answer  # the provider's key is in no process's environment, anywhere
    if profile == "default":
        assert len(found) == 1, answer  # its own, which only its own socket accepts
    else:
        assert len(found) == len(credentials) == 4, answer


@pytest.mark.parametrize("profile", ["default", "open"])
async def test_a_tool_reaches_no_local_service(
    make_daemon: MakeDaemon, real_claude: str, upstream: FakeUpstream, tmp_path: Path, redis_url: str, profile: str
) -> None:
    d = await daemon(make_daemon, real_claude, upstream, tmp_path)
    # The daemon's HTTP port, the provider (here the fake upstream) directly, and a real Redis.
    ports = [d.url.rsplit(":", 1)[1], upstream.base_url.rsplit(":", 1)[1], redis_url.rsplit(":", 1)[1].split("/")[0]]
    probe = ("for p in {ports}; do (exec 3<>/dev/tcp/127.0.0.1/$p) 2>/dev/null && echo open-$p || echo closed-$p; "
             "done").format(ports=" ".join(ports))
    answer = await run_tool(d, probe, profile)
    state = "closed" if profile == "default" else "open"
    assert all(f"{state}-{port}" in answer for port in ports), answer


@pytest.fixture
def etc_secret() -> Iterator[Path]:
    """A daemon's config file where a package puts it (under /etc), holding a provider key."""
    path = Path(f"/etc/claudepool-test-{os.getpid()}-{secrets.token_hex(4)}.toml")
    path.write_text('[upstream]\napi_key = "sk-ant-ETC-SECRET-4417"\n')
    path.chmod(0o644)  # readable by anyone on the host: only the sandbox keeps it from a tool
    try:
        yield path
    finally:
        path.unlink()


@pytest.mark.parametrize("profile", ["default", "open"])
async def test_a_tool_reads_nothing_of_the_hosts_etc_but_what_programs_need(
    make_daemon: MakeDaemon, real_claude: str, upstream: FakeUpstream, tmp_path: Path, etc_secret: Path,
    profile: str
) -> None:
    d = await daemon(make_daemon, real_claude, upstream, tmp_path)
    answer = await run_tool(d, f"cat {etc_secret} 2>&1; head -c 300 /etc/shadow 2>&1; ls /etc/ssh /etc/redis 2>&1; "
                               "getent passwd | cut -d: -f1 | tr '\\n' ' '; echo; hostname", profile)
    users = set(answer.splitlines()[-2].split())
    if profile == "default":
        assert "ETC-SECRET-4417" not in answer and "root:" not in answer, answer
        assert users == {"claude", "nobody"}, answer  # no host account's name or home
        assert answer.splitlines()[-1] == "sandbox"
    else:
        assert "ETC-SECRET-4417" in answer and "root:" in answer
        assert "root" in users


@pytest.mark.parametrize("profile", ["default", "open"])
async def test_a_tool_fills_no_memory_through_tmp_and_makes_no_namespace(
    make_daemon: MakeDaemon, real_claude: str, upstream: FakeUpstream, tmp_path: Path, profile: str
) -> None:
    d = await daemon(make_daemon, real_claude, upstream, tmp_path)
    size_mib = sandbox.TMPFS_BYTES // 2**20 * 2
    name = f"claudepool-fill-{secrets.token_hex(4)}"
    try:
        answer = await run_tool(
            d, f"for d in /tmp /dev/shm /dev; do dd if=/dev/zero of=$d/{name} bs=1M count={size_mib} 2>/dev/null;"
               f" echo $d=$(du -m $d/{name} 2>/dev/null | cut -f1)MiB; rm -f $d/{name}; done; "
               "unshare -U true 2>/dev/null && echo NESTED-NS", profile)
    finally:
        for directory in ("/tmp", "/dev/shm", "/dev"):
            Path(directory, name).unlink(missing_ok=True)  # unsandboxed, the tool wrote to the host's
    written = dict(line.split("=", 1) for line in answer.splitlines() if line.startswith("/"))
    if profile == "default":
        bound = f"{sandbox.TMPFS_BYTES // 2**20}MiB"
        assert written == {"/tmp": bound, "/dev/shm": bound, "/dev": "MiB"}, answer  # /dev: nothing at all
        assert "NESTED-NS" not in answer
    else:
        assert written["/tmp"] == written["/dev/shm"] == f"{size_mib}MiB", answer
        assert "NESTED-NS" in answer


async def test_a_tool_cannot_make_the_system_writable(
    make_daemon: MakeDaemon, real_claude: str, upstream: FakeUpstream, tmp_path: Path
) -> None:
    d = await daemon(make_daemon, real_claude, upstream, tmp_path)
    answer = await run_tool(d, "id -u; mount -o remount,rw,bind /usr 2>&1; touch /usr/claudepool-x 2>&1; "
                               "ls /usr/claudepool-x 2>&1", "default")
    assert not Path("/usr/claudepool-x").exists()
    # uid 1000 with no capability over the host: without its own user namespace the tool would be
    # root in a mount namespace of its own, and that remount would make the host's /usr writable.
    assert "1000" in answer.split(), answer
    assert "must be superuser" in answer or "permission denied" in answer.lower()
    assert "Read-only file system" in answer or "Permission denied" in answer


@pytest.mark.parametrize("profile", ["default", "open"])
async def test_a_sandboxed_workers_credential_opens_nothing_off_its_own_socket(
    make_daemon: MakeDaemon, real_claude: str, upstream: FakeUpstream, tmp_path: Path, profile: str
) -> None:
    # As a process outside the sandbox that got hold of the credential (from the host's /proc, say)
    # would: present it on the gateway's loopback listener.
    d = await daemon(make_daemon, real_claude, upstream, tmp_path, profiles={
        "default": {**BASH, "min_idle": 1}, "open": {**BASH, "sandbox": False, "min_idle": 1},
        "lean": {"min_idle": 0}, "other": {"min_idle": 0}})
    await d.idle(1, profile=profile)
    worker = d.pool(profile).workers()[0]
    credential = worker_environ(worker.pid)["ANTHROPIC_API_KEY"]
    async with aiohttp.ClientSession() as session, session.post(
            f"{d.daemon.gateway.base_url}/v1/messages", data=b"{}",
            headers={"x-api-key": credential, "content-type": "application/json"}) as resp:
        status, body = resp.status, await resp.json()
    assert status == 403
    refused = d.sample("claudepool_gateway_refusals_total", reason="wrong_socket")
    if profile == "default":
        assert refused == 1 and "another listener" in body["error"]["message"]
    else:
        assert refused == 0 and "serves no request" in body["error"]["message"]  # it got as far as the lease


def test_a_profile_with_tools_refuses_to_start_without_its_sandbox(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    (tmp_path / "bin").mkdir()  # a PATH with neither bwrap nor socat
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    sandbox.probe.cache_clear()
    try:
        with pytest.raises(SandboxUnavailable, match=r"bubblewrap \(bwrap\) and socat is not installed"):
            Daemon(load_settings(None, profiles={"default": {"tools": ["Bash"]}}))
        Daemon(load_settings(None, profiles={"default": {"tools": ["Bash"], "sandbox": False}}))  # knowingly
        Daemon(load_settings(None, profiles={"default": {}}))  # no tools: no sandbox to need
    finally:
        sandbox.probe.cache_clear()


@pytest.mark.parametrize("profile", ["default", "open"])
async def test_the_next_tenant_finds_no_file_and_no_process_of_the_last_lease(
    make_daemon: MakeDaemon, real_claude: str, upstream: FakeUpstream, tmp_path: Path, profile: str
) -> None:
    one_worker = {"min_idle": 1, "max_workers": 1}
    d = await daemon(make_daemon, real_claude, upstream, tmp_path, profiles={
        "default": {**BASH, **one_worker}, "open": {**BASH, "sandbox": False, **one_worker},
        "lean": {"min_idle": 0}, "other": {"min_idle": 0}})
    # Also deep in HOME, where the CLI keeps its own state (and a large tool output: A's data too).
    leave = ("echo A-SECRET-551 > left.txt; echo A-SECRET-551 > $TMPDIR/t.txt; echo A-SECRET-551 > $HOME/h.txt; "
             "echo A-SECRET-551 > $HOME/.claude/deep.txt; "
             "mkdir -p $HOME/.claude/projects/x && echo A-SECRET-551 > $HOME/.claude/projects/x/out.txt; "
             "(sleep 611 &); setsid nohup sleep 622 >/dev/null 2>&1 & echo left")
    assert "left" in await run_tool(d, leave, profile, tenant="acme")
    await d.idle(1, profile=profile)  # acme's lease is over and the worker reset
    before = len(upstream.requests)
    # Only the sleeps' lines: a busy host's whole process list is past what the CLI shows inline.
    seen = await run_tool(d, "cat left.txt $TMPDIR/t.txt $HOME/h.txt 2>&1; grep -rh A-SECRET $HOME 2>/dev/null; "
                          "ps -eo args= | grep -E '^sleep 6'",
                          profile, tenant="beta")
    worker = d.pool(profile).workers()[0]
    # What beta's turn sent the provider: acme's marker there would be one tenant's data in another's context.
    leaked = [r for r in upstream.requests[before:] if b"A-SECRET-551" in r.body]
    if profile == "default":
        assert "A-SECRET-551" not in seen and "sleep 6" not in seen, seen
        assert not leaked
        assert worker.workspace_killed >= 2  # both sleeps, setsid or not
    else:
        try:
            assert "A-SECRET-551" in seen and "sleep 622" in seen, seen
            assert leaked
        finally:  # unsandboxed, the setsid one escaped the worker's group: it must not outlive the test
            for proc in psutil.process_iter(["cmdline"]):
                if proc.info["cmdline"] in (["sleep", "611"], ["sleep", "622"]):
                    proc.kill()
