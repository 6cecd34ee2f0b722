"""Which videos make a dataset, and with which labels.

Three input forms: a folder (class sub-folders become labels, as in UCF-101's layout; files directly in
the folder are unlabelled), a CSV `path,label` (header optional; relative paths are relative to the CSV),
or a text list of paths. Class names map to ids by sorted name unless a classes.json fixes them (so a
validation split gets the same ids as training).
"""

from __future__ import annotations

import csv
import json
import re
from dataclasses import dataclass
from pathlib import Path

from nbp_ds.errors import UsageError
from nbp_ds.video_io import VIDEO_SUFFIXES


@dataclass(frozen=True)
class VideoEntry:
    path: Path
    rel: str  # path relative to the dataset root: stable across machines, used for keys and manifests
    label_name: str | None


class ListingError(UsageError, ValueError):
    """The --videos argument or a classes file cannot be used; the message names it."""


@dataclass(frozen=True)
class Listing:
    """What a dataset source holds: its videos, and (for a folder) the files that are not videos, which are not
    taken but reported so that every file is accounted for."""

    videos: list[VideoEntry]
    not_videos: list[str]  # paths relative to the folder, sorted

    def not_video_records(self, task: int = 0, tasks: int = 1) -> list[dict]:
        """This array task's share of the files not taken, as failure records (reason ``not_a_video``)."""
        return [{"video": rel, "reason": "not_a_video",
                 "detail": f"{Path(rel).suffix or 'no extension'} is not a video file type "
                           f"({', '.join(VIDEO_SUFFIXES)})"} for rel in self.not_videos[task::tasks]]


def list_dataset(source: str | Path) -> Listing:
    """The videos of a folder, CSV or text list, sorted by relative path (the order every array task shares),
    and for a folder the other files in it (hidden files and its classes.json aside)."""
    source = Path(source)
    not_videos: list[str] = []
    if source.is_dir():
        entries = []
        for p in source.rglob("*"):
            rel = p.relative_to(source)
            if p.is_dir() or p.name.startswith(".") or rel.as_posix() == "classes.json":
                continue  # hidden: editors' and writers' temporaries; classes.json: the class ids, read apart
            # not only regular files: a named pipe, a device or a dangling link is listed too, as a video (its
            # decoding then fails or times out, and says so) or as not a video, so that no file goes unseen
            if p.suffix.lower() in VIDEO_SUFFIXES:
                entries.append(VideoEntry(p, rel.as_posix(), rel.parts[0] if len(rel.parts) > 1 else None))
            else:
                not_videos.append(rel.as_posix())
        if not entries:
            raise ListingError(f"--videos {source}: no video files ({', '.join(VIDEO_SUFFIXES)}) in the folder"
                               + (f"; it holds {len(not_videos)} other file(s), e.g. {sorted(not_videos)[0]}"
                                  if not_videos else ""))
    elif source.is_file() and source.suffix.lower() == ".csv":
        entries = _from_csv(source)
    elif source.is_file():
        entries = [_entry(source.parent, line.strip(), None)
                   for line in source.read_text().splitlines() if line.strip() and not line.startswith("#")]
    else:
        raise ListingError(f"--videos {source}: no such folder or file")
    entries.sort(key=lambda e: e.rel)
    seen: dict[str, str] = {}
    for e in entries:
        key = sample_key(e.rel, 0)
        if key in seen and seen[key] != e.rel:
            raise ListingError(f"videos {seen[key]} and {e.rel} map to the same sample key {key!r}; rename one")
        seen[key] = e.rel
    return Listing(entries, sorted(not_videos))


def _entry(root: Path, text: str, label: str | None) -> VideoEntry:
    path = Path(text) if Path(text).is_absolute() else root / text
    return VideoEntry(path, text if not Path(text).is_absolute() else path.as_posix().lstrip("/"), label)


def _from_csv(path: Path) -> list[VideoEntry]:
    rows = [r for r in csv.reader(path.read_text().splitlines()) if r and any(c.strip() for c in r)]
    if rows and rows[0][0].strip().lower() in ("path", "video", "file"):
        rows = rows[1:]
    entries = []
    for n, row in enumerate(rows, 1):
        if len(row) < 2 or not row[1].strip():
            raise ListingError(f"{path} row {n}: expected `path,label`, got {','.join(row)!r}")
        entries.append(_entry(path.parent, row[0].strip(), row[1].strip()))
    return entries


def class_ids(entries: list[VideoEntry], classes_file: str | Path | None) -> dict[str, int] | None:
    """{class name: id}: from classes_file when given, else sorted names (integer names keep their value)."""
    names = sorted({e.label_name for e in entries if e.label_name is not None})
    if not names:
        return None
    if classes_file is not None:
        try:
            mapping = {str(k): int(v) for k, v in json.loads(Path(classes_file).read_text()).items()}
        except (OSError, ValueError, AttributeError) as exc:
            raise ListingError(f"classes file {classes_file}: not a JSON object of name -> id ({exc})") from exc
        missing = [n for n in names if n not in mapping]
        if missing:
            raise ListingError(f"classes file {classes_file} has no id for class(es) {missing[:5]}")
        return mapping
    if all(re.fullmatch(r"\d+", n) for n in names):
        return {n: int(n) for n in names}
    return {n: i for i, n in enumerate(names)}


def sample_key(rel: str, clip: int) -> str:
    """A WebDataset key for a clip: no dots (WebDataset splits keys from extensions at the first dot)."""
    stem = rel.rsplit(".", 1)[0] if "." in Path(rel).name else rel
    return re.sub(r"[^A-Za-z0-9_\-]", "_", stem.replace("/", "__")) + f"__c{clip:02d}"
