"""A job's end, POSTed to its tenant's webhook (`claudepool.jobs.webhooks`), its delivery state kept on the job.

The body is ``{"type": "job.ended", "job": <the job as GET /v1/jobs/{id} shows it>}``, the event id
(``Claudepool-Event-Id``) is the job id: delivery is at least once (a retry after a lost answer, or
the daemon stopping mid-delivery), so a receiver de-duplicates by it. Each attempt's state is
written on the job (``webhook``), so a tenant can see a delivery that is pending or failed.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping

import orjson

from claudepool.jobs.model import JobRecord, WebhookDelivery
from claudepool.jobs.store import JobStore
from claudepool.jobs.webhooks import WebhookSender

log = logging.getLogger(__name__)

_CLOSE_TIMEOUT_S = 5.0
# At start, the ended jobs of this last hour whose delivery a stopped daemon left are delivered.
_RECOVERY_WINDOW_S = 3600.0
_RECOVERY_PAGE = 500


class JobWebhooks:
    def __init__(self, sender: WebhookSender, targets: Mapping[str, tuple[str, bytes]], store: JobStore, *,
                 on_delivery: Callable[[str], None] | None = None) -> None:
        """``targets``: each tenant's webhook URL and secret (tenants without one are not called);
        ``on_delivery(state)`` is told how each delivery ended (delivered or failed)."""
        self._on_delivery = on_delivery
        self._sender = sender
        self._targets = targets
        self._store = store
        self._deliveries: set[asyncio.Task[None]] = set()

    @property
    def in_flight(self) -> int:
        return len(self._deliveries)

    async def ended(self, record: JobRecord) -> None:
        target = self._targets.get(record.tenant)
        if target is None:
            return
        task = asyncio.create_task(self._deliver(record, *target), name=f"webhook-{record.id}")
        self._deliveries.add(task)
        task.add_done_callback(self._deliveries.discard)

    async def _deliver(self, record: JobRecord, url: str, secret: bytes) -> None:
        async def keep(state: WebhookDelivery) -> None:
            try:
                await self._store.set_webhook(record.tenant, record.id, state)
            except Exception as exc:  # the delivery goes on; only its visible state is behind
                log.warning("job %s: could not record its webhook state: %s", record.id, exc)

        payload = orjson.dumps({"type": "job.ended", "job": record.view()})
        await keep(WebhookDelivery(state="pending", attempts=0))
        final = await self._sender.deliver(url, secret, record.id, payload, on_state=keep)
        if self._on_delivery is not None:
            self._on_delivery(final.state)

    async def start(self) -> None:
        await self._sender.start()

    async def recover(self, window_s: float = _RECOVERY_WINDOW_S) -> int:
        """Deliver again what a stopped daemon left undelivered: the ended jobs of the last
        ``window_s`` whose webhook is pending or was never started. Another daemon may be delivering
        some of them now; a receiver sees those twice (at least once), never none."""
        since = time.time() - window_s
        resumed = 0
        for tenant in self._targets:
            after = since
            while True:
                page = await self._store.list_jobs(tenant, since=after, limit=_RECOVERY_PAGE)
                for record in page:
                    if (record.terminal and (record.finished_at or 0) >= since
                            and (record.webhook is None or record.webhook.state == "pending")):
                        await self.ended(record)
                        resumed += 1
                if len(page) < _RECOVERY_PAGE:
                    break
                after = page[-1].created_at + 1e-6
        if resumed:
            log.info("resumed %d webhook deliveries a stopped daemon had left", resumed)
        return resumed

    async def run(self) -> None:
        """Hold the sender open (after resuming what was left); on the way out stop the deliveries
        (their state stays pending, for `recover`)."""
        try:
            try:
                await self.recover()
            except Exception as exc:  # a store outage: what was pending stays so until the next start
                log.warning("could not resume pending webhook deliveries: %s", exc)
            await asyncio.Event().wait()
        finally:
            for task in list(self._deliveries):
                task.cancel()
            if self._deliveries:
                await asyncio.wait(list(self._deliveries), timeout=_CLOSE_TIMEOUT_S)
            await self._sender.close(_CLOSE_TIMEOUT_S)
