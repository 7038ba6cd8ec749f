"""The `claudepool` command.

    claudepool serve [--config FILE] [--dev]      run the daemon
    claudepool run [--socket PATH | --url URL] [--key KEY] PROMPT
                                                  stream one answer to stdout
    claudepool status [--socket PATH | --url URL] [--key KEY]
                                                  the workers (admin key) or readiness (tenant key)
    claudepool usage [--socket PATH | --url URL] [--key KEY] [--tenant T] [--window day|month]
                     [--date D] [--ledger [--since TS] [--limit N]]
                                                  usage and budgets, or the ledger as JSON lines
    claudepool check [--claude PATH]              one worker behind a gateway: start, a slash-command-looking
                                                  prompt, a reset
    claudepool reconcile --since DAY [--until DAY] [--config FILE] [--url URL] [--ledger-file PATH] [--json]
                                                  the ledger against the provider's usage and cost reports
                                                  (claudepool.reconcile.command)
    claudepool version

``--key`` defaults to ``$CLAUDEPOOL_KEY``; the socket defaults to the daemon's default path. A refused
connect is retried for ``--connect-timeout`` seconds (default 10) before the command fails.
Exit codes: 0 success, 1 the request or command failed, 2 invalid configuration or usage (reconcile: 1
a difference beyond the tolerance, 2 nothing compared).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import orjson

from claudepool import __version__
from claudepool.client import AsyncClient
from claudepool.config import Settings, default_socket_path, load_settings
from claudepool.errors import ClaudepoolError, ConfigError, RemoteError
from claudepool.pool.memory import MiB
from claudepool.pool.profile import Profile
from claudepool.pool.worker import Worker
from claudepool.protocol.wire import ModelFallback, PromptResult, ToolUse
from claudepool.reconcile import command as reconcile_command

DEV_KEY = "dev"
DEV_ADMIN_KEY = "dev-admin"


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="claudepool", description="A multi-tenant pool of warm Claude Code CLIs.")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the daemon")
    serve.add_argument("--config", help="TOML config file (default: $CLAUDEPOOL_CONFIG, else built-in defaults)")
    serve.add_argument("--dev", action="store_true",
                       help=f"development mode: a tenant with key {DEV_KEY!r}, admin key {DEV_ADMIN_KEY!r}, "
                            "and a loopback fake upstream unless ANTHROPIC_API_KEY is set")

    for name, text in (("run", "send one prompt and stream the answer"), ("status", "show the pool"),
                       ("usage", "usage and budgets per tenant and model, or the ledger")):
        cmd = sub.add_parser(name, help=text)
        where = cmd.add_mutually_exclusive_group()
        where.add_argument("--socket", help="daemon socket path (default: the daemon's default)")
        where.add_argument("--url", help="daemon HTTP base URL, e.g. http://127.0.0.1:8787")
        cmd.add_argument("--key", default=os.environ.get("CLAUDEPOOL_KEY"), help="API key ($CLAUDEPOOL_KEY)")
        cmd.add_argument("--connect-timeout", type=float, default=10.0, dest="connect_timeout_s",
                         help="seconds to keep retrying a refused connect (daemon restarting or flooded)")
        if name == "run":
            cmd.add_argument("prompt")
            cmd.add_argument("--profile")
            cmd.add_argument("--system", help="the request's own system prompt (the tenant must be allowed one)")
            cmd.add_argument("--timeout", type=float, dest="timeout_s")
            cmd.add_argument("--file", action="append", default=[], dest="files", metavar="PATH[=WORKSPACE_PATH]",
                             help="put a local file into the request's workspace, as its name (or WORKSPACE_PATH)")
        if name == "usage":
            cmd.add_argument("--tenant", help="one tenant (admin key); a tenant key sees only itself")
            cmd.add_argument("--window", choices=("day", "month"), default="day")
            cmd.add_argument("--date", help="YYYY-MM-DD for a day, YYYY-MM for a month (default: now, UTC)")
            cmd.add_argument("--ledger", action="store_true", help="print the ledger as JSON lines (needs --url)")
            cmd.add_argument("--since", type=float, help="with --ledger: records at or after this unix time")
            cmd.add_argument("--limit", type=int, default=1000)

    reconcile = sub.add_parser("reconcile", help="compare the ledger with the provider's usage and cost reports")
    reconcile_command.add_arguments(reconcile)
    check = sub.add_parser("check", help="start one worker and reset it, to validate the installed CLI")
    check.add_argument("--claude", default="claude", help="path of the claude binary (default: claude on PATH)")
    sub.add_parser("version", help="print the version")

    args = parser.parse_args(argv)
    if args.command == "version":
        print(__version__)
        return
    if args.command == "check":
        # The worker runs in a directory of its own: a relative path must not change meaning.
        claude_bin = os.path.abspath(args.claude) if os.sep in args.claude else args.claude
        sys.exit(asyncio.run(_check(claude_bin)))
    if args.command == "serve":
        sys.exit(_serve(args.config, args.dev))
    if args.command == "reconcile":
        sys.exit(reconcile_command.run(args))
    if not args.key:
        parser.error("a key is needed: --key or $CLAUDEPOOL_KEY")
    client = AsyncClient(key=args.key, url=args.url, socket_path=None if args.url else (args.socket or
                                                                                        default_socket_path()),
                         connect_timeout_s=args.connect_timeout_s)
    commands = {"run": _run, "status": _status, "usage": _usage}
    sys.exit(asyncio.run(commands[args.command](client, args)))


# -- serve -------------------------------------------------------------------------------------------


def _serve(config: str | None, dev: bool) -> int:
    from claudepool.daemon.app import Daemon
    from claudepool.logs import configure_logging

    configure_logging(os.environ.get("CLAUDEPOOL_LOG_LEVEL", "INFO"))
    try:
        settings = load_settings(config)
    except ConfigError as exc:
        print(f"claudepool: {exc}", file=sys.stderr)
        return 2

    async def serve() -> int:
        fake = None
        final = settings
        if dev:
            overrides, fake = await _dev_overrides(settings)
            final = load_settings(config, **overrides)
        try:
            return await Daemon(final).run()
        finally:
            if fake is not None:
                await fake.stop()

    try:
        with asyncio.Runner(loop_factory=loop_factory(settings.server.event_loop)) as runner:
            return runner.run(serve())
    except ConfigError as exc:
        print(f"claudepool: {exc}", file=sys.stderr)
        return 2


def loop_factory(event_loop: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """The factory of ``server.event_loop``'s loop (None: asyncio's default). Raises `ConfigError`
    when uvloop is asked for but not installed (``pip install 'claudepool[fast]'``)."""
    if event_loop == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        raise ConfigError("server.event_loop = \"uvloop\" needs uvloop: pip install 'claudepool[fast]'") from None
    return uvloop.new_event_loop


async def _dev_overrides(settings: Settings) -> tuple[dict[str, Any], Any]:
    """Make a bare checkout answer requests: a known key, and an upstream."""
    from claudepool.testing.fake_upstream import FakeUpstream

    overrides: dict[str, Any] = {}
    if not settings.tenants:
        overrides["tenants"] = {"dev": {"key": os.environ.get("CLAUDEPOOL_DEV_KEY", DEV_KEY)}}
    if not settings.server.admin_key.get_secret_value():
        overrides["server"] = {"admin_key": DEV_ADMIN_KEY}
    pool: dict[str, Any] = {}
    pinned = _pinned_cli()
    if settings.pool.claude_bin == "claude" and pinned:
        pool["claude_bin"] = pinned
    if pool:
        overrides["pool"] = pool
    # The provider is the gateway's business: a fake one becomes [upstream] base_url, never a
    # worker's variable. A key in $ANTHROPIC_API_KEY (the gateway's default key) means the real one.
    fake = None
    if not any(settings.upstream_for(name).has_credential for name in settings.profiles):
        fake = FakeUpstream()
        url = await fake.start()
        overrides["upstream"] = {"base_url": url, "api_key": "sk-ant-dev-fake"}
        print(f"claudepool: --dev without ANTHROPIC_API_KEY: answers come from a loopback fake upstream at {url}",
              flush=True)
    elif os.environ.get("ANTHROPIC_BASE_URL") and "base_url" not in settings.upstream.model_fields_set:
        overrides["upstream"] = {"base_url": os.environ["ANTHROPIC_BASE_URL"]}
    keys = overrides.get("tenants", {}).get("dev", {}).get("key")
    if keys:
        print(f"claudepool: --dev tenant 'dev' has key {keys!r}; admin key {DEV_ADMIN_KEY!r}", flush=True)
    return overrides, fake


def _pinned_cli() -> str | None:
    """The CLI that `.ci/run` installs into the checkout, if we run from one."""
    local = Path(".cache/claude-cli/node_modules/.bin/claude")
    return str(local.resolve()) if local.exists() else None


# -- client commands ---------------------------------------------------------------------------------


_MARKER_CHARS = 160


def tool_marker(call: ToolUse) -> str:
    """The one line `run` prints to stderr when the agent calls a tool: its name and input, cut short.

    >>> tool_marker(ToolUse(id="t1", name="Bash", input={"command": "echo hi"}))
    '[tool] Bash {"command":"echo hi"}'
    """
    shown = call.input if isinstance(call.input, str) else orjson.dumps(call.input).decode()
    line = "".join(c if c.isprintable() else "?" for c in f"[tool] {call.name} {shown}")
    return line if len(line) <= _MARKER_CHARS else line[:_MARKER_CHARS - 1] + "…"


async def _run(client: AsyncClient, args: argparse.Namespace) -> int:
    streamed = False
    line_open = False  # the answer's text so far does not end a line: a marker starts a new one
    try:
        files = _input_files(args.files)
    except OSError as exc:
        print(f"claudepool: cannot read {exc.filename}: {exc.strerror}", file=sys.stderr)
        return 2
    try:
        async with client:
            async for piece in client.stream(args.prompt, profile=args.profile, timeout_s=args.timeout_s,
                                             files=files or None, system=args.system):
                if isinstance(piece, str):
                    streamed = True
                    sys.stdout.write(piece)
                    sys.stdout.flush()
                    if piece:
                        line_open = not piece.endswith("\n")
                elif isinstance(piece, ToolUse):
                    print(("\n" if line_open else "") + tool_marker(piece), file=sys.stderr, flush=True)
                    line_open = False
                elif isinstance(piece, ModelFallback):
                    print(("\n" if line_open else "") + f"[{piece.original_model} was {piece.trigger}: "
                          f"{piece.fallback_model} answers]", file=sys.stderr, flush=True)
                    line_open = False
                elif isinstance(piece, PromptResult):
                    if piece.is_error:
                        print(f"\nclaudepool: the model call failed: {piece.text}", file=sys.stderr)
                        return 1
                    # A profile without partial messages streams no deltas: the text is all here.
                    sys.stdout.write("\n" if streamed else piece.text + "\n")
    except RemoteError as exc:
        print(f"claudepool: {exc.remote_code}: {exc.message}", file=sys.stderr)
        return 1
    return 0


def _input_files(specs: list[str]) -> dict[str, bytes]:
    """``--file PATH[=WORKSPACE_PATH]``: each local file's bytes, by its path in the workspace."""
    files: dict[str, bytes] = {}
    for spec in specs:
        local, _, remote = spec.partition("=")
        files[remote or Path(local).name] = Path(local).read_bytes()
    return files


