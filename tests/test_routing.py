"""Routing by request kind and tier (issue 14), on the fake CLI: ``[routes.KIND]`` and
``[tiers.NAME]`` choose a request's profile, model and effort in the documented order; a route
never widens what a tenant may use; an unknown kind is refused; the effort a route switches to
serves its request only. The fake CLI answers ``[[settings]]`` with the model and effort in force."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import orjson
import pytest

from claudepool.config import load_settings
from claudepool.errors import ConfigError, UnknownKind
from claudepool.tenancy.routing import Resolved, Route, Router, Tier
from tests.daemon_fixtures import RunningDaemon, make_daemon
from tests.test_sessions import call, new_session, say, sessions_config

__all__ = ["make_daemon"]

MakeDaemon = Callable[..., Awaitable[RunningDaemon]]
FAKE_DEFAULT = "claude-fake-1"  # the fake CLI's model when a profile sets none
HAIKU, SONNET, OPUS = "claude-haiku-4-5", "claude-sonnet-4-5", "claude-opus-4-5"

# The seed article's three kinds, and two tiers: free reviews code on haiku, pro on sonnet.
ROUTES = {
    "simple_qa": {"profile": "lean", "effort": "low"},
    "code_review": {"model": "sonnet", "effort": "medium"},
    "security_audit": {"model": "opus", "effort": "high"},
}
TIERS = {
    "free": {"effort": "low", "routes": {"code_review": {"model": "haiku"}}},
    "pro": {"model": "sonnet"},
}


def config(**extra: Any) -> dict[str, Any]:
    # One worker per pool: a request after a routed one runs on the very worker that was switched.
    return {"pool": {"max_workers": 1}, "routes": ROUTES, "tiers": TIERS, "tenants": {
        "acme": {"tier": "free", "models": ["haiku", "sonnet", "opus"]},
        # beta may use only the default profile and sonnet besides it: routes must not widen that.
        "beta": {"tier": "pro", "models": ["sonnet"]}}, **extra}


async def settings_of(d: RunningDaemon, tenant: str = "acme", **extra: Any) -> dict[str, Any]:
    status, body = await say(d, None, "[[settings]]", tenant=tenant, **extra)
    assert status == 200, body
    answer: dict[str, Any] = orjson.loads(body["text"])
    return answer


def test_each_field_is_resolved_in_the_documented_order() -> None:
    router = Router({"k": Route(profile="global", model="global", effort="high")},
                    {"t": Tier(default=Route(profile="tier", model="tier", effort="low"),
                               routes={"k": Route(model="tier-route")})})
    # the request's own fields first, then the tier's route, the global route, the tier's default
    assert router.resolve(tier="t", kind="k", profile="mine", model="mine") == Resolved("mine", "mine", "high")
    assert router.resolve(tier="t", kind="k", profile=None, model=None) == Resolved("global", "tier-route", "high")
    assert router.resolve(tier=None, kind="k", profile=None, model=None) == Resolved("global", "global", "high")
    assert router.resolve(tier="t", kind=None, profile=None, model=None) == Resolved("tier", "tier", "low")
    # nothing routes it: the tenant's profile and that profile's own model and effort
    assert router.resolve(tier=None, kind=None, profile=None, model=None) == Resolved(None, None, None)
    with pytest.raises(UnknownKind, match="'nope'"):
        router.resolve(tier="t", kind="nope", profile=None, model=None)


def test_a_kind_only_another_tier_routes_is_unknown() -> None:
    router = Router({}, {"free": Tier(routes={"cheap": Route(model="haiku")}), "pro": Tier()})
    assert router.resolve(tier="free", kind="cheap", profile=None, model=None).model == "haiku"
    with pytest.raises(UnknownKind):
        router.resolve(tier="pro", kind="cheap", profile=None, model=None)


async def test_kinds_and_tiers_choose_the_model_and_effort(make_daemon: MakeDaemon) -> None:
    d = await make_daemon(**config())
    # free: its own route for code_review (haiku), the global route's effort
    assert await settings_of(d, kind="code_review") == {"model": HAIKU, "effort": "medium"}
    # pro: the global route (sonnet, medium)
    assert await settings_of(d, "beta", kind="code_review") == {"model": SONNET, "effort": "medium"}
    assert await settings_of(d, kind="security_audit") == {"model": OPUS, "effort": "high"}
    # no kind: the tier's defaults (free: effort low on the profile's model; pro: sonnet)
    assert await settings_of(d) == {"model": FAKE_DEFAULT, "effort": "low"}
    assert await settings_of(d, "beta") == {"model": SONNET, "effort": "medium"}
    # the request's own model wins over the route's
    assert await settings_of(d, kind="code_review", model="opus") == {"model": OPUS, "effort": "medium"}


async def test_a_routed_profile_serves_the_request(make_daemon: MakeDaemon) -> None:
    d = await make_daemon(**config())
    status, body = await say(d, None, "[[reply:hi]]", kind="simple_qa")
    assert status == 200, body
    assert d.pool("lean").stats.leases == 1 and d.pool("default").stats.leases == 0


async def test_a_route_never_widens_what_a_tenant_may_use(make_daemon: MakeDaemon) -> None:
    d = await make_daemon(**config())
    # beta may not use the lean profile simple_qa routes to, nor the opus security_audit routes to
    status, body = await say(d, None, "hi", tenant="beta", kind="simple_qa")
    assert (status, body["error"]["code"]) == (403, "forbidden"), body
    status, body = await say(d, None, "hi", tenant="beta", kind="security_audit")
    assert (status, body["error"]["code"]) == (400, "model_not_allowed"), body
    # negative control: acme, whose lists hold both, is served on them
    assert (await say(d, None, "hi", kind="simple_qa"))[0] == 200
    assert (await settings_of(d, kind="security_audit"))["model"] == OPUS


async def test_an_unknown_kind_is_refused(make_daemon: MakeDaemon) -> None:
    d = await make_daemon(**config())
    status, body = await say(d, None, "hi", kind="poetry")
    assert (status, body["error"]["code"]) == (400, "unknown_kind"), body
    assert "code_review" in body["error"]["message"]  # the kinds it knows are named


async def test_a_routed_effort_serves_its_request_and_not_the_next(make_daemon: MakeDaemon) -> None:
    # beta's tier sets no effort: after acme's security_audit (high) on the one worker, beta's
    # request runs on the profile's effort again (the fake CLI's default, with no --effort).
    d = await make_daemon(**config())
    assert (await settings_of(d, kind="security_audit"))["effort"] == "high"
    await d.idle()
    assert await settings_of(d, "beta") == {"model": SONNET, "effort": "medium"}


async def test_a_profile_with_an_effort_gets_it_back(make_daemon: MakeDaemon) -> None:
    d = await make_daemon(**config(profiles={"default": {"effort": "xhigh"}}))
    assert await settings_of(d, "beta") == {"model": SONNET, "effort": "xhigh"}  # the profile's own
    assert (await settings_of(d, kind="simple_qa"))["effort"] == "low"
    assert (await settings_of(d, kind="security_audit"))["effort"] == "high"
    await d.idle()
    assert await settings_of(d, "beta") == {"model": SONNET, "effort": "xhigh"}
    stats = d.pool("default").stats
    assert (stats.spawned, stats.reset_failures) == (1, 0)  # restored and reused, never retired


async def test_a_sessions_next_turn_runs_on_the_profiles_effort(make_daemon: MakeDaemon) -> None:
    # A session keeps its worker between turns, with no reset: the switch is undone after its turn.
    d = await make_daemon(**config(**sessions_config()))
    session = await new_session(d, "beta")
    # the request's own model (one beta may use) with the route's effort
    status, body = await say(d, session, "[[settings]]", tenant="beta", kind="security_audit", model="sonnet")
    assert (status, orjson.loads(body["text"])) == (200, {"model": SONNET, "effort": "high"}), body
    status, body = await say(d, session, "[[settings]]", tenant="beta", kind="security_audit")
    assert status == 400, body  # beta may not use opus, in a session either
    status, body = await say(d, session, "[[settings]]", tenant="beta")
    assert (status, orjson.loads(body["text"])) == (200, {"model": SONNET, "effort": "medium"}), body
    status, _ = await call(d, "DELETE", f"/v1/sessions/{session}", tenant="beta")
    assert status == 204


@pytest.mark.parametrize(("overrides", "message"), [
    ({"routes": {"k": {"profile": "nope"}}}, "routes.k: unknown profile 'nope'"),
    ({"tiers": {"t": {"routes": {"k": {"profile": "nope"}}}}}, "tiers.t.routes.k: unknown profile 'nope'"),
    ({"tiers": {"t": {"profile": "nope"}}}, "tiers.t: unknown profile 'nope'"),
    ({"tenants": {"a": {"key": "k-1", "tier": "gold"}}}, "tenants.a: unknown tier 'gold'"),
    ({"profiles": {"default": {}, "p": {}}, "tiers": {"t": {"profile": "p"}},
      "tenants": {"a": {"key": "k-1", "tier": "t"}}}, "defaults to profile 'p', which is not in its profiles"),
    ({"routes": {"k": {"effort": "extreme"}}}, "routes.k.effort"),
    ({"routes": {"a kind": {}}}, "a kind must match"),
    ({"routes": {"k": {"temperature": 1}}}, "routes.k.temperature"),
    # the CLI switches effort at runtime among low..xhigh only: "max" needs a profile of its own
    ({"routes": {"k": {"effort": "max"}}}, 'routes.k: effort "max" cannot be switched to'),
    ({"profiles": {"default": {}, "deep": {"effort": "max"}}, "routes": {"k": {"profile": "deep", "effort": "low"}}},
     "routes.k: profile 'deep' runs at effort \"max\""),
])
def test_a_bad_routing_table_is_a_config_error(overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_settings(None, **overrides)


async def test_a_switch_from_a_profiles_max_effort_is_refused(make_daemon: MakeDaemon) -> None:
    # The tenant's own profile runs at max: its tier's "low" would need a switch the CLI cannot undo.
    d = await make_daemon(**config(profiles={"default": {"effort": "max"}}))
    status, body = await say(d, None, "hi")
    assert (status, body["error"]["code"]) == (400, "bad_request"), body
    assert "at runtime" in body["error"]["message"]
    assert await settings_of(d, "beta") == {"model": SONNET, "effort": "max"}  # no effort asked: served


def test_a_route_to_a_max_profile_loads() -> None:
    load_settings(None, profiles={"default": {}, "deep": {"effort": "max"}},
                  routes={"security_audit": {"profile": "deep", "effort": "max"}})


def test_a_good_routing_table_loads() -> None:
    settings = load_settings(None, profiles={"default": {}, "lean": {}}, routes=ROUTES, tiers=TIERS,
                             tenants={"a": {"key": "k-1", "tier": "free", "profiles": ["default", "lean"]}})
    assert settings.router().kinds("free") == ["code_review", "security_audit", "simple_qa"]


def test_the_module_doctests_pass() -> None:
    import doctest

    from claudepool.pool import process_settings
    from claudepool.tenancy import routing

    assert doctest.testmod(routing).failed == 0
    assert doctest.testmod(process_settings).failed == 0
