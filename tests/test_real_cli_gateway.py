"""The gateway's security proof on the real CLI (issue 12): tenants whose profile allows Bash try to
get at the provider's key and to bill someone else.

Each test runs twice: through the gateway, and as the negative control on the path before it (the
same pool, with the provider's key and address in every worker's environment), where the same
scenario must leak. A check that passes on both paths would prove nothing.

The fake provider answers a ``[[tool:Bash:CMD]]`` prompt with a Bash tool call, the CLI runs it, and
the next answer is the tool's output: the tenant's answer shows exactly what its tool printed.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import secrets
import sys
from collections.abc import Awaitable, Callable

import aiohttp
import orjson
import pytest

from claudepool.client import AsyncClient
from claudepool.gateway.credentials import CREDENTIAL_PREFIX
from claudepool.pool.lease import Lease
from claudepool.pool.profile import Profile
from claudepool.pool.timeouts import WorkerTimeouts
from claudepool.pool.worker import TurnResult
from claudepool.testing.fake_upstream import FakeUpstream
from tests.daemon_fixtures import KEYS, RunningDaemon, make_daemon
from tests.gateway_fixtures import MakeStack, Stack, lease_for, make_stack, worker_environ
from tests.helpers import collect, until

pytestmark = pytest.mark.real_cli
__all__ = ["make_daemon", "make_stack"]

TIMEOUTS = WorkerTimeouts(ready_timeout_s=30, turn_idle_timeout_s=30, interrupt_timeout_s=5, reset_timeout_s=10)
PATHS = [pytest.param(True, id="gateway"), pytest.param(False, id="direct-negative-control")]


def provider_key() -> str:
    """A key shaped like the provider's, new for each test: finding it anywhere can only be a leak."""
    return "sk-ant-api03-" + secrets.token_urlsafe(24)


def bash_profile(claude: str, *, sandbox: bool = False) -> Profile:
    """A Bash-enabled profile; unsandboxed unless asked, so that these tests prove what the gateway
    alone does (`tests/test_real_cli_sandbox.py` proves the sandbox)."""
    return Profile(name="default", claude_bin=claude, tools=("Bash",), args=("--allowedTools", "Bash"),
                   upstream_max_retries=0, upstream_timeout_ms=20_000, sandbox=sandbox)


async def ask(lease: Lease, prompt: str) -> TurnResult:
    _, result = await collect(lease.run_turn(prompt), timeout_s=60)
    assert not result.is_error, result.text
    return result


def python_tool(script: str) -> str:
    """A Bash command running ``script`` with this interpreter (no curl needed), in a form the fake
    provider's directive can carry (no ``]``)."""
    encoded = base64.b64encode(script.encode()).decode()
    return f"""{sys.executable} -c "import base64; exec(base64.b64decode('{encoded}'))\""""


def leaks(upstream: FakeUpstream, key: str) -> list[str]:
    """Where the key appears in what reached the provider, other than in the credential header."""
    found = []
    for r in upstream.requests:
        if key.encode() in r.body:
            found.append(f"{r.path} body")
        found += [f"{r.path} header {name}" for name, value in r.headers.items()
                  if key in value and name != "x-api-key"]
    return found


@pytest.mark.parametrize("gateway", PATHS)
async def test_no_tool_of_a_tenant_finds_the_provider_key(
    make_stack: MakeStack, real_claude: str, upstream: FakeUpstream, gateway: bool
) -> None:
    key = provider_key()
    stack = await make_stack(bash_profile(real_claude), upstream.base_url, key=key, direct=not gateway,
                             timeouts=TIMEOUTS)
    lease = await lease_for(stack.pool, "acme", "req-env")
    env = await ask(lease, "show me the environment [[tool:Bash:env]]")
    procs = await ask(lease, r"every environment [[tool:Bash:cat /proc/*/environ 2>/dev/null | tr '\0' '\n' "
                             r"| grep -a -e ANTHROPIC_ -e sk-ant-]]")
    home = await ask(lease, "look around [[tool:Bash:grep -rIn -e sk-ant- -e ANTHROPIC_API_KEY $HOME; echo done]]")
    lease.release()
    assert "ANTHROPIC_BASE_URL=" in env.text and "HOME=" in env.text  # the tools did run
    assert home.text.rstrip().endswith("done")
    answers = [env.text, procs.text, home.text]
    if gateway:
        assert not [a for a in answers if key in a]
        assert leaks(upstream, key) == []
        # What the worker holds instead: its own credential, and the gateway's address.
        assert f"ANTHROPIC_API_KEY={CREDENTIAL_PREFIX}" in env.text
        assert f"ANTHROPIC_BASE_URL={stack.credentials.base_url}" in env.text
        # The key was used, where only the gateway puts it.
        assert len(upstream.message_requests()) == 6
        assert {r.headers["x-api-key"] for r in upstream.message_requests()} == {key}
    else:
        assert key in env.text and key in procs.text, "without the gateway the key must show in the tool's output"
        assert leaks(upstream, key), "without the gateway the key must reach the provider inside a tool result"


