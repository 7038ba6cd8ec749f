"""The fair queue: weighted sharing, no starvation, no idle credit, caps, batch room, cancel."""

from __future__ import annotations

import doctest
import gc
import itertools
import random
import tracemalloc
from collections import Counter
from dataclasses import dataclass, field

import pytest

from claudepool.pool import fair_queue, shares
from claudepool.pool.fair_queue import FairQueue
from claudepool.pool.shares import Priority, TenantShare, TenantSlots

EQUAL = TenantShare()


@dataclass
class Harness:
    """A queue with a settable batch limit, as a pool would own it."""

    slots: TenantSlots = field(default_factory=TenantSlots)
    batch_max: int = 0
    queue: FairQueue[str] = field(init=False)

    def __post_init__(self) -> None:
        self.queue = FairQueue(self.slots, batch_max_running=lambda: self.batch_max)

    def flood(
        self, tenant: str, count: int, share: TenantShare = EQUAL, priority: Priority = Priority.INTERACTIVE
    ) -> None:
        for i in range(count):
            self.queue.push(f"{tenant}{i}", tenant, share, priority)

    def pop_tenants(self, count: int) -> list[str]:
        served = []
        for _ in range(count):
            popped = self.queue.pop()
            assert popped is not None
            served.append(popped[1])
        return served

    def pop_items(self) -> list[str]:
        return [item for item, _tenant, _priority in iter(self.queue.pop, None)]


def longest_run(served: list[str], tenant: str) -> int:
    return max((len(list(group)) for who, group in itertools.groupby(served) if who == tenant), default=0)


@pytest.mark.parametrize("module", [fair_queue, shares])
def test_module_doctests_pass(module: object) -> None:
    result = doctest.testmod(module)  # type: ignore[arg-type]
    assert result.attempted > 0
    assert result.failed == 0


# -- sharing ----------------------------------------------------------------------------------


def test_equal_weights_alternate() -> None:
    h = Harness()
    h.flood("a", 50)
    h.flood("b", 50)
    assert h.pop_tenants(20) == ["a", "b"] * 10


def test_weights_three_to_one_over_400_pops() -> None:
    h = Harness()
    h.flood("heavy", 1000, TenantShare(weight=3))
    h.flood("light", 1000, TenantShare(weight=1))
    counts = Counter(h.pop_tenants(400))
    assert counts["heavy"] / counts["light"] == pytest.approx(3.0, rel=0.03)


def test_quiet_tenant_is_served_within_two_pops_of_a_flood() -> None:
    h = Harness()
    h.flood("noisy", 1000)
    h.queue.push("quiet0", "quiet", EQUAL)
    assert "quiet" in h.pop_tenants(2)


def test_quiet_tenant_arriving_late_is_not_behind_the_noisy_backlog() -> None:
    h = Harness()
    h.flood("noisy", 1000)
    h.pop_tenants(600)  # noisy built no credit by being served alone
    h.queue.push("quiet0", "quiet", EQUAL)
    assert "quiet" in h.pop_tenants(2)


def test_idle_tenant_gets_no_burst_when_it_returns() -> None:
    h = Harness()
    h.flood("a", 1000)
    h.flood("b", 1000)
    h.pop_tenants(500)
    h.flood("late", 20)
    served = h.pop_tenants(45)
    assert longest_run(served, "late") == 1
    assert served.count("late") == 15  # one in three: its weighted share, no more, no less


def test_fifo_within_a_tenant() -> None:
    h = Harness()
    h.flood("a", 10)
    h.flood("b", 3)
    items = h.pop_items()
    assert [item for item in items if item.startswith("a")] == [f"a{i}" for i in range(10)]
    assert [item for item in items if item.startswith("b")] == ["b0", "b1", "b2"]


def test_share_of_each_push_sets_its_tag() -> None:
    h = Harness()
    h.flood("a", 4, TenantShare(weight=1))  # tags 1..4
    h.flood("b", 6, TenantShare(weight=1))  # tags 1..6
    # A reload raised a's weight: its next requests get tags 4.25 and 4.5, ahead of b4 (5) and b5 (6).
    h.queue.push("a-fast0", "a", TenantShare(weight=4))
    h.queue.push("a-fast1", "a", TenantShare(weight=4))
    assert h.pop_tenants(8) == ["a", "b"] * 4
    assert h.pop_items() == ["a-fast0", "a-fast1", "b4", "b5"]


