"""Backends on a CUDA GPU: flex (and flash where installed) forward and backward equal sdpa."""

from __future__ import annotations

import importlib.util

import pytest
import torch

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
    ref_loss, ref = grads_for("sdpa", False, torch.bfloat16)
    loss, grads = grads_for("flash", False, torch.bfloat16)
    torch.testing.assert_close(loss, ref_loss, rtol=2e-2, atol=2e-2)


def test_greedy_decoding_exact_on_gpu_bf16():
    torch.manual_seed(0)
    cfg = load_config("tiny", LAYOUT + ["model.attention=flex", "layout.hybrid=true"])
    model = build_model(cfg).cuda().eval()
    tokens, stats = generate(model, 2, label=torch.tensor([1, 2]), temperature=0)
    assert stats["forward_passes"] == 16 + 80 - 1
    with torch.no_grad():
        pred = model.logits({"tokens": tokens, "label": torch.tensor([1, 2]).cuda()}).argmax(-1)
    assert (pred == tokens.view(2, -1)).float().mean() > 0.999