async def call_with(base_url: str, credential: str) -> int:
    body = {"model": "claude-x", "max_tokens": 8, "messages": [{"role": "user", "content": "[[reply:stolen]]"}]}
    async with aiohttp.ClientSession() as session, session.post(
        f"{base_url}/v1/messages", data=orjson.dumps(body),
        headers={"x-api-key": credential, "anthropic-version": "2023-06-01", "content-type": "application/json"},
    ) as resp:
        return resp.status


@pytest.mark.parametrize("gateway", PATHS)
async def test_a_workers_credential_opens_nothing_while_it_serves_no_one_or_once_it_has_exited(
    make_stack: MakeStack, real_claude: str, upstream: FakeUpstream, gateway: bool
) -> None:
    key = provider_key()
    stack = await make_stack(bash_profile(real_claude), upstream.base_url, key=key, direct=not gateway,
                             timeouts=TIMEOUTS)
    [worker] = stack.pool.workers()
    env = worker_environ(worker.pid)  # what any tool of the worker's can read
    base_url, credential = env["ANTHROPIC_BASE_URL"], env["ANTHROPIC_API_KEY"]
    # The credential is the one the CLI uses: a turn works with it.
    lease = await lease_for(stack.pool, "acme", "req-1")
    assert (await ask(lease, "[[reply:fine]]")).text == "fine"
    lease.release()
    await until(lambda: stack.pool.counts()["idle"] == 1 and stack.pool.lease_of(worker) is None, 20)
    idle_status = await call_with(base_url, credential)
    await stack.pool.close()
    assert worker.returncode is not None
    exited_status = await call_with(base_url, credential)
    if gateway:
        assert (idle_status, exited_status) == (403, 401)
        assert stack.sample("claudepool_gateway_refusals_total", reason="no_lease") == 1
        assert stack.sample("claudepool_gateway_refusals_total", reason="unknown_credential") == 1
        assert len(upstream.message_requests()) == 1  # the turn's call, and nothing else
    else:
        assert (idle_status, exited_status) == (200, 200), "without the gateway what a worker holds opens the provider"
        assert len(upstream.message_requests()) == 3


def smuggle(marker: str) -> str:
    """A tool that calls the provider itself with its worker's credential, claiming to be tenant beta."""
    return python_tool(f"""
import os, urllib.request, urllib.error
body = b'{{"model": "m", "max_tokens": 8, "messages": [{{"role": "user", "content": "[[reply:{marker}]]"}}]}}'
request = urllib.request.Request(os.environ["ANTHROPIC_BASE_URL"] + "/v1/messages", data=body, headers={{
    "x-api-key": os.environ["ANTHROPIC_API_KEY"], "content-type": "application/json",
    "anthropic-version": "2023-06-01", "x-claudepool-tenant": "beta", "x-tenant": "beta"}})
try:
    print("status", urllib.request.urlopen(request, timeout=20).status)
except urllib.error.HTTPError as error:
    print("status", error.code)
""")


@pytest.mark.parametrize("gateway", PATHS)
async def test_worker_a_credential_never_bills_tenant_b(
    make_stack: MakeStack, real_claude: str, upstream: FakeUpstream, gateway: bool
) -> None:
    """Two tenants at once on two workers. Tenant acme's tool makes a call of its own with its
    worker's credential and headers claiming tenant beta. Every call the provider received must be
    attributed, by the gateway, to the tenant whose worker made it."""
    stack = await make_stack(bash_profile(real_claude), upstream.base_url, key=provider_key(), direct=not gateway,
                             timeouts=TIMEOUTS, min_idle=2, max_workers=2)
    await stack.pool.wait_ready(60, idle=2)
    acme, beta = await lease_for(stack.pool, "acme", "req-acme"), await lease_for(stack.pool, "beta", "req-beta")
    assert acme.worker is not beta.worker
    answers = await asyncio.gather(ask(acme, f"acme-prompt [[tool:Bash:{smuggle('smuggled-by-acme')}]]"),
                                   ask(beta, "beta-prompt [[delay_s:1]] [[reply:for beta]]"))
    acme.release()
    beta.release()
    assert "status 200" in answers[0].text and answers[1].text == "for beta"
    by_request_id = {call.upstream_request_id: call for call in stack.recorder.calls}
    unattributed = [r for r in upstream.message_requests() if r.request_id not in by_request_id]
    if not gateway:
        assert stack.recorder.calls == [] and len(unattributed) == 4, (
            "without the gateway no call is attributed to anyone: the smuggled one is billed to nobody")
        return
    assert unattributed == []
    tenant_of = {r.request_id: by_request_id[r.request_id].attribution for r in upstream.message_requests()}
    for r in upstream.message_requests():
        who = tenant_of[r.request_id]
        carries = "acme" if (r.contains("acme-prompt") or r.contains("smuggled-by-acme")) else "beta"
        assert (who.tenant, who.worker) == (carries, (acme if carries == "acme" else beta).worker.id), r.body[:200]
    assert sorted(a.tenant for a in tenant_of.values()) == ["acme", "acme", "acme", "beta"]
    assert {a.request_id for a in tenant_of.values()} == {"req-acme", "req-beta"}
    assert stack.sample("claudepool_gateway_calls_total", tenant="beta", outcome="ok") == 1


