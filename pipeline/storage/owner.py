"""The process that runs a local job, and whether it is still alive.

`moe-pipeline run` records its host, pid and start time on its job, then beats every
`HEARTBEAT_S` seconds (`ledger.beat_job`). A job still ``running`` is *interrupted* when its
process is gone: on the same host, the pid no longer exists or now belongs to a process that
started at another time (pids are reused); on another host, where we cannot look at its
processes, when its heartbeat is older than `STALE_S`.

The start time is the 22nd field of ``/proc/PID/stat`` (clock ticks since boot): exact, and
compared as a string, so two processes with the same pid never look alike. Without /proc
(not Linux) it is unknown and the pid alone decides on the same host.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

HEARTBEAT_S = 5.0
# Silent this long, a job on another host is taken for dead: many beats missed, so a busy
# machine or a slow database does not make a live job look interrupted.
STALE_S = 60.0


def process_start(pid: int) -> str | None:
    """When process ``pid`` started (clock ticks since boot), or None if it does not exist
    or /proc is not there."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    # The command name (field 2) is in parentheses and may hold spaces or parentheses
    # itself: the fields after it are counted from the last ')'.
    fields = stat[stat.rindex(b")") + 2:].split()
    if fields[0] in (b"Z", b"X"):  # dead, only not yet reaped by its parent
        return None
    return fields[19].decode()


@dataclass(frozen=True)
class Owner:
    host: str
    pid: int
    start: str | None

    @classmethod
    def me(cls) -> Owner:
        return cls(socket.gethostname(), os.getpid(), process_start(os.getpid()))


def _pid_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: it exists
        return True
    return True


def is_gone(owner: Owner, heartbeat_at: float | None, now: float,
            host: str | None = None) -> bool:
    """Whether ``owner``'s process is gone (see the module's docstring); ``host``: the host
    this runs on (default: this one)."""
    if owner.host != (host or socket.gethostname()):
        return heartbeat_at is None or now - heartbeat_at > STALE_S
    if owner.start is not None and os.path.isdir("/proc"):
        return process_start(owner.pid) != owner.start
    return not _pid_exists(owner.pid)


def interrupted(job, now: float) -> bool:  # a `sql.Job` row
    """Whether a job still recorded as ``running`` by a local process lost that process."""
    if job.status != "running" or job.owner_pid is None:
        return False
    return is_gone(Owner(job.owner_host, job.owner_pid, job.owner_start), job.heartbeat_at,
                   now)


def shown_status(job, now: float) -> str:  # a `sql.Job` row
    """A job's status as a user should read it: a local job whose process is gone is
    ``interrupted``, not ``running``."""
    return "interrupted" if interrupted(job, now) else job.status
