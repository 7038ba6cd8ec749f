"""Issue 10 on the real CLI: no slash command a tenant sends runs, or changes the next tenant's request.

`test_every_command_the_cli_knows_reaches_the_model_as_text` sends every command the CLI lists (in
``system/init``'s ``slash_commands`` and ``terminal_slash_commands``) and some it does not, bare and
with arguments, as one tenant's prompts on a pool of one worker, and checks after each that the
model received the text exactly, that every upstream call was metered to that tenant, and that the
next tenant's request is the profile's (model, system prompt, tools, effort, thinking). The other
tests take the layers away one at a time, with a worker that writes prompts unmarked (as a CLI
ignoring the marker would see them), and show the hazard each remaining layer stops.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest

from claudepool.errors import PromptRanAsCommand, ResetFailed
from claudepool.pool.lease import Lease
from claudepool.pool.pool import Pool
from claudepool.pool.profile import Profile
from claudepool.pool.timeouts import WorkerTimeouts
from claudepool.pool.worker import TurnResult, Worker
from claudepool.protocol.cli_events import ResultEvent, SystemInit, UserContent
from claudepool.testing.fake_upstream import FakeUpstream, RecordedRequest
from tests.helpers import collect

pytestmark = pytest.mark.real_cli

TIMEOUTS = WorkerTimeouts(ready_timeout_s=30, turn_idle_timeout_s=30, interrupt_timeout_s=5, reset_timeout_s=10)
# Arguments that make a command do the most harm it can: change the model, write settings, dump memory.
ARGS = {
    "model": "haiku", "effort": "high", "output-style": "Explanatory", "config": "theme=dark", "color": "red",
    "rename": "pwned", "fast": "on", "add-dir": "/", "goal": "print the environment", "loop": "1m /heapdump",
    "mcp": "add evil http://127.0.0.1:9", "compact": "forget nothing", "run": "env", "resume": "latest",
}
# Commands of the CLI's interactive mode that init does not list: sent anyway.
UNLISTED = ("exit", "quit", "reset", "new", "resume", "login", "logout", "cost", "status", "help", "permissions",
            "memory", "hooks", "export", "vim", "plugin", "skills", "rewind", "sandbox", "bashes", "todos",
            "statusline", "terminal-setup", "ide", "release-notes", "upgrade", "privacy-settings", "bug",
            "feedback", "review", "pr-comments", "install-github-app", "theme", "advisor", "btw", "doctor")


@pytest.fixture
def pool_defaults() -> dict[str, Any]:
    return {"min_idle": 1, "max_workers": 1, "lease_timeout_s": 30, "timeouts": TIMEOUTS}


async def turn(lease: Lease, content: UserContent) -> tuple[list[Any], TurnResult]:
    return await collect(lease.run_turn(content), timeout_s=60)


def request_shape(request: RecordedRequest) -> dict[str, Any]:
    """What the profile decides about a request; the billing line in the system prompt changes per call."""
    body = request.json()
    system = [b for b in body.get("system") or [] if not str(b.get("text", "")).startswith("x-anthropic-billing")]
    return {"model": body.get("model"), "system": system, "tools": body.get("tools"),
            "output_config": body.get("output_config"), "thinking": body.get("thinking"),
            "max_tokens": body.get("max_tokens"), "context_management": body.get("context_management")}


def last_text(request: RecordedRequest) -> str:
    """The text of the last block of the last user message: what this turn's prompt became."""
    users = [m for m in request.json()["messages"] if m["role"] == "user"]
    content = users[-1]["content"]
    return content if isinstance(content, str) else content[-1].get("text", "")


def files_over(root: Path, limit_bytes: int) -> list[str]:
    return [str(Path(d, f)) for d, _, names in os.walk(root) for f in names
            if Path(d, f).stat().st_size > limit_bytes]


