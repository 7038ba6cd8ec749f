"""How the fair queue's cost grows with the number of queued requests (it should grow as log n).

For each size n: queue n requests across 500 tenants with mixed weights, then time a steady state of
push + pop pairs (the queue stays at n) and a drain. Prints microseconds per operation.

    python -m bench.scheduler_bench
"""

from __future__ import annotations

import time

from claudepool.pool.fair_queue import FairQueue
from claudepool.pool.shares import TenantShare, TenantSlots

TENANTS = 500
STEADY_OPS = 20_000


def measure(n: int) -> tuple[float, float]:
    slots = TenantSlots()
    queue: FairQueue[int] = FairQueue(slots, batch_max_running=lambda: 1)
    shares = [TenantShare(weight=1 + i % 4) for i in range(TENANTS)]
    for i in range(n):
        queue.push(i, f"t{i % TENANTS}", shares[i % TENANTS])
    started = time.perf_counter()
    for i in range(STEADY_OPS):
        queue.push(i, f"t{i % TENANTS}", shares[i % TENANTS])
        queue.pop()
    steady_us = (time.perf_counter() - started) / STEADY_OPS * 1e6
    started = time.perf_counter()
    while queue.pop() is not None:
        pass
    drain_us = (time.perf_counter() - started) / n * 1e6
    return steady_us, drain_us


def main() -> None:
    print("| queued requests | push+pop µs (steady) | pop µs (drain) |")
    print("|---|---|---|")
    for n in (1_000, 10_000, 100_000, 1_000_000):
        steady_us, drain_us = measure(n)
        print(f"| {n:,} | {steady_us:.2f} | {drain_us:.2f} |")


if __name__ == "__main__":
    main()
