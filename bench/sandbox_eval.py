"""Our bubblewrap sandbox against Anthropic's sandbox runtime (srt) as a worker's mechanism (issue 13).

Arms: ``none`` (the probe run directly: the negative control, every probe must reach its target
there), ``bwrap`` (claudepool's `sandbox.wrap` and the environment `Profile.environ` builds), ``srt``
(the tightest settings of `bench.sandbox_srt`, the gateway's loopback port allow-listed) and
``srt+unix`` (the same with Unix sockets allowed, the only way a worker reaches a socket of its own).

* probes (`bench.sandbox_probe`): secrets in the spawner's environment (one named to srt's
  ``credentials.envVars``, one not) and in a host process's ``/proc/PID/environ``, ``/proc/1``, the
  host's processes, /etc/shadow and every other /etc file that is not world-readable, another
  worker's directory, a sessions directory, /root, a host loopback TCP service, writes outside the
  worker's directory (checked on the host), the gateway (how, and which listener took it).
* spawn: wall and CPU (this process's reaped children) of ``true``, and of the real CLI from spawn
  to its answer to ``initialize`` (then closed); the arms alternate. Memory: PSS of the sandbox's
  helper processes (all but the CLI) beside a ready CLI, srt's own node process (its proxy) included.
* ``ANTHROPIC_UNIX_SOCKET``: one real-CLI turn with the variable naming a socket relayed to the fake
  upstream and ``ANTHROPIC_BASE_URL`` a closed port, unsandboxed and in bwrap; the control without it.

    python -m bench.sandbox_eval --spawns 6
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import orjson
import psutil

from bench import sandbox_srt
from bench.pool_bench import REPO, find_claude
from claudepool.pool import sandbox
from claudepool.pool.profile import Profile
from claudepool.protocol.cli_events import encode_user_message
from claudepool.testing.fake_upstream import FakeUpstream

ARMS = ("none", "bwrap", "srt", "srt+unix")
# srt binds /etc whole (it has no allow-list): what it is told to deny again inside it, the secrets
# our sandbox's deny-list had before /etc became an allow-list there.
SRT_MASKED = tuple(p for p in ("/etc/shadow", "/etc/gshadow", "/etc/shadow-", "/etc/gshadow-", "/etc/ssh",
                               "/etc/ssl/private", "/etc/sudoers", "/etc/sudoers.d", "/etc/redis",
                               "/etc/security/opasswd") if os.path.lexists(p))
NAMED, UNNAMED = "CLAUDEPOOL_EVAL_NAMED_SECRET", "CLAUDEPOOL_EVAL_OTHER_SECRET"
MARKER = "EVAL-SECRET-4471"
CLOSED_URL = "http://127.0.0.1:9"  # discard: nothing listens, so only a Unix socket can answer


@dataclass
class Host:
    """What the probes aim at, set up on the host, and the gateway's listeners and what they took."""

    root: Path
    srt: Path
    claude: Path
    victim: subprocess.Popen[bytes] | None = None
    service_port: int = 0
    gateway_port: int = 0
    accepted: list[str] = field(default_factory=list)
    servers: list[asyncio.AbstractServer] = field(default_factory=list)

    def worker(self, name: str) -> Path:
        path = self.root / name
        for sub in ("home", "tmp", "cwd"):
            (path / sub).mkdir(parents=True, exist_ok=True)
        return path

    async def start(self) -> None:
        (self.root / "w2").mkdir()
        (self.root / "w2" / "secret.txt").write_text(MARKER)
        (self.root / "sessions").mkdir()
        (self.root / "sessions" / "s1.jsonl").write_text(MARKER)
        (self.root / "outside").mkdir()
        Path("/root/.claudepool-eval-secret").write_text(MARKER)
        self.victim = subprocess.Popen(["sleep", "600"], env={**os.environ, "VICTIM": MARKER})
        service = await asyncio.start_server(self._banner("host-service"), "127.0.0.1", 0)
        gateway = await asyncio.start_server(self._banner("gateway-tcp"), "127.0.0.1", 0)
        self.service_port = service.sockets[0].getsockname()[1]
        self.gateway_port = gateway.sockets[0].getsockname()[1]
        self.servers += [service, gateway]
        for name in ("w1", "w2"):  # each worker's own gateway socket: attribution by socket
            self.servers.append(await asyncio.start_unix_server(self._banner(f"gateway-{name}.sock"),
                                                                str(self.root / f"{name}.sock")))

    def _banner(self, listener: str) -> Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]:
        async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            peer = writer.get_extra_info("peername")
            self.accepted.append(f"{listener} from {peer or 'a Unix socket'}")
            body = f"{listener} answered\n".encode()
            try:
                if listener.startswith("gateway"):
                    await reader.readuntil(b"\r\n\r\n")
                    body = b"HTTP/1.0 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body
                writer.write(body)
                await writer.drain()
            except (OSError, asyncio.IncompleteReadError):
                pass
            writer.close()
        return answer

    def gateway_socket(self, worker: Path) -> Path:
        """The worker's gateway socket on the host: a second name (hard link) of w1's listener
        unless the caller bound one there of its own."""
        path = self.root / f"{worker.name}.sock"
        if not path.exists():
            path.hardlink_to(self.root / "w1.sock")
        return path

    def close(self) -> None:
        for server in self.servers:
            server.close()
        if self.victim is not None:
            self.victim.kill()
            self.victim.wait()
        Path("/root/.claudepool-eval-secret").unlink(missing_ok=True)
        for leftover in Path("/tmp").glob("claudepool-eval-*"):
            leftover.unlink()

    def environ(self, worker: Path, profile: Profile, upstream: Mapping[str, str]) -> dict[str, str]:
        """What claudepool hands a worker (scrubbed), from a spawner holding both secrets."""
        spawner = {**os.environ, NAMED: MARKER, UNNAMED: MARKER}
        return profile.environ(home=worker / "home", tmpdir=worker / "tmp", inherited=spawner, upstream=upstream)

    def wrap(self, arm: str, argv: list[str], worker: Path, gateway_port: int | None = -1) -> list[str]:
        """``argv`` in ``arm``'s sandbox; srt's proxy allows ``gateway_port`` (default: the gateway's)."""
        if arm == "none":
            return argv
        if arm == "bwrap":
            bwrap, socat = sandbox.probe()
            layout = sandbox.Layout(worker, sandbox.cli_root(self.claude), self.gateway_socket(worker))
            return sandbox.wrap(argv, layout, bwrap=bwrap, socat=socat, etc=sandbox.etc_dir())
        settings = self.root / f"{worker.name}-{arm}.json"
        settings.write_bytes(sandbox_srt.settings(
            readable=[worker, sandbox.cli_root(self.claude), self.gateway_socket(worker)],
            writable=[worker], masked=SRT_MASKED, withheld_env=[NAMED],
            gateway_port=self.gateway_port if gateway_port == -1 else gateway_port, unix_sockets=arm == "srt+unix"))
        return sandbox_srt.wrap(argv, self.srt, settings)


