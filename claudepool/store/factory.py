"""Build the configured store."""

from __future__ import annotations

from claudepool.store.base import Store
from claudepool.store.memory import MemoryStore
from claudepool.store.settings import StoreSettings


def build_store(settings: StoreSettings) -> Store:
    """`MemoryStore` unless ``store.url`` names a Redis server."""
    url = settings.url.get_secret_value()
    if not url:
        return MemoryStore(ledger_max_records=settings.ledger_max_records, settled_max_ids=settings.settled_max_ids)
    from claudepool.store.redis import RedisStore  # only deployments with Redis pay for the import

    return RedisStore(url, key_prefix=settings.key_prefix, ledger_max_records=settings.ledger_max_records,
                      socket_timeout_s=settings.socket_timeout_s, settled_max_ids=settings.settled_max_ids)
