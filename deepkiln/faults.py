"""Fault injection for the kill tests, off unless DEEPKILN_KILL_ONCE names a marker file.

With the variable set and the marker absent, the first process to reach `kill_once()` creates the
marker and SIGKILLs itself; with the marker present (the default the tests set up) nothing happens.
`kill_at(step)` does the same at the named step of a process when DEEPKILN_KILL_AT names that step.
"""

from __future__ import annotations

import os
import signal


def kill_once() -> None:
    marker = os.environ.get("DEEPKILN_KILL_ONCE")
    if not marker:
        return
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return
    os.close(fd)
    os.kill(os.getpid(), signal.SIGKILL)


def kill_at(step: str) -> None:
    """kill_once() if DEEPKILN_KILL_AT is `step`: a kill test stops a process at one step of its work."""
    if os.environ.get("DEEPKILN_KILL_AT") == step:
        kill_once()
