"""The end-of-run summary: ``summary.json`` in the run folder and a table in the log.

What a run did, over all its starts: steps, samples, tokens, wall time, mean tokens/s and MFU, the final and
best validation loss, restarts, skipped steps and failed shards. The running totals live in a
:class:`RunTally` that every checkpoint saves, so a run stopped and requeued any number of times ends with the
summary of a run that went straight through, except the figures of time (wall time, tokens/s, MFU: time spent
after an attempt's last checkpoint is lost with that attempt) and ``restarts``.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nbp_ds.files import write_text_atomic
from nbp_ds.runtime.metrics import format_duration, mfu

SUMMARY_FILE = "summary.json"
# figures that depend on the clock or on the number of starts: not equal between a straight and a requeued run
TIME_AND_STARTS = ("wall_time_s", "tokens_per_s", "mfu", "restarts")


@dataclass
class RunTally:
    """Running totals of a run, saved in its checkpoints (state_dict / load_state_dict). The clock counts
    training time of this process from :meth:`start_clock`, added to what the checkpoint it resumed from held."""

    samples: int = 0
    tokens: int = 0
    wall_time_s: float = 0.0  # up to the last start_clock(); elapsed() adds the time since
    restarts: int = 0  # starts from a checkpoint
    final_val_loss: float | None = None
    best_val_loss: float | None = None
    best_val_step: int | None = None
    val_failed_shards: int = 0  # validation shards given up, over every rank and validation

    def __post_init__(self) -> None:
        self._started: float | None = None

    def start_clock(self) -> None:
        self._started = time.perf_counter()

    def elapsed(self) -> float:
        """Wall time of training over every start, up to now."""
        return self.wall_time_s + (time.perf_counter() - self._started if self._started is not None else 0.0)

    def add_step(self, samples: int, tokens_per_sample: int) -> None:
        self.samples += samples
        self.tokens += samples * tokens_per_sample

    def add_validation(self, step: int, loss: float, failed_shards: int = 0) -> None:
        self.final_val_loss, self.val_failed_shards = loss, self.val_failed_shards + failed_shards
        if math.isfinite(loss) and (self.best_val_loss is None or loss < self.best_val_loss):
            self.best_val_loss, self.best_val_step = loss, step

    def state_dict(self) -> dict[str, Any]:
        return {"samples": self.samples, "tokens": self.tokens, "wall_time_s": self.elapsed(),
                "restarts": self.restarts, "final_val_loss": self.final_val_loss,
                "best_val_loss": self.best_val_loss, "best_val_step": self.best_val_step,
                "val_failed_shards": self.val_failed_shards}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """A checkpoint's totals (one saved before the tally existed holds none: the totals start there)."""
        for key, value in state.items():
            setattr(self, key, value)
        self._started = None


def run_summary(tally: RunTally, *, status: str, steps: int, skipped_steps: int, failed_shards: int,
                flops_per_token: float, devices: int, peak_tflops: float | None) -> dict[str, Any]:
    """The summary of a run as ``summary.json`` holds it; ``status`` is "finished" or "stopped"."""
    seconds = tally.elapsed()
    tokens_per_s = tally.tokens / seconds if seconds > 0 else 0.0
    return {"status": status, "steps": steps, "samples": tally.samples, "tokens": tally.tokens,
            "wall_time_s": round(seconds, 3), "tokens_per_s": tokens_per_s,
            "mfu": mfu(flops_per_token, tokens_per_s, devices, peak_tflops),
            "final_val_loss": tally.final_val_loss, "best_val_loss": tally.best_val_loss,
            "best_val_step": tally.best_val_step, "restarts": tally.restarts, "skipped_steps": skipped_steps,
            "failed_shards": failed_shards}


def write_summary(out_dir: Path, summary: dict[str, Any]) -> Path:
    path = out_dir / SUMMARY_FILE
    write_text_atomic(path, json.dumps(summary, indent=1) + "\n")
    return path


def summary_table(summary: dict[str, Any]) -> str:
    """The summary as a two-column table for the log."""
    def shown(key: str, value: Any) -> str:
        if value is None:
            return "-"
        if key == "wall_time_s":
            return format_duration(value)
        if key == "mfu":
            return f"{100 * value:.1f}%"
        if isinstance(value, float):
            return f"{value:.4f}" if "loss" in key else f"{value:,.0f}"
        return f"{value:,}" if isinstance(value, int) else str(value)

    width = max(map(len, summary))
    return "\n".join(["run summary"] + [f"  {key:<{width}}  {shown(key, value)}" for key, value in summary.items()])