async def _usage(client: AsyncClient, args: argparse.Namespace) -> int:
    try:
        async with client:
            if args.ledger:
                for record in await client.ledger(tenant=args.tenant, since=args.since, limit=args.limit):
                    print(orjson.dumps(record).decode())
                return 0
            report = await client.usage(window=args.window, date=args.date, tenant=args.tenant)
    except (RemoteError, ValueError) as exc:
        print(f"claudepool: {exc}", file=sys.stderr)
        return 1
    print(f"usage for {report['window']['kind']} {report['window']['key']} (UTC)")
    print(f"{'TENANT':<16} {'MODEL':<28} {'REQUESTS':>8} {'INPUT':>10} {'OUTPUT':>10} {'CACHE_R':>10} "
          f"{'CACHE_W':>10} {'COST_USD':>12}")
    for tenant, entry in report["tenants"].items():
        for model, t in entry["models"].items():
            print(f"{tenant:<16} {model:<28} {t['requests']:>8} {t['input_tokens']:>10} {t['output_tokens']:>10} "
                  f"{t['cache_read_input_tokens']:>10} {t['cache_creation_input_tokens']:>10} {t['cost_usd']:>12.6f}")
        budget = entry.get("budget")
        if budget:
            print(f"{tenant:<16} budget: today ${budget['day_spent_usd']:.6f} of "
                  f"{budget['daily_limit_usd'] or 'unlimited'}, month ${budget['month_spent_usd']:.6f} of "
                  f"{budget['monthly_limit_usd'] or 'unlimited'}, reserved ${budget['reserved_usd']:.6f}")
    return 0


