"""Reading the process table from /proc: whether a process still runs, and whose children are whose."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")


GONE = ("Z", "X")  # state letters of a process that runs nothing: a zombie nobody reaped yet, one marked dead


def _stat(pid: int | str) -> list[str] | None:
    """The fields of /proc/PID/stat after the command name (state, ppid, ...); None once it is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):  # gone, or gone while being read
        return None


def state(pid: int) -> str | None:
    """The state letter of a process (R, S, Z, ...); None once it is gone."""
    fields = _stat(pid)
    return fields[0] if fields else None


def alive(pid: int) -> bool:
    """Running: neither gone nor in a GONE state."""
    return state(pid) not in (None, *GONE)


def children_of(pid: int) -> list[int]:
    """The running processes whose parent is ``pid``."""
    found = []
    for entry in Path("/proc").glob("[0-9]*"):
        fields = _stat(entry.name)
        if fields is not None and fields[0] not in GONE and int(fields[1]) == pid:
            found.append(int(entry.name))
    return found


def wait_for(predicate: Callable[[], T], seconds: float, what: str) -> T:
    """``predicate()``'s first truthy value, polled every 0.1 s; fails naming ``what`` after ``seconds``."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"waited {seconds} s for {what}")
