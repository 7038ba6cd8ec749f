"""What the jobs need of the daemon, as protocols: the daemon's admission gate and prompt service
satisfy them, and the jobs import nothing of the daemon (which composes them, `claudepool.daemon.jobs`)."""

from __future__ import annotations

from collections.abc import Collection
from typing import Protocol

from claudepool.protocol.wire import PromptRequest, PromptResult
from claudepool.tenancy.models import ModelCatalog
from claudepool.tenancy.routing import Router
from claudepool.tenancy.tenants import Tenant


class Checks(Protocol):
    """Admission's checks that need no worker (`claudepool.daemon.admission.Gate`)."""

    @property
    def router(self) -> Router: ...

    @property
    def catalog(self) -> ModelCatalog: ...

    @property
    def profile_names(self) -> Collection[str]: ...

    @property
    def default_timeout_s(self) -> float: ...

    async def check_budget(self, tenant: Tenant) -> None: ...


class Serving(Protocol):
    """The one path a prompt takes (`claudepool.daemon.service.PromptService`)."""

    @property
    def draining(self) -> bool: ...

    async def serve(self, tenant: Tenant, request: PromptRequest, request_id: str) -> PromptResult:
        """Admit and run one prompt for ``tenant``: its answer, or the `ClaudepoolError` to give."""
        ...
