"""A sampler output folder's first videos in TensorBoard: each an animated GIF in the image panel (the way the
trainer logs its sample videos), tagged ``samples/<stem>``, whatever its length; ``nbp-sample --tensorboard``.

Long samples (``--frames``) are watched here rather than in the trainer's sample panels: a long video costs
many clips' worth of passes, which the trainer would pay on every rank at every ``train.sample_every``."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from nbp_ds.generate.folder import PREVIEW_VIDEOS, recorded_videos
from nbp_ds.runtime.metrics import add_gif
from nbp_ds.visualize import enlarged

log = logging.getLogger(__name__)


def videos_to_tensorboard(folder: str | Path, logdir: str | Path, fps: float = 8.0,
                          limit: int = PREVIEW_VIDEOS) -> int:
    """Write the first ``limit`` finished videos of the sampler folder ``folder`` (its decoded frames, enlarged to
    at least 128 rows) into a TensorBoard event file under ``logdir``; returns how many."""
    from torch.utils.tensorboard import SummaryWriter  # local: seconds to import, only when asked for

    records = (recorded_videos(folder) or [])[:limit]
    writer = SummaryWriter(str(logdir))
    try:
        for record in records:
            add_gif(writer, f"samples/{record['stem']}", enlarged(np.load(record["frames_path"])), 0, fps)
    finally:
        writer.close()
    log.info("%d videos shown in TensorBoard: tensorboard --logdir %s", len(records), logdir)
    return len(records)