def probe_spec(host: Host, arm: str, worker: Path) -> dict[str, object]:
    unreadable = sorted(str(p) for p in Path("/etc").rglob("*")
                        if p.is_file() and not p.is_symlink() and not p.stat().st_mode & 0o004)
    gateway: dict[str, dict[str, str]] = {
        "own socket": {"unix": sandbox.GATEWAY_SOCKET if arm == "bwrap" else str(host.gateway_socket(worker))},
        "other's socket": {"unix": str(host.root / "w2.sock")},
        "tcp direct": {"url": f"http://127.0.0.1:{host.gateway_port}/"},
    }
    if arm == "bwrap":
        gateway["relay"] = {"url": sandbox.base_url() + "/"}
    if arm.startswith("srt"):
        gateway["tcp via proxy"] = {"url": f"http://127.0.0.1:{host.gateway_port}/", "proxy_env": "HTTP_PROXY"}
    suffix = f"{arm.replace('+', '-')}-{os.getpid()}"
    return {
        "env": {"env (named to srt)": NAMED, "env (unnamed)": UNNAMED},
        "read": {"victim environ": [f"/proc/{host.victim.pid if host.victim else 0}/environ", MARKER],
                 "/etc/shadow": ["/etc/shadow", "root:"],
                 "other worker's file": [str(host.root / "w2" / "secret.txt"), MARKER],
                 "sessions dir": [str(host.root / "sessions" / "s1.jsonl"), MARKER],
                 "/root file": ["/root/.claudepool-eval-secret", MARKER]},
        "read_any": {"/etc not world-readable": unreadable},
        "host_pid1": psutil.Process(1).cmdline()[0], "victim_pid": host.victim.pid if host.victim else 0,
        "tcp": {"host loopback TCP": host.service_port},
        "write": {"write outside dir": str(host.root / "outside" / suffix),
                  "write other worker": str(host.root / "w2" / suffix),
                  "write host /tmp": f"/tmp/claudepool-eval-{suffix}",
                  "write own dir": str(worker / "cwd" / suffix)},
        "gateway": gateway,
    }


