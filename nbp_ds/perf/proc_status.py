"""Memory figures of a running process from the kernel (Linux ``/proc/PID/status``), for the benchmarks."""

from __future__ import annotations

from pathlib import Path


def status_bytes(field: str, pid: int | str = "self") -> int:
    """A memory figure of /proc/PID/status (VmRSS, VmHWM, ...), in bytes."""
    path = Path(f"/proc/{pid}/status")
    for line in path.read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise OSError(f"{path} has no {field}")
