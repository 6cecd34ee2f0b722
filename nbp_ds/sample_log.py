"""Sample videos in TensorBoard while a transformer trains: a trainer hook (nbp_ds.train.hooks) that
generates a few videos, decodes them with ``train.sample_tokenizer`` and logs them as frame grids.

It lives above the trainer because it needs the tokenizer; ``nbp-train`` adds it to the run's hooks."""

from __future__ import annotations

import logging
from typing import Any

import torch

from nbp_ds.generate import generate
from nbp_ds.tokenizer import VideoTokenizer, load_tokenizer
from nbp_ds.train.hooks import TrainerHooks
from nbp_ds.visualize import frame_grid

log = logging.getLogger(__name__)


class SampleLogger(TrainerHooks):
    """A few sampled videos per ``train.sample_every`` steps: one per class (up to 4), or 2 unconditional."""

    def __init__(self) -> None:
        self.tokenizer: VideoTokenizer | None = None  # loaded on rank 0 at the first samples

    @torch.no_grad()
    def on_samples_due(self, trainer: Any, step: int) -> None:
        tr, lay = trainer.cfg.train, trainer.layout
        if not tr.sample_tokenizer:
            log.warning("train.sample_every is set but train.sample_tokenizer is not: no samples logged")
            return
        if lay.condition == "frames":
            return  # needs real context frames: see nbp-sample --context
        n = min(lay.num_classes, 4) if lay.condition == "class" else 2
        label = torch.arange(n) if lay.condition == "class" else None
        trainer.engine.eval()
        # static decoding, no CUDA graphs: ZeRO-3 gathers the weights at every call, and a captured decoder would
        # hold its memory through training
        tokens, _ = generate(trainer.engine.module, n, label=label, temperature=1.0, seed=step, mode="static")
        trainer.engine.train()
        if trainer.rank == 0:
            if self.tokenizer is None:
                self.tokenizer = load_tokenizer(tr.sample_tokenizer, device=trainer.device)
            videos = self.tokenizer.decode(tokens.to(trainer.device)).cpu().numpy()
            trainer.metrics.image("samples", frame_grid(videos), step)