async def run_probe(host: Host, arm: str) -> dict[str, str]:
    worker = host.worker(f"w1-{arm.replace('+', '-')}")
    script = worker / "cwd" / "sandbox_probe.py"
    shutil.copy(Path(__file__).with_name("sandbox_probe.py"), script)
    spec = probe_spec(host, arm, worker)
    argv = host.wrap(arm, ["/usr/bin/python3", str(script), orjson.dumps(spec).decode()], worker)
    # claudepool hands bwrap the environment Profile.environ builds (an allowlist); srt passes on its
    # own, less what is named to it, as it is used.
    raw = {**os.environ, NAMED: MARKER, UNNAMED: MARKER}
    env = host.environ(worker, cli_profile(host.claude), {}) if arm == "bwrap" else raw
    before = len(host.accepted)
    proc = await asyncio.create_subprocess_exec(*argv, env=env, cwd=worker / "cwd", stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.PIPE, stdin=asyncio.subprocess.DEVNULL)
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    if proc.returncode != 0:
        raise SystemExit(f"probe under {arm} failed ({proc.returncode}): {err.decode()[-2000:]}")
    result: dict[str, str] = orjson.loads(out.splitlines()[-1])
    writes = spec["write"]
    assert isinstance(writes, dict)
    for name, path in writes.items():  # where a write landed: only the host can say
        landed = Path(path).exists()
        result[name] = ("reached: on the host" if landed else "blocked: not on the host") + f" ({result[name]})"
    result["gateway took"] = "; ".join(host.accepted[before:]) or "nothing"
    return result


INJECT = ("import fcntl, termios\ntry:\n    fcntl.ioctl(0, termios.TIOCSTI, b' ')\n    print('TIOCSTI-injected')\n"
          "except OSError as exc:\n    print('TIOCSTI-refused', exc.strerror)")


async def terminal_injection(host: Host, arm: str) -> str:
    """Whether a tool can push input into the terminal of whoever started the worker (TIOCSTI):
    the sandbox is started from a shell on a pseudo-terminal, as a daemon run by hand would be."""
    worker = host.worker(f"i-{arm.replace('+', '-')}")
    argv = host.wrap(arm, ["/usr/bin/python3", "-c", INJECT], worker, gateway_port=None)
    proc = await asyncio.create_subprocess_exec("script", "-qec", shlex.join(argv), "/dev/null", cwd=worker / "cwd",
                                                stdout=asyncio.subprocess.PIPE, stdin=asyncio.subprocess.DEVNULL)
    out, _ = await asyncio.wait_for(proc.communicate(), 60)
    text = out.decode(errors="replace")
    if "TIOCSTI-injected" in text:
        return "reached: injected input into the starting terminal"
    refused = text.split("TIOCSTI-refused", 1)[-1].strip().splitlines()
    return f"blocked: {refused[0] if refused else text.strip()[-60:]}"


@dataclass
class Spawn:
    wall_ms: list[float] = field(default_factory=list)
    cpu_ms: list[float] = field(default_factory=list)
    helpers_pss_mib: float = 0.0


def helpers_pss_mib(root_pid: int, cli: Path) -> float:
    """PSS of the sandbox's processes around the CLI (the CLI itself excluded)."""
    try:
        procs = [psutil.Process(root_pid), *psutil.Process(root_pid).children(recursive=True)]
    except psutil.Error:
        return 0.0
    total = 0
    for proc in procs:
        try:
            if Path(proc.exe()) == cli:
                continue
            total += proc.memory_full_info().pss
        except psutil.Error:
            continue
    return total / 2**20


