"""claudepool's side of a reconciliation: the per-call ledger, from the daemon or from its ledger file.

The daemon serves its ledger (`GET /v1/ledger`, the admin key) a page at a time, oldest first, from
``since`` on, at most ``X-Ledger-Limit`` records: a shorter page is the last. Paging goes on from the
last record's ``at`` less `OVERLAP_S`, so records of that same instant, and records a little late in
the ledger's settle order (``at`` is when a call ended; several daemons sharing Redis interleave
their records as they settle), come again and are told apart by ``record_id``. A full page of
records seen already moves on to the latest of their instants. A page's worth of records at one
instant cannot be paged past with ``since``: that is an error, not a silent gap. A record settled
later than ``OVERLAP_S`` after newer ones (it waited out a store outage while another daemon went
on) may be missed: the daemon that wrote it has it in its ledger file.

The ledger file (``[metering] ledger_file``) holds every record as a JSON line, written before the
record reached the store: the source when the daemon is down, or when its bounded ledger
(``store.ledger_max_records``) no longer reaches back to ``since``. A last line cut short (the
daemon died mid-write) is skipped; any other line that is not a record is an error.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from claudepool.client import AsyncClient
from claudepool.errors import LedgerUnreadable, RemoteError

# How far back of the last record's time the next page starts (records come again; duplicates go).
OVERLAP_S = 5.0
PAGE_RECORDS = 10_000


class LedgerRecord(BaseModel):
    """The fields of a ledger record (`claudepool.store.base.UsageRecord`) a reconciliation reads."""

    model_config = ConfigDict(strict=True, extra="ignore", frozen=True)

    record_id: str
    kind: str  # call: one model call, as the gateway measured it; turn: as the CLI reported it
    at: float  # unix seconds when the call ended
    model: str
    input_tokens: int = 0
    output_tokens: int = 0
    cache_read_input_tokens: int = 0
    cache_creation_input_tokens: int = 0  # 5-minute and 1-hour writes together
    cache_write_1h_input_tokens: int = 0
    cost_usd: float = 0.0
    duration_ms: float | None = None
    # How the provider bills the call: "batch" for a request of a Message Batch (at the batch price),
    # "standard" for a /v1/messages call (and a record written before batches existed).
    service_tier: str = "standard"

    @property
    def started_at(self) -> float:
        """When the call began, which is when the provider received it, to within the network's
        latency: the instant its usage report buckets it by (a call over midnight counts on the day
        it began)."""
        return self.at - (self.duration_ms or 0.0) / 1000


def parse(line: bytes | dict[str, Any], where: str) -> LedgerRecord:
    """One record, from its JSON line or its decoded object; `LedgerUnreadable` if it is not one."""
    try:
        return LedgerRecord.model_validate_json(line) if isinstance(line, bytes) else LedgerRecord.model_validate(line)
    except ValidationError as exc:
        problem = exc.errors()[0]
        field = ".".join(str(p) for p in problem["loc"]) or "the line"
        raise LedgerUnreadable(f"{where}: not a ledger record ({field}: {problem['msg']})") from None


def read_file(path: Path) -> list[LedgerRecord]:
    """Every record of a ledger file, in its order."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise LedgerUnreadable(f"cannot read the ledger file {path}: {exc.strerror}") from None
    lines = raw.split(b"\n")
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(parse(line, f"{path}:{number}"))
        except LedgerUnreadable:
            if number == len(lines):  # no newline after it: a write cut short; the record never settled
                continue
            raise
    return records


async def read_daemon(client: AsyncClient, since: float, *, page_records: int = PAGE_RECORDS,
                      overlap_s: float = OVERLAP_S) -> list[LedgerRecord]:
    """Every record of the daemon's ledger at or after ``since`` (unix seconds), each once."""
    seen: dict[str, LedgerRecord] = {}
    cursor = since
    while True:
        try:
            lines, applied = await client.ledger_page(since=cursor, limit=page_records)
        except RemoteError as exc:
            raise LedgerUnreadable(f"the daemon's ledger: {exc.remote_code}: {exc.message}") from None
        page = [parse(line, f"the daemon's ledger after {cursor}") for line in lines]
        new = [r for r in page if r.record_id not in seen]
        seen.update((r.record_id, r) for r in new)
        if len(page) < applied:
            return list(seen.values())
        if new:
            cursor = max(cursor, page[-1].at - overlap_s)
            continue
        # A full page of records seen already: all within the overlap. Go on from the latest of them
        # (those of that instant come again); if that is where this page began, a page's worth of
        # records share one instant and no `since` can page past them.
        latest = max(r.at for r in page)
        if latest <= cursor:
            raise LedgerUnreadable(f"the daemon's ledger holds {applied} or more records at the instant {cursor}: "
                                   "raise server.ledger_page_records, or use --ledger-file")
        cursor = latest


def merged(*sources: Iterable[LedgerRecord]) -> list[LedgerRecord]:
    """The records of every source, each record once (by ``record_id``)."""
    out: dict[str, LedgerRecord] = {}
    for source in sources:
        for record in source:
            out.setdefault(record.record_id, record)
    return list(out.values())