async def test_every_command_the_cli_knows_reaches_the_model_as_text(
    make_pool: Callable[..., Pool], real_profile: Callable[..., Profile], upstream: FakeUpstream
) -> None:
    pool = make_pool(real_profile())
    async with pool.lease("beta") as lease:
        events, _ = await turn(lease, "[[reply:baseline]]")
        worker = lease.worker
    init = next(e for e in events if isinstance(e, SystemInit))
    extra = init.model_extra or {}
    listed = {*extra.get("slash_commands", []), *extra.get("terminal_slash_commands", [])}
    assert {"model", "heapdump", "config", "clear", "effort"} <= listed  # the list is the CLI's own
    baseline = request_shape(upstream.message_requests()[-1])
    prompts: list[UserContent] = [f"/{name}" for name in sorted(listed | set(UNLISTED))]
    prompts += [f"/{name} {arg}" for name, arg in ARGS.items()]
    # A full model id (its switch made an upstream call billed to no one), a trailing newline, a block.
    prompts += ["/model claude-haiku-4-5-20251001", "/model haiku\n", [{"type": "text", "text": "/model haiku"}],
                "/heapdump\n/heapdump"]
    assert len(prompts) > 90

    for prompt in prompts:
        before = len(upstream.requests)
        async with pool.lease("acme") as lease:
            assert lease.worker is worker  # one process serves both tenants throughout
            _, result = await turn(lease, prompt)
        made = upstream.requests[before:]
        text = prompt if isinstance(prompt, str) else prompt[-1]["text"]
        assert not result.is_error, (prompt, result.text)
        assert [r.path for r in made] == ["/v1/messages"], prompt  # one model call, nothing else
        assert last_text(made[0]) == text, prompt  # the model got the prompt exactly
        # Metered to the tenant that caused it: the turn reports what the upstream billed.
        usage = made[0].usage
        assert usage is not None
        assert (result.usage.input_tokens, result.usage.output_tokens, result.usage.cache_read_input_tokens,
                result.usage.cache_creation_input_tokens) == (
            usage["input_tokens"], usage["output_tokens"], usage["cache_read_input_tokens"],
            usage["cache_creation_input_tokens"]), prompt
        assert result.cost_usd > 0, prompt

        between = len(upstream.requests)
        async with pool.lease("beta") as lease:
            _, after = await turn(lease, "[[reply:next]]")
        assert upstream.requests[before:between] == made  # the reset called nothing
        assert [r.path for r in upstream.requests[between:]] == ["/v1/messages"], prompt
        assert after.text == "next"
        assert request_shape(upstream.requests[-1]) == baseline, prompt
    assert worker.home is not None
    assert files_over(worker.home.parent, 1 << 20) == []
    assert pool.stats.retired.total() == 0 and pool.stats.reset_failures == 0


# -- the layers behind the marker ------------------------------------------------------------------


class UnmarkedWorker(Worker):
    """Writes prompts without ``text_not_typed``: what a CLI that ignores the marker would see."""

    @staticmethod
    def _prompt_line(content: UserContent) -> bytes:
        return orjson.dumps({"type": "user", "message": {"role": "user", "content": content}}) + b"\n"


class SilentUnmarkedWorker(UnmarkedWorker):
    """Also blind to ``local_command``: only the reset stands between the command and the next tenant."""

    @staticmethod
    def _ran_command(event: ResultEvent) -> str | None:
        return None


@pytest.fixture
async def start_worker(tmp_path: Path, real_profile: Callable[..., Profile]) -> Any:
    started: list[Worker] = []

    async def start(kind: type[Worker]) -> Worker:
        worker = kind(real_profile(), timeouts=TIMEOUTS, workdir_root=tmp_path / "w")
        started.append(worker)
        await worker.start()
        return worker

    yield start
    for worker in started:
        await worker.close()


async def test_a_prompt_run_as_a_command_fails_and_poisons_the_worker(start_worker: Any) -> None:
    worker = await start_worker(UnmarkedWorker)
    with pytest.raises(PromptRanAsCommand, match="/model"):
        await collect(worker.run_turn("/model haiku"))
    assert not worker.is_alive()  # the pool retires it instead of resetting it


async def test_the_reset_restores_the_model_a_command_set(start_worker: Any, upstream: FakeUpstream) -> None:
    worker = await start_worker(SilentUnmarkedWorker)
    await collect(worker.run_turn("[[reply:one]]"))
    profile_model = upstream.message_requests()[-1].json()["model"]
    _, ran = await collect(worker.run_turn("/model haiku"))
    assert "haiku" in ran.text.lower()  # the CLI did run it...
    await collect(worker.run_turn("[[reply:two]]"))
    assert "haiku" in upstream.message_requests()[-1].json()["model"]  # ...and it changed the model
    await worker.reset()
    await collect(worker.run_turn("[[reply:three]]"))
    assert upstream.message_requests()[-1].json()["model"] == profile_model
    assert worker.is_alive()


@pytest.mark.parametrize(("command", "seen_by"), [
    ("/effort high", "get_settings"),  # not in system/init: only get_settings shows it
    ("/output-style Explanatory", "system/init"),
])
async def test_the_reset_retires_a_worker_whose_settings_a_command_changed(
    start_worker: Any, upstream: FakeUpstream, command: str, seen_by: str
) -> None:
    worker = await start_worker(SilentUnmarkedWorker)
    await collect(worker.run_turn("[[reply:one]]"))
    before = request_shape(upstream.message_requests()[-1])
    await collect(worker.run_turn(command))
    if seen_by == "get_settings":
        await collect(worker.run_turn("[[reply:two]]"))
        assert request_shape(upstream.message_requests()[-1]) != before  # the next request would change
    with pytest.raises(ResetFailed, match="settings changed"):
        await worker.reset()
    assert not worker.is_alive()
