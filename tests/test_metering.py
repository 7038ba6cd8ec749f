"""The meter on its own, with a real memory store and real files: the ledger file is written off the event
loop, before the store, in order, and bounded."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import ClassVar

import orjson
import pytest

from claudepool.store.base import UsageRecord
from claudepool.store.memory import MemoryStore
from claudepool.tenancy.budgets import PricingTable
from claudepool.tenancy.limits import RateLimiter
from claudepool.tenancy.metering import Meter
from claudepool.tenancy.settings import MeteringSettings, default_prices
from tests.helpers import release_fifo


def usage(n: int) -> UsageRecord:
    return UsageRecord(record_id=f"r{n}", request_id=f"q{n}", tenant="acme", profile="default", model="m",
                       outcome="ok", at=time.time(), output_tokens=n, cost_usd=n / 1000)


def line(record: UsageRecord) -> bytes:
    return orjson.dumps(record.to_dict()) + b"\n"


@contextlib.asynccontextmanager
async def running(meter: Meter) -> AsyncIterator[Meter]:
    task = asyncio.create_task(meter.run())
    try:
        yield meter
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def meter_on(store: MemoryStore, ledger: Path, **metering: int) -> Meter:
    return Meter(store, RateLimiter(), PricingTable.of(default_prices()),
                 MeteringSettings(ledger_file=str(ledger), **metering))


@contextlib.contextmanager
def fifo_released_at_exit(path: Path) -> Iterator[None]:
    """A FIFO as the ledger file: its writer blocks in open() until a reader comes. No thread stays
    blocked on it past the test."""
    os.mkfifo(path)
    try:
        yield
    finally:
        release_fifo(path)


async def test_each_record_is_in_the_ledger_file_before_the_store_has_it(tmp_path: Path) -> None:
    ledger = tmp_path / "usage.jsonl"

    class Checking(MemoryStore):
        """A real store that looks at the file as each record arrives."""

        late: ClassVar[list[str]] = []

        async def settle(self, record: UsageRecord) -> bool:
            if line(record) not in ledger.read_bytes().splitlines(keepends=True):
                self.late.append(record.record_id)
            return await super().settle(record)

    store = Checking()
    records = [usage(n) for n in range(50)]
    async with running(meter_on(store, ledger)) as meter:
        for record in records:
            meter.submit(record)
        assert await meter.flush(10)
    assert store.late == []
    assert ledger.read_bytes() == b"".join(line(r) for r in records)  # every record, once, in order
    assert [r.record_id for r in await store.ledger("acme")] == [r.record_id for r in records]


async def test_a_ledger_file_that_blocks_holds_up_the_file_and_the_store_never_the_loop(tmp_path: Path) -> None:
    ledger = tmp_path / "usage.fifo"
    store = MemoryStore()
    with fifo_released_at_exit(ledger):
        async with running(meter_on(store, ledger)) as meter:
            record = usage(1)
            meter.submit(record)  # on the event loop, an open() of this FIFO would never return
            ticks = 0
            for _ in range(20):  # the loop runs on: timers fire, other tasks are served
                await asyncio.sleep(0.01)
                ticks += 1
            assert ticks == 20
            assert await store.ledger("acme") == []  # the store waits for the file
            assert not await meter.flush(0.2)
            reader = await asyncio.to_thread(ledger.open, "rb")  # the disk comes back
            with reader:
                assert await asyncio.to_thread(reader.readline) == line(record)
            assert await meter.flush(10)
    assert [r.record_id for r in await store.ledger("acme")] == ["r1"]


async def test_lines_the_file_cannot_take_go_to_the_log_and_the_rest_stay_in_order(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    ledger = tmp_path / "usage.jsonl"
    store = MemoryStore()
    with caplog.at_level(logging.ERROR, "claudepool.tenancy.ledger_file"):
        async with running(meter_on(store, ledger, max_buffered_records=2)) as meter:
            records = [usage(n) for n in (1, 2, 3, 4)]
            for record in records:  # in one go, before the writer runs: two may wait, r3 and r4 push out r1, r2
                meter.submit(record)
            assert await meter.flush(10)
    assert ledger.read_bytes() == line(records[2]) + line(records[3])
    assert [r.message for r in caplog.records if r.name == "claudepool.tenancy.ledger_file"] == [
        f"ledger file {ledger} is not keeping up; this record goes to the log instead: "
        + line(record).rstrip(b"\n").decode() for record in records[:2]]
    # The store's own buffer (also two) dropped the same two.
    assert [r.record_id for r in await store.ledger("acme")] == ["r3", "r4"]
