"""Per-worker credentials: what a worker presents to the gateway in place of the provider's key.

Each worker gets a random credential when it starts (`CredentialRegistry.issue`, called by the
worker just before its process starts) and loses it when it begins to close (`revoke`): a
credential is valid only while its worker lives, and names that one worker. The registry keeps only
the SHA-256 digest of each credential, and finds a presented credential by its digest.

A credential is not an identity of the process that shows it: anything in the worker's process
tree can read it from the environment (a tool's ``env``), and on the loopback listener any local
process holding it can use it. A sandboxed worker (`claudepool.pool.sandbox`) gets a socket of its
own too (`claudepool.gateway.sockets`): its credential is valid only on that socket, which only
its sandbox reaches, and its sandbox sees no other process's ``/proc``. An unsandboxed worker
(a profile without tools, or ``sandbox = false``) has only its credential.

>>> registry = CredentialRegistry()
>>> registry.base_url = "http://127.0.0.1:9"
>>> class W: id = "default-1"
>>> env = registry.issue(W())
>>> env["ANTHROPIC_BASE_URL"], env["ANTHROPIC_API_KEY"].startswith(CREDENTIAL_PREFIX)
('http://127.0.0.1:9', True)
>>> registry.worker_of(env["ANTHROPIC_API_KEY"]).id
'default-1'
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from claudepool.errors import GatewayError, MissingCredential, UnknownCredential
from claudepool.gateway.egress import EgressProxy
from claudepool.gateway.sockets import WorkerSockets
from claudepool.pool.worker import Worker

# Tells a worker credential apart from a provider key at a glance (in a tool's output, say).
CREDENTIAL_PREFIX = "cpw-"
_CREDENTIAL_BYTES = 32


@dataclass(frozen=True)
class _Issued:
    digest: str
    worker: Worker


def _digest(credential: str) -> str:
    return hashlib.sha256(credential.encode()).hexdigest()


class CredentialRegistry:
    """The live workers' credentials, by digest; a `claudepool.pool.worker.WorkerCredentials`."""

    def __init__(self) -> None:
        # Set by the gateway once it listens: where workers send their calls, and the sockets of
        # sandboxed workers.
        self.base_url: str | None = None
        self.sockets: WorkerSockets | None = None
        # And the egress proxy, for a sandboxed worker whose profile allows outbound hosts.
        self.egress: EgressProxy | None = None
        self._by_digest: dict[str, _Issued] = {}
        self._by_worker: dict[Worker, str] = {}

    def __len__(self) -> int:
        """Credentials valid now: one per live worker."""
        return len(self._by_digest)

    def issue(self, worker: Worker) -> Mapping[str, str]:
        """A new credential for ``worker`` (replacing any it had), as the variables its CLI reads."""
        if self.base_url is None:
            raise GatewayError("the gateway is not listening: no worker can start before it")
        self.revoke(worker)
        credential = CREDENTIAL_PREFIX + secrets.token_urlsafe(_CREDENTIAL_BYTES)
        digest = _digest(credential)
        self._by_digest[digest] = _Issued(digest, worker)
        self._by_worker[worker] = digest
        return {"ANTHROPIC_BASE_URL": self.base_url, "ANTHROPIC_API_KEY": credential}

    async def open_socket(self, worker: Worker) -> Path:
        """A gateway socket of ``worker``'s own, for its sandbox (after `issue`); its host path."""
        if self.sockets is None:
            raise GatewayError("the gateway is not listening: no worker can start before it")
        return await self.sockets.open(worker)

    async def open_egress(self, worker: Worker) -> Path | None:
        """An egress proxy socket of ``worker``'s own (`claudepool.gateway.egress`), its host path;
        None when its profile allows no outbound host."""
        if self.egress is None:
            if worker.profile.allowed_hosts:
                raise GatewayError("the egress proxy is not started: no worker with allowed_hosts can start before it")
            return None
        return await self.egress.open(worker)

    def revoke(self, worker: Worker) -> None:
        """From now on ``worker``'s credential is refused, and its sockets (the gateway's, the egress
        proxy's and that one's tunnels) are gone. Idempotent."""
        digest = self._by_worker.pop(worker, None)
        if digest is not None:
            self._by_digest.pop(digest, None)
        if self.sockets is not None:
            self.sockets.close(worker)
        if self.egress is not None:
            self.egress.close(worker)

    def worker_of(self, presented: str | None) -> Worker:
        """The live worker ``presented`` was issued to; `MissingCredential` or `UnknownCredential`.

        The lookup is by digest: how long it takes depends on the digest of what was presented,
        which tells nothing of how close it came to a real credential (as `TenantRegistry` compares
        digests, not keys). The compare that follows is constant-time for the same reason."""
        if not presented:
            raise MissingCredential("no credential: send the worker's own as x-api-key")
        digest = _digest(presented)
        issued = self._by_digest.get(digest)
        if issued is None or not hmac.compare_digest(issued.digest, digest):
            raise UnknownCredential("unknown credential, or its worker has exited")
        return issued.worker


def presented_credential(headers: Mapping[str, str]) -> str | None:
    """The credential a call carries: ``x-api-key`` (what the CLI sends with ANTHROPIC_API_KEY),
    else a bearer token."""
    key = headers.get("x-api-key")
    if key:
        return key
    scheme, _, token = headers.get("authorization", "").partition(" ")
    return token.strip() or None if scheme.lower() == "bearer" else None
