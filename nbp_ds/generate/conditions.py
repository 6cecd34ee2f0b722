"""What a model is conditioned on against what a caller gives it, checked in one place.

A layout's ``condition`` decides the inputs a video needs: a class label (class-conditional models, which also
take classifier-free guidance when they have a null class), given context frames (frame prediction), or
nothing. ``generate`` and the sampler (``nbp-sample``) both ask ``check_conditions``; each names the arguments
as its caller writes them (``label=`` in Python, ``--label`` on the command line).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from nbp_ds.layout import Layout

KEYWORD_NAMES = {"label": "label=", "cfg_scale": "cfg_scale=", "context": "context="}  # generate's arguments


def guidance_scale(cfg_scale: float | None) -> float | None:
    """The classifier-free guidance scale in effect: None when off (None, or 1: the conditional model itself)."""
    return None if cfg_scale == 1.0 else cfg_scale


def check_conditions(layout: Layout, label: torch.Tensor | None, cfg_scale: float | None, context_given: bool,
                     names: Mapping[str, str] = KEYWORD_NAMES) -> None:
    """Raise ValueError, naming the argument as ``names`` spells it, unless the inputs fit the layout: a label
    (host tensor, each in range) exactly for class-conditional models, guidance only there and only with a null
    class, a context exactly for frame prediction. Shapes are the caller's to check."""
    if layout.condition == "class":
        if label is None:
            raise ValueError(f"this model is class-conditional: pass {names['label']} (class indices in "
                             f"[0, {layout.num_classes}))")
        try:
            layout.check_labels(label)
        except ValueError as exc:  # the flag or keyword first, as the user wrote it
            raise ValueError(f"{names['label'].removesuffix('=')}: {exc}") from None
        if guidance_scale(cfg_scale) is not None and not layout.has_null_class:
            raise ValueError(f"{names['cfg_scale']} needs a null class, and a model conditioned on class text "
                             f"prefixes (layout.class_prefixes) has none: sample without classifier-free guidance")
    elif label is not None or guidance_scale(cfg_scale) is not None:
        raise ValueError(f"{names['label']} and {names['cfg_scale']} need a class-conditional model; this one has "
                         f"layout.condition={layout.condition}")
    if layout.condition == "frames" and not context_given:
        raise ValueError(f"this model predicts frames after {layout.context_frames} given latent frames: pass "
                         f"{names['context']}")
    if layout.condition != "frames" and context_given:
        raise ValueError(f"{names['context']} is for frame-prediction models; this one has "
                         f"layout.condition={layout.condition}")
