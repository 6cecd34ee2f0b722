"""KV-cache block decoding: NBP (a block per pass), NTP (block 1x1x1) and hybrid layouts.

The layout's ``generation_steps`` say what each forward pass feeds: step 0 the prefix (condition,
BOV, and for frame prediction the given context blocks), each later step the block just sampled.
A pass reads one set of logits per token of the block it predicts. The KV cache is allocated once
for the whole sequence.
"""

from __future__ import annotations

import time

import torch

from nbp_ds.layout import Layout
from nbp_ds.model.transformer import NBPModel

# the NBP paper's sampling for its reported FVD (the authors' evaluation scripts): no classifier-free guidance
PAPER_SAMPLING = {"temperature": 1.0, "top_k": 16000, "top_p": 0.9, "cfg_scale": None}


def filter_logits(logits: torch.Tensor, top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """Mask logits [..., V] outside the top-k and/or the nucleus of mass top_p with -inf."""
    if top_k is not None and 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and 0.0 < top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        # drop a token when the mass before it already reaches top_p (the first token always stays)
        drop_sorted = (cum - sorted_logits.softmax(-1)) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def guided_logits(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance: ``uncond + scale * (cond - uncond)`` (scale 1 gives cond, 0 gives uncond)."""
    return uncond + scale * (cond - uncond)


def inverse_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Tokens [...] drawn from probs [..., V] (unnormalised is fine) by uniforms u [...] in [0, 1).

    Token i owns the draws in [cdf(i-1), cdf(i)), so a token of probability 0 owns none: the search takes
    the first token whose cdf *exceeds* the draw (a left-side search would give token 0 at u = 0 even when
    the filters removed it).
    """
    cdf = probs.cumsum(-1)
    found = torch.searchsorted(cdf, u.unsqueeze(-1).to(cdf.dtype) * cdf[..., -1:], right=True).squeeze(-1)
    # a draw that rounds up to the total (u just below 1 cast to a coarser dtype) finds no token: it belongs
    # to the last token with mass, not to trailing zeros
    last_with_mass = probs.shape[-1] - 1 - (probs > 0).flip(-1).int().argmax(-1)
    return torch.minimum(found, last_with_mass)


def sample_tokens(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None,
                  generator: torch.Generator | None) -> torch.Tensor:
    """logits [B, n, V] -> tokens [B, n]; temperature 0 means greedy."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = filter_logits(logits / temperature, top_k, top_p).softmax(-1)
    # inverse-CDF sampling: one uniform per token (torch.multinomial is ~20x slower on CPU at 64k codes)
    u = torch.rand(probs.shape[:-1], device=probs.device, generator=generator, dtype=probs.dtype)
    return inverse_cdf(probs, u)


def _as_labels(label, batch_size: int, layout: Layout, device: torch.device) -> torch.Tensor:
    if label is None:
        raise ValueError("this model is class-conditional: pass label= (an int or LongTensor[B])")
    label = layout.check_labels(torch.as_tensor(label, dtype=torch.long).cpu())  # checked once, on the host
    if label.dim() == 0:
        label = label.expand(batch_size)
    if label.shape != (batch_size,):
        raise ValueError(f"label must be an int or have shape [{batch_size}], got {list(label.shape)}")
    return label.to(device)


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
        seed: seed of the sampling generator (None = nondeterministic).

    Returns:
        (tokens LongTensor[B, T, H, W], {"forward_passes": int, "seconds": float, "tokens_per_pass": float})
    """
    layout = model.layout
    param = next(model.parameters())
    device, dtype = param.device, param.dtype
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    generator = torch.Generator(device=device)
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)

    tokens = torch.zeros(batch_size, layout.num_video_tokens, dtype=torch.long, device=device)
    if layout.condition == "frames":
        t, h, w = layout.grid
        c = layout.context_frames
        if context is None:
            raise ValueError(f"this model predicts frames: pass context= LongTensor[{batch_size}, {c}, {h}, {w}]")
        context = torch.as_tensor(context, device=device).long()
        if context.dim() != 4 or context.shape[0] != batch_size or tuple(context.shape[2:]) != (h, w) \
                or context.shape[1] < c:
            raise ValueError(f"context must be [{batch_size}, >= {c}, {h}, {w}], got {list(context.shape)}")
        tokens[:, : c * h * w] = context[:, :c].reshape(batch_size, -1)
    elif context is not None:
        raise ValueError(f"context= is for frame-prediction models; this one has condition={layout.condition!r}")

    labels = None
    guided = False
    if layout.condition == "class":
        labels = _as_labels(label, batch_size, layout, device)
        guided = cfg_scale is not None and cfg_scale != 1.0
        if guided and not layout.has_null_class:
            raise ValueError("cfg_scale= needs a null class, and a model conditioned on class text prefixes "
                             "(layout.class_prefixes) has none: sample without classifier-free guidance")
        if guided:  # second half of the rows runs unconditionally (null class)
            labels = torch.cat([labels, torch.full_like(labels, layout.null_class)])
    elif label is not None or (cfg_scale is not None and cfg_scale != 1.0):
        raise ValueError(f"label= and cfg_scale= need a class-conditional model; condition={layout.condition!r}")

    rows = labels.shape[0] if labels is not None else batch_size
    target = torch.as_tensor(layout.target_index, device=device)
    was_training = model.training
    model.eval()
    cache = model.new_cache(rows, device, dtype)
    began = time.perf_counter()
    try:
        for step in layout.generation_steps:
            video = tokens if rows == batch_size else tokens.repeat(2, 1)
            ids = layout.input_ids(video, labels, step.start, step.end)
            hidden = model(ids, start=step.start, cache=cache)
            read = torch.as_tensor(step.read, device=device)
            logits = model.head(hidden[:, read - step.start]).float()
            if guided:
                logits = guided_logits(*logits.chunk(2), cfg_scale)
            tokens[:, target[read]] = sample_tokens(logits, temperature, top_k, top_p, generator)
    finally:
        model.train(was_training)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - began
    steps = len(layout.generation_steps)
    stats = {"forward_passes": steps, "seconds": seconds,
             "tokens_per_pass": (layout.num_video_tokens - int(layout.context_mask.sum())) / steps}
    return tokens.view(batch_size, *layout.grid), stats
