"""Room for the connections the daemon admits: the open-file limit, raised if need be.

Each front end admits ``server.max_connections`` clients, one file descriptor each. Under a soft
limit below that, a flood fails ``accept()`` with EMFILE first (asyncio then stops accepting for a
second, well-behaved clients included) and worker spawns fail for want of pipes. So at start-up the
soft limit is raised as far as needed, never past the hard limit (systemd's default is 1024 soft,
524288 hard); if even the hard limit is short, a warning says so.
"""

from __future__ import annotations

import logging
import resource

log = logging.getLogger(__name__)

# Descriptors beyond client connections: workers' pipes, the reaper, Redis, files, listeners.
HEADROOM = 1024


def ensure_open_files(client_connections: int) -> int:
    """Raise the soft RLIMIT_NOFILE to fit ``client_connections`` plus `HEADROOM`; return the limit in force."""
    needed = client_connections + HEADROOM
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        soft = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    if soft != resource.RLIM_INFINITY and soft < needed:
        log.warning("the open-file limit (%d, hard) is below the %d the connection bounds need: lower "
                    "server.max_connections or raise LimitNOFILE=", soft, needed)
    return soft
