"""Long-sampling cost, for ``nbp-bench-long-sample``: frames/s and peak memory of ``generate_long`` at several
video lengths, per decoder and long mode. A sliding window makes both flat in the length: each new latent frame
costs the same passes over the same window whatever came before.

Peak memory is what decoding adds on top of what was allocated before it: on CUDA the allocator's peak
(``max_memory_allocated``), on a CPU (Linux) the kernel's high-water mark of the process's resident memory (the CPU
allocator keeps no peak of its own).
"""

from __future__ import annotations

import ctypes
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from nbp_ds.generate.long import generate_long
from nbp_ds.perf.generate_bench import inputs, synchronize
from nbp_ds.perf.proc_status import status_bytes


@dataclass
class LongRow:
    frames: int  # video frames per sample
    passes: int  # forward passes per batch
    seconds: float  # decoding, per batch
    peak_bytes: int  # memory decoding added at its peak


class ResidentPeak:
    """The peak resident memory while the block runs, above what it was on entry (Linux). Memory the C allocator
    keeps from earlier work is handed back first (malloc_trim), so that reusing it does not hide what the block
    needs; the kernel's high-water mark is reset (clear_refs 5) and read on exit."""

    def __enter__(self) -> ResidentPeak:
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):  # not glibc: the figure may then be low
            pass
        Path("/proc/self/clear_refs").write_text("5")
        self.base = status_bytes("VmRSS")
        return self

    def __exit__(self, *exc) -> None:
        self.peak = status_bytes("VmHWM")

    @property
    def added(self) -> int:
        return max(0, self.peak - self.base)


def time_long_sample(model, batch: int, latent_frames: int, temporal_compression: int, sampling: dict, mode: str,
                     long_mode: str, sink_frames: int) -> LongRow:
    """One row: a whole long sample of ``batch`` videos, decoding timed (generate_long's own clock, after the
    set-up), memory measured around it."""
    device = next(model.parameters()).device
    args = {**inputs(model, batch), **sampling, "mode": mode, "long_mode": long_mode, "sink_frames": sink_frames}
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        _, stats = generate_long(model, batch, latent_frames, seed=0, **args)
        peak = torch.cuda.max_memory_allocated(device) - before
    else:
        with ResidentPeak() as resident:
            _, stats = generate_long(model, batch, latent_frames, seed=0, **args)
        peak = resident.added
    frames = 1 + (latent_frames - 1) * temporal_compression
    return LongRow(frames, stats["forward_passes"], stats["seconds"], peak)


def warm_up(model, batch: int, sampling: dict, mode: str, long_mode: str, sink_frames: int) -> float:
    """One short long sample (the clip and one more frame): kernels chosen, allocator warm. Returns seconds."""
    began = time.perf_counter()
    args = {**inputs(model, batch), **sampling, "mode": mode, "long_mode": long_mode, "sink_frames": sink_frames}
    generate_long(model, batch, model.layout.grid[0] + 1, seed=0, **args)
    return time.perf_counter() - began
