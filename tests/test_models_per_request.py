"""A model per request (issue 14): within the tenant's ``models``, switched with ``set_model`` for
that request only, on the fake CLI (which reports the model in force in each turn's system/init)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from claudepool.errors import ModelNotAllowed
from claudepool.tenancy.models import ModelCatalog, ProfileModel, resolve_model
from tests.daemon_fixtures import RunningDaemon, make_daemon
from tests.test_sessions import call, new_session, say, sessions_config
from tests.test_unix_api import connect, prompt

__all__ = ["make_daemon"]

MakeDaemon = Callable[..., Awaitable[RunningDaemon]]
FAKE_DEFAULT = "claude-fake-1"  # the fake CLI's model when a profile sets none


def config(**extra: Any) -> dict[str, Any]:
    # One worker: the request after a switch runs on the very worker that was switched.
    return {"pool": {"max_workers": 1}, "tenants": {"acme": {"models": ["haiku", "claude-opus-4-5"]}}, **extra}


def test_aliases_resolve_and_only_the_tenants_list_is_allowed() -> None:
    catalog = ModelCatalog({"p": ProfileModel("claude-sonnet-4-5", None)})
    assert resolve_model("Opus") == "claude-opus-4-5"
    assert catalog.switch_for("p", frozenset(), "sonnet") is None  # the profile's own model: no switch
    assert catalog.switch_for("p", frozenset({"claude-haiku-4-5"}), "haiku") == "claude-haiku-4-5"
    with pytest.raises(ModelNotAllowed):
        catalog.switch_for("p", frozenset(), "haiku")  # the default list: only the profile's model


async def test_a_switched_model_serves_its_request_and_not_the_next(make_daemon: MakeDaemon) -> None:
    d = await make_daemon(**config())
    status, body = await say(d, None, "one", model="haiku")
    assert status == 200, body
    assert body["model"] == "claude-haiku-4-5"
    await d.idle()
    status, body = await say(d, None, "two")  # same tenant, same (single) worker, after its reset
    assert status == 200, body
    assert body["model"] == FAKE_DEFAULT
    status, body = await say(d, None, "three", model="claude-opus-4-5")
    assert status == 200, body
    assert body["model"] == "claude-opus-4-5"


async def test_a_model_not_in_the_tenants_list_is_refused(make_daemon: MakeDaemon) -> None:
    d = await make_daemon(**config())
    status, body = await say(d, None, "one", model="sonnet")
    assert status == 400, body
    assert body["error"]["code"] == "model_not_allowed"
    # beta sets no models: only its profile's own, named "default" when the profile sets none.
    status, body = await say(d, None, "one", tenant="beta", model="haiku")
    assert (status, body["error"]["code"]) == (400, "model_not_allowed")
    status, body = await say(d, None, "one", tenant="beta", model="default")
    assert status == 200, body
    assert body["model"] == FAKE_DEFAULT


async def test_a_sessions_next_turn_runs_on_the_profiles_model(make_daemon: MakeDaemon) -> None:
    # A session keeps its worker between turns, with no reset: the switch is undone after its turn.
    d = await make_daemon(**config(**sessions_config()))
    session = await new_session(d)
    status, body = await say(d, session, "one", model="haiku")
    assert (status, body["model"]) == (200, "claude-haiku-4-5"), body
    status, body = await say(d, session, "two")
    assert (status, body["model"]) == (200, FAKE_DEFAULT), body
    status, _ = await call(d, "DELETE", f"/v1/sessions/{session}")
    assert status == 204


async def test_the_socket_takes_a_model_too(make_daemon: MakeDaemon) -> None:
    d = await make_daemon(**config())
    async with connect(d) as c:
        await c.send(prompt("m1", "[[reply:hi]]", "acme", model="haiku"),
                     prompt("m2", "[[reply:hi]]", "acme", model="sonnet"))
        await c.until_terminals("m1", "m2")
        grouped = c.by_id()
    assert grouped["m1"][-1]["model"] == "claude-haiku-4-5"
    assert (grouped["m2"][-1]["event"], grouped["m2"][-1]["code"]) == ("error", "model_not_allowed")