async def _status(client: AsyncClient, args: argparse.Namespace | None = None) -> int:
    try:
        async with client:
            status = await client.status()
    except RemoteError as exc:
        print(f"claudepool: {exc.remote_code}: {exc.message}", file=sys.stderr)
        return 1
    if "pools" in status and any("workers" in p for p in status["pools"].values()):
        print(f"{'WORKER':<14} {'STATE':<9} {'PID':>7} {'PROFILE':<10} {'TURNS':>6} {'AGE_S':>8} {'PSS_MIB':>8}")
        for pool in status["pools"].values():
            for w in pool["workers"]:
                pss = f"{w['pss_bytes'] / MiB:.0f}" if w["pss_bytes"] else "-"
                print(f"{w['id']:<14} {w['state']:<9} {w['pid'] or '-':>7} {w['profile']:<10} "
                      f"{w['turns']:>6} {w['age_s']:>8.1f} {pss:>8}")
        print(f"waiting: {status['queue']['waiting']}  in flight: {status['in_flight']}  "
              f"draining: {status['draining']}")
    else:
        ready = status.get("ready")
        print(f"ready: {ready}")
        for name, pool in status.get("pools", {}).items():
            print(f"  {name}: healthy={pool['healthy']} warm={pool['warm']} idle={pool['idle']}")
    return 0