# -- concurrency caps ---------------------------------------------------------------------------


def test_capped_tenant_is_skipped_then_served_in_tag_order_after_release() -> None:
    h = Harness()
    capped = TenantShare(max_concurrency=1)
    h.flood("a", 3, capped)
    h.flood("b", 6)
    assert h.queue.pop() == ("a0", "a", Priority.INTERACTIVE)
    h.slots.acquire("a")
    assert h.pop_tenants(3) == ["b", "b", "b"]  # a1 (tag 2) waits behind its cap
    assert h.queue.waiting("a") == 2
    h.slots.release("a")
    assert h.queue.pop() == ("a1", "a", Priority.INTERACTIVE)  # its old tag puts it ahead of b3
    h.slots.acquire("a")
    assert h.pop_tenants(3) == ["b", "b", "b"]
    assert h.queue.pop() is None  # only the capped tenant waits
    assert len(h.queue) == 1
    h.slots.release("a")
    assert h.queue.pop() == ("a2", "a", Priority.INTERACTIVE)


def test_cap_counts_leases_from_every_pool_sharing_the_slots() -> None:
    slots = TenantSlots()
    other_pool: FairQueue[str] = FairQueue(slots, batch_max_running=lambda: 0)
    h = Harness(slots=slots)
    h.flood("a", 2, TenantShare(max_concurrency=2))
    other_pool.push("elsewhere", "a", TenantShare(max_concurrency=2))
    assert other_pool.pop() is not None
    slots.acquire("a")
    slots.acquire("a")
    assert h.queue.pop() is None
    assert h.queue.eligible() == 0


def test_latest_share_decides_the_cap() -> None:
    h = Harness()
    h.slots.acquire("a")
    h.queue.push("a0", "a", TenantShare(max_concurrency=1))
    assert h.queue.pop() is None
    h.queue.push("a1", "a", TenantShare(max_concurrency=2))  # a reload raised the cap
    assert h.queue.eligible() == 1
    assert h.queue.pop() == ("a0", "a", Priority.INTERACTIVE)


def test_release_calls_listeners_after_the_queue_sees_the_free_slot() -> None:
    h = Harness()
    h.queue.push("a0", "a", TenantShare(max_concurrency=1))
    h.slots.acquire("a")
    assert h.queue.pop() is None
    calls: list[str] = []
    popped: list[object] = []

    def pool_step(tenant: str) -> None:
        calls.append(tenant)
        popped.append(h.queue.pop())

    h.slots.add_listener(pool_step)
    h.slots.add_listener(lambda tenant: calls.append(f"second:{tenant}"))
    h.slots.release("a")
    assert calls == ["a", "second:a"]
    assert popped == [("a0", "a", Priority.INTERACTIVE)]
    h.slots.remove_listener(pool_step)
    h.slots.acquire("a")
    h.slots.release("a")
    assert calls == ["a", "second:a", "second:a"]


def test_a_failing_listener_does_not_starve_the_others() -> None:
    slots = TenantSlots()
    calls: list[str] = []

    def broken(tenant: str) -> None:
        raise RuntimeError("pool bug")

    slots.add_listener(broken)
    slots.add_listener(calls.append)
    slots.acquire("a")
    with pytest.raises(RuntimeError, match="pool bug"):
        slots.release("a")
    assert calls == ["a"]
    assert slots.running("a") == 0


def test_slots_count_leases_and_reject_unbalanced_releases() -> None:
    slots = TenantSlots()
    slots.acquire("a")
    slots.acquire("a", Priority.BATCH)
    slots.acquire("b", Priority.BATCH)
    assert (slots.running("a"), slots.running("b"), slots.batch_running()) == (2, 1, 2)
    slots.release("a", Priority.BATCH)
    slots.release("b", Priority.BATCH)
    assert (slots.running("a"), slots.running("b"), slots.batch_running()) == (1, 0, 0)
    with pytest.raises(ValueError, match="no lease"):
        slots.release("b")
    with pytest.raises(ValueError, match="no batch lease"):
        slots.release("a", Priority.BATCH)
    assert slots.running("a") == 1
    assert "1 leases (0 batch)" in repr(slots)


