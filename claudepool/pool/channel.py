"""The events of a worker's running exchange, handed from its reader task to one consumer."""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass, field

from claudepool.protocol.cli_events import CliEvent


@dataclass
class Channel:
    """Events of the running exchange, handed from the reader task to one consumer."""

    items: deque[CliEvent] = field(default_factory=deque)
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    error: BaseException | None = None

    def push(self, event: CliEvent) -> None:
        self.items.append(event)
        self.ready.set()

    def fail(self, exc: BaseException) -> None:
        self.error = exc
        self.ready.set()

    async def get(self) -> CliEvent:
        while not self.items:
            if self.error is not None:
                raise self.error
            self.ready.clear()
            await self.ready.wait()
        return self.items.popleft()