async def _check(claude_bin: str) -> int:
    """Prove the installed CLI speaks the protocol the pool relies on: the handshake, a prompt that
    looks like a slash command reaching the model as text (on a loopback fake of the Messages API,
    through a gateway as the daemon's workers reach their provider), and a reset that restores and
    verifies the process settings."""
    from claudepool.gateway.attribution import Attribution
    from claudepool.gateway.credentials import CredentialRegistry
    from claudepool.gateway.server import Gateway
    from claudepool.gateway.settings import Upstream
    from claudepool.testing.fake_upstream import FakeUpstream

    upstream = FakeUpstream()
    await upstream.start()
    key = "sk-ant-claudepool-check"
    credentials = CredentialRegistry()
    gateway = Gateway(credentials, lambda w: Attribution("check", "check", w.profile.name, w.id, w.slot), {},
                      default=Upstream("check", upstream.base_url, {"x-api-key": key}))
    await gateway.start()
    probe = "/model claude-check-probe"
    with tempfile.TemporaryDirectory(prefix="claudepool-check-") as tmp:
        worker = Worker(Profile(name="check", claude_bin=claude_bin, upstream_max_retries=0),
                        workdir_root=Path(tmp), credentials=credentials)
        t0 = time.perf_counter()
        try:
            await worker.start()
            ready_ms = (time.perf_counter() - t0) * 1000
            answered = [item async for item in worker.run_turn(f"{probe} [[reply:as text]]")]
            if getattr(answered[-1], "text", None) != "as text":  # the model's answer, not /model's
                print(f"check failed: the prompt {probe!r} did not reach the model as text", file=sys.stderr)
                return 1
            if any(r.headers.get("x-api-key") != key for r in upstream.requests):
                print("check failed: a call reached the provider without the gateway's key", file=sys.stderr)
                return 1
            t1 = time.perf_counter()
            await worker.reset()
            reset_ms = (time.perf_counter() - t1) * 1000
            pss = worker.measure_memory()
        except ClaudepoolError as exc:
            print(f"check failed: {exc}", file=sys.stderr)
            return 1
        finally:
            await worker.close()
            await gateway.close(5.0)
            await upstream.stop()
    print(f"ok: {claude_bin} is ready in {ready_ms:.0f} ms, sends slash-command text to the model, "
          f"resets in {reset_ms:.0f} ms, PSS {pss / MiB if pss else 0:.0f} MiB")
    return 0
