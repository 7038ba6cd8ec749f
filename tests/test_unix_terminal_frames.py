"""Exactly one terminal frame per accepted prompt on the socket (issue item 7), whatever else arrives on
the connection: invalid frames reusing its id, a second prompt with its id, cancels before and after
it finished, cancels of unknown ids, oversize frames, garbage lines, status frames.

The property test writes random frame sequences to one real socket of an in-process daemon on the
fake CLI and replays what comes back against the documented rules (see `claudepool.daemon.unix_api`).
"""

from __future__ import annotations

import asyncio
import itertools
from collections import Counter, deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import orjson
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from tests.daemon_fixtures import KEYS, RunningDaemon, make_daemon
from tests.helpers import until
from tests.test_unix_api import TERMINAL, Frame, connect, prompt

__all__ = ["make_daemon"]

MakeDaemon = Callable[..., Awaitable[RunningDaemon]]

MAX_FRAME_BYTES = 2048


def refusal_about(frame: Frame, frame_id: str) -> bool:
    """The answer to a frame refused because ``frame_id`` is a prompt in flight."""
    return (frame["id"] is None and frame["event"] == "error"
            and f"refused a frame with id {frame_id!r}, which a request in flight holds" in frame["message"])


# -- the reported sequence, and its relatives ------------------------------------------------------------


REUSING = {
    "invalid-prompt": {"id": "fl", "op": "prompt", "key": KEYS["acme"], "prompt": 5},
    "invalid-stream": {**prompt("fl", "x"), "stream": "yes"},
    "unknown-op": {"id": "fl", "op": "dance"},
    "second-prompt": prompt("fl", "[[reply:must not run]]"),
    "status": {"id": "fl", "op": "status", "key": KEYS["acme"]},
    "cancel-with-its-id": {"id": "fl", "op": "cancel", "target": "someone-else"},
    "oversize": orjson.dumps(prompt("fl", "o" * 3 * MAX_FRAME_BYTES)) + b"\n",
}


@pytest.mark.parametrize("reusing", list(REUSING.values()), ids=list(REUSING))
async def test_a_frame_reusing_an_id_in_flight_then_cancel_ends_it_with_one_terminal_frame(
    make_daemon: MakeDaemon, reusing: Frame | bytes
) -> None:
    """The report: a prompt ``fl`` in flight, an invalid frame reusing ``fl``, then a cancel: the client
    got two ``error`` frames and the ``result``. Now the reusing frame is answered with id null naming
    ``fl``, and ``fl`` ends once."""
    d = await make_daemon(server={"max_frame_bytes": MAX_FRAME_BYTES})
    async with connect(d) as c:
        # Long enough to be still in flight when the reusing frame lands, however loaded the machine
        # (it is cancelled, so the test does not wait for it).
        await c.send(prompt("fl", "[[sleep:8]] " + "a long answer " * 4, stream=True))
        assert (await c.read_until(lambda f: f["id"] == "fl"))["event"] == "delta"
        await c.send(reusing)
        refused = await c.read_until(lambda f: f["id"] != "fl")
        assert refusal_about(refused, "fl"), refused
        await c.send({"id": "c1", "op": "cancel", "target": "fl"})
        await c.until_terminals("fl")
        await c.barrier()
    grouped = c.by_id()
    fl = grouped["fl"]
    assert [(f["event"], f.get("code")) for f in fl if f["event"] in TERMINAL] == [("error", "cancelled")]
    assert fl[-1]["event"] == "error"
    assert grouped[None] == [refused]
    assert grouped["c1"] == [{"id": "c1", "event": "cancelled", "target": "fl", "found": True}]
    assert d.pool().stats.leases == 1  # the second prompt never ran


async def test_a_cancel_after_the_end_finds_nothing_and_adds_no_frame(make_daemon: MakeDaemon) -> None:
    d = await make_daemon()
    async with connect(d) as c:
        await c.send(prompt("r1", "[[reply:done]]"))
        await c.until_terminals("r1")
        await c.send({"id": "c1", "op": "cancel", "target": "r1"}, {"id": "c2", "op": "cancel", "target": "never"})
        await c.barrier()
    assert [(f["id"], f["event"], f.get("found")) for f in c.frames] == [
        ("r1", "result", None), ("c1", "cancelled", False), ("c2", "cancelled", False),
        ("barrier-1", "cancelled", False)]


# -- the property ------------------------------------------------------------------------------------


PROMPT_IDS = ("a", "b", "c")
OTHER_IDS = ("x", "y")
# Other frames mostly reuse prompt ids: reuse while in flight is what the rules are about.
ANY_ID = PROMPT_IDS + PROMPT_IDS + OTHER_IDS
# Terminal errors an accepted prompt of this test may end with; an immediate answer under a prompt id
# is a status, a cancelled, or one of IMMEDIATE_ERRORS (its own frame was invalid).
TERMINAL_ERRORS = frozenset({"unauthorized", "cancelled"})
IMMEDIATE_ERRORS = frozenset({"bad_request", "frame_too_large"})


