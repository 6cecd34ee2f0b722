"""Which share of a dataset an array task tokenizes, decided from what stays true when a task is rerun.

Slurm describes an array submission, not the dataset's split: a rerun of one failed task (`sbatch --array=7`)
is a new array of one task, with SLURM_ARRAY_TASK_COUNT=1 and the bounds 7..7. So the number of shards comes,
in this order, from --num-shards, from NBP_NUM_SHARDS, from the split the output folder already holds
(``split.json``, written by the first task that ran into it), and only for a first run from the array's bounds
(SLURM_ARRAY_TASK_MAX - SLURM_ARRAY_TASK_MIN + 1). A task's shard index is its array task id modulo that
number: a 0-based array 0..n-1 and a 1-based one 1..n both cover 0..n-1 once (task n of a 1-based array
writes shard index 0), and a rerun task id lands on the share its first run had.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from nbp_ds.errors import UsageError
from nbp_ds.files import write_text_atomic

SPLIT_FILE = "split.json"
NUM_SHARDS_VARIABLE = "NBP_NUM_SHARDS"


@dataclass(frozen=True)
class TaskSplit:
    """This task's share: shard ``index`` of ``count``, and where the count came from (for the log)."""

    index: int
    count: int
    source: str


def _positive_int(value: str, name: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise UsageError(f"{name}={value!r} is not a whole number") from None
    if number < 1:
        raise UsageError(f"{name}={value!r} must be >= 1")
    return number


def array_span(env: Mapping[str, str]) -> int | None:
    """How many task ids the array submission spans (its bounds), None outside an array job."""
    if "SLURM_ARRAY_TASK_ID" not in env:
        return None
    if "SLURM_ARRAY_TASK_MIN" in env and "SLURM_ARRAY_TASK_MAX" in env:
        low = int(env["SLURM_ARRAY_TASK_MIN"])
        high = int(env["SLURM_ARRAY_TASK_MAX"])
        step = int(env.get("SLURM_ARRAY_TASK_STEP", "1") or 1)
        if step != 1:
            raise UsageError(f"an array with a step ({low}-{high}:{step}) leaves task ids out: submit a plain "
                             f"range such as --array=0-{high - low} (or set {NUM_SHARDS_VARIABLE})")
        return high - low + 1
    return int(env.get("SLURM_ARRAY_TASK_COUNT", "1"))


def recorded_split(out: str | Path) -> int | None:
    """The number of shards the output folder was split into by an earlier task, None for a new folder."""
    path = Path(out) / SPLIT_FILE
    if not path.is_file():
        return None
    try:
        return int(json.loads(path.read_text())["num_shards"])
    except (ValueError, KeyError, TypeError) as exc:
        raise UsageError(f"{path} is not a split record ({{\"num_shards\": N}}): {exc}") from None


def resolve_split(out: str | Path, env: Mapping[str, str], num_shards: int | None = None,
                  shard_index: int | None = None) -> TaskSplit:
    """This task's share of the dataset tokenized into ``out`` (see the module docstring); explicit
    ``num_shards`` / ``shard_index`` (the command's flags) win over the environment."""
    recorded = recorded_split(out)
    if num_shards is not None:
        count, source = num_shards, "--num-shards"
    elif env.get(NUM_SHARDS_VARIABLE):
        count, source = _positive_int(env[NUM_SHARDS_VARIABLE], NUM_SHARDS_VARIABLE), NUM_SHARDS_VARIABLE
    elif recorded is not None:
        span = array_span(env)
        if span is not None and span > recorded:
            raise UsageError(f"this array spans {span} task ids, but {Path(out) / SPLIT_FILE} says the folder was "
                             f"split into {recorded} shards by an earlier run: rerun tasks of that split, or "
                             "tokenize into a new folder")
        count, source = recorded, f"{Path(out) / SPLIT_FILE}"
    else:
        span = array_span(env)
        count, source = (span, "the array's bounds") if span is not None else (1, "no array job")
    if recorded is not None and count != recorded:
        raise UsageError(f"{source} says {count} shards, but {Path(out) / SPLIT_FILE} says the folder was split "
                         f"into {recorded} by an earlier run: the shares would overlap; use {recorded}, or a new "
                         "folder")
    if shard_index is not None:
        index = shard_index
    elif "SLURM_ARRAY_TASK_ID" in env:
        index = int(env["SLURM_ARRAY_TASK_ID"]) % count
    else:
        index = 0
    if not 0 <= index < count:
        raise UsageError(f"--shard-index {index} is outside 0..{count - 1} ({count} shards from {source})")
    return TaskSplit(index=index, count=count, source=source)


def record_split(out: str | Path, count: int) -> None:
    """Write the folder's split the first time a task runs into it; refuse another split later (its shares
    would overlap the ones already written). Tasks starting together write the same record."""
    recorded = recorded_split(out)
    if recorded is None:
        write_text_atomic(Path(out) / SPLIT_FILE, json.dumps({"num_shards": count}) + "\n")
    elif recorded != count:
        raise UsageError(f"{Path(out) / SPLIT_FILE} says the folder was split into {recorded} shards; this run "
                         f"asks for {count}: the shares would overlap; use {recorded}, or a new folder")
