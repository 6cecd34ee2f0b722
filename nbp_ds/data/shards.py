"""Where token shards live and how one is read.

Shards are addressed the WebDataset way: local paths (a folder, a brace pattern, a glob, a file),
``::``-joined lists, ``pipe:COMMAND`` (its standard output is the tar; ``pipe:aws s3 cp s3://b/x.tar -``,
``pipe:gsutil cat gs://b/x.tar``) and the URLs ``webdataset.gopen`` opens itself (``http(s)://``, through
``curl``; ``gs://``, ...). Brace patterns expand in all of them. Only local specs can be checked before
reading; a remote shard that cannot be read shows when it is read.

A shard is opened with ``webdataset.gopen`` and its members come from webdataset's
``tar_file_iterator``; :func:`read_shard` groups them into samples (WebDataset's convention: the member
name up to the first dot of its file name is the key), numbers them (the *ordinal*: the sample's place in
the shard) and survives failures: a shard that cannot be opened or breaks mid-stream is read again from
its start, up to ``retries`` more times with a doubling pause, skipping the samples already yielded, so
a retry neither repeats nor drops one; then it is given up, counted (``failed_shards``) and named.
(``curl``, which webdataset reads http(s) with, first retries transient HTTP errors itself.)

Starting inside a shard (a resumed stream) seeks: a local uncompressed tar is indexed once (its member
headers only) and opened at the sample's byte offset; any other shard is read from its start and the
samples before the offset are passed over without being decoded.
"""

from __future__ import annotations

import glob
import logging
import lzma
import os
import re
import tarfile
import time
import zlib
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import braceexpand
from webdataset.gopen import Pipe, gopen, gopen_schemes
from webdataset.tariterators import meta_prefix, meta_suffix, tar_file_iterator

from nbp_ds.data.report import DataReport

log = logging.getLogger(__name__)

# members webdataset's tar iterator passes over (given to it explicitly, so the index below agrees with it)
SKIP_META = r"__[^/]*__($|/)"
# what a broken shard raises: a pipe's exit status and I/O errors (OSError, as gzip and bz2 do), tarfile's,
# zlib's and lzma's errors, and webdataset's ValueErrors
READ_ERRORS = (OSError, EOFError, ValueError, tarfile.TarError, zlib.error, lzma.LZMAError)


# ---- addresses -------------------------------------------------------------------------------------
def scheme_of(url: str) -> str:
    """``pipe``, ``http``, ... or ``""`` for a local path (``file://`` URLs included)."""
    scheme = urlparse(url).scheme
    return "" if scheme == "file" or len(scheme) == 1 else scheme  # a one-letter scheme is a drive, not a URL


def is_local(url: str) -> bool:
    return scheme_of(url) == ""


def local_path(url: str) -> str:
    return re.sub(r"^file://?", "", url) if url.startswith("file:") else url


def expand_shards(spec: str | list | tuple) -> list[str]:
    """Shard addresses: a folder (its *.tar files, sorted), a brace pattern, a glob, a file, a URL or
    ``pipe:`` command (brace patterns expanded), ``a::b``, or a list of those. Local shards must exist
    (FileNotFoundError names what is missing); remote ones are taken as given."""
    if spec is None or spec == "" or spec == [] or spec == ():
        raise FileNotFoundError("no shards given (set data.train / data.val to a folder, pattern, URL or list)")
    if isinstance(spec, (list, tuple)):
        return [url for item in spec for url in expand_shards(item)]
    spec = str(spec)
    if "::" in spec:
        return [url for part in spec.split("::") if part for url in expand_shards(part)]
    scheme = scheme_of(spec)
    if scheme:
        if scheme != "pipe" and scheme not in gopen_schemes:
            raise FileNotFoundError(f"shard {spec!r}: webdataset cannot open {scheme}:// URLs (it opens "
                                    f"{', '.join(sorted(k for k in gopen_schemes if k != '__default__'))}); "
                                    f"use pipe:COMMAND, a command that writes the tar to its standard output")
        return list(braceexpand.braceexpand(spec))
    path = local_path(spec)
    if os.path.isdir(path):
        found = sorted(str(p) for p in Path(path).glob("*.tar") if not p.name.startswith("."))  # not temporaries
        if not found:
            raise FileNotFoundError(f"shard folder {path!r} holds no .tar files")
        return found
    if "{" in path:
        paths = list(braceexpand.braceexpand(path))
        missing = [p for p in paths if not os.path.isfile(p)]
        if missing:
            raise FileNotFoundError(f"shard pattern {spec!r}: {len(missing)} of {len(paths)} files missing, "
                                    f"first {missing[0]!r}")
        return paths
    if any(ch in path for ch in "*?["):
        found = sorted(glob.glob(path))
        if not found:
            raise FileNotFoundError(f"shard pattern {spec!r} matches no file")
        return found
    if not os.path.isfile(path):
        raise FileNotFoundError(f"shard {spec!r} does not exist")
    return [path]


