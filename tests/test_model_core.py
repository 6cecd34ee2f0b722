"""The layout, the attention rule seen through model.logits, backends, and next-token equivalence."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from nbp_ds.config import load_config
from nbp_ds.errors import ConfigError
from nbp_ds.layout import Layout
from nbp_ds.model import AttentionUnavailable, build_model

LAYOUTS = {
    "nbp-class": ["layout.block=[1,1,4]"],
    "nbp-frame-blocks": ["layout.block=[1,2,4]", "layout.condition=none", "layout.num_classes=0"],
    "nbp-3d-blocks": ["layout.grid=[4,4,4]", "layout.block=[2,2,2]"],
    "ntp": ["layout.block=[1,1,1]"],
    "hybrid": ["layout.block=[1,1,4]", "layout.hybrid=true"],
    "frames": ["layout.condition=frames", "layout.context_frames=1", "layout.num_classes=0"],
}


def make(name: str, *extra: str):
    torch.manual_seed(0)
    cfg = load_config("tiny", LAYOUTS[name] + ["model.attention=sdpa", *extra])
    return build_model(cfg).eval(), cfg


def batch_for(cfg, b: int = 2, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, cfg.model.vocab_size, (b, *cfg.layout.grid), generator=g)
    return {"tokens": tokens, "label": torch.arange(b) % max(cfg.layout.num_classes, 1)}


@pytest.mark.parametrize("name", ["nbp-class", "nbp-frame-blocks", "nbp-3d-blocks", "ntp", "frames"])
def test_attention_rule_through_logits(name):
    """Changing a token of video block k keeps target blocks <= k bit-identical and changes block k+1."""
    model, cfg = make(name)
    lay = model.layout
    batch = batch_for(cfg)
    with torch.no_grad():
        base = model.logits(batch)
    order = lay.block_order
    size = lay.block_size
    rng = np.random.default_rng(0)
    for k in range(lay.num_blocks - 1):
        for inner in sorted({0, size - 1, int(rng.integers(size))}):
            pos = int(order[k * size + inner])
            changed = {key: v.clone() for key, v in batch.items()}
            flat = changed["tokens"].view(2, -1)
            flat[:, pos] = (flat[:, pos] + 1) % cfg.model.vocab_size
            with torch.no_grad():
                out = model.logits(changed)
            earlier = order[: (k + 1) * size]
            following = order[(k + 1) * size:(k + 2) * size]
            assert torch.equal(out[:, earlier], base[:, earlier]), (k, inner)
            diff = (out[:, following] - base[:, following]).abs().amax(-1)
            assert bool((diff > 0).all()), f"block {k + 1} not fully influenced by block {k} token {inner}"


def test_hybrid_first_block_is_token_by_token():
    model, cfg = make("hybrid")
    lay = model.layout
    batch = batch_for(cfg)
    with torch.no_grad():
        base = model.logits(batch)
    order, size = lay.block_order, lay.block_size
    for i in range(size):  # token i of block 0 influences tokens i+1.. of block 0 and all of block 1
        changed = {key: v.clone() for key, v in batch.items()}
        changed["tokens"].view(2, -1)[:, order[i]] += 1
        with torch.no_grad():
            out = model.logits(changed)
        assert torch.equal(out[:, order[: i + 1]], base[:, order[: i + 1]])
        later = order[i + 1: 2 * size]
        assert bool(((out[:, later] - base[:, later]).abs().amax(-1) > 0).all())
    assert len(lay.generation_steps) == size + lay.num_blocks - 1


def test_hybrid_tables_over_two_blocks_by_hand():
    """hybrid_blocks=2 on a 2x2x4 grid of row blocks (L = 4, n = 4): BOV and x0..x6 each their own block
    predicting x0..x7, then x7 and three placeholders predicting block 2, then block 2 predicting block 3."""
    lay = Layout(grid=(2, 2, 4), block=(1, 1, 4), vocab_size=16, hybrid=True, hybrid_blocks=2)
    bov, ph = -1, -2  # SOURCE_BOV, SOURCE_PLACEHOLDER
    assert lay.input_source.tolist() == [bov, 0, 1, 2, 3, 4, 5, 6, 7, ph, ph, ph, 8, 9, 10, 11]
    assert lay.target_index.tolist() == list(range(16))
    assert lay.block_ids.tolist() == [1, 2, 3, 4, 5, 6, 7, 8, 9, 9, 9, 9, 10, 10, 10, 10]
    # one pass per token of the first two blocks, then one per block: kL + n - k = 8 + 4 - 2
    assert [step.read for step in lay.generation_steps] == [(p,) for p in range(8)] + [(8, 9, 10, 11),
                                                                                      (12, 13, 14, 15)]


def test_hybrid_over_a_whole_frame_is_token_by_token_through_it():
    """hybrid_blocks = the blocks of a latent frame: every token of frame 0 sees exactly the tokens before it
    (through model.logits), and the first block after the frame sees the whole frame."""
    model, cfg = make("hybrid", "layout.hybrid_blocks=4")
    lay = model.layout
    batch = batch_for(cfg)
    with torch.no_grad():
        base = model.logits(batch)
    order, first = lay.block_order, 4 * lay.block_size  # the 16 tokens of latent frame 0
    for i in range(first):
        changed = {key: v.clone() for key, v in batch.items()}
        changed["tokens"].view(2, -1)[:, order[i]] += 1
        with torch.no_grad():
            out = model.logits(changed)
        assert torch.equal(out[:, order[: i + 1]], base[:, order[: i + 1]]), i
        later = order[i + 1: first + lay.block_size]
        assert bool(((out[:, later] - base[:, later]).abs().amax(-1) > 0).all()), i
    assert len(lay.generation_steps) == first + lay.num_blocks - 4


def rotate_3d(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """3D RoPE written independently of nbp_ds.model.rope, as complex multiplication: x [B, H, S, D] at
    positions [S, 3] (t, h, w). Coordinates i and i + D/2 form a complex number; the first D/2 angles
    belong to t, h, w in turn, h and w getting 2 * (D // 6) dimensions each and t the rest, each part
    with frequencies theta^(-2j / its size)."""
    d = x.shape[-1]
    spatial = 2 * (d // 6)
    freqs, axis = [], []
    for a, size in enumerate((d - 2 * spatial, spatial, spatial)):
        for j in range(size // 2):
            freqs.append(theta ** (-2 * j / size))
            axis.append(a)
    angle = positions[:, axis].double() * torch.tensor(freqs, dtype=torch.float64)  # [S, D/2]
    rotation = torch.polar(torch.ones_like(angle), angle)  # e^(i angle)
    z = torch.complex(x[..., : d // 2].double(), x[..., d // 2:].double()) * rotation
    return torch.cat([z.real, z.imag], dim=-1).to(x.dtype)


def reference_causal_logits(model, batch, theta: float) -> torch.Tensor:
    """A plain causal next-token model with the same weights: [class] BOV x0 .. x(N-2), is_causal attention,
    and its own rotary embedding (rotate_3d), so that a wrong rotation in the package cannot hide here."""
    lay = model.layout
    flat = batch["tokens"].view(batch["tokens"].shape[0], -1)
    b, n = flat.shape
    cls = lay.class_token(batch["label"]).unsqueeze(1)
    ids = torch.cat([cls, torch.full((b, 1), lay.bov_token), flat[:, :-1]], dim=1)
    raster = torch.arange(n)  # input j + 1 predicts raster token j and carries its (t, h, w) on the 3x4x4 grid
    pos = torch.stack([raster // 16, (raster // 4) % 4, raster % 4], 1)
    pos = torch.cat([torch.tensor([[-1, 0, 0]]), pos])  # the class token, one frame before the video
    x = model.embed(ids)
    for layer in model.layers:
        a = layer.attn
        h = layer.attn_norm(x)
        q, k, v = a.qkv(h).view(b, n + 1, 3, a.n_head, a.head_dim).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(rotate_3d(q, pos, theta), rotate_3d(k, pos, theta), v, is_causal=True)
        x = x + a.out(y.transpose(1, 2).reshape(b, n + 1, -1))
        x = x + layer.mlp(layer.mlp_norm(x))
    return model.head(model.norm(x))[:, 1:]  # drop the class token's output


def test_block_1x1x1_is_next_token_prediction():
    model, cfg = make("ntp")
    lay = model.layout
    assert torch.equal(lay.allowed(), torch.ones(lay.seq_len, lay.seq_len).tril().bool())
    batch = batch_for(cfg)
    with torch.no_grad():
        ours = model.logits(batch)
        ref = reference_causal_logits(model, batch, cfg.model.rope_theta)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["nbp-class", "hybrid", "nbp-3d-blocks"])
def test_flex_forward_equals_sdpa(name):
    model, cfg = make(name)
    flex, _ = make(name, "model.attention=flex")  # same seed: the same weights, another backend
    assert flex.backend.on(torch.device("cpu")).name == "flex"
    batch = batch_for(cfg)
    with torch.no_grad():
        ref = model.logits(batch)
        out = flex.logits(batch)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


def test_flex_backward_on_cpu_is_a_clear_error():
    model, cfg = make("nbp-class", "model.attention=flex")
    model.train()
    with pytest.raises(AttentionUnavailable, match="no backward pass on CPU"):
        model.loss(batch_for(cfg))[0].backward()


def test_flash_without_gpu_or_package_is_a_clear_error():
    model, cfg = make("nbp-class", "model.attention=flash")
    with pytest.raises(AttentionUnavailable, match="flash"):
        model.logits(batch_for(cfg))


def test_loss_and_targets_shift_by_one_block():
    lay = Layout.from_config(load_config("tiny").layout, 64)
    tokens = torch.arange(48).view(1, 3, 4, 4)
    ids = lay.input_ids(tokens, torch.tensor([2]))
    tgt = lay.targets(tokens)
    assert ids[0, 0] == lay.class_token(torch.tensor(2))
    assert (ids[0, 1:5] == lay.bov_token).all()
    assert tgt[0, 0] == -100 and tgt[0, 1:5].tolist() == [0, 1, 2, 3]
    assert ids[0, 5:9].tolist() == [0, 1, 2, 3] and tgt[0, 5:9].tolist() == [4, 5, 6, 7]
    # BOV block sits where video block 0 sits
    assert lay.positions[1:5].tolist() == [[0, 0, 0], [0, 0, 1], [0, 0, 2], [0, 0, 3]]


def test_frames_layout_excludes_context_from_loss():
    model, cfg = make("frames")
    lay = model.layout
    assert lay.loss_mask.sum() == 2 * 16  # 2 of 3 latent frames are predicted
    loss, metrics = model.loss(batch_for(cfg))
    assert metrics["tokens"] == 2 * 32 and torch.isfinite(loss)


def test_loss_falls_when_overfitting_one_batch():
    model, cfg = make("nbp-class")
    model.train()
    batch = batch_for(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = None
    for _ in range(30):
        loss, _ = model.loss(batch)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * first


def test_activation_checkpointing_gives_same_gradients():
    model, cfg = make("nbp-class", "model.class_dropout=0.0")
    model.train()
    batch = batch_for(cfg)
    model.loss(batch)[0].backward()
    ref = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.enable_activation_checkpointing()
    model.loss(batch)[0].backward()
    for a, p in zip(ref, model.parameters(), strict=True):
        torch.testing.assert_close(p.grad, a)


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        (["model.n_layers=3"], "model.n_layers"),
        (["layout.block=[1,3,4]"], "layout.block"),
        (["model.n_head=5"], "model.n_head=5"),
        (["model.attention=fast"], "model.attention"),
        (["layout.condition=frames"], "layout.context_frames"),
        (["layout.hybrid=true", "layout.condition=frames", "layout.context_frames=1"], "layout.hybrid"),
        (["train.lr=abc"], "train.lr"),
        (["nonsense"], "key=value"),
    ],
)
def test_bad_config_is_refused_by_name(overrides, fragment):
    with pytest.raises(ConfigError, match=fragment.replace("[", r"\[").replace("]", r"\]")):
        load_config("tiny", overrides)


def test_bad_labels_and_shapes_are_clear_errors():
    model, cfg = make("nbp-class")
    batch = batch_for(cfg)
    with pytest.raises(ValueError, match="labels must be in"):
        model.logits({**batch, "label": torch.tensor([0, 9])})
    with pytest.raises(ValueError, match="tokens must be"):
        model.logits({**batch, "tokens": batch["tokens"][:, :2]})


def test_chunked_loss_equals_whole_loss():
    model, cfg = make("nbp-class", "model.class_dropout=0.0")
    model.train()
    batch = batch_for(cfg, b=3)
    loss, metrics = model.loss(batch)
    loss.backward()
    ref = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.loss_chunk = 7  # 3 x 48 targets in 21 uneven chunks
    chunked, chunked_metrics = model.loss(batch)
    chunked.backward()
    torch.testing.assert_close(chunked, loss)
    torch.testing.assert_close(chunked_metrics["acc"], metrics["acc"])
    for a, p in zip(ref, model.parameters(), strict=True):
        torch.testing.assert_close(p.grad, a, rtol=1e-5, atol=1e-6)
