"""The soak's load: many concurrent clients of one daemon, in a process of their own, each counting
the terminal answers of every request it makes (`bench.soak_bench` runs it).

    python -m bench.soak_load PLAN_JSON      # prints one JSON summary line when done

Clients are given a kind by their index, round robin over `KINDS`, and a tenant the same way. Each
loops until the deadline: think (uniform ``think_s``), then one request, its prompt drawn from
`FAULTS` (worker crashes, upstream 529/429 errors and retries, stalls the daemon's watchdog must cut,
slow streams), and, on a streaming kind, a hang-up mid-stream with probability ``hangup_p``.

What "one terminal answer" means, per transport, counted from the raw bytes (not through the client
library, which stops reading at the first terminal frame and would hide a second one):

* socket: NDJSON on a connection of the client's own; frames of a request are read until its
  ``result`` or ``error``; a frame under an id already answered (read while waiting for the next
  request's) is an ``extra``;
* SSE: the whole stream is read to its end; ``result`` and ``error`` events are counted: one is
  right, none is ``missing``, more is ``extra``;
* HTTP JSON: one status and body by construction (a body that is neither result nor error is ``bad``);
* sessions: create, ``session_turns`` turns (HTTP JSON), delete; jobs: submit (a share
  ``interactive_jobs`` of them ``priority: interactive``, the rest the default ``batch``), then poll
  until it has ended, past the deadline too (bounded by ``request_timeout_s``): no job is left behind.

No client starts a request past the deadline, nor sleeps its think time beyond it: the load ends with
the last request in flight at the deadline (``tail_s`` per kind says how long after it).

A request that gets no terminal answer within ``request_timeout_s`` is ``no_answer``. A client that
hangs up counts ``hung_up`` (that is its one end).
"""

from __future__ import annotations

import asyncio
import random
import resource
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson

# Client kinds, round robin over the client index.
KINDS = ("socket", "sse", "socket", "sse", "http", "session", "socket", "sse", "http", "job")
# (weight, prompt): what each request asks of its fake CLI worker.
FAULTS = (
    (80.0, "[[sleep:0.2]] soak"),
    (3.0, "[[crash]]"),  # the worker dies mid-turn: worker_died
    (3.0, "[[api_error:529]]"),  # the upstream is overloaded: model_error
    (2.0, "[[api_error:429]]"),
    (4.0, "[[api_retry:529,429]] [[sleep:0.2]] retried"),
    (1.0, "[[hang]]"),  # the turn stalls: the daemon's watchdog cuts it (turn_stalled)
    (7.0, "[[sleep:1.5]] a slow stream"),
)
_ENDED = ("succeeded", "failed", "cancelled", "dead")


@dataclass
class Tally:
    answers: Counter[str] = field(default_factory=Counter)  # per request: its terminal answer's kind
    answers_by_kind: Counter[str] = field(default_factory=Counter)  # "client kind:answer"
    anomalies: Counter[str] = field(default_factory=Counter)  # missing, extra, no_answer, bad, crash
    by_kind: Counter[str] = field(default_factory=Counter)  # requests per client kind
    requests: int = 0  # prompts the daemon saw (socket, SSE, HTTP, session turns), hang-ups included
    jobs: int = 0
    job_ids: list[str] = field(default_factory=list)
    tail_s: dict[str, float] = field(default_factory=dict)  # per client kind: its last end past the deadline


@dataclass(frozen=True)
class Plan:
    socket: str
    url: str
    keys: list[str]
    clients: int
    duration_s: float
    think_s: tuple[float, float]
    hangup_p: float
    request_timeout_s: float
    session_turns: int = 3
    job_poll_s: float = 1.0
    interactive_jobs: float = 0.5
    seed: int = 16


def draw(rng: random.Random) -> str:
    return rng.choices([p for _, p in FAULTS], weights=[w for w, _ in FAULTS])[0]


