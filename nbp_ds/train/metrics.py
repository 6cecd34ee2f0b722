"""What a cluster user watches: TensorBoard scalars, a console line, and ``metrics.jsonl`` (one JSON
object per logged step, appended across restarts), all from rank 0."""

from __future__ import annotations

import json
import logging
import resource
from pathlib import Path
from typing import Any

import numpy as np
import torch

log = logging.getLogger("nbp_ds.train")

# dense bf16 tensor-core peaks, TFLOP/s, by a substring of torch.cuda.get_device_name()
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "GH200": 989.0, "B200": 2250.0, "A100": 312.0,
                    "L40S": 362.0, "A6000": 155.0, "A10": 125.0, "V100": 125.0}


def peak_tflops(configured: float | None, device: torch.device) -> float | None:
    """train.peak_tflops if set, else looked up from the GPU's name; None on CPU (no MFU)."""
    if configured:
        return configured
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, value in PEAK_BF16_TFLOPS.items():
        if key in name:
            return value
    log.warning("unknown GPU %r: set train.peak_tflops to get an MFU figure", name)
    return None


def memory_gib(device: torch.device) -> float:
    """Peak memory: CUDA max allocated, else the process' max resident set."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


class MetricsLogger:
    def __init__(self, out_dir: Path, enabled: bool):
        self.enabled = enabled
        self.writer = None
        self.jsonl = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(out_dir / "tb"))
            self.jsonl = open(out_dir / "metrics.jsonl", "a")

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        for key, value in values.items():
            if value is not None:
                self.writer.add_scalar(key, value, step)
        self.jsonl.write(json.dumps({"step": step, **{k: v for k, v in values.items() if v is not None}}) + "\n")
        self.jsonl.flush()

    def text(self, tag: str, text: str, step: int = 0) -> None:
        if self.enabled:
            self.writer.add_text(tag, text, step)

    def image(self, tag: str, image: np.ndarray, step: int) -> None:
        if self.enabled:
            self.writer.add_image(tag, image, step, dataformats="HWC")

    def flush(self) -> None:
        if self.enabled:
            self.writer.flush()

    def close(self) -> None:
        if self.enabled and not self.jsonl.closed:
            self.writer.close()
            self.jsonl.close()


def console_line(step: int, total: int, values: dict[str, Any]) -> str:
    parts = [f"step {step}/{total}", f"loss {values['train/loss']:.4f}", f"acc {values['train/acc']:.3f}",
             f"lr {values['lr']:.2e}", f"gnorm {values['grad_norm']:.3f}",
             f"{values['tokens_per_s']:.0f} tok/s", f"step {values['step_time']:.2f}s",
             f"data {100 * values['data_wait_share']:.0f}%", f"mem {values['memory_gib']:.1f}GiB"]
    if values.get("mfu") is not None:
        parts.insert(6, f"mfu {100 * values['mfu']:.1f}%")
    return " | ".join(parts)
