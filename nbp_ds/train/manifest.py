"""A checkpoint's manifest: what its save wrote, checked before a resume trusts it.

``manifest.json`` in a tag folder lists every file the save wrote (its path in the folder, size and hash),
the step and the number of processes that saved it. It is written after every rank's part is on disk and
before ``latest`` may name the checkpoint, so a checkpoint without one never completed. A file that is
missing, has another size (truncated, a copy cut short) or another hash (flipped bytes) makes the
checkpoint damaged; files added later (the universal copy, its log) are not the save's and are not checked.

**The hash** is XXH3-128 (``xxhash``): about 10 GB/s on one core, against 0.7-1.2 GB/s for SHA-256,
SHA-1, BLAKE2b or MD5 and 2 GB/s for CRC-32 (measured in this repository's CI box), so reading the files
back from disk, not hashing, bounds the cost; its 128 bits make an undetected accidental change
(truncation, bit rot, a bad copy) as unlikely as with a cryptographic hash. It is not meant to detect a
deliberate forgery, which a checkpoint folder one can write to does not resist anyway.

The work is spread over the ranks (:func:`shares`): each hashes about 1/world of the bytes, so saving or
checking a 3B model's 36 GB on 64 processes reads about 0.6 GB per process.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import xxhash

MANIFEST = "manifest.json"
HASH = "xxh3_128"
FORMAT = 1
_CHUNK = 8 << 20


def hash_file(path: Path) -> str:
    digest = xxhash.xxh3_128()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


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
    from nbp_ds.files import write_text_atomic

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
