"""The memory store's ledger: settled records in settle order, bounded, indexed by tenant and time.

A read must not cost more with uptime or with other tenants' records: `RecordLog.select` looks only
at the chosen tenant's records (or everyone's, for an admin read), starts with a binary search at the
first record that may be recent enough for ``since``, and stops at ``limit``. Appending is O(1)
amortised and drops the oldest record once ``max_records`` are held, from the tenant's index too.

Records are in settle order, but ``at`` (when the turn ended) is not: a record flushed late carries
an earlier time. The search runs over the running maximum of ``at``, which never decreases: every
record before the first position whose running maximum reaches ``since`` is older than ``since``.

>>> from claudepool.store.base import UsageRecord
>>> log = RecordLog(max_records=2)
>>> for i, at in enumerate([10.0, 30.0, 20.0]):
...     log.append(UsageRecord(f"r{i}", f"q{i}", "acme", "default", "m", "ok", at))
>>> [r.record_id for r in log.select("acme", since=15.0, limit=10)]
['r1', 'r2']
>>> [r.record_id for r in log.select(None, since=None, limit=1)]
['r1']
"""

from __future__ import annotations

import bisect
import math

from claudepool.store.base import UsageRecord

# Put in a dropped record's place, so the list does not keep the record alive until it is cut.
_DROPPED = UsageRecord("", "", "", "", "", "", -math.inf)


class _Queue:
    """Records in settle order, oldest first, with the running maximum of their ``at``."""

    __slots__ = ("head", "max_at", "records")

    def __init__(self) -> None:
        self.records: list[UsageRecord] = []
        # max_at[i] = max(at of records[0..i]), counting records already dropped: an over-estimate
        # after a drop, which can only make `start` earlier, never skip a record.
        self.max_at: list[float] = []
        # records[:head] are dropped (each replaced by `_DROPPED` at once). Their slots are cut off in
        # one go once they are as many as the live ones: each record is moved O(1) times, amortised.
        self.head = 0

    def __len__(self) -> int:
        return len(self.records) - self.head

    def append(self, record: UsageRecord) -> None:
        top = self.max_at[-1] if self.max_at else -math.inf
        self.records.append(record)
        self.max_at.append(record.at if record.at > top else top)

    def popleft(self) -> UsageRecord:
        record = self.records[self.head]
        # The search starts at head: what lies before it is never read, and must keep nothing alive.
        self.records[self.head], self.max_at[self.head] = _DROPPED, -math.inf
        self.head += 1
        if 2 * self.head >= len(self.records):
            del self.records[:self.head]
            del self.max_at[:self.head]
            self.head = 0
        return record

    def select(self, since: float | None, limit: int) -> list[UsageRecord]:
        start = self.head if since is None else bisect.bisect_left(self.max_at, since, lo=self.head)
        out: list[UsageRecord] = []
        for i in range(start, len(self.records)):
            record = self.records[i]
            if since is None or record.at >= since:
                out.append(record)
                if len(out) >= limit:
                    break
        return out


class RecordLog:
    """The newest ``max_records`` settled records, each tenant's also on its own."""

    def __init__(self, max_records: int) -> None:
        if max_records <= 0:
            raise ValueError("max_records must be positive")
        self.max_records = max_records
        self._all = _Queue()
        self._by_tenant: dict[str, _Queue] = {}

    def __len__(self) -> int:
        return len(self._all)

    def append(self, record: UsageRecord) -> None:
        if len(self._all) >= self.max_records:
            oldest = self._all.popleft()
            mine = self._by_tenant[oldest.tenant]
            mine.popleft()  # the tenant's oldest is the oldest of all that is the tenant's: the same record
            if not mine:
                del self._by_tenant[oldest.tenant]
        self._all.append(record)
        self._by_tenant.setdefault(record.tenant, _Queue()).append(record)

    def select(self, tenant: str | None, *, since: float | None, limit: int) -> list[UsageRecord]:
        """Records of ``tenant`` (None: every tenant) with ``at >= since``, oldest settled first, at most ``limit``."""
        if limit <= 0:
            return []
        queue = self._all if tenant is None else self._by_tenant.get(tenant)
        return queue.select(since, limit) if queue is not None else []