# -- batch ----------------------------------------------------------------------------------------


def test_batch_waits_for_batch_room() -> None:
    h = Harness(batch_max=0)
    h.flood("a", 3, priority=Priority.BATCH)
    assert h.queue.pop() is None
    h.batch_max = 2
    assert h.queue.pop() == ("a0", "a", Priority.BATCH)
    h.slots.acquire("a", Priority.BATCH)
    assert h.queue.pop() == ("a1", "a", Priority.BATCH)
    h.slots.acquire("a", Priority.BATCH)
    assert h.queue.pop() is None  # two batch leases held: the limit
    h.slots.release("a", Priority.BATCH)
    assert h.queue.pop() == ("a2", "a", Priority.BATCH)


def test_interactive_pushed_after_batch_is_served_first() -> None:
    h = Harness(batch_max=100)
    h.flood("a", 50, priority=Priority.BATCH)
    h.flood("b", 50, priority=Priority.BATCH)
    h.queue.push("chat", "a", EQUAL)
    assert h.queue.pop() == ("chat", "a", Priority.INTERACTIVE)
    assert h.queue.pop() == ("a0", "a", Priority.BATCH)


def test_batch_is_served_when_the_only_interactive_requests_are_capped() -> None:
    h = Harness(batch_max=1)
    h.slots.acquire("a")
    h.queue.push("a-chat", "a", TenantShare(max_concurrency=1))
    h.queue.push("b-report", "b", EQUAL, Priority.BATCH)
    assert h.queue.pop() == ("b-report", "b", Priority.BATCH)


def test_batch_tenants_share_fairly_and_do_not_push_back_interactive_tags() -> None:
    h = Harness(batch_max=1000)
    h.flood("a", 100, priority=Priority.BATCH)
    h.flood("b", 100, priority=Priority.BATCH)
    assert h.pop_tenants(10) == ["a", "b"] * 5
    h.flood("a", 2)  # a's batch backlog must not give its interactive requests late tags
    h.flood("c", 2)
    assert h.pop_tenants(4) == ["a", "c", "a", "c"]


# -- cancel ---------------------------------------------------------------------------------------


def test_cancelled_requests_are_never_served_and_counts_update_at_once() -> None:
    h = Harness(batch_max=5)
    tickets = [h.queue.push(f"a{i}", "a", EQUAL) for i in range(4)]
    batch = h.queue.push("b0", "b", EQUAL, Priority.BATCH)
    assert (len(h.queue), h.queue.eligible(), h.queue.waiting("a")) == (5, 5, 4)
    h.queue.cancel(tickets[0])  # the head
    h.queue.cancel(tickets[2])  # the middle
    h.queue.cancel(tickets[2])  # twice: harmless
    h.queue.cancel(batch)
    assert tickets[0].dead
    assert (len(h.queue), h.queue.eligible(), h.queue.waiting("a"), h.queue.waiting("b")) == (2, 2, 2, 0)
    assert h.queue.tenants_waiting() == ["a"]
    assert h.pop_items() == ["a1", "a3"]
    h.queue.cancel(tickets[1])  # already served: harmless
    assert len(h.queue) == 0


def test_cancelling_the_head_lets_other_tenants_keep_their_place() -> None:
    h = Harness()
    a = [h.queue.push(f"a{i}", "a", EQUAL) for i in range(3)]
    h.flood("b", 3)
    h.queue.cancel(a[0])
    # a1 keeps tag 2; b0 (tag 1) goes first.
    assert h.pop_items() == ["b0", "a1", "b1", "a2", "b2"]