class Load:
    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        self.tally = Tally()
        self.deadline = time.monotonic() + plan.duration_s

    def answer(self, kind: str, what: str) -> None:
        self.tally.by_kind[kind] += 1
        self.tally.answers[what] += 1
        self.tally.answers_by_kind[f"{kind}:{what}"] += 1

    async def client(self, index: int, http: aiohttp.ClientSession) -> None:
        kind = KINDS[index % len(KINDS)]
        key = self.plan.keys[index % len(self.plan.keys)]
        rng = random.Random(self.plan.seed * 100_003 + index)
        sock: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        serial = 0
        try:
            # Spread the first requests over the first think time, as clients arriving do.
            await asyncio.sleep(rng.uniform(0, self.plan.think_s[1]))
            while time.monotonic() < self.deadline:
                try:
                    async with asyncio.timeout(self.plan.request_timeout_s * (4 if kind == "session" else 1)):
                        if kind == "socket":
                            if sock is None:
                                sock = await asyncio.open_unix_connection(self.plan.socket, limit=2**22)
                            serial += 1
                            if not await self.socket_prompt(sock, key, f"r{serial}", rng):
                                sock[1].close()  # hung up (or unusable): a new connection next time
                                sock = None
                        elif kind == "sse":
                            await self.sse_prompt(http, key, rng)
                        elif kind == "http":
                            await self.http_prompt(http, key, draw(rng))
                        elif kind == "session":
                            await self.session(http, key, rng)
                        else:
                            await self.job(http, key, rng)
                except TimeoutError:
                    self.tally.anomalies["no_answer"] += 1
                    if sock is not None:
                        sock[1].close()
                        sock = None
                # Think, but not past the deadline: a client that would start no more requests is done.
                await asyncio.sleep(min(rng.uniform(*self.plan.think_s), max(self.deadline - time.monotonic(), 0)))
        except Exception as exc:  # a client that breaks is a finding, not a crash of the whole load
            self.tally.anomalies[f"client_error:{type(exc).__name__}"] += 1
        finally:
            if sock is not None:
                sock[1].close()
            late_s = time.monotonic() - self.deadline
            self.tally.tail_s[kind] = round(max(self.tally.tail_s.get(kind, 0.0), late_s), 2)

    async def socket_prompt(self, sock: tuple[asyncio.StreamReader, asyncio.StreamWriter], key: str,
                            frame_id: str, rng: random.Random) -> bool:
        """One prompt on the connection; False when the client hung up (the connection is closed)."""
        reader, writer = sock
        stream = rng.random() < 0.7
        hangup = stream and rng.random() < self.plan.hangup_p
        prompt = "[[sleep:5]] hung up on" if hangup else draw(rng)
        writer.write(orjson.dumps({"id": frame_id, "op": "prompt", "key": key, "prompt": prompt,
                                   "stream": stream}) + b"\n")
        await writer.drain()
        self.tally.requests += 1
        hangup_at = time.monotonic() + rng.uniform(0.3, 2.0)
        while True:
            try:
                line = await asyncio.wait_for(reader.readline(), max(hangup_at - time.monotonic(), 0.01)) \
                    if hangup else await reader.readline()
            except TimeoutError:
                self.answer("socket", "hung_up")
                return False
            if not line:
                self.tally.anomalies["missing"] += 1  # the daemon closed the connection first
                return False
            frame = orjson.loads(line)
            if frame.get("id") != frame_id:
                self.tally.anomalies["extra"] += 1  # under an earlier, answered id (or none)
                continue
            event = frame.get("event")
            if event == "result":
                self.answer("socket", "model_error" if frame.get("is_error") else "ok")
                return True
            if event == "error":
                self.answer("socket", f"error:{frame.get('code')}")
                return True

    async def sse_prompt(self, http: aiohttp.ClientSession, key: str, rng: random.Random) -> None:
        hangup = rng.random() < self.plan.hangup_p
        prompt = "[[sleep:5]] hung up on" if hangup else draw(rng)
        self.tally.requests += 1
        terminals: list[str] = []
        event = ""
        async with http.post(f"{self.plan.url}/v1/prompt", data=orjson.dumps({"prompt": prompt, "stream": True}),
                             headers={"Authorization": f"Bearer {key}"}) as resp:
            if resp.content_type != "text/event-stream":  # refused before streaming: one JSON error
                body = orjson.loads(await resp.read())
                self.answer("sse", f"error:{body.get('error', {}).get('code')}")
                return
            try:
                async with asyncio.timeout(rng.uniform(0.3, 2.0) if hangup else None):
                    async for raw in resp.content:
                        line = raw.decode().rstrip("\r\n")
                        if line.startswith("event:"):
                            event = line[6:].strip()
                        elif line.startswith("data:") and event in ("result", "error"):
                            data = orjson.loads(line[5:])
                            terminals.append("model_error" if event == "result" and data.get("is_error") else
                                             "ok" if event == "result" else f"error:{data.get('code')}")
            except TimeoutError:
                resp.close()  # hang up mid-stream
                self.answer("sse", "hung_up")
                return
        if not terminals:
            self.tally.anomalies["missing"] += 1
        else:
            self.answer("sse", terminals[0])
            if len(terminals) > 1:
                self.tally.anomalies["extra"] += len(terminals) - 1

    async def http_prompt(self, http: aiohttp.ClientSession, key: str, prompt: str, *, kind: str = "http",
                          **fields: Any) -> None:
        self.tally.requests += 1
        async with http.post(f"{self.plan.url}/v1/prompt", data=orjson.dumps({"prompt": prompt, "stream": False,
                                                                              **fields}),
                             headers={"Authorization": f"Bearer {key}"}) as resp:
            body = orjson.loads(await resp.read())
        if "error" in body:
            self.answer(kind, f"error:{body['error'].get('code')}")
        elif "text" in body:
            self.answer(kind, "model_error" if body.get("is_error") else "ok")
        else:
            self.tally.anomalies["bad"] += 1

    async def session(self, http: aiohttp.ClientSession, key: str, rng: random.Random) -> None:
        auth = {"Authorization": f"Bearer {key}"}
        async with http.post(f"{self.plan.url}/v1/sessions", data=b"{}", headers=auth) as resp:
            body = orjson.loads(await resp.read())
        if resp.status != 201:
            self.answer("session", f"create_error:{body.get('error', {}).get('code')}")
            return
        try:
            for _ in range(self.plan.session_turns):
                prompt = draw(rng) if rng.random() < 0.3 else "[[sleep:0.2]] a session turn"
                await self.http_prompt(http, key, prompt, kind="session", session=body["id"])
        finally:
            async with http.delete(f"{self.plan.url}/v1/sessions/{body['id']}", headers=auth) as resp:
                await resp.read()

    async def job(self, http: aiohttp.ClientSession, key: str, rng: random.Random) -> None:
        auth = {"Authorization": f"Bearer {key}"}
        priority = "interactive" if rng.random() < self.plan.interactive_jobs else "batch"
        async with http.post(f"{self.plan.url}/v1/jobs", data=orjson.dumps({"prompt": draw(rng), "priority": priority}),
                             headers=auth) as resp:
            body = orjson.loads(await resp.read())
        if resp.status != 202:
            self.answer("job", f"submit_error:{body.get('error', {}).get('code')}")
            return
        self.tally.jobs += 1
        self.tally.job_ids.append(body["id"])
        while True:  # bounded by the caller's request timeout
            await asyncio.sleep(self.plan.job_poll_s)
            async with http.get(f"{self.plan.url}/v1/jobs/{body['id']}", headers=auth) as resp:
                job = orjson.loads(await resp.read())
            if job.get("status") in _ENDED:
                self.answer("job", f"job_{job['status']}")
                self.tally.by_kind[f"job_{priority}"] += 1
                return

    async def run(self) -> dict[str, Any]:
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=None)) as http:
            await asyncio.gather(*(self.client(i, http) for i in range(self.plan.clients)))
        t = self.tally
        return {"requests": t.requests, "jobs": t.jobs, "answers": dict(t.answers), "anomalies": dict(t.anomalies),
                "by_kind": dict(t.by_kind), "answers_by_kind": dict(t.answers_by_kind), "job_ids": t.job_ids,
                "tail_s": t.tail_s}


def main() -> int:
    raw = orjson.loads(sys.argv[1])
    plan = Plan(**{**raw, "think_s": tuple(raw["think_s"])})
    # A client holds a connection or two: room for all of them (the soft limit is often 1024).
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard if hard != resource.RLIM_INFINITY else 65536, hard))
    summary = asyncio.run(Load(plan).run())
    sys.stdout.write(orjson.dumps(summary).decode() + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