@dataclass(frozen=True)
class Send:
    """One line the client writes, and what the replay needs to know about it."""

    raw: bytes
    kind: str  # prompt (answered later, or refused at once) | other (answered at once) | blank | pause
    frame_id: str | None = None  # the valid id an answer may be addressed to
    answer: str = ""  # for other: the answer's event, or "error:<code>"
    target: str | None = None  # for a cancel

    def __repr__(self) -> str:  # hypothesis prints failing examples with it
        return f"{self.kind}({self.raw[:90]!r})"


def line(obj: Frame) -> bytes:
    return orjson.dumps(obj) + b"\n"


prompt_sends = st.builds(
    lambda frame_id, text, stream, key: Send(
        line({"id": frame_id, "op": "prompt", "key": key, "prompt": text, "stream": stream}), "prompt", frame_id),
    st.sampled_from(PROMPT_IDS),
    st.sampled_from(["[[reply:quick]]", "[[sleep:0.15]] [[reply:a slower answer in pieces]]",
                     "[[sleep:0.05]] [[reply:" + "z" * 40 + "]]"]),
    st.booleans(),
    st.sampled_from([KEYS["acme"], KEYS["beta"], KEYS["acme"], "nobody-has-this-key"]),
)
invalid_sends = st.builds(
    lambda frame_id, frame: Send(line({"id": frame_id, **frame}), "other", frame_id, "error:bad_request"),
    st.sampled_from(ANY_ID),
    st.sampled_from([{"op": "prompt", "key": KEYS["acme"], "prompt": 5},
                     {"op": "prompt", "key": KEYS["acme"], "prompt": "p", "stream": "yes"},
                     {"op": "dance"}, {"op": "status"}, {"op": "cancel", "target": 7}]),
)
status_sends = st.builds(
    lambda frame_id: Send(line({"id": frame_id, "op": "status", "key": KEYS["beta"]}), "other", frame_id, "status"),
    st.sampled_from(ANY_ID))
cancel_sends = st.builds(
    lambda frame_id, target: Send(line({"id": frame_id, "op": "cancel", "target": target}), "other", frame_id,
                                  "cancelled", target),
    st.sampled_from(ANY_ID), st.sampled_from((*PROMPT_IDS, "never-sent")))
oversize_sends = st.builds(
    lambda frame_id, leading: Send(
        line({"id": frame_id, "op": "prompt", "key": KEYS["acme"], "prompt": "o" * 3 * MAX_FRAME_BYTES}) if leading
        else line({"op": "prompt", "id": frame_id, "prompt": "o" * 3 * MAX_FRAME_BYTES}),
        "other", frame_id if leading else None, "error:frame_too_large"),
    st.sampled_from(ANY_ID), st.booleans())
garbage_sends = st.sampled_from([Send(b"{not json\n", "other", None, "error:bad_request"),
                                 Send(b'["id", "a"]\n', "other", None, "error:bad_request"),
                                 Send(b'{"id": 5, "op": "status"}\n', "other", None, "error:bad_request"),
                                 Send(b" \t\n", "blank")])
pauses = st.sampled_from([Send(b"", "pause", answer="0.02"), Send(b"", "pause", answer="0.2")])
sequences = st.lists(st.one_of(prompt_sends, prompt_sends, prompt_sends, invalid_sends, invalid_sends, status_sends,
                               cancel_sends, cancel_sends, oversize_sends, garbage_sends, pauses),
                     min_size=1, max_size=16)


