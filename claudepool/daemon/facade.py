"""What a front end may ask of the daemon, and who may ask it: the one door between wire and core.

A front end (`claudepool.daemon.http_api`, `claudepool.daemon.unix_api`) reads its wire, calls one
method of `Api` with the caller's key, and writes the answer or the `ClaudepoolError` raised in its
own format. It never reaches the tenants, the pools, the store or the sessions itself, so a new
front door is a translation and nothing more.

Who may do what is decided here: a tenant key serves prompts and reads its own usage, ledger and
sessions; the admin key reads any tenant's (or all, when no tenant is named) and the pools' state;
the metrics key (or the admin key) scrapes, unless ``metrics.public``.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, generate_latest

from claudepool.daemon.service import OnEvent, PromptService, ReadRequest
from claudepool.daemon.status import Status
from claudepool.daemon.usage import LedgerReads, usage_report
from claudepool.errors import BadRequest, ClaudepoolError, Forbidden
from claudepool.pool.workspace_files import FileBounds, check_path, list_entries, read_file
from claudepool.protocol.wire import PromptRequest, PromptResult
from claudepool.sessions import workspace_archive
from claudepool.sessions.conversations import Conversations
from claudepool.sessions.manager import SessionManager
from claudepool.store.base import Store, UsageRecord, Window
from claudepool.tenancy.models import ModelCatalog
from claudepool.tenancy.routing import Router
from claudepool.tenancy.tenants import Tenant, TenantRegistry


@dataclass(frozen=True)
class LedgerPage:
    """Ledger records, oldest first, and the record limit that was applied to them."""

    records: list[UsageRecord]
    limit: int


class Api(Protocol):
    """The calls a front end makes; `Facade` is the daemon's, a test may bring its own."""

    async def handle(self, key: str | None, request: PromptRequest | ReadRequest, on_event: OnEvent | None = None,
                     *, request_id: str | None = None) -> PromptResult: ...

    def refused(self, exc: BaseException, *, key: str | None = None) -> None: ...

    def authenticate(self, key: str | None) -> Tenant: ...

    def scope(self, key: str | None, tenant: str | None = None) -> list[str] | None: ...

    async def create_session(self, tenant: Tenant, profile: str | None, system: str | None = None
                             ) -> dict[str, Any]: ...

    async def list_sessions(self, owner: str | None) -> list[dict[str, Any]]: ...

    async def get_session(self, owner: str, session_id: str) -> dict[str, Any]: ...

    async def delete_session(self, owner: str, session_id: str) -> None: ...

    async def session_files(self, owner: str, session_id: str) -> dict[str, Any]: ...

    async def session_file(self, owner: str, session_id: str, path: str) -> bytes: ...

    async def usage(self, key: str | None, *, tenant: str | None = None, window: str = "day",
                    date: str | None = None) -> dict[str, Any]: ...

    def ledger(self, key: str | None, *, tenant: str | None, since: float | None,
               limit: int) -> AbstractAsyncContextManager[LedgerPage]: ...

    def readiness(self) -> tuple[bool, dict[str, Any]]: ...

    def pool_status(self, key: str | None) -> dict[str, Any]: ...

    def status(self, key: str | None) -> dict[str, Any]: ...

    def metrics(self, key: str | None) -> bytes: ...