# ---- members -> samples ----------------------------------------------------------------------------
def member_key(name: str) -> tuple[str, str] | None:
    """(sample key, extension) of a member name: the key is the folder plus the file name up to its first
    dot; None for a name without an extension (not part of a sample)."""
    folder, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    if not dot:
        return None
    return (f"{folder}/{stem}" if folder else stem), ext


def _is_meta(name: str) -> bool:
    """Members webdataset's tar iterator skips (``__name__`` files and folders)."""
    top_meta = "/" not in name and name.startswith(meta_prefix) and name.endswith(meta_suffix)
    return top_meta or re.match(SKIP_META, name) is not None


@dataclass(frozen=True)
class RetryPolicy:
    """How a shard that fails is retried: ``retries`` more attempts, the first after ``backoff`` seconds,
    each later one after twice the previous pause (at most ``max_backoff``)."""

    retries: int = 3
    backoff: float = 1.0
    max_backoff: float = 30.0

    def pause(self, attempt: int) -> float:
        return min(self.backoff * 2**attempt, self.max_backoff)


def read_shard(url: str, start: int = 0, *, policy: RetryPolicy, report: DataReport) -> Iterator[tuple[int, dict]]:
    """``(ordinal, sample)`` for every sample of shard ``url`` from ordinal ``start`` on, in stored order.
    A sample is ``{"__key__", "__shard__", ext: bytes, ...}``. Failures are retried from the shard's start
    (see the module docstring); a shard given up ends early, counted as ``failed_shards``. A retry that
    brought new samples resets the count, so a long shard on a flaky link is not given up while it
    progresses."""
    next_ordinal, failures = start, 0
    while True:
        progressed = False
        try:
            for ordinal, sample in _read_once(url, next_ordinal):
                next_ordinal, progressed = ordinal + 1, True
                yield ordinal, sample
            return
        except READ_ERRORS as exc:
            failures = 1 if progressed else failures + 1
            if failures > policy.retries:
                report.problem("failed_shards", f"{url}: gave up after {failures} failed attempt(s) at sample "
                                                f"{next_ordinal}: {_describe(exc)}", place=url)
                return
            report.counts["shard_retries"] += 1
            pause = policy.pause(failures - 1)
            log.warning("shard %s failed at sample %d (%s); retry %d of %d in %.1f s", url, next_ordinal,
                        _describe(exc), failures, policy.retries, pause)
            time.sleep(pause)


def read_samples_at(url: str, ordinals: Iterable[int], *, policy: RetryPolicy,
                    report: DataReport) -> dict[int, dict]:
    """The samples of shard ``url`` at these ordinals (to fill a shuffle buffer again): consecutive runs
    are read from where they start (a seek on a local tar); those that cannot be read are missing."""
    wanted = sorted(set(ordinals))
    found: dict[int, dict] = {}
    runs: list[list[int]] = []
    for ordinal in wanted:
        if runs and ordinal == runs[-1][-1] + 1:
            runs[-1].append(ordinal)
        else:
            runs.append([ordinal])
    if not (is_local(url) and sample_offsets(local_path(url)) is not None):
        runs = [wanted] if wanted else []  # a stream: one pass from the first wanted sample to the last
    for run in runs:
        keep, last = set(run), run[-1]
        for ordinal, sample in read_shard(url, run[0], policy=policy, report=report):
            if ordinal in keep:
                found[ordinal] = sample
            if ordinal >= last:
                break
    return found


