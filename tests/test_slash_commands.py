"""Issue 10: no text a tenant sends runs a CLI command or changes a worker's process settings.

Three layers, each tested here on the fake CLI with a fault that gets past the layers before it
(and on the real CLI in test_real_cli_slash.py):
  1. every prompt is written with ``text_not_typed``, so the CLI sends it to the model as text;
  2. a turn whose result says it ran a command (``local_command``) fails and retires its worker;
  3. the reset restores the profile's model and retires a worker whose settings differ from its start.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest

from claudepool.errors import PromptRanAsCommand
from claudepool.pool.lease import Lease
from claudepool.pool.pool import Pool
from claudepool.pool.profile import Profile
from claudepool.pool.worker import TurnResult, Worker
from claudepool.protocol.cli_events import UserContent
from tests.helpers import collect, until
from tests.test_pool import TIMEOUTS

MODEL = "claude-fake-1"  # the fake's default


@pytest.fixture
def pool_defaults() -> dict[str, Any]:
    # One worker, so the tenant after the attacker is served by the very same process.
    return {"min_idle": 1, "max_workers": 1, "max_turns_jitter": 0, "lease_timeout_s": 5.0,
            "maintenance_interval_s": 0.1, "timeouts": TIMEOUTS}


async def turn(lease: Lease, content: UserContent) -> TurnResult:
    return (await collect(lease.run_turn(content)))[1]


def large_files(worker: Worker, min_bytes: int = 1 << 20) -> list[str]:
    assert worker.home is not None
    found = []
    for root, _, files in os.walk(worker.home.parent):
        for name in files:
            path = Path(root, name)
            if path.stat().st_size > min_bytes:
                found.append(str(path))
    return found


COMMAND_PROMPTS: list[UserContent] = [
    "/model claude-other-9", "/effort high", "/output-style fancy", "/heapdump", "/clear", "/reset",
    "/config theme=dark", "/model claude-other-9\n", [{"type": "text", "text": "/model claude-other-9"}],
    [{"type": "text", "text": "look:"}, {"type": "text", "text": "/heapdump"}],
]


@pytest.mark.parametrize("prompt", COMMAND_PROMPTS, ids=lambda p: repr(p)[:40])
async def test_a_prompt_that_is_a_command_reaches_the_model_as_text(
    make_pool: Callable[..., Pool], fake_profile: Profile, fake_log: Path, prompt: UserContent
) -> None:
    pool = make_pool(fake_profile)
    async with pool.lease("attacker") as lease:
        pid = lease.worker.pid
        result = await turn(lease, prompt)
        worker = lease.worker
    text = prompt if isinstance(prompt, str) else "".join(b["text"] for b in prompt)
    assert result.text == f"ok: {text.strip()[:40]}"  # the model's answer, not a command's
    assert result.model == MODEL
    written = [orjson.loads(line) for line in fake_log.read_bytes().splitlines()]
    sent = [w for w in written if w.get("type") == "user" and w["message"]["content"] == prompt]
    assert [w.get("text_not_typed") for w in sent] == [True]
    async with pool.lease("next-tenant") as lease:
        assert lease.worker.pid == pid  # the same process: nothing retired it
        after = await turn(lease, "hello")
    assert after.model == MODEL
    assert large_files(worker) == []
    assert pool.stats.retired.total() == 0


async def test_a_cli_that_runs_a_marked_prompt_anyway_loses_its_worker(
    make_pool: Callable[..., Pool], make_fake_profile: Callable[..., Profile]
) -> None:
    billed: list[TurnResult] = []
    pool = make_pool(make_fake_profile("ignore_text_not_typed"), on_turn_result=lambda _, r: billed.append(r))
    async with pool.lease("attacker") as lease:
        pid = lease.worker.pid
        with pytest.raises(PromptRanAsCommand, match="/model"):
            await turn(lease, "/model claude-other-9")
    assert [r.text for r in billed] == ["Set model to claude-other-9"]  # the turn is still metered
    await until(lambda: pool.stats.retired["failed"] == 1)
    async with pool.lease("next-tenant") as lease:
        assert lease.worker.pid != pid
        assert (await turn(lease, "hello")).model == MODEL


async def test_the_reset_restores_a_model_that_a_command_changed(
    make_pool: Callable[..., Pool], make_fake_profile: Callable[..., Profile]
) -> None:
    # A CLI that runs marked prompts as commands and does not say so: only the reset stands guard.
    pool = make_pool(make_fake_profile("ignore_text_not_typed,silent_commands"))
    async with pool.lease("attacker") as lease:
        pid = lease.worker.pid
        await turn(lease, "/model claude-other-9")
        assert (await turn(lease, "hello")).model == "claude-other-9"  # the command did take
    async with pool.lease("next-tenant") as lease:
        assert lease.worker.pid == pid  # restored in place, not retired
        assert (await turn(lease, "hello")).model == MODEL
    assert pool.stats.retired.total() == 0


@pytest.mark.parametrize(("faults", "prompt"), [
    ("ignore_text_not_typed,silent_commands", "/effort high"),  # get_settings shows it
    ("ignore_text_not_typed,silent_commands", "/output-style fancy"),  # system/init shows it
    ("ignore_text_not_typed,silent_commands,set_model_noop", "/model claude-other-9"),  # cannot be undone
])
async def test_the_reset_retires_a_worker_whose_settings_it_cannot_restore(
    make_pool: Callable[..., Pool], make_fake_profile: Callable[..., Profile], faults: str, prompt: str
) -> None:
    pool = make_pool(make_fake_profile(faults))
    async with pool.lease("attacker") as lease:
        pid = lease.worker.pid
        await turn(lease, prompt)
    await until(lambda: pool.stats.reset_failures == 1 and pool.stats.retired["failed"] == 1)
    async with pool.lease("next-tenant") as lease:
        assert lease.worker.pid != pid
        assert (await turn(lease, "hello")).model == MODEL