def test_cancelling_a_whole_backlog_leaves_no_penalty() -> None:
    h = Harness()
    h.flood("b", 100)
    tickets = [h.queue.push(f"a{i}", "a", EQUAL) for i in range(50)]
    for ticket in tickets:
        h.queue.cancel(ticket)
    h.queue.push("a-again", "a", EQUAL)
    assert "a" in h.pop_tenants(2)


def test_cancel_rejects_a_ticket_of_another_queue() -> None:
    h, other = Harness(), Harness()
    h.queue.push("a0", "a", EQUAL)
    ticket = other.queue.push("x", "a", EQUAL)
    with pytest.raises(ValueError, match="not issued by this queue"):
        h.queue.cancel(ticket)
    assert (len(h.queue), len(other.queue)) == (1, 1)


# -- eligible, drain ----------------------------------------------------------------------------


def test_eligible_excludes_capped_tenants_and_clamps_batch_to_its_room() -> None:
    h = Harness(batch_max=3)
    h.flood("capped", 5, TenantShare(max_concurrency=1))
    h.slots.acquire("capped")
    h.flood("limited", 5, TenantShare(max_concurrency=3))  # room for 3 leases: counts 3
    h.flood("free", 2)
    h.flood("bulk", 10, priority=Priority.BATCH)
    h.slots.acquire("bulk", Priority.BATCH)  # batch room: 3 - 1 = 2
    assert len(h.queue) == 22
    assert h.queue.eligible() == 0 + 3 + 2 + 2
    h.slots.release("capped")
    assert h.queue.eligible() == 1 + 3 + 2 + 2
    h.batch_max = 0
    assert h.queue.eligible() == 1 + 3 + 2
    assert "22 queued (10 batch)" in repr(h.queue)


def test_eligible_matches_what_pop_hands_out() -> None:
    h = Harness(batch_max=2)
    h.flood("a", 4, TenantShare(max_concurrency=2))
    h.flood("b", 3, priority=Priority.BATCH)
    h.flood("c", 1)
    expected = h.queue.eligible()
    served = 0
    while (popped := h.queue.pop()) is not None:
        h.slots.acquire(popped[1], popped[2])  # as the pool does once it has a worker
        served += 1
    assert served == expected == 2 + 2 + 1


def test_drain_returns_every_live_item_and_empties_the_queue() -> None:
    h = Harness(batch_max=1)
    h.flood("a", 3)
    h.flood("b", 2, priority=Priority.BATCH)
    gone = h.queue.push("gone", "c", EQUAL)
    h.queue.cancel(gone)
    assert sorted(h.queue.drain()) == ["a0", "a1", "a2", "b0", "b1"]
    assert (len(h.queue), h.queue.eligible(), h.queue.tenants_waiting()) == (0, 0, [])
    assert h.queue.pop() is None
    h.queue.push("after", "a", EQUAL)
    assert h.queue.pop() == ("after", "a", Priority.INTERACTIVE)


def test_share_rejects_nonsense() -> None:
    for weight in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="weight"):
            TenantShare(weight=weight)
    with pytest.raises(ValueError, match="max_concurrency"):
        TenantShare(max_concurrency=-1)


# -- against a plain model ------------------------------------------------------------------------


class ReferenceQueue:
    """The same rules, done the slow obvious way: scan every entry on each pop."""

    def __init__(self, slots: TenantSlots, batch_max: int) -> None:
        self.slots = slots
        self.batch_max = batch_max
        self.virtual_time = {p: 0.0 for p in Priority}
        self.last_tag: dict[tuple[str, Priority], float] = {}
        self.entries: list[tuple[float, int, str, Priority, str]] = []
        self.caps: dict[str, int] = {}
        self.seq = 0

    def push(self, item: str, tenant: str, share: TenantShare, priority: Priority) -> int:
        if not any(e[2] == tenant and e[3] is priority for e in self.entries):
            self.last_tag.pop((tenant, priority), None)  # an empty lane starts from V
        base = max(self.virtual_time[priority], self.last_tag.get((tenant, priority), float("-inf")))
        tag = self.last_tag[(tenant, priority)] = base + 1.0 / share.weight
        self.caps[tenant] = share.max_concurrency
        self.entries.append((tag, self.seq, tenant, priority, item))
        self.seq += 1
        return self.seq - 1

    def cancel(self, seq: int) -> None:
        self.entries = [e for e in self.entries if e[1] != seq]

    def pop(self) -> tuple[str, str, Priority] | None:
        def open_(tenant: str) -> bool:
            return self.caps[tenant] == 0 or self.slots.running(tenant) < self.caps[tenant]

        for priority in Priority:
            if priority is Priority.BATCH and self.slots.batch_running() >= self.batch_max:
                break
            candidates = [e for e in self.entries if e[3] is priority and open_(e[2])]
            if candidates:
                best = min(candidates)
                self.entries.remove(best)
                self.virtual_time[priority] = max(self.virtual_time[priority], best[0])
                return best[4], best[2], best[3]
        return None


