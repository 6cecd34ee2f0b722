"""Backends on a CUDA GPU: flex (and flash where installed) forward and backward equal sdpa, and KV-cache greedy
decoding agrees with the full forward pass in the dtype each test names."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from numerics import assert_within_bf16_error

from nbp_ds.config import load_config
from nbp_ds.generate import generate
from nbp_ds.model import build_model

pytestmark = pytest.mark.gpu

LAYOUT = ["layout.grid=[5,16,16]", "layout.block=[1,1,16]", "model.n_layer=2", "model.d_model=256",
          "model.n_head=4", "model.vocab_size=1000", "layout.num_classes=10"]


def grads_for(attention: str, hybrid: bool, dtype: torch.dtype):
    torch.manual_seed(0)
    cfg = load_config("tiny", LAYOUT + [f"model.attention={attention}", f"layout.hybrid={str(hybrid).lower()}",
                                        "model.class_dropout=0.0"])
    model = build_model(cfg).cuda().to(dtype)
    g = torch.Generator().manual_seed(1)
    batch = {"tokens": torch.randint(0, 1000, (4, 5, 16, 16), generator=g).cuda(),
             "label": torch.arange(4).cuda()}
    loss, _ = model.loss(batch)
    loss.backward()
    return loss.detach().float(), {n: p.grad.float() for n, p in model.named_parameters()}


@pytest.mark.parametrize("hybrid", [False, True])
def test_flex_forward_backward_equal_sdpa(hybrid):
    ref_loss, ref = grads_for("sdpa", hybrid, torch.float32)
    loss, grads = grads_for("flex", hybrid, torch.float32)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-4, atol=1e-4)
    for name, g in grads.items():
        torch.testing.assert_close(g, ref[name], rtol=2e-3, atol=2e-4, msg=name)


@pytest.mark.skipif(importlib.util.find_spec("flash_attn") is None, reason="flash-attn(-4) not installed")
def test_flash_forward_backward_close_to_sdpa_bf16():
    """bf16 moves every gradient away from the fp32 values by some relative amount; flash in bf16 may differ
    from sdpa in bf16 in its accumulation order, so it is held to a small multiple of sdpa's own bf16 error
    (plus 1% for parameters whose bf16 error happens to be tiny). A wrong mask or a missing term in the
    backward pass moves gradients by O(1)."""
    ref_loss, ref = grads_for("sdpa", False, torch.float32)
    bf16_loss, bf16 = grads_for("sdpa", False, torch.bfloat16)
    loss, grads = grads_for("flash", False, torch.bfloat16)
    torch.testing.assert_close(loss, ref_loss, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(bf16_loss, ref_loss, rtol=2e-2, atol=2e-2)
    assert_within_bf16_error(grads, bf16, ref, what="flash bf16 gradient")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_greedy_decoding_agrees_with_full_forward_on_gpu(dtype):
    """Each greedily decoded token must be the argmax of the full forward pass's logits at its position, up to
    the dtype's rounding: cached and full passes round differently, so in bf16 a token may lose to a near-tie,
    but never by more than a few bf16 steps of the logits' size."""
    torch.manual_seed(0)
    cfg = load_config("tiny", LAYOUT + ["model.attention=flex", "layout.hybrid=true"])
    model = build_model(cfg).cuda().to(dtype).eval()
    with torch.no_grad():
        model.head.weight.mul_(8)  # spread the logits so that near-ties are rare (as in test_generate)
    assert next(model.parameters()).dtype == dtype
    label = torch.tensor([1, 2]).cuda()
    tokens, stats = generate(model, 2, label=label, temperature=0)
    assert stats["forward_passes"] == 16 + 80 - 1
    with torch.no_grad():
        logits = model.logits({"tokens": tokens, "label": label}).float()
    flat = tokens.view(2, -1)
    chosen = logits.gather(-1, flat.unsqueeze(-1)).squeeze(-1)
    gap = logits.amax(-1) - chosen  # 0 where the decoded token is the full pass's argmax
    if dtype == torch.float32:
        min_agreement, tolerance = 0.999, 1e-3
    else:
        min_agreement = 0.98
        tolerance = 4 * torch.finfo(torch.bfloat16).eps * float(logits.abs().amax())  # ~3% of the largest logit
    agreement = float((logits.argmax(-1) == flat).float().mean())
    assert agreement >= min_agreement, agreement
    assert float(gap.max()) <= tolerance, (float(gap.max()), tolerance)
