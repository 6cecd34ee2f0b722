"""Timing repeated work on a device without synchronising between repetitions."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch


def time_repeats(fn: Callable[[], object], repeats: int, warmup: int, device: torch.device) -> list[float]:
    """Seconds of each of ``repeats`` calls of ``fn`` after ``warmup`` untimed ones.

    On a GPU, CUDA events recorded between consecutive calls time the device's timeline (the host queues the
    calls back to back, as a training loop does, and synchronises once at the end); each figure includes any
    gap in which the GPU waited for the host. On the CPU, the wall clock around each call."""
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        marks = [torch.cuda.Event(enable_timing=True) for _ in range(repeats + 1)]
        marks[0].record()
        for i in range(repeats):
            fn()
            marks[i + 1].record()
        torch.cuda.synchronize(device)
        return [marks[i].elapsed_time(marks[i + 1]) / 1e3 for i in range(repeats)]
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        fn()
        times.append(time.perf_counter() - began)
    return times


def median(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[len(ordered) // 2]
