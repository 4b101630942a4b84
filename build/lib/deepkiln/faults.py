"""Fault injection for the kill tests, off unless DEEPKILN_KILL_ONCE names a marker file.

With the variable set and the marker absent, the first process to reach `kill_once()` creates the
marker and SIGKILLs itself; with the marker present (the default the tests set up) nothing happens.
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
