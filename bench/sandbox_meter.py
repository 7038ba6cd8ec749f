"""Wall time and CPU of one sandboxed spawn, whole process tree included (for `bench.sandbox_eval`).

A parent's ``RUSAGE_CHILDREN`` misses a bwrap sandbox with its own PID namespace: the outer bwrap
exits without reaping the namespace's init, which is reparented away with the CPU of everything
inside. This meter makes itself a child subreaper, so those orphans come back to it, reaps every
descendant, and prints ``{"ready_ms": …, "cpu_ms": …}`` as JSON. With ``--initialize`` it writes
the CLI's ``initialize`` request and times the answer (then closes stdin); else it times the exit.

    python -m bench.sandbox_meter [--initialize] -- ARGV...
"""

from __future__ import annotations

import ctypes
import json
import os
import resource
import subprocess
import sys
import time

from claudepool.protocol.cli_events import encode_control_request

PR_SET_CHILD_SUBREAPER = 36
INITIALIZE = encode_control_request("init-1", "initialize")


def main() -> None:
    args = sys.argv[1:]
    initialize = args[0] == "--initialize"
    argv = args[args.index("--") + 1:]
    if ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise SystemExit("prctl(PR_SET_CHILD_SUBREAPER) failed")
    t0 = time.perf_counter()
    if initialize:
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(INITIALIZE)
        proc.stdin.flush()
        while b'"init-1"' not in (line := proc.stdout.readline()):
            if not line:
                raise SystemExit("the CLI exited before it was ready")
        ready_s = time.perf_counter() - t0
        print(json.dumps({"pid": proc.pid}), flush=True)  # the caller measures memory now
        sys.stdin.readline()  # until it has
        proc.stdin.close()
    else:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL)
        proc.wait()
        ready_s = time.perf_counter() - t0
    while True:  # every descendant, the orphaned ones included
        try:
            os.wait()
        except ChildProcessError:
            break
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    print(json.dumps({"ready_ms": ready_s * 1000, "cpu_ms": (usage.ru_utime + usage.ru_stime) * 1000}))


if __name__ == "__main__":
    main()