class Replay:
    """Replays the frames read against the frames written, under the documented rules.

    The daemon handles frames one at a time in the order written, and writes every frame to one
    stream, so the order read is the order things happened: a prompt's terminal frame read before
    another frame's answer was written before that frame was handled, when the id was free again.
    Every frame but an accepted prompt gets an answer at once, in order; a prompt is always followed
    by a barrier (a cancel of nothing), so whether it was accepted is known by the barrier's answer."""

    def __init__(self, sends: list[Send]) -> None:
        self.pending = deque(s for s in sends if s.kind in ("prompt", "other"))
        self.open: set[str] = set()  # accepted prompts without their terminal frame yet
        self.accepted: Counter[str] = Counter()
        self.terminals: Counter[str] = Counter()
        self.violations: list[str] = []
        self.seen: set[str] = set()  # what happened, for the statistics (--hypothesis-show-statistics)

    def feed(self, frame: Frame) -> None:
        frame_id, event = frame.get("id"), frame["event"]
        immediate = event in ("status", "cancelled") or (event == "error" and frame["code"] in IMMEDIATE_ERRORS)
        if frame_id in PROMPT_IDS and not immediate:
            self._episode(frame_id, frame)
        else:
            self._answer(frame)

    def _episode(self, frame_id: str, frame: Frame) -> None:
        if frame_id not in self.open:
            # Its prompt may have been accepted just now, with its barrier not yet answered.
            if self.pending and self.pending[0].kind == "prompt" and self.pending[0].frame_id == frame_id:
                self._accept(self.pending.popleft())
            else:
                self.violations.append(f"{frame} with no prompt {frame_id!r} in flight")
                return
        if frame["event"] == "error" and frame["code"] not in TERMINAL_ERRORS:
            self.violations.append(f"unexpected terminal error {frame}")
        if frame["event"] in TERMINAL:
            self.open.discard(frame_id)
            self.terminals[frame_id] += 1

    def _answer(self, frame: Frame) -> None:
        while self.pending:
            sent = self.pending.popleft()
            if sent.kind == "prompt":
                assert sent.frame_id is not None
                if refusal_about(frame, sent.frame_id):
                    self.seen.add("a prompt refused: its id was in flight")
                    if sent.frame_id not in self.open:
                        self.violations.append(f"{sent!r} refused but its id was free")
                    return
                self._accept(sent)  # accepted in silence; the next pending frame has this answer
                continue
            if sent.frame_id is not None and sent.frame_id in self.open:
                self.seen.add(f"{sent.answer} frame refused: its id was in flight")
                if not refusal_about(frame, sent.frame_id):
                    self.violations.append(f"{sent!r} reuses {sent.frame_id!r} in flight, answered {frame}")
                return
            event, _, code = sent.answer.partition(":")
            if (frame["id"], frame["event"], frame.get("code", "")) != (sent.frame_id, event, code):
                self.violations.append(f"{sent!r} answered {frame}, expected {sent.answer} under {sent.frame_id!r}")
            if frame.get("found"):
                self.seen.add("a cancel found its target")
            if sent.target is not None and frame.get("found") and sent.target not in self.open:
                self.violations.append(f"{sent!r} found {sent.target!r}, which was not in flight")
            return
        self.violations.append(f"{frame} answers nothing that was sent")

    def _accept(self, sent: Send) -> None:
        assert sent.frame_id is not None
        if sent.frame_id in self.open:
            self.violations.append(f"{sent!r} accepted while {sent.frame_id!r} was in flight")
        self.open.add(sent.frame_id)
        self.accepted[sent.frame_id] += 1


@pytest.fixture
async def shared_daemon(make_daemon: MakeDaemon) -> RunningDaemon:
    """One daemon for every example: starting one per example would dominate the test's time."""
    return await make_daemon(server={"max_frame_bytes": MAX_FRAME_BYTES}, pool={"max_workers": 3, "min_idle": 2})


_barriers = itertools.count(1)


def with_barriers(sends: list[Send]) -> list[Send]:
    out: list[Send] = []
    for sent in sends:
        out.append(sent)
        if sent.kind == "prompt":
            barrier = f"bar-{next(_barriers)}"
            out.append(Send(line({"id": barrier, "op": "cancel", "target": "no-such"}), "other", barrier,
                            "cancelled"))
    return out


async def run_sequence(d: RunningDaemon, sends: list[Send]) -> Replay:
    final = f"bar-{next(_barriers)}"
    sends = [*with_barriers(sends), Send(line({"id": final, "op": "cancel", "target": "no-such"}), "other", final,
                                         "cancelled")]
    replay = Replay(sends)
    async with connect(d) as c:

        async def read() -> None:
            final_seen = False
            while not final_seen or replay.open or replay.pending:
                frame = await c.next(timeout_s=20)
                final_seen = final_seen or frame.get("id") == final
                replay.feed(frame)

        reader = asyncio.create_task(read())
        try:
            for sent in sends:
                if sent.kind == "pause":
                    await asyncio.sleep(float(sent.answer))
                else:
                    await c.send(sent.raw)
            async with asyncio.timeout(30):
                await reader
        finally:
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)
        # Nothing more may come for anyone: one more round trip brings back its own answer only.
        seen = len(c.frames)
        await c.barrier()
        assert len(c.frames) == seen + 1, c.frames[seen:]
    return replay


@settings(max_examples=50, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(sends=sequences)
async def test_random_frame_sequences_end_every_accepted_prompt_exactly_once(
    shared_daemon: RunningDaemon, sends: list[Send]
) -> None:
    replay = await run_sequence(shared_daemon, sends)
    assert not replay.violations, replay.violations
    assert not replay.pending and not replay.open
    assert replay.terminals == replay.accepted
    for what in sorted(replay.seen):
        event(what)
    # Closing the connection ended everything; the next example starts from a quiet daemon.
    await until(lambda: shared_daemon.daemon.service.in_flight == 0, 10)


async def test_the_replay_catches_two_terminal_frames_and_an_answer_under_an_id_in_flight() -> None:
    """The checker itself: what the daemon answered before this fix must be a violation."""
    sends = with_barriers([Send(b"", "prompt", "a")])
    barrier = sends[1].frame_id
    invalid = Send(b"", "other", "a", "error:bad_request")
    replay = Replay([*sends, invalid])
    replay.feed({"id": barrier, "event": "cancelled", "target": "no-such", "found": False})
    replay.feed({"id": "a", "event": "error", "code": "bad_request", "message": "invalid request: prompt: …"})
    replay.feed({"id": "a", "event": "result", "text": "done"})
    replay.feed({"id": "a", "event": "error", "code": "cancelled", "message": "cancelled by the client"})
    assert len(replay.violations) == 2, replay.violations
    assert "reuses 'a' in flight" in replay.violations[0]
    assert "with no prompt 'a' in flight" in replay.violations[1]