def _read_once(url: str, start: int) -> Iterator[tuple[int, dict]]:
    """One attempt: samples from ``start`` on; raises what the stream raises. The last sample is yielded
    only after the stream's exit status was checked: a download cut at a member boundary looks like a
    complete tar to tarfile, and that sample may lack members."""
    stream, ordinal = _open_at(url, start)
    if stream is None:
        return
    finished = False
    try:
        current: dict | None = None
        for member in tar_file_iterator(stream, skip_meta=SKIP_META):
            parsed = member_key(member["fname"])
            if parsed is None:
                continue
            key, ext = parsed
            if current is None or current["__key__"] != key:
                if current is not None:
                    if ordinal >= start:
                        yield ordinal, current
                    ordinal += 1
                current = {"__key__": key, "__shard__": url}
            current[ext] = member["data"]
        finished = True
    finally:
        _close(stream, check=finished)
    if current is not None and ordinal >= start:
        yield ordinal, current


def _open_at(url: str, start: int):
    """(stream, ordinal of its first sample): a local uncompressed tar opened at sample ``start``, anything
    else at its beginning; (None, start) when a local tar has no sample ``start``."""
    if start > 0 and is_local(url):
        offsets = sample_offsets(local_path(url))
        if offsets is not None:
            if start >= len(offsets):
                return None, start
            stream = gopen(url, "rb")
            stream.seek(offsets[start])
            return stream, start
    stream = gopen(url, "rb")
    return (PipeReader(stream) if isinstance(stream, Pipe) else stream), 0


class PipeReader:
    """A command's output (``pipe:``, and the http(s) URLs webdataset reads through curl), read to its end
    before the command's exit status counts. webdataset's Pipe checks the status after every read and drops
    the bytes of the read that sees a failure, so a download cut after a few samples yielded none of them
    whenever the command had already exited at the first read (small shards, fast networks). Here every
    byte the command wrote is read, and a non-zero exit raises at the end of its output."""

    def __init__(self, pipe: Pipe):
        self.pipe = pipe

    def read(self, size: int = -1) -> bytes:
        data = self.pipe.stream.read(size)
        if not data and size != 0:
            self.pipe.wait_for_child()  # raises OSError naming the command and its status when it failed
        return data

    def close(self, check: bool = True) -> None:
        """Close; ``check``: a non-zero exit status raises. Unchecked (the stream was left early), the
        command is stopped and its status ignored (it may complain about the closed pipe)."""
        if check:
            self.pipe.close()
            return
        if self.pipe.proc.poll() is None:
            self.pipe.proc.kill()
        try:
            self.pipe.close()
        except OSError:
            pass


def _close(stream, check: bool) -> None:
    """Close a shard's stream; read to its end (``check``), a pipe's non-zero exit status raises."""
    if isinstance(stream, PipeReader):
        stream.close(check)
    else:
        stream.close()


def _describe(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}"
    return text if len(text) <= 300 else text[:297] + "..."


# ---- seeking inside local tars -----------------------------------------------------------------------
_OFFSETS: OrderedDict[tuple[str, int, int], list[int] | None] = OrderedDict()
_OFFSETS_KEPT = 64


def sample_offsets(path: str) -> list[int] | None:
    """Byte offset of each sample's first member header in a local uncompressed tar (read from the member
    headers, not the data; cached per process); None for a compressed, unreadable or truncated file, which
    is then read from its start instead."""
    try:
        stat = os.stat(path)
    except OSError:
        return None
    cache_key = (path, stat.st_mtime_ns, stat.st_size)
    if cache_key in _OFFSETS:
        _OFFSETS.move_to_end(cache_key)
        return _OFFSETS[cache_key]
    offsets: list[int] | None = []
    try:
        with tarfile.open(path, mode="r:") as tar:  # random access: headers are read, data is seeked over
            last_key = None
            for member in tar:
                if not member.isreg() or _is_meta(member.name):
                    continue
                parsed = member_key(member.name)
                if parsed is None:
                    continue
                if parsed[0] != last_key:
                    offsets.append(member.offset)
                    last_key = parsed[0]
    except READ_ERRORS:
        offsets = None
    _OFFSETS[cache_key] = offsets
    while len(_OFFSETS) > _OFFSETS_KEPT:
        _OFFSETS.popitem(last=False)
    return offsets
