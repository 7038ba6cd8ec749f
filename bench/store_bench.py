"""What one store write costs the daemon: settles and session writes on a real Redis, one at a time.

Each round settles ``--ops`` records (spread over ``--tenants`` tenants) and then writes as many
session records, through `RedisStore`, sequentially; the CPU is this process's own (the client's
work per operation: building the call, the round trips, parsing the reply), the wall time includes
Redis. Medians over ``--rounds``. Run against another checkout's code with
``PYTHONPATH=DIR python bench/store_bench.py``.

    python -m bench.store_bench [--ops 3000] [--tenants 10] [--rounds 5]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

import claudepool
from claudepool.store.base import SessionRecord, UsageRecord
from claudepool.store.redis import RedisStore
from tests.redis_server import RedisServer


async def measure(store: RedisStore, ops: int, tenants: int, round_: int) -> dict[str, tuple[float, float]]:
    out = {}
    cpu, wall = time.process_time(), time.perf_counter()
    for i in range(ops):
        await store.settle(UsageRecord(record_id=f"{round_}-{i}", request_id=f"q{i}", tenant=f"t{i % tenants}",
                                       profile="default", model="m", outcome="ok", at=time.time(),
                                       input_tokens=10, output_tokens=20, cost_usd=0.001))
    out["settle"] = ((time.process_time() - cpu) / ops * 1e6, (time.perf_counter() - wall) / ops * 1e6)
    cpu, wall = time.process_time(), time.perf_counter()
    now = time.time()
    for i in range(ops):
        await store.session_put(SessionRecord(id=f"s_bench{round_:02d}{i:08d}", tenant=f"t{i % tenants}",
                                              profile="default", created_at=now, last_used_at=now, state="active"))
    out["session_put"] = ((time.process_time() - cpu) / ops * 1e6, (time.perf_counter() - wall) / ops * 1e6)
    return out


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ops", type=int, default=3000)
    parser.add_argument("--tenants", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    print(f"claudepool from {claudepool.__file__}")
    with RedisServer() as server:
        store = RedisStore(server.url)
        try:
            await measure(store, 200, args.tenants, -1)  # warm: scripts loaded, connections open
            runs = [await measure(store, args.ops, args.tenants, r) for r in range(args.rounds)]
        finally:
            await store.close()
    for op in ("settle", "session_put"):
        cpu = [run[op][0] for run in runs]
        wall = [run[op][1] for run in runs]
        each = ", ".join(f"{c:.0f}" for c in cpu)
        print(f"{op:12} client CPU per op: median {statistics.median(cpu):6.1f} us (runs {each}); "
              f"wall median {statistics.median(wall):6.1f} us")


if __name__ == "__main__":
    asyncio.run(main())
