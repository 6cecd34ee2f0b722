"""A checkpoint's manifest: what its save wrote, checked before a resume trusts it.

``manifest.json`` in a tag folder lists every file the save wrote (its path in the folder, size and hash),
the step and the number of processes that saved it. It is written after every rank's part is on disk and
before ``latest`` may name the checkpoint, so a checkpoint without one never completed. A file that is
missing, has another size (truncated, a copy cut short) or another hash (flipped bytes) makes the
checkpoint damaged; files added later (the universal copy, its log) are not the save's and are not checked.

**The hash** is CRC-32 (:func:`zlib.crc32`, the standard library): it is made for exactly this job,
catching accidental damage (it detects every burst of up to 32 flipped bits and every odd number of flipped
bits; with the size checked too, a truncation always shows), it runs at about 2 GB/s on one core (SHA-256,
SHA-1, BLAKE2b and MD5 make 0.7-1.2 GB/s on the same machine) and needs no package a GPU image or an
offline install might lack. Spread over the ranks, one core each, the hashing outpaces the disk it reads
from, so it adds little to a save. (XXH3 would be 5x faster per core but is a dependency; a cryptographic
hash would guard against deliberate forgery, which a folder one can write to does not resist anyway.)

The work is spread over the ranks (:func:`shares`): each hashes about 1/world of the bytes, so saving or
checking a 3B model's 36 GB on 64 processes reads about 0.6 GB per process.
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path
from typing import Any

from nbp_ds.files import write_text_atomic

MANIFEST = "manifest.json"
HASH = "crc32"
FORMAT = 1
_CHUNK = 8 << 20


def hash_file(path: Path) -> str:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            crc = zlib.crc32(chunk, crc)
    return f"{crc:08x}"


def list_files(folder: Path) -> list[tuple[str, int]]:
    """(path relative to ``folder``, size) of every file under it but the manifest, in name order; hidden
    files (a temporary being written) are not the checkpoint's."""
    return [(str(p.relative_to(folder)), p.stat().st_size) for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != MANIFEST and not p.name.startswith(".")]


def shares(files: list[tuple[str, Any]], world: int, size_of=lambda item: item[1]) -> list[list[str]]:
    """``files`` split into ``world`` lists of names with about the same number of bytes each (largest
    first, each to the least loaded rank); the same on every rank given the same list."""
    loads, out = [0] * world, [[] for _ in range(world)]
    for item in sorted(files, key=lambda item: (-size_of(item), item[0])):
        rank = loads.index(min(loads))
        out[rank].append(item[0])
        loads[rank] += size_of(item)
    return out


def hash_files(folder: Path, names: list[str]) -> dict[str, dict[str, Any]]:
    """name -> {"size", HASH} for the files ``names`` in ``folder``."""
    return {name: {"size": (folder / name).stat().st_size, HASH: hash_file(folder / name)} for name in names}


def write_manifest(folder: Path, files: dict[str, dict[str, Any]], step: int, world_size: int) -> None:
    record = {"format": FORMAT, "step": step, "world_size": world_size, "hash": HASH,
              "files": dict(sorted(files.items()))}
    write_text_atomic(folder / MANIFEST, json.dumps(record, indent=1) + "\n")


def read_manifest(folder: Path) -> dict[str, Any] | None:
    """The manifest of a tag folder; None when it has none or it cannot be read."""
    try:
        record = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and isinstance(record.get("files"), dict) else None


def check_files(folder: Path, manifest: dict[str, Any], names: list[str]) -> list[str]:
    """What is wrong with the files ``names`` of ``folder`` against ``manifest`` (empty: all intact), each
    problem naming the file."""
    problems = []
    for name in names:
        want, path = manifest["files"][name], folder / name
        if not path.is_file():
            problems.append(f"{path} is missing")
        elif (size := path.stat().st_size) != want["size"]:
            problems.append(f"{path} has {size} bytes, the manifest {want['size']} (truncated or cut short)")
        elif hash_file(path) != want[HASH]:
            problems.append(f"{path} does not match its {HASH} hash in the manifest (its bytes changed)")
    return problems
