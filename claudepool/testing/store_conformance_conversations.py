"""Store conformance: conversation digests (put with a TTL, atomic claim, per-tenant namespaces).
Part of the suite in `claudepool.testing.store_conformance`, which registers these checks by
importing this module."""

from __future__ import annotations

import asyncio

from claudepool.store.base import Store
from claudepool.testing.conformance_kit import check

DIGEST = "ab" * 32  # what a sha256 hex digest looks like


@check()
async def a_conversation_is_claimed_once(store: Store) -> None:
    assert await store.conversation_claim("acme", DIGEST) is None
    await store.conversation_put("acme", DIGEST, "s_one", 60.0)
    assert await store.conversation_claim("acme", DIGEST) == "s_one"
    assert await store.conversation_claim("acme", DIGEST) is None  # claiming removed it
    await store.conversation_put("acme", DIGEST, "s_one", 60.0)
    await store.conversation_put("acme", DIGEST, "s_two", 60.0)  # a put replaces
    assert await store.conversation_claim("acme", DIGEST) == "s_two"


@check()
async def conversations_of_two_tenants_never_meet(store: Store) -> None:
    await store.conversation_put("acme", DIGEST, "s_acme", 60.0)
    assert await store.conversation_claim("beta", DIGEST) is None
    await store.conversation_put("beta", DIGEST, "s_beta", 60.0)
    assert await store.conversation_claim("acme", DIGEST) == "s_acme"
    assert await store.conversation_claim("beta", DIGEST) == "s_beta"


@check()
async def concurrent_claims_of_one_conversation_give_it_to_one(store: Store) -> None:
    for round_ in range(5):
        await store.conversation_put("acme", DIGEST, f"s_{round_}", 60.0)
        won = await asyncio.gather(*(store.conversation_claim("acme", DIGEST) for _ in range(8)))
        assert won.count(None) == 7 and f"s_{round_}" in won, won


@check()
async def a_conversation_expires_after_its_ttl(store: Store) -> None:
    await store.conversation_put("acme", DIGEST, "s_short", 0.2)
    await store.conversation_put("acme", "cd" * 32, "s_long", 60.0)
    await asyncio.sleep(0.3)
    assert await store.conversation_claim("acme", DIGEST) is None
    assert await store.conversation_claim("acme", "cd" * 32) == "s_long"
