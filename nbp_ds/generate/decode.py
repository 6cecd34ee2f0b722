"""``generate``: sample videos as token grids, with the eager decoder (the reference) or the static one.

Modes:

* ``eager``: the KV cache grows pass by pass, each pass slicing its positions and attending through the model's
  attention backend (``chunk``); the reference every other mode is checked against.
* ``static``: the static decoder (``nbp_ds.generate.static``): fixed-shape passes, no host synchronisation, run
  eagerly; works on every device (and ZeRO-3 partitioned models).
* ``graph``: the static decoder with each pass shape captured in a CUDA graph (CUDA only). The captured decoder is
  kept per model, batch size and sampling settings, so later calls only replay; ``release_decoders`` frees it.
* ``auto`` (default): ``graph`` on a CUDA device, ``eager`` elsewhere (on a CPU the static passes' masked
  full-length attention costs more than the launches it saves).
"""

from __future__ import annotations

import os
import time
import weakref

import torch

from nbp_ds.generate.conditions import check_conditions, guidance_scale
from nbp_ds.generate.draw import Sampling, check_seed, draw_tokens, video_keys
from nbp_ds.generate.plan import DEFAULT_KV_BUCKET
from nbp_ds.generate.static import StaticDecoder, plan_for
from nbp_ds.layout import Layout
from nbp_ds.model.transformer import KVCache, NBPModel

MODES = ("auto", "eager", "static", "graph")


def is_partitioned(model: torch.nn.Module) -> bool:
    """Whether DeepSpeed ZeRO-3 partitions the model's parameters (gathered by hooks at each call: no graphs)."""
    return any(hasattr(p, "ds_id") for p in model.parameters())


