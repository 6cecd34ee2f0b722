"""Packed rows (nbp_ds.packing) through the model: equal to training the same clips one by one, no gradient from
one clip into another, flex equal to the dense reference, and clear refusals."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from nbp_ds.config import load_config
from nbp_ds.errors import ConfigError, UsageError
from nbp_ds.layout import Layout
from nbp_ds.model import AttentionUnavailable, build_model
from nbp_ds.packing import Clip, clip_length, pack_rows

# per layout: the run's overrides and the grids of the clips packed together (several lengths and sizes)
CASES = {
    "nbp-class": (["layout.block=[1,1,4]"], [(3, 4, 4), (2, 4, 8), (1, 8, 4), (4, 4, 4)]),
    "hybrid": (["layout.block=[1,1,4]", "layout.hybrid=true"], [(3, 4, 4), (1, 4, 8), (2, 2, 4), (2, 4, 4)]),
    "frames": (["layout.condition=frames", "layout.context_frames=1", "layout.num_classes=0"],
               [(3, 4, 4), (2, 4, 8), (4, 4, 4), (2, 4, 4)]),
    "3d-blocks": (["layout.grid=[4,4,4]", "layout.block=[2,2,2]"], [(4, 4, 4), (2, 2, 4), (2, 4, 2), (4, 2, 2)]),
}
# fp32 on the CPU: the packed and the clip-by-clip passes sum the same terms in other orders
TOLERANCE = {"rtol": 1e-5, "atol": 1e-6}


def config(name: str, *extra: str, grid=None):
    overrides, _ = CASES[name]
    grid_override = [f"layout.grid=[{','.join(map(str, grid))}]"] if grid is not None else []
    return load_config("tiny", [*overrides, *grid_override, "model.attention=sdpa", *extra])


def model_for(cfg, state=None):
    torch.manual_seed(0)
    model = build_model(cfg).eval()  # eval: no class dropout, so both sides see the same labels
    if state is not None:
        model.load_state_dict(state)
    return model


def clips_for(name: str, seed: int = 3) -> list[Clip]:
    cfg = config(name)
    rng = np.random.default_rng(seed)
    return [Clip(rng.integers(0, cfg.model.vocab_size, size=grid), label=int(i % 4) if cfg.layout.num_classes else None)
            for i, grid in enumerate(CASES[name][1])]


def hand_count(cfg, grid) -> int:
    """Video targets of a clip, counted from the rules: every token, less the given context frames."""
    t, h, w = grid
    return (t - cfg.layout.context_frames) * h * w


def grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def two_rows(cfg, clips):
    """Clips 0 and 1 in row 0, clips 2 and 3 in row 1, with room to spare (padding) in both."""
    layout = Layout.from_config(cfg.layout, cfg.model.vocab_size)
    need = max(sum(clip_length(layout, c.grid) for c in clips[:2]), sum(clip_length(layout, c.grid) for c in clips[2:]))
    return layout, pack_rows(layout, [clips[:2], clips[2:]], need + 5)


@pytest.mark.parametrize("name", list(CASES))
def test_packed_batch_equals_clip_by_clip(name):
    """Loss and every gradient of a packed batch equal the token-weighted sum over the same clips trained one at a
    time, each by a model of the clip's own grid (same weights)."""
    cfg = config(name)
    clips = clips_for(name)
    packed_model = model_for(cfg)
    state = packed_model.state_dict()
    _, batch = two_rows(cfg, clips)
    loss, metrics = packed_model.loss(batch)
    loss.backward()

    counts = [hand_count(cfg, c.grid) for c in clips]
    total = sum(counts)
    assert metrics["tokens"] == total
    expected_loss, per_clip_losses = 0.0, []
    expected_grads: dict[str, torch.Tensor] = {}
    for clip, n in zip(clips, counts, strict=True):
        single = model_for(config(name, grid=clip.grid), state)
        one = {"tokens": torch.from_numpy(clip.tokens)[None], "label": torch.tensor([clip.label or 0])}
        clip_loss, clip_metrics = single.loss(one)
        assert clip_metrics["tokens"] == n
        (clip_loss * n / total).backward()
        expected_loss += clip_loss.item() * n / total
        per_clip_losses.append(clip_loss.item())
        for key, g in grads(single).items():
            expected_grads[key] = expected_grads.get(key, 0) + g

    torch.testing.assert_close(loss.item(), expected_loss, **TOLERANCE)
    # weighting by tokens, not by clips: the clips' plain mean is told apart at this tolerance
    assert abs(np.mean(per_clip_losses) - expected_loss) > 1e-4
    got = grads(packed_model)
    assert set(got) == set(expected_grads)
    for key, g in got.items():
        torch.testing.assert_close(g, expected_grads[key], **TOLERANCE, msg=lambda m, k=key: f"{k}: {m}")


