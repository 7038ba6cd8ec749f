"""The shipped store conformance suite (claudepool/testing/store_conformance.py), run against the memory
store and a real Redis: the two backends must be indistinguishable. And the suite itself: it must
catch a store that breaks its contract."""

from __future__ import annotations

import inspect
from typing import Any

import pytest

from claudepool.store.base import Store, UsageRecord
from claudepool.store.memory import MemoryStore
from claudepool.store.redis import RedisStore
from claudepool.testing import store_conformance as conformance


@pytest.fixture(params=["memory", "redis"])
def make_store(request: pytest.FixtureRequest) -> conformance.StoreFactory:
    if request.param == "memory":
        return MemoryStore
    url = request.getfixturevalue("redis_url")  # emptied for this test

    def redis_store(**options: Any) -> Store:
        return RedisStore(url, **options)

    return redis_store


@pytest.mark.parametrize("check", conformance.CHECKS, ids=str)
async def test_conformance(check: conformance.Check, make_store: conformance.StoreFactory) -> None:
    await conformance.run(check, make_store)


class CountsTwice(MemoryStore):
    """A store that forgets which records it settled: each settle counts again."""

    async def settle(self, record: UsageRecord) -> bool:
        await super().settle(record)
        return True


async def test_the_suite_fails_a_store_that_counts_a_record_twice() -> None:
    failed = []
    for check in conformance.CHECKS:
        try:
            await conformance.run(check, CountsTwice)
        except AssertionError:
            failed.append(check.name)
    assert "settle_is_idempotent_on_record_id" in failed
    assert "a_duplicate_is_rejected_while_among_the_newest_settled_ids" in failed
    with pytest.raises(AssertionError):
        await conformance.run_all(CountsTwice)


async def test_the_whole_suite_passes_in_one_call() -> None:
    await conformance.run_all(MemoryStore)


def test_every_check_written_is_registered() -> None:
    # A coroutine function taking a store but missing its @check would silently never run.
    written = {name for module in (conformance, conformance.store_conformance_budgets,
                                         conformance.store_conformance_conversations)
               for name, value in vars(module).items()
               if inspect.iscoroutinefunction(value) and list(inspect.signature(value).parameters) in (
                   ["store"], ["small_store"])}
    assert written == {check.name for check in conformance.CHECKS}
    assert len(conformance.CHECKS) == len(written) > 20