def resolve_mode(mode: str, model: torch.nn.Module) -> str:
    """``auto`` -> the fastest mode the model's device supports; other modes are checked and passed through."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    on_gpu = next(model.parameters()).device.type == "cuda"
    if mode == "auto":
        return "graph" if on_gpu and not is_partitioned(model) else "eager"
    if mode == "graph" and not on_gpu:
        raise ValueError("mode='graph' needs a model on a CUDA device; use mode='static' or 'eager'")
    if mode == "graph" and is_partitioned(model):
        raise ValueError("mode='graph' cannot capture a ZeRO-3 partitioned model (its weights move at every call); "
                         "use mode='static' or 'eager'")
    return mode


# ---- captured decoders, kept per model ---------------------------------------------------------------------------
class _KeptDecoders:
    def __init__(self, fingerprint: tuple):
        self.fingerprint = fingerprint
        self.decoders: dict[tuple, StaticDecoder] = {}


_KEPT: weakref.WeakKeyDictionary[torch.nn.Module, _KeptDecoders] = weakref.WeakKeyDictionary()


def _weights_fingerprint(model: torch.nn.Module) -> tuple:
    """Where the weights live: captured graphs read them there, so a moved or cast model needs new graphs."""
    return tuple((t.data_ptr(), t.dtype, tuple(t.shape)) for t in (*model.parameters(), *model.buffers()))


def kept_decoder(model: NBPModel, batch: int, sampling: Sampling, kv_bucket: int = DEFAULT_KV_BUCKET) -> StaticDecoder:
    """The graph-captured decoder of ``model`` for a batch size and sampling settings, captured on first use."""
    fingerprint = _weights_fingerprint(model)
    kept = _KEPT.get(model)
    if kept is None or kept.fingerprint != fingerprint:
        kept = _KEPT[model] = _KeptDecoders(fingerprint)
    key = (batch, sampling, kv_bucket)
    if key not in kept.decoders:
        kept.decoders[key] = StaticDecoder(model, batch, sampling, graphs=True, kv_bucket=kv_bucket)
    return kept.decoders[key]


def release_decoders(model: torch.nn.Module | None = None) -> None:
    """Free the captured decoders (KV caches, graphs and their memory) of ``model``, or of every model."""
    if model is None:
        _KEPT.clear()
    else:
        _KEPT.pop(model, None)


# ---- inputs ----------------------------------------------------------------------------------------------------
def _as_labels(label: torch.Tensor, batch_size: int, device: torch.device) -> torch.Tensor:
    """Checked labels (a host LongTensor, one or [B]) as [B] on the device."""
    if label.dim() == 0:
        label = label.expand(batch_size)
    if label.shape != (batch_size,):
        raise ValueError(f"label must be an int or have shape [{batch_size}], got {list(label.shape)}")
    return label.to(device)


def _initial_tokens(layout: Layout, batch_size: int, context: torch.Tensor | None,
                    device: torch.device) -> torch.Tensor:
    """[B, T*H*W] zeros, with the given context frames of a frame-prediction layout in place."""
    tokens = torch.zeros(batch_size, layout.num_video_tokens, dtype=torch.long, device=device)
    if context is not None:  # a frame-prediction layout (check_conditions)
        t, h, w = layout.grid
        c = layout.context_frames
        context = torch.as_tensor(context, device=device).long()
        if context.dim() != 4 or context.shape[0] != batch_size or tuple(context.shape[2:]) != (h, w) \
                or context.shape[1] < c:
            raise ValueError(f"context must be [{batch_size}, >= {c}, {h}, {w}], got {list(context.shape)}")
        tokens[:, : c * h * w] = context[:, :c].reshape(batch_size, -1)
    return tokens


def _video_index(video_index, batch_size: int, device: torch.device) -> torch.Tensor:
    if video_index is None:
        return torch.arange(batch_size, device=device)
    index = torch.as_tensor(video_index, dtype=torch.long)
    if index.shape != (batch_size,) or bool((index < 0).any()):
        raise ValueError(f"video_index must be {batch_size} non-negative ints, got {index.tolist()}")
    return index.to(device)


# ---- decoding --------------------------------------------------------------------------------------------------
def decode_eager(model: NBPModel, tokens: torch.Tensor, labels: torch.Tensor | None, sampling: Sampling,
                 keys: torch.Tensor, cache: KVCache | None = None, first_step: int = 0,
                 stream_offset: int = 0) -> None:
    """The reference decoder: a KV cache that grows pass by pass, sliced by each step's [start, end).

    By default it decodes a whole video into ``tokens`` [B, T*H*W] with a fresh cache. Long sampling
    (nbp_ds.generate.long) passes its own ``cache`` holding the passes before ``first_step`` and a
    ``stream_offset`` added to the raster positions the random draws are keyed by (the token's place in the long
    video, not in the clip)."""
    layout, device = model.layout, tokens.device
    param = next(model.parameters())
    plan = plan_for(layout, str(device))
    rows = 2 * tokens.shape[0] if sampling.guided else tokens.shape[0]
    if cache is None:
        cache = model.new_cache(rows, device, param.dtype)
    for step in plan.steps[first_step:]:
        group = plan.groups[step.group]
        read_rows, targets = group.read_rows[step.row], group.targets[step.row]
        video = tokens if rows == tokens.shape[0] else tokens.repeat(2, 1)
        ids = layout.input_ids(video, labels, step.start, step.end)
        hidden = model(ids, start=step.start, cache=cache)
        logits = model.head(hidden[:, read_rows]).float()
        tokens[:, targets] = draw_tokens(logits, sampling, keys, targets + stream_offset)


@torch.no_grad()
def generate(
    model: NBPModel,
    batch_size: int,
    label: int | torch.Tensor | None = None,
    context: torch.Tensor | None = None,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    cfg_scale: float | None = None,
    seed: int | None = None,
    video_index: torch.Tensor | list[int] | None = None,
    mode: str = "auto",
    kv_bucket: int = DEFAULT_KV_BUCKET,
) -> tuple[torch.Tensor, dict]:
    """Sample videos as token grids.

    Args:
        model: an NBPModel (its layout decides NBP, NTP or hybrid decoding).
        batch_size: number of videos.
        label: class index (int or LongTensor[B]) for class-conditional models.
        context: LongTensor [B, c, H, W] (or [B, T, H, W]; its first c frames are used) of given
            latent frames for frame-prediction models (c = layout.context_frames).
        temperature: softmax temperature; 0 = greedy (argmax).
        top_k, top_p: sampling filters.
        cfg_scale: classifier-free guidance scale (class-conditional models; None or 1 = off).
        seed: seed of the random stream (a non-negative int; None = nondeterministic).
        video_index: each video's index in its run [B] (default 0..B-1): a video's random draws depend only on
            (seed, its index), never on the batch it is generated in.
        mode: ``auto`` (the fastest the device supports), ``eager`` (the reference), ``static`` or ``graph``
            (see nbp_ds.generate.decode).
        kv_bucket: the static decoder's attention lengths are multiples of this many cache slots
            (nbp_ds.generate.plan); fewer buckets, fewer captured graphs, more masked keys read.

    Returns:
        (tokens LongTensor[B, T, H, W], {"forward_passes": int, "seconds": float (decoding, after set-up),
        "tokens_per_pass": float, "mode": str})
    """
    layout = model.layout
    param = next(model.parameters())
    device = param.device
    if label is not None:
        label = torch.as_tensor(label, dtype=torch.long).cpu()  # checked once, on the host
    check_conditions(layout, label, cfg_scale, context is not None)
    sampling = Sampling(temperature, top_k, top_p, guidance_scale(cfg_scale))
    mode = resolve_mode(mode, model)
    if seed is None:
        seed = int.from_bytes(os.urandom(8), "little") >> 1
    check_seed(seed)

    tokens = _initial_tokens(layout, batch_size, context, device)
    labels = None
    if label is not None:
        labels = _as_labels(label, batch_size, device)
        if sampling.guided:  # the second half of the rows runs unconditionally (null class)
            labels = torch.cat([labels, torch.full_like(labels, layout.null_class)])
    keys = video_keys(seed, _video_index(video_index, batch_size, device))

    was_training = model.training
    model.eval()
    try:
        if mode == "eager":
            began = time.perf_counter()
            decode_eager(model, tokens, labels, sampling, keys)
        else:
            if mode == "graph":
                decoder = kept_decoder(model, batch_size, sampling, kv_bucket)
            else:
                decoder = StaticDecoder(model, batch_size, sampling, kv_bucket=kv_bucket)
            condition = layout.condition_ids(labels) if layout.prefix_len else None
            decoder.prepare(tokens, condition, keys)
            began = time.perf_counter()
            decoder.decode()
            tokens = decoder.tokens.clone()
    finally:
        model.train(was_training)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - began
    steps = len(layout.generation_steps)
    stats = {"forward_passes": steps, "seconds": seconds, "mode": mode,
             "tokens_per_pass": (layout.num_video_tokens - int(layout.context_mask.sum())) / steps}
    return tokens.view(batch_size, *layout.grid), stats