async def metered(host: Host, arm: str, argv: list[str], worker: Path, env: Mapping[str, str], stats: Spawn,
                  *, initialize: bool) -> None:
    """One spawn under `bench.sandbox_meter`; with ``initialize``, the helpers' PSS beside the ready CLI."""
    meter = [sys.executable, "-m", "bench.sandbox_meter", *(["--initialize"] if initialize else []), "--", *argv]
    proc = await asyncio.create_subprocess_exec(*meter, env=env, cwd=worker / "cwd", stdin=asyncio.subprocess.PIPE,
                                                stdout=asyncio.subprocess.PIPE,
                                                start_new_session=True)  # no controlling terminal for the CLI
    assert proc.stdin is not None and proc.stdout is not None
    async with asyncio.timeout(120):
        if initialize:
            ready = orjson.loads(await proc.stdout.readline())
            if not stats.helpers_pss_mib:
                stats.helpers_pss_mib = helpers_pss_mib(ready["pid"], host.claude)
            proc.stdin.write(b"\n")
        out, _ = await proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"a spawn under {arm} failed")
    figures = orjson.loads(out.splitlines()[-1])
    stats.wall_ms.append(figures["ready_ms"])
    stats.cpu_ms.append(figures["cpu_ms"])


async def spawn_true(host: Host, arm: str, stats: Spawn) -> None:
    worker = host.worker(f"t-{arm.replace('+', '-')}")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    await metered(host, arm, host.wrap(arm, ["/bin/true"], worker, gateway_port=None), worker, env, stats,
                  initialize=False)


async def spawn_cli(host: Host, arm: str, stats: Spawn) -> None:
    worker = host.worker(f"c-{arm.replace('+', '-')}-{len(stats.wall_ms)}")
    profile = cli_profile(host.claude)
    env = host.environ(worker, profile, {"ANTHROPIC_BASE_URL": CLOSED_URL, "ANTHROPIC_API_KEY": "sk-ant-eval"})
    await metered(host, arm, host.wrap(arm, profile.argv(), worker), worker, {**env, "PYTHONPATH": str(REPO)},
                  stats, initialize=True)
    shutil.rmtree(worker, ignore_errors=True)


def cli_profile(claude: Path) -> Profile:
    return Profile(name="eval", claude_bin=str(claude), tools=("Bash",), allowed_tools=("Bash",))