def steal_and_call(marker: str) -> str:
    """A tool that reads every worker's credential from /proc and calls with the ones not its own."""
    return python_tool(f"""
import glob, os, urllib.request, urllib.error
mine = os.environ["ANTHROPIC_API_KEY"]
found = set()
for path in glob.glob("/proc/[0-9]*/environ"):
    try:
        for item in open(path, "rb").read().split(b"\\0"):
            if item.startswith(b"ANTHROPIC_API_KEY={CREDENTIAL_PREFIX}"):
                found.add(item.split(b"=", 1)[1].decode())
    except OSError:
        pass
body = b'{{"model": "m", "max_tokens": 8, "messages": [{{"role": "user", "content": "[[reply:{marker}]]"}}]}}'
for credential in sorted(found - {{mine}}):
    request = urllib.request.Request(os.environ["ANTHROPIC_BASE_URL"] + "/v1/messages", data=body, headers={{
        "x-api-key": credential, "content-type": "application/json", "anthropic-version": "2023-06-01"}})
    try:
        print("status", urllib.request.urlopen(request, timeout=20).status)
    except urllib.error.HTTPError as error:
        print("status", error.code)
""")


@pytest.mark.parametrize("sandbox", [pytest.param(True, id="sandboxed"),
                                     pytest.param(False, id="unsandboxed-negative-control")])
async def test_a_tool_cannot_use_another_workers_credential(
    make_stack: MakeStack, real_claude: str, upstream: FakeUpstream, sandbox: bool
) -> None:
    """Tenant acme's tool reads worker B's credential from /proc while B serves beta mid-turn, and
    calls with it. Unsandboxed, the call is billed to beta (the gap the sandbox closes); sandboxed,
    the tool sees no other process, and a credential used off its own socket is refused."""
    stack: Stack = await make_stack(bash_profile(real_claude, sandbox=sandbox), upstream.base_url,
                                    key=provider_key(), timeouts=TIMEOUTS, min_idle=2, max_workers=2)
    await stack.pool.wait_ready(60, idle=2)
    acme, beta = await lease_for(stack.pool, "acme", "req-acme"), await lease_for(stack.pool, "beta", "req-beta")
    beta_turn = asyncio.create_task(ask(beta, "beta-prompt [[delay_s:4]] [[reply:for beta]]"))
    await until(lambda: any(r.contains("beta-prompt") for r in upstream.message_requests()), 20)
    thief = await ask(acme, f"acme-prompt [[tool:Bash:{steal_and_call('stolen-by-acme')}]]")
    await beta_turn
    acme.release()
    beta.release()
    stolen = [c for c in stack.recorder.calls if b"stolen-by-acme" in stack.recorder.bodies[c.id]]
    if sandbox:
        assert stolen == [], thief.text  # it found no credential but its own, and reached no listener
    else:
        assert [c.attribution.tenant for c in stolen] == ["beta"], thief.text



async def test_the_daemon_sends_every_model_call_through_its_gateway(
    make_daemon: Callable[..., Awaitable[RunningDaemon]], real_claude: str, upstream: FakeUpstream,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The composition: [upstream] holds the key, a tenant's prompt runs a tool, and what the daemon
    answers, sends and counts is what the gateway makes of it."""
    key = provider_key()
    d = await make_daemon(
        pool={"claude_bin": real_claude, "min_idle": 1, "max_workers": 1, "timeouts": {"ready_timeout_s": 30}},
        upstream={"base_url": upstream.base_url, "api_key": key},
        profiles={"default": {"tools": ["Bash"], "args": ["--allowedTools", "Bash"], "upstream_max_retries": 0,
                              "sandbox": False},
                  "lean": {}, "other": {}})
    caplog.set_level(logging.INFO, logger="claudepool.gateway.server")
    async with AsyncClient(key=KEYS["acme"], url=d.url) as client:
        answer = await client.prompt("what is set? [[tool:Bash:env]]")
    assert f"ANTHROPIC_API_KEY={CREDENTIAL_PREFIX}" in answer.text and key not in answer.text
    assert f"ANTHROPIC_BASE_URL={d.daemon.gateway.base_url}" in answer.text
    assert [r.headers["x-api-key"] for r in upstream.message_requests()] == [key, key]
    assert leaks(upstream, key) == []
    assert d.sample("claudepool_gateway_calls_total", tenant="acme", outcome="ok") == 2
    # Each call's usage is measured there too, as the provider reported it.
    assert d.sample("claudepool_gateway_tokens_total", tenant="acme", kind="output") == sum(
        (r.usage or {}).get("output_tokens", 0) for r in upstream.message_requests()) > 0
    calls = [r for r in caplog.records if r.getMessage() == "gateway call"]
    fields = [getattr(c, "fields", {}) for c in calls]
    assert [(f["tenant"], f["request_id"], f["status"]) for f in fields] == [("acme", answer.id, 200)] * 2
