"""Floods of clients, and the cost of masking log records.

Starts a daemon in this process on the fake CLI (4 workers) and sends N requests at once, each on
its own connection: over the Unix socket (one `AsyncClient` each) and over HTTP (raw aiohttp, no
connection limit), with the listen backlog given and the client's connect retry on or off. Then
times `SecretMask` on typical records.

    python -m bench.net_bench --clients 1000 [--backlog 100] [--no-retry]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import hashlib
import logging
import resource
import tempfile
import time
import timeit
from pathlib import Path

import aiohttp
import orjson

from claudepool.client import AsyncClient
from claudepool.config import load_settings
from claudepool.daemon.app import Daemon
from claudepool.daemon.notify import Notifier
from claudepool.errors import RemoteError
from claudepool.logs import SecretMask, add_key_digests

REPO = Path(__file__).resolve().parent.parent
FAKE = REPO / "tests" / "fakes" / "fake_claude.py"
KEY = "bench-key-0123456789"


async def flood(clients: int, backlog: int, retry: bool) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(soft, 2 * clients + 1024)), hard))
    with tempfile.TemporaryDirectory() as tmp:
        settings = load_settings(None, server={"socket": f"{tmp}/cp.sock", "http": "127.0.0.1:0", "backlog": backlog,
                                               "max_queued": 4 * clients},
                                 pool={"claude_bin": str(FAKE), "min_idle": 4, "max_workers": 4,
                                       "workdir": f"{tmp}/w", "lease_timeout_s": 300},
                                 sessions={"min_idle": 0, "dir": f"{tmp}/s"},
                                 tenants={"bench": {"key": KEY, "max_queued": 4 * clients}})
        daemon = Daemon(settings, notifier=Notifier({}))
        task = asyncio.create_task(daemon.run(handle_signals=False))
        while not daemon.status.readiness()[0]:
            await asyncio.sleep(0.05)
        connect_timeout_s = 10.0 if retry else 0.0

        async def over_socket(i: int) -> str:
            async with AsyncClient(key=KEY, socket_path=settings.server.socket,
                                   connect_timeout_s=connect_timeout_s) as client:
                try:
                    return "ok" if (await client.prompt(f"[[reply:{i}]]")).text == str(i) else "wrong"
                except RemoteError as exc:
                    return exc.remote_code

        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:

            async def over_http(i: int) -> str:
                try:
                    async with session.post(f"{daemon.listening['http']}/v1/prompt",
                                            data=orjson.dumps({"prompt": f"[[reply:{i}]]"}),
                                            headers={"Authorization": f"Bearer {KEY}"}) as resp:
                        return "ok" if resp.status == 200 else str(resp.status)
                except aiohttp.ClientError as exc:
                    return type(exc).__name__

            for name, one in (("socket", over_socket), ("http", over_http)):
                started = time.perf_counter()
                outcomes = collections.Counter(await asyncio.gather(*(one(i) for i in range(clients))))
                print(f"{name:>6}: {clients} at once, backlog {backlog}, retry {'on' if retry else 'off'}: "
                      f"{time.perf_counter() - started:.2f} s, {dict(outcomes)}")
        daemon.request_stop()
        await task


def masking() -> None:
    add_key_digests([hashlib.sha256(KEY.encode()).hexdigest()])
    mask = SecretMask()
    canonical: dict[str, object] = {
        "request_id": "0123456789abcdef0123456789abcdef", "tenant": "acme", "session": None, "profile": "default",
        "priority": "interactive", "worker_slot": 1, "outcome": "ok", "queue_ms": 0.3, "duration_ms": 41.2,
        "input_tokens": 12, "output_tokens": 40, "cost_usd": 0.0016}
    cases: dict[str, tuple[str, str, tuple[object, ...], dict[str, object]]] = {
        "canonical request line": ("claudepool.request", "request", (), canonical),
        "aiohttp 400 line": ("aiohttp.server", "Error handling request from %s", ("127.0.0.1",), {}),
        "worker stderr line": ("claudepool.worker.stderr", "worker stderr", (),
                               {"line": "warning: retrying the API call after 529 (attempt 2 of 3)"}),
    }
    for name, (logger, msg, args, fields) in cases.items():

        def make(logger: str = logger, msg: str = msg, args: tuple[object, ...] = args,
                 fields: dict[str, object] = fields) -> logging.LogRecord:
            record = logging.LogRecord(logger, logging.INFO, __file__, 1, msg, args, None)
            record.fields = dict(fields)
            return record

        n = 20_000
        made_s = timeit.timeit(make, number=n)
        masked_s = timeit.timeit(lambda make=make: mask.filter(make()), number=n)  # type: ignore[misc]
        print(f"mask: {name}: {(masked_s - made_s) / n * 1e6:.1f} µs per record")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--backlog", type=int, default=1024)
    parser.add_argument("--no-retry", action="store_true")
    args = parser.parse_args()
    asyncio.run(flood(args.clients, args.backlog, not args.no_retry))
    masking()


if __name__ == "__main__":
    main()