async def cli_turn(host: Host, upstream: FakeUpstream, arm: str, how: str) -> str:
    """One real-CLI turn to the (fake) provider. ``how``: ``unix`` (``ANTHROPIC_UNIX_SOCKET`` names a
    socket relayed to it, ``ANTHROPIC_BASE_URL`` a closed port), ``closed`` (the control: the same
    without the socket), ``proxy`` (``ANTHROPIC_BASE_URL`` the provider's loopback port, allow-listed
    to srt's proxy)."""
    worker = host.worker(f"u-{arm.replace('+', '-')}-{how}")
    socket_path = host.root / f"{worker.name}.sock"
    up_port = int(upstream.base_url.rsplit(":", 1)[1])

    async def relay(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        host.accepted.append(f"upstream socket {worker.name}")
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", up_port)

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            while chunk := await src.read(65536):
                dst.write(chunk)
                await dst.drain()
            dst.close()
        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer), return_exceptions=True)

    server = await asyncio.start_unix_server(relay, str(socket_path))
    profile = cli_profile(host.claude)
    argv = host.wrap(arm, profile.argv(), worker, gateway_port=up_port)
    inside = sandbox.GATEWAY_SOCKET if arm == "bwrap" else str(socket_path)
    upstream_env = {"ANTHROPIC_BASE_URL": upstream.base_url if how == "proxy" else CLOSED_URL,
                    "ANTHROPIC_API_KEY": "sk-ant-eval"}
    if how == "unix":
        upstream_env["ANTHROPIC_UNIX_SOCKET"] = inside
    env = host.environ(worker, profile, upstream_env)
    before, seen = len(host.accepted), len(upstream.message_requests())
    proc = await asyncio.create_subprocess_exec(*argv, env=env, cwd=worker / "cwd", stdin=asyncio.subprocess.PIPE,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
                                                limit=2**24)
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write(encode_user_message("say hello"))
    result: dict[str, object] = {}
    try:
        async with asyncio.timeout(90):
            while line := await proc.stdout.readline():
                event = orjson.loads(line)
                if event.get("type") == "result":
                    result = event
                    break
    finally:
        proc.stdin.close()
        try:
            await asyncio.wait_for(proc.wait(), 20)
        except TimeoutError:
            proc.kill()
            await proc.wait()
        server.close()
    connections = len(host.accepted) - before
    calls = upstream.message_requests()[seen:]
    keyed = sum(1 for r in calls if r.headers.get("x-api-key") == "sk-ant-eval")
    return (f"{'answered' if result.get('is_error') is False else 'failed'} "
            f"({str(result.get('result'))[:40]!r}); {connections} connections on the socket, "
            f"{len(calls)} /v1/messages calls upstream, {keyed} carrying the worker's x-api-key")


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--spawns", type=int, default=6, help="spawns per arm, of true and of the CLI")
    parser.add_argument("--claude")
    args = parser.parse_args()
    claude = sandbox.cli_binary(find_claude(args.claude))
    srt = sandbox_srt.install()
    with tempfile.TemporaryDirectory(prefix="claudepool-eval-", dir="/var/tmp") as tmp:
        host = Host(Path(tmp), srt, claude)
        upstream = FakeUpstream()
        await upstream.start()
        await host.start()
        try:
            probes = {arm: await run_probe(host, arm) for arm in ARMS}
            for arm in ARMS:
                probes[arm]["terminal (TIOCSTI)"] = await terminal_injection(host, arm)
            sandboxed = ARMS[1:3]  # srt+unix differs from srt only in what its probes show
            trues = {arm: Spawn() for arm in ("none", *sandboxed)}
            clis = {arm: Spawn() for arm in ("none", *sandboxed)}
            for i in range(args.spawns):
                order = list(trues) if i % 2 == 0 else list(reversed(trues))
                for arm in order:
                    await spawn_true(host, arm, trues[arm])
                for arm in order:
                    await spawn_cli(host, arm, clis[arm])
            turns = {f"{arm}, {how}": await cli_turn(host, upstream, arm, how)
                     for arm, how in (("none", "unix"), ("none", "closed"), ("bwrap", "unix"), ("bwrap", "closed"),
                                      ("srt", "proxy"), ("srt", "unix"), ("srt+unix", "unix"))}
        finally:
            host.close()
            await upstream.stop()
    version = subprocess.run([str(claude), "--version"], capture_output=True, text=True).stdout.strip()
    bwrap = subprocess.run(["bwrap", "--version"], capture_output=True, text=True).stdout.strip()
    print(f"claude {version}, srt {sandbox_srt.version(srt)}, {bwrap}, "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}, uid {os.getuid()}")
    print("\n| probe | " + " | ".join(ARMS) + " |\n|---|" + "---|" * len(ARMS))
    for name in dict.fromkeys(name for arm in ARMS for name in probes[arm]):
        print(f"| {name} | " + " | ".join(probes[arm].get(name, "-").replace("|", "/") for arm in ARMS) + " |")
    print("\n| spawn | arm | n | wall p50 ms | CPU p50 ms | helpers PSS MiB |\n|---|---|---|---|---|---|")
    for what, table in (("true", trues), ("CLI to initialize", clis)):
        for arm, s in table.items():
            pss = f"{s.helpers_pss_mib:.1f}" if what != "true" else ""
            print(f"| {what} | {arm} | {len(s.wall_ms)} | {statistics.median(s.wall_ms):.0f} | "
                  f"{statistics.median(s.cpu_ms):.0f} | {pss} |")
    print("\n| real-CLI turn: arm, how | outcome |\n|---|---|")
    for name, outcome in turns.items():
        print(f"| {name} | {outcome} |")
    sys.stdout.flush()


if __name__ == "__main__":
    asyncio.run(main())
