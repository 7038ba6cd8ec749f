"""A Unix socket of the gateway's for each sandboxed worker: attribution by socket.

A sandboxed worker reaches nothing but the socket bind-mounted into its sandbox
(`claudepool.pool.sandbox`), so a call that arrives on worker W's socket was made inside W's
sandbox, whatever credential it shows. The gateway accepts on every socket with the same handler
and checks that the credential presented is the one of the worker whose socket it came in on;
a sandboxed worker's credential is refused anywhere else (the loopback listener), so a credential
that leaked out of a sandbox opens nothing.

The sockets live in a private directory (0700) with short names: a Unix socket path is at most
107 bytes, and a worker's own directory can be deep.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from claudepool.pool.worker import Worker

_names = itertools.count(1)


class WorkerSockets:
    def __init__(self) -> None:
        self._dir: Path | None = None
        self._factory: Callable[[], asyncio.Protocol] | None = None
        self._servers: dict[Worker, tuple[asyncio.AbstractServer, Path]] = {}
        self._owners: dict[str, Worker] = {}

    def __len__(self) -> int:
        return len(self._servers)

    def start(self, factory: Callable[[], asyncio.Protocol]) -> None:
        """Accept with ``factory`` (the gateway's HTTP server) on every socket opened from now on."""
        self._factory = factory
        self._dir = Path(tempfile.mkdtemp(prefix="claudepool-gw-"))

    async def open(self, worker: Worker) -> Path:
        """A new listening socket for ``worker`` (replacing any it had); its host path."""
        if self._factory is None or self._dir is None:
            raise RuntimeError("the gateway is not listening")
        self.close(worker)
        path = self._dir / f"{next(_names)}.sock"
        server = await asyncio.get_running_loop().create_unix_server(self._factory, str(path))
        os.chmod(path, 0o600)
        self._servers[worker] = (server, path)
        self._owners[str(path)] = worker
        return path

    def close(self, worker: Worker) -> None:
        """Stop accepting on ``worker``'s socket and remove it; idempotent. Calls already accepted
        end as they would (their credential is revoked first)."""
        opened = self._servers.pop(worker, None)
        if opened is None:
            return
        server, path = opened
        self._owners.pop(str(path), None)
        server.close()
        with contextlib.suppress(FileNotFoundError):
            path.unlink()

    def owner(self, sockname: object) -> Worker | None:
        """The worker whose socket a connection came in on (its ``sockname``); None for another
        listener."""
        return self._owners.get(sockname) if isinstance(sockname, str) else None

    def has_socket(self, worker: Worker) -> bool:
        return worker in self._servers

    def close_all(self) -> None:
        for worker in list(self._servers):
            self.close(worker)
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None
