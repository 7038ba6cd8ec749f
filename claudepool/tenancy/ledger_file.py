"""The local ledger file (``metering.ledger_file``): one JSON line per usage record, appended off the event
loop.

`append` takes a line at once and returns its sequence number; `run` writes the lines in order, in
batches, from a worker thread, so a slow or stuck disk (a full NFS mount, a FIFO nobody reads) holds
up only the file, never every tenant's turns. The meter hands a record to the store only once
`written` says its line is in the file (or failed to get there, which is logged), so the file never
lags the store: a daemon that dies with records still waiting for the store finds them in the file.

At most ``max_pending`` lines wait; past that the oldest goes to the log at error level instead, as
the meter does with records the store cannot take.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from pathlib import Path

log = logging.getLogger(__name__)


def _append(path: Path, data: bytes) -> None:
    with path.open("ab") as ledger:
        ledger.write(data)


class LedgerFile:
    def __init__(self, path: Path, *, max_pending: int) -> None:
        self.path = path
        self.max_pending = max_pending
        self._pending: deque[tuple[int, bytes]] = deque()
        self._next_seq = 1
        self._writing_from: int | None = None  # the first sequence number of the batch being written
        self._writing = 0  # and how many lines it holds
        self._wake = asyncio.Event()
        self._progress = asyncio.Event()

    @property
    def pending(self) -> int:
        """Lines not yet written (queued or being written)."""
        return len(self._pending) + (0 if self._writing_from is None else self._writing)

    def append(self, line: bytes) -> int:
        """Queue one line (with its newline); returns its sequence number."""
        if len(self._pending) >= self.max_pending:
            _, lost = self._pending.popleft()
            log.error("ledger file %s is not keeping up; this record goes to the log instead: %s", self.path,
                      lost.rstrip(b"\n").decode())
            self._progressed()
        seq = self._next_seq
        self._next_seq += 1
        self._pending.append((seq, line))
        self._wake.set()
        return seq

    def written(self, seq: int) -> bool:
        """Whether line ``seq`` is done with: in the file, or failed or dropped (and logged)."""
        if self._writing_from is not None:
            return seq < self._writing_from
        return seq < self._pending[0][0] if self._pending else seq < self._next_seq

    async def wait_written(self, seq: int) -> None:
        while not self.written(seq):
            await self._progress.wait()

    async def drained(self) -> None:
        """Until every line appended so far is done with."""
        await self.wait_written(self._next_seq - 1)

    async def run(self) -> None:
        """Write queued lines in order, forever; each batch in a thread."""
        while True:
            if not self._pending:
                self._wake.clear()
                await self._wake.wait()
            batch = list(self._pending)
            self._pending.clear()
            self._writing_from, self._writing = batch[0][0], len(batch)
            try:
                # Not cancellable once started: the thread finishes its write even if we stop waiting.
                await asyncio.to_thread(_append, self.path, b"".join(line for _, line in batch))
            except OSError as exc:
                log.error("cannot append to the ledger file %s: %s (%d records)", self.path, exc, len(batch))
            finally:
                self._writing_from, self._writing = None, 0
                self._progressed()

    async def flush(self, timeout_s: float) -> bool:
        """Wait until every queued line is written; False if ``timeout_s`` passed first."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                await self.drained()
        return self.pending == 0

    def _progressed(self) -> None:
        self._progress.set()
        self._progress = asyncio.Event()
