"""Sample videos in TensorBoard (and W&B) while a transformer trains: a trainer hook (nbp_ds.runtime.hooks),
called every ``train.sample_every`` steps, that generates a few videos and decodes them with the tokenizer
``train.sample_tokenizer`` names. It lives above the trainer because it needs the tokenizer; ``nbp-train`` adds
it to the run's hooks.

Each sample is an animated GIF in TensorBoard's image panel, tagged with what it shows: ``samples/<id>_<class
name>`` for a class-conditional model (one per class, up to 4; names from the shards' classes.json),
``samples/<n>`` for an unconditional one. A frame-prediction model continues the first clips of the validation
shards (the training shards when there are none; the same clips every time, so the panels show progress): each
panel is the real clip (left) and the model's continuation (right), the given context frames outlined in green,
the predicted ones in red. A PNG grid of every sample (``samples/grid``) comes with them.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch

from nbp_ds.data import build_loader
from nbp_ds.data.classes import shard_class_names
from nbp_ds.generate import generate
from nbp_ds.runtime.hooks import TrainerHooks
from nbp_ds.tokenizer import VideoTokenizer, load_tokenizer
from nbp_ds.visualize import enlarged, frame_grid, mark_given_frames, side_by_side

log = logging.getLogger(__name__)

FPS = 8.0  # playback rate of the logged GIFs (the sampler's mp4 default)
MAX_SAMPLES = 4


class SampleLogger(TrainerHooks):
    """Generates (on every rank: ZeRO-3 gathers weights) and logs (rank 0) the samples of one run."""

    def __init__(self) -> None:
        self.tokenizer: VideoTokenizer | None = None  # loaded on rank 0 at the first samples
        self.context: torch.Tensor | None = None  # frame prediction: the clips continued, read once
        self.names: dict[int, str] | None = None
        self.warned = False

    @torch.no_grad()
    def on_samples_due(self, trainer: Any, step: int) -> None:
        # nothing here draws from torch's global generators, which class dropout reads: the samples draw from their
        # own counter-based streams (seeded by the step), load_tokenizer and the context loader from none, so a run
        # learns the same whether it logs samples or not (train.sample_every is a free key:
        # nbp_ds.weights.identity.FREE_KEYS; tests/test_sample_log.py)
        tr, lay = trainer.cfg.train, trainer.layout
        if not tr.sample_tokenizer:
            if not self.warned:
                log.warning("train.sample_every=%d but train.sample_tokenizer is not set: no sample videos logged "
                            "(set it to the tokenizer of the training shards)", tr.sample_every)
                self.warned = True
            return
        label, real = None, None
        if lay.condition == "class":
            n = min(lay.num_classes, MAX_SAMPLES)
            label = torch.arange(n)
        elif lay.condition == "frames":
            real = self._clips(trainer)
            n = real.shape[0]
        else:
            n = 2
        trainer.engine.eval()
        # static decoding, no CUDA graphs: ZeRO-3 gathers the weights at every call, and a captured decoder would
        # hold its memory through training
        tokens, _ = generate(trainer.engine.module, n, label=label, context=real, temperature=1.0, seed=step,
                             mode="static")
        trainer.engine.train()
        if trainer.rank == 0:
            self._write(trainer, step, tokens, label, real)

    def _clips(self, trainer: Any) -> torch.Tensor:
        """The first clips of the validation shards (else the training shards), the same on every rank."""
        if self.context is None:
            cfg = trainer.cfg
            shards = trainer.val_shards or [s for source in trainer.train_sources for s in source.shards]
            loader = build_loader(shards, grid=cfg.layout.grid, batch_size=2, mode="val", num_workers=0,
                                  seed=cfg.train.seed, retries=cfg.data.retries, retry_backoff=cfg.data.retry_backoff)
            self.context = next(iter(loader))["tokens"].long()
        return self.context

    def _write(self, trainer: Any, step: int, tokens: torch.Tensor, label: torch.Tensor | None,
               real: torch.Tensor | None) -> None:
        if self.tokenizer is None:
            self.tokenizer = load_tokenizer(trainer.cfg.train.sample_tokenizer, device=trainer.device)
            self.names = shard_class_names(trainer.train_sources)
        videos = self.tokenizer.decode(tokens.to(self.tokenizer.device)).cpu().numpy()
        if real is not None:
            lay = trainer.layout
            given = self.tokenizer.clip_shape([lay.context_frames, *lay.grid[1:]])[0]  # video frames of the context
            clips = self.tokenizer.decode(real.to(self.tokenizer.device)).cpu().numpy()
            panels = [side_by_side([mark_given_frames(c, given), mark_given_frames(v, given)])
                      for c, v in zip(clips, videos, strict=True)]
        else:
            panels = list(videos)
        for i, panel in enumerate(panels):
            trainer.metrics.video(sample_tag(i, None if label is None else int(label[i]), self.names or {}),
                                  enlarged(panel), step, FPS)
        trainer.metrics.image("samples/grid", frame_grid(np.stack(panels)), step)


def sample_tag(index: int, label: int | None, names: dict[int, str]) -> str:
    """The TensorBoard tag of sample ``index``: its class id and name when it has a class."""
    if label is None:
        return f"samples/{index}"
    return f"samples/{label}_{names[label]}" if label in names else f"samples/{label}"