class Facade:
    def __init__(self, *, tenants: TenantRegistry, service: PromptService, sessions: SessionManager, store: Store,
                 status: Status, registry: CollectorRegistry, metrics_public: bool, ledger_page_records: int,
                 max_ledger_reads_per_tenant: int, file_bounds: FileBounds | None = None) -> None:
        self._tenants = tenants
        self._service = service
        self._sessions = sessions
        self._conversations = Conversations(store, sessions)
        self._store = store
        self._status = status
        self._registry = registry
        self._metrics_public = metrics_public
        self._ledger_page_records = ledger_page_records
        self._ledger_reads = LedgerReads(max_ledger_reads_per_tenant)
        self._file_bounds = file_bounds or FileBounds()

    # -- prompts -------------------------------------------------------------------------------

    async def handle(self, key: str | None, request: PromptRequest | ReadRequest, on_event: OnEvent | None = None,
                     *, request_id: str | None = None) -> PromptResult:
        """Authenticate, admit and serve one prompt: see `PromptService.handle`."""
        return await self._service.handle(key, request, on_event, request_id=request_id)

    def refused(self, exc: BaseException, *, key: str | None = None) -> None:
        """A prompt the front end refused before `handle` (an unreadable frame, a bound of the
        connection): its one count and log line, under the key's tenant when the key is good."""
        try:
            tenant: Tenant | None = self._tenants.authenticate(key)
        except ClaudepoolError:
            tenant = None
        self._service.refused(exc, tenant=tenant)

    @property
    def catalog(self) -> ModelCatalog:
        """The profiles' models and system prompts, and the checks of a request's ``model``."""
        return self._service.gate.catalog

    @property
    def conversations(self) -> Conversations:
        """What the front doors recognise conversations from chat histories with."""
        return self._conversations

    @property
    def router(self) -> Router:
        """The routing table admission resolves requests with."""
        return self._service.gate.router

    # -- who the caller is -----------------------------------------------------------------------

    def authenticate(self, key: str | None) -> Tenant:
        """The tenant holding ``key``, or `Unauthorized` (the admin key is no tenant's)."""
        return self._tenants.authenticate(key)

    def scope(self, key: str | None, tenant: str | None = None) -> list[str] | None:
        """Which tenants' data ``key`` may read: the admin any (None = all), a tenant only itself."""
        if self._tenants.is_admin(key):
            return [tenant] if tenant else None
        caller = self._tenants.authenticate(key)
        if tenant and tenant != caller.name:
            raise Forbidden("a tenant key reads only its own usage")
        return [caller.name]

    # -- sessions (the caller's ``owner`` comes from `authenticate` or `scope`) ------------------

    async def create_session(self, tenant: Tenant, profile: str | None, system: str | None = None
                             ) -> dict[str, Any]:
        return self._sessions.view(await self._sessions.create(tenant, profile, system=system))

    async def list_sessions(self, owner: str | None) -> list[dict[str, Any]]:
        return [self._sessions.view(r) for r in await self._sessions.list(owner)]

    async def get_session(self, owner: str, session_id: str) -> dict[str, Any]:
        return self._sessions.view(await self._sessions.get(owner, session_id))

    async def delete_session(self, owner: str, session_id: str) -> None:
        await self._sessions.delete(owner, session_id)

    async def session_files(self, owner: str, session_id: str) -> dict[str, Any]:
        """The session's workspace: path, type and size of each entry (at most ``server.max_listed_files``;
        ``truncated`` if there were more). Links and special files are listed, never followed or opened."""
        bound = self._file_bounds.max_listed_files
        listed, truncated = await self._sessions.read_workspace(
            owner, session_id, lambda cwd: list_entries(cwd, bound),
            lambda archive: workspace_archive.entries(archive, bound))
        return {"session": session_id, "truncated": truncated,
                "files": [{"path": e.path, "type": e.kind, "size_bytes": e.size_bytes} for e in listed]}

    async def session_file(self, owner: str, session_id: str, path: str) -> bytes:
        """One regular file of the session's workspace (at most ``server.max_file_read_bytes``)."""
        check_path(path)
        bound = self._file_bounds.max_file_read_bytes
        return await self._sessions.read_workspace(
            owner, session_id, lambda cwd: read_file(cwd, path, bound),
            lambda archive: workspace_archive.read(archive, path, bound))

    # -- usage -------------------------------------------------------------------------------------

    async def usage(self, key: str | None, *, tenant: str | None = None, window: str = "day",
                    date: str | None = None) -> dict[str, Any]:
        """Usage per tenant and model for one UTC day or month, with each tenant's budget state."""
        scope = self.scope(key, tenant)
        try:
            span = Window.parse(window, date)
        except ValueError as exc:
            raise BadRequest(f"bad usage window: {exc}") from None
        return await usage_report(self._store, self._tenants, span, scope)

    @contextlib.asynccontextmanager
    async def ledger(self, key: str | None, *, tenant: str | None, since: float | None,
                     limit: int) -> AsyncIterator[LedgerPage]:
        """At most ``server.ledger_page_records`` records since ``since``; the read counts against the
        reader's ``server.max_ledger_reads_per_tenant`` until the block ends (the answer is written)."""
        scope = self.scope(key, tenant)
        # Counted per tenant; the admin key's reads (of any tenant, or of all) count as "admin".
        reader = "admin" if scope is None or self._tenants.is_admin(key) else scope[0]
        with self._ledger_reads.held(reader):
            limit = min(limit, self._ledger_page_records)
            records: list[UsageRecord] = []
            for name in scope if scope is not None else [None]:
                records += await self._store.ledger(name, since=since, limit=limit)
            records.sort(key=lambda r: r.at)
            del records[limit:]
            yield LedgerPage(records, limit)

    # -- status ----------------------------------------------------------------------------------

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        """Whether warm capacity is available, and each pool's; anyone may ask."""
        return self._status.readiness()

    def pool_status(self, key: str | None) -> dict[str, Any]:
        """Every worker's state and the queues: the admin key only."""
        self._tenants.require_admin(key)
        return self._status.pool_status()

    def status(self, key: str | None) -> dict[str, Any]:
        """The pools' state for the admin key, readiness for a tenant key; `Unauthorized` otherwise."""
        if self._tenants.is_admin(key):
            return self._status.pool_status()
        self._tenants.authenticate(key)
        return self._status.readiness()[1]

    def metrics(self, key: str | None) -> bytes:
        """The Prometheus text: for the metrics or the admin key, or anyone when ``metrics.public``."""
        if not self._metrics_public:
            self._tenants.require_scraper(key)
        return generate_latest(self._registry)
