"""What a cluster user watches, and how it is computed.

Figures are grouped by TensorBoard tag prefix: ``train/`` (loss, accuracy, LR, grad norm, skipped
steps), ``val/``, ``perf/`` (tokens/s, per device, step time, MFU, data-wait share), ``data/`` (the
loaders' sample and corrupt-member counts, summed over ranks) and ``sys/`` (peak memory). They go to
TensorBoard, to ``metrics.jsonl`` (one JSON object per logged step, appended across restarts) and to
a console line with an ETA, all from rank 0.

:class:`StepMeter` accumulates a log interval's losses on the device and reduces them over ranks once
per interval, so a training step never waits for the host.
"""

from __future__ import annotations

import json
import logging
import resource
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from nbp_ds.config import TrainConfig
from nbp_ds.errors import ConfigError
from nbp_ds.files import write_text_atomic
from nbp_ds.runtime import distributed
from nbp_ds.visualize import gif_bytes

log = logging.getLogger(__name__)

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


def mfu(flops_per_token: float, tokens_per_s: float, devices: int, peak: float | None) -> float | None:
    """Model FLOPs utilisation: achieved model FLOP/s over the devices' dense peak (None without a peak)."""
    return flops_per_token * tokens_per_s / (devices * peak * 1e12) if peak else None