def clip_spans(layout: Layout, clips) -> list[tuple[int, int]]:
    spans, at = [], 0
    for c in clips:
        n = clip_length(layout, c.grid)
        spans.append((at, at + n))
        at += n
    return spans


def test_no_gradient_crosses_clips():
    """A clip's outputs have exactly zero gradient with respect to the inputs of every other clip (and padding) in
    its row, and a nonzero one with respect to its own."""
    cfg = config("nbp-class")
    clips = clips_for("nbp-class")
    model = model_for(cfg)
    layout, batch = two_rows(cfg, clips)
    seen = {}
    model.embed.register_forward_hook(lambda module, args, out: seen.setdefault("x", out.retain_grad() or out))
    hidden = model.forward_packed(batch)
    spans = clip_spans(layout, clips[:2])
    for source, (lo, hi) in enumerate(spans):
        model.zero_grad()
        seen["x"].grad = None
        hidden[0, lo:hi].pow(2).sum().backward(retain_graph=True)
        g = seen["x"].grad[0]
        for other, (olo, ohi) in enumerate(spans):
            if other == source:
                assert g[olo:ohi].abs().sum() > 0
            else:
                assert torch.equal(g[olo:ohi], torch.zeros_like(g[olo:ohi])), f"clip {source} reads clip {other}"
        assert torch.equal(g[spans[-1][1]:], torch.zeros_like(g[spans[-1][1]:])), "a clip reads the padding"
        assert torch.equal(seen["x"].grad[1], torch.zeros_like(seen["x"].grad[1])), "a clip reads another row"


def test_flex_equals_sdpa_on_packed_rows():
    """FlexAttention's packed BlockMask gives the dense reference's hidden states (forward: CPU flex has no
    backward)."""
    clips = clips_for("hybrid")
    sdpa = model_for(config("hybrid"))
    flex = model_for(config("hybrid", "model.attention=flex"))
    _, batch = two_rows(config("hybrid"), clips)
    with torch.no_grad():
        torch.testing.assert_close(flex.forward_packed(batch), sdpa.forward_packed(batch), rtol=1e-4, atol=1e-5)
    assert flex._packed_backends[torch.device("cpu")].name == "flex"


def test_packed_checkpointing_and_then_one_grid():
    """Activation checkpointing recomputes each layer under the same packed mask (same gradients), and a one-grid
    batch after a packed one runs under the layout's rule again."""
    cfg = config("nbp-class")
    _, batch = two_rows(cfg, clips_for("nbp-class"))
    plain, recomputed = model_for(cfg), model_for(cfg)
    recomputed.enable_activation_checkpointing("full")
    for model in (plain, recomputed):
        model.loss(batch)[0].backward()
    for key, g in grads(plain).items():
        torch.testing.assert_close(grads(recomputed)[key], g, **TOLERANCE)
    one_grid = {"tokens": torch.randint(0, 64, (2, 3, 4, 4), generator=torch.Generator().manual_seed(0)),
                "label": torch.tensor([0, 1])}
    with torch.no_grad():
        torch.testing.assert_close(plain.logits(one_grid), model_for(cfg).logits(one_grid))


def test_packing_refusals_are_clear():
    cfg = config("nbp-class")
    layout = Layout.from_config(cfg.layout, cfg.model.vocab_size)
    clips = clips_for("nbp-class")
    with pytest.raises(ConfigError, match=r"grid \[3, 4, 6\].*layout.block=\[1, 1, 4\]"):
        pack_rows(layout, [[Clip(np.zeros((3, 4, 6), np.int64), 0)]], 200)
    with pytest.raises(ValueError, match="more than 60 positions"):
        pack_rows(layout, [clips[:2]], 60)
    with pytest.raises(ValueError, match="needs a class label"):
        pack_rows(layout, [[Clip(np.zeros((3, 4, 4), np.int64))]], 60)
    _, batch = two_rows(cfg, clips)
    with pytest.raises(AttentionUnavailable, match="model.attention=flash cannot train packed rows"):
        model_for(config("nbp-class", "model.attention=flash")).loss(batch)
    gpt2 = load_config("tiny", ["layout.block=[1,1,4]", "model.arch=gpt2", "model.attention=sdpa"])
    with pytest.raises(UsageError, match="model.arch=gpt2"):
        model_for(gpt2).loss(batch)
