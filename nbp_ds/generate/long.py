"""Videos longer than the training clip: a window of the clip's length slides one latent frame at a time.

The first clip is decoded as ``generate`` decodes it (same tokens for the same seed). Each later latent frame j is
predicted by the clip's last-frame passes over a window of the clip's T latent frames: the ``sink_frames`` first
frames of the video at their own places (with the condition prefix and the BOV block), then the T - 1 - sinks most
recent frames, then frame j in the clip's last place. Every position a pass uses is one of the clip's, so no
rotary angle or position embedding outside the trained range is ever used.

Two ways to get the window's keys and values (``long_mode``):

* ``recompute`` (the TATS way): each window is fed from scratch, as a clip whose first T - 1 frames are given
  (one pass over them), then frame j is decoded. The model sees exactly a training clip every time; any model
  runs it (rotary or learned positions, nbp_ds or the released generators).
* ``rolling``: the window's cache is kept. When it slides, the slots of the recent frames move down by one
  frame and their keys are rotated afresh from the keys kept before rotation (``KVCache.slide``), so each sits
  at its place in the new window; the sink slots never move. The cost of a frame no longer holds the pass over
  the given frames. Rotary models only (a learned position embedding is baked into the keys).

Both feed the same tokens at the same positions. In a one-layer model the two give the same logits: a slot's
keys and values depend only on the token fed there and its position. In deeper models a kept slot also holds what
its layers saw when it was computed, a window that reached one frame further back (receptive field grows with
depth, as in any sliding-window attention); ``recompute`` forgets that, so the two differ there by design.

The random draws of token i of the long video (raster order) come from the stream of (seed, video, i) in both
modes and both decoders, so a resumed run, the eager and the static decoder, give the same video.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import numpy as np
import torch

from nbp_ds.generate.conditions import check_conditions, guidance_scale
from nbp_ds.generate.decode import (
    _as_labels,
    _initial_tokens,
    _video_index,
    decode_eager,
    resolve_mode,
)
from nbp_ds.generate.draw import Sampling, check_seed, video_keys
from nbp_ds.generate.plan import DEFAULT_KV_BUCKET
from nbp_ds.generate.static import StaticDecoder, plan_for
from nbp_ds.layout import Layout
from nbp_ds.model.transformer import KVCache, NBPModel

LONG_MODES = ("auto", "rolling", "recompute")
DEFAULT_SINK_FRAMES = 1


@dataclass(frozen=True)
class LongWindow:
    """Where the window's parts sit in the clip's sequence (a layout and a number of sink frames)."""

    clip_frames: int  # T: latent frames of the clip (and of the window)
    frame_tokens: int  # F = H * W
    sink_frames: int
    sink_end: int  # first sequence position fed a token of frame ``sink_frames``: the slots before never move
    seq_len: int
    first_step: int  # the first generation step that reads the clip's last frame
    prefill_end: int  # where that step starts: a recomputed window feeds [0, prefill_end) in one pass

    @classmethod
    def of(cls, layout: Layout, sink_frames: int) -> LongWindow:
        """The window of ``layout`` with ``sink_frames`` kept frames; ValueError naming what does not fit."""
        t, h, w = layout.grid
        f = h * w
        if layout.block[0] != 1:
            raise ValueError(f"long sampling moves the window one latent frame at a time: it needs blocks one "
                             f"latent frame deep (layout.block[0] = 1), got layout.block={list(layout.block)}")
        if not 0 <= sink_frames <= t - 2:
            raise ValueError(f"sink_frames must be in 0..{t - 2} (the window keeps at least one recent frame of the "
                             f"{t}-frame clip), got {sink_frames}")
        source = layout.input_source
        fed_sinks = np.nonzero(source >= sink_frames * f)[0]
        sink_end = int(fed_sinks[0])
        frames = source[sink_end:] // f
        expected = np.repeat(np.arange(sink_frames, t), f)[: len(frames)]
        if len(frames) != (t - sink_frames) * f - layout.block_size or not np.array_equal(frames, expected):
            raise ValueError(f"with sink_frames={sink_frames} the positions after the sinks do not feed whole latent "
                             f"frames in order (a hybrid layout's first frame is fed token by token: keep it as a "
                             f"sink, sink_frames >= 1)")
        reads_last = [i for i, step in enumerate(layout.generation_steps)
                      if layout.target_index[step.read[0]] // f == t - 1]
        first_step = reads_last[0]
        return cls(t, f, sink_frames, sink_end, layout.seq_len, first_step,
                   layout.generation_steps[first_step].start)


class _Runner:
    """The clip-shaped decoding state a long video slides through: window tokens, cache, and the passes."""

    tokens: torch.Tensor  # [B, T*H*W] the window's tokens
    cache: KVCache

    def run(self, first_step: int, stream_offset: int) -> None:
        raise NotImplementedError


class _EagerRunner(_Runner):
    def __init__(self, model: NBPModel, tokens: torch.Tensor, labels: torch.Tensor | None, sampling: Sampling,
                 keys: torch.Tensor, rows: int, keep_unrotated: bool):
        self.model, self.tokens, self.labels, self.sampling, self.keys = model, tokens, labels, sampling, keys
        param = next(model.parameters())
        self.cache = model.new_cache(rows, tokens.device, param.dtype, keep_unrotated=keep_unrotated)

    def run(self, first_step: int, stream_offset: int) -> None:
        decode_eager(self.model, self.tokens, self.labels, self.sampling, self.keys, self.cache, first_step,
                     stream_offset)


class _StaticRunner(_Runner):
    def __init__(self, model: NBPModel, tokens: torch.Tensor, labels: torch.Tensor | None, sampling: Sampling,
                 keys: torch.Tensor, graphs: bool, kv_bucket: int, keep_unrotated: bool):
        lay = model.layout
        self.decoder = StaticDecoder(model, tokens.shape[0], sampling, graphs=graphs, kv_bucket=kv_bucket,
                                     keep_unrotated=keep_unrotated)
        self.decoder.prepare(tokens, lay.condition_ids(labels) if lay.prefix_len else None, keys)
        self.tokens, self.cache = self.decoder.tokens, self.decoder.cache

    def run(self, first_step: int, stream_offset: int) -> None:
        self.decoder.stream_offset.fill_(stream_offset)
        self.decoder.decode(range(first_step, self.decoder.passes))


def _decode_long(model: NBPModel, runner: _Runner, window: LongWindow, latent_frames: int,
                 labels: torch.Tensor | None, rolling: bool) -> torch.Tensor:
    """Decode the first clip, then slide the window one frame at a time; the long video [B, N*H*W]."""
    t, f, s = window.clip_frames, window.frame_tokens, window.sink_frames
    lay = model.layout
    tokens = runner.tokens
    out = torch.empty(tokens.shape[0], latent_frames * f, dtype=tokens.dtype, device=tokens.device)
    runner.run(0, 0)
    out[:, : t * f] = tokens
    begin, end = window.sink_end, window.seq_len
    for j in range(t, latent_frames):
        tokens[:, s * f:(t - 1) * f] = tokens[:, (s + 1) * f:].clone()  # the window's recent frames move down
        if rolling:
            runner.cache.slide(begin, end, f, model.rope_cos[begin:end - f], model.rope_sin[begin:end - f])
        elif window.prefill_end:  # recompute: the window's given frames fed from scratch, in one pass
            video = tokens if labels is None or labels.shape[0] == tokens.shape[0] else tokens.repeat(2, 1)
            ids = lay.input_ids(video, labels, 0, window.prefill_end)
            model(ids, start=0, cache=runner.cache)
        runner.run(window.first_step, (j - t + 1) * f)
        out[:, j * f:(j + 1) * f] = tokens[:, (t - 1) * f:]
    return out


def resolve_long_mode(long_mode: str, model: NBPModel) -> str:
    """``auto`` -> ``recompute``: every window is then exactly a training clip, in models of any depth (``rolling``
    matches it only in one-layer models, see the module's docstring), so the default never trades the video for
    speed; ``rolling`` is asked for by name. The others are checked and passed through."""
    if long_mode not in LONG_MODES:
        raise ValueError(f"long_mode must be one of {', '.join(LONG_MODES)}, got {long_mode!r}")
    if long_mode == "auto":
        return "recompute"
    if long_mode == "rolling" and not model.rotary:
        raise ValueError(f"long_mode='rolling' rotates cached keys to their place in the window, and "
                         f"{type(model).__name__} has learned position embeddings baked into its keys: use "
                         f"long_mode='recompute'")
    return long_mode


@torch.no_grad()
def generate_long(
    model: NBPModel,
    batch_size: int,
    latent_frames: int,
    label: int | torch.Tensor | None = None,
    context: torch.Tensor | None = None,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    cfg_scale: float | None = None,
    seed: int | None = None,
    video_index: torch.Tensor | list[int] | None = None,
    mode: str = "auto",
    long_mode: str = "auto",
    sink_frames: int = DEFAULT_SINK_FRAMES,
    kv_bucket: int = DEFAULT_KV_BUCKET,
) -> tuple[torch.Tensor, dict]:
    """Sample videos of ``latent_frames`` latent frames (at least the clip's T) as token grids.

    Arguments as ``generate``'s (nbp_ds.generate.decode), plus:
        latent_frames: length of the videos in latent frames (a tokenizer decodes N latent frames into
            1 + f (N - 1) frames).
        long_mode: ``rolling`` (keep the window's cache), ``recompute`` (feed each window from scratch) or
            ``auto`` (= recompute); see the module docstring.
        sink_frames: first latent frames every window keeps at their own places.

    Returns:
        (tokens LongTensor[B, N, H, W], {"forward_passes", "seconds", "mode", "long_mode", "tokens_per_pass"})
    """
    lay = model.layout
    t, h, w = lay.grid
    if latent_frames < t:
        raise ValueError(f"latent_frames must be at least the clip's {t} latent frames, got {latent_frames}")
    window = LongWindow.of(lay, sink_frames)
    long_mode = resolve_long_mode(long_mode, model)
    rolling = long_mode == "rolling"
    param = next(model.parameters())
    device = param.device
    if label is not None:
        label = torch.as_tensor(label, dtype=torch.long).cpu()
    check_conditions(lay, label, cfg_scale, context is not None)
    sampling = Sampling(temperature, top_k, top_p, guidance_scale(cfg_scale))
    mode = resolve_mode(mode, model)
    if seed is None:
        seed = int.from_bytes(os.urandom(8), "little") >> 1
    check_seed(seed)
    tokens = _initial_tokens(lay, batch_size, context, device)
    labels = None
    if label is not None:
        labels = _as_labels(label, batch_size, device)
        if sampling.guided:
            labels = torch.cat([labels, torch.full_like(labels, lay.null_class)])
    keys = video_keys(seed, _video_index(video_index, batch_size, device))
    rows = 2 * batch_size if sampling.guided else batch_size

    was_training = model.training
    model.eval()
    try:
        if mode == "eager":
            runner: _Runner = _EagerRunner(model, tokens, labels, sampling, keys, rows, rolling)
        else:
            runner = _StaticRunner(model, tokens, labels, sampling, keys, mode == "graph", kv_bucket, rolling)
        began = time.perf_counter()
        video = _decode_long(model, runner, window, latent_frames, labels, rolling)
    finally:
        model.train(was_training)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - began
    clip_passes = len(plan_for(lay, str(device)).steps)
    frame_passes = clip_passes - window.first_step + (0 if rolling else 1)
    passes = clip_passes + (latent_frames - t) * frame_passes
    predicted = latent_frames * h * w - int(lay.context_mask.sum())
    stats = {"forward_passes": passes, "seconds": seconds, "mode": mode, "long_mode": long_mode,
             "tokens_per_pass": predicted / passes}
    return video.view(batch_size, latent_frames, h, w), stats
