"""A process that hosts a pool, for tests that kill it with SIGKILL and look for survivors.

It warms three workers, gives one of them a tool subprocess (fake CLI only), leaves one mid-turn,
prints every pid it created as one JSON line, and waits to be killed.

``--unprotected`` turns off both orphan protections (PR_SET_PDEATHSIG, set by the ``setpriv`` exec
wrapper, and the reaper helper) so a test can show that its check would catch orphans.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

import orjson

from claudepool.pool import process as process_module
from claudepool.pool import reaper as reaper_module
from claudepool.pool.config import PoolConfig
from claudepool.pool.pool import Pool
from claudepool.pool.profile import Profile
from claudepool.pool.worker import TurnResult


class _NoReaper(reaper_module.Reaper):
    def register(self, pgid: int) -> None:
        pass

    def unregister(self, pgid: int) -> None:
        pass


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--claude", required=True)
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--env", action="append", default=[])
    parser.add_argument("--child", action="store_true", help="ask the fake CLI for a grandchild process")
    parser.add_argument("--stall-prompt", default="[[hang]]")
    parser.add_argument("--unprotected", action="store_true", help="no PDEATHSIG and no reaper")
    parser.add_argument("--no-reaper", action="store_true", help="PDEATHSIG only")
    args = parser.parse_args()

    reaper: reaper_module.Reaper | None = None
    if args.unprotected:
        # Workers start without the setpriv wrapper, as where util-linux is missing.
        process_module.pdeathsig_argv = lambda: ()  # type: ignore[assignment]
    if args.unprotected or args.no_reaper:
        reaper = _NoReaper()
    env = dict(item.split("=", 1) for item in args.env)
    profile = Profile(name="host", claude_bin=args.claude, env=env, upstream_max_retries=0)
    config = PoolConfig(min_idle=3, max_workers=3, workdir=Path(args.workdir))
    pool = Pool(profile, config, reaper=reaper)
    await pool.start()
    await pool.wait_ready(60)

    grandchildren: list[int] = []
    if args.child:
        async with pool.lease("host") as lease:
            async for item in lease.run_turn("[[child]]"):
                if isinstance(item, TurnResult):
                    grandchildren.append(int(item.text.split()[1]))
    busy = await pool.acquire("host")
    turn = busy.run_turn(args.stall_prompt)
    await anext(turn)  # the turn is under way

    helper = reaper.helper_pid if reaper is not None else reaper_module.default_reaper().helper_pid
    workers = [w.pid for w in pool.workers()]
    sys.stdout.write(orjson.dumps({"workers": workers, "grandchildren": grandchildren,
                                   "busy": busy.worker.pid, "helper": helper}).decode() + "\n")
    sys.stdout.flush()
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main())