class StepMeter:
    """One log interval's figures: losses summed on the device, time and data wait on the host."""

    def __init__(self, device: torch.device, tokens_per_step: int, flops_per_token: float, peak: float | None):
        self.device, self.tokens_per_step = device, tokens_per_step
        self.flops_per_token, self.peak = flops_per_token, peak
        self._reset()

    def _reset(self) -> None:
        self.sums = torch.zeros(3, dtype=torch.float64, device=self.device)  # loss, accuracy, micro-batches
        self.counted_tokens = 0  # on the host: the tokens of micro-batches that count their own (packed rows)
        self.steps, self.waited, self.began = 0, 0.0, time.perf_counter()

    @contextmanager
    def timing_data(self) -> Iterator[None]:
        """Count the block's time as waiting for data."""
        began = time.perf_counter()
        yield
        self.waited += time.perf_counter() - began

    def add_micro_batch(self, loss: torch.Tensor, acc: torch.Tensor, tokens: int | None = None) -> None:
        """One micro-batch's loss and accuracy (device tensors); ``tokens``, counted on the host, for a micro-batch
        whose real tokens are not ``tokens_per_step``'s share (packed rows: positions that are no padding)."""
        self.sums += torch.stack([loss.detach().double(), acc.detach().double(), self.sums.new_ones(())])
        self.counted_tokens += tokens or 0

    def end_step(self) -> None:
        self.steps += 1

    def flush(self) -> dict[str, float]:
        """The interval's means over every rank (one collective), then a fresh interval."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # the clock should see the GPU's work, not just the queue
        seconds = time.perf_counter() - self.began
        sums = distributed.all_reduce(torch.cat([self.sums, self.sums.new_tensor([self.counted_tokens])])).tolist()
        devices = distributed.world_size()
        step_time = seconds / max(self.steps, 1)
        counted = sums[3]  # over every rank: the micro-batches' own token counts, when they gave them
        tokens_per_s = (counted if counted else self.tokens_per_step * self.steps) / seconds
        values = {"train/loss": sums[0] / sums[2], "train/acc": sums[1] / sums[2],
                  "perf/tokens_per_s": tokens_per_s, "perf/tokens_per_s_per_device": tokens_per_s / devices,
                  "perf/step_time": step_time, "perf/data_wait": self.waited / max(self.steps, 1),
                  "perf/data_wait_share": self.waited / seconds,
                  "perf/mfu": mfu(self.flops_per_token, tokens_per_s, devices, self.peak),
                  "sys/memory_gib": memory_gib(self.device)}
        self._reset()
        return values


@dataclass(frozen=True)
class WandbSettings:
    """Where a run logs in Weights & Biases: ``train.wandb_project``, ``_entity``, ``_group`` and ``_tags``."""

    project: str
    entity: str | None = None
    group: str | None = None
    tags: tuple[str, ...] = ()


def wandb_settings(tr: TrainConfig) -> WandbSettings:
    return WandbSettings(tr.wandb_project, tr.wandb_entity, tr.wandb_group, tuple(tr.wandb_tags))


WANDB_ID_FILE = "wandb_id"


def wandb_init_arguments(out_dir: Path, settings: WandbSettings, config: dict) -> dict[str, Any]:
    """The arguments of ``wandb.init`` for the run in ``out_dir``: its id is made once and kept in
    ``out_dir/wandb_id``, and ``resume="allow"``, so every start of the run (a requeue, a resume) continues the
    same W&B run; the run is named after the folder."""
    id_file = out_dir / WANDB_ID_FILE
    run_id = id_file.read_text().strip() if id_file.is_file() else uuid.uuid4().hex[:8]
    write_text_atomic(id_file, run_id)
    return {"project": settings.project, "entity": settings.entity, "group": settings.group,
            "tags": list(settings.tags) or None, "id": run_id, "resume": "allow", "name": out_dir.name,
            "dir": str(out_dir), "config": config}


class MetricsLogger:
    """TensorBoard (``tb/``), ``metrics.jsonl`` and, with ``wandb`` settings, Weights & Biases; rank 0 only.

    The W&B run id is kept in ``wandb_id`` in the output folder, so a resumed run continues the same W&B run.
    """

    def __init__(self, out_dir: Path, enabled: bool, wandb: WandbSettings | None = None, config: dict | None = None):
        self.enabled = enabled
        self.writer = None
        self.jsonl = None
        self.wandb = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter  # local: seconds to import; rank 0 only

            self.writer = SummaryWriter(str(out_dir / "tb"))
            self.jsonl = open(out_dir / "metrics.jsonl", "a")
            if wandb is not None:
                self.wandb = _wandb_run(out_dir, wandb, config or {})

    def scalars(self, step: int, values: dict[str, float | None]) -> None:
        if not self.enabled:
            return
        kept = {k: v for k, v in values.items() if v is not None}
        for key, value in kept.items():
            self.writer.add_scalar(key, value, step)
        self.jsonl.write(json.dumps({"step": step, **kept}) + "\n")
        self.jsonl.flush()
        if self.wandb is not None:
            self.wandb.log(kept, step=step)

    def text(self, tag: str, text: str, step: int = 0) -> None:
        if self.enabled:
            self.writer.add_text(tag, text, step)

    def image(self, tag: str, image: np.ndarray, step: int) -> None:
        if self.enabled:
            self.writer.add_image(tag, image, step, dataformats="HWC")
            if self.wandb is not None:
                import wandb  # local: an optional dependency (train.wandb)

                self.wandb.log({tag: wandb.Image(image)}, step=step)

    def video(self, tag: str, video: np.ndarray, step: int, fps: float = 8.0) -> None:
        """A uint8 video [N, H, W, 3] as an animated GIF: TensorBoard's image panel plays it (what add_video writes,
        without its moviepy dependency); W&B gets a wandb.Video."""
        if not self.enabled:
            return
        add_gif(self.writer, tag, video, step, fps)
        if self.wandb is not None:
            import wandb  # local: an optional dependency (train.wandb)

            self.wandb.log({tag: wandb.Video(video.transpose(0, 3, 1, 2), fps=fps, format="gif")}, step=step)

    def flush(self) -> None:
        if self.enabled:
            self.writer.flush()

    def close(self) -> None:
        if self.enabled and not self.jsonl.closed:
            self.writer.close()
            self.jsonl.close()
            if self.wandb is not None:
                self.wandb.finish()


def add_gif(writer: Any, tag: str, video: np.ndarray, step: int, fps: float = 8.0) -> None:
    """A uint8 video [N, H, W, 3] as an animated GIF in a SummaryWriter's event file (what add_video writes, without
    its moviepy dependency): TensorBoard's image panel plays it."""
    from tensorboard.compat.proto.summary_pb2 import Summary  # local: TensorBoard's import time

    _, height, width, _ = video.shape
    image = Summary.Image(height=height, width=width, colorspace=3, encoded_image_string=gif_bytes(video, fps))
    # the SummaryWriter's own event file, as its add_video does
    writer._get_file_writer().add_summary(Summary(value=[Summary.Value(tag=tag, image=image)]), step)


def _wandb_run(out_dir: Path, settings: WandbSettings, config: dict):
    try:
        import wandb  # local: an optional dependency (train.wandb)
    except ImportError as exc:
        raise ConfigError("train.wandb=true needs the wandb package: pip install 'nbp_ds[wandb]' (or wandb), "
                          "or set train.wandb=false") from exc
    return wandb.init(**wandb_init_arguments(out_dir, settings, config))


def format_duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


def console_line(step: int, total: int, values: dict[str, Any]) -> str:
    parts = [f"step {step}/{total}", f"loss {values['train/loss']:.4f}", f"acc {values['train/acc']:.3f}",
             f"lr {values['train/lr']:.2e}", f"gnorm {values['train/grad_norm']:.3f}",
             f"{values['perf/tokens_per_s']:.0f} tok/s", f"step {values['perf/step_time']:.2f}s",
             f"data {100 * values['perf/data_wait_share']:.0f}%", f"mem {values['sys/memory_gib']:.1f}GiB",
             f"ETA {format_duration((total - step) * values['perf/step_time'])}"]
    if values.get("perf/mfu") is not None:
        parts.insert(6, f"mfu {100 * values['perf/mfu']:.1f}%")
    return " | ".join(parts)