@pytest.mark.parametrize("seed", range(8))
def test_matches_the_reference_model_under_random_operations(seed: int) -> None:
    rng = random.Random(seed)
    h = Harness(batch_max=2)
    model = ReferenceQueue(h.slots, batch_max=2)
    tenants = [f"t{i}" for i in range(6)]
    shares = [TenantShare(weight=w, max_concurrency=c) for w in (0.5, 1.0, 3.0) for c in (0, 1, 2)]
    tickets = []
    held: list[tuple[str, Priority]] = []
    for step in range(3000):
        roll = rng.random()
        if roll < 0.45:
            tenant, share = rng.choice(tenants), rng.choice(shares)
            priority = Priority.BATCH if rng.random() < 0.3 else Priority.INTERACTIVE
            item = f"r{step}"
            tickets.append((h.queue.push(item, tenant, share, priority), model.push(item, tenant, share, priority)))
        elif roll < 0.6 and tickets:
            ticket, seq = tickets.pop(rng.randrange(len(tickets)))
            h.queue.cancel(ticket)
            model.cancel(seq)
        elif roll < 0.85:
            popped = h.queue.pop()
            assert popped == model.pop(), f"step {step}"
            if popped is not None:
                h.slots.acquire(popped[1], popped[2])
                held.append((popped[1], popped[2]))
        elif held:
            h.slots.release(*held.pop(rng.randrange(len(held))))
        assert len(h.queue) == len(model.entries)
    assert sorted(h.queue.drain()) == sorted(e[4] for e in model.entries)


# -- cost -----------------------------------------------------------------------------------------


def test_twenty_thousand_pushes_and_pops_across_500_tenants() -> None:
    # Speed is measured by bench/scheduler_bench.py, not asserted here (a loaded CI machine is slow).
    h = Harness()
    shares = [TenantShare(weight=1 + i % 4) for i in range(500)]
    for i in range(20_000):
        h.queue.push("x", f"t{i % 500}", shares[i % 500])
    served = Counter(popped[1] for _ in range(20_000) if (popped := h.queue.pop()) is not None)
    assert h.queue.pop() is None
    assert sum(served.values()) == 20_000
    assert set(served.values()) == {40}


def test_push_cancel_churn_behind_a_capped_head_stays_small() -> None:
    # A capped tenant's head never surfaces, and with no pop the heap is never cleaned from the top:
    # cancelled entries must be compacted away, or clients that time out and retry grow the queue forever.
    h = Harness()
    h.queue.push("head", "a", TenantShare(max_concurrency=1))
    h.slots.acquire("a")
    tracemalloc.start()
    try:
        before_bytes, _ = tracemalloc.get_traced_memory()
        for _ in range(20_000):
            h.queue.cancel(h.queue.push("x", "a", TenantShare(max_concurrency=1)))
            h.queue.cancel(h.queue.push("y", "b", EQUAL))
        gc.collect()  # count what is kept, not garbage the collector has yet to visit
        after_bytes, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert after_bytes - before_bytes < 500_000  # bounded near 135 kB; 40 000 dead entries kept are several MB
    assert (len(h.queue), h.queue.eligible(), h.queue.pop()) == (1, 0, None)
    h.slots.release("a")
    assert h.queue.pop() == ("head", "a", Priority.INTERACTIVE)
