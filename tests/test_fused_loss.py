"""The fused, chunked output layer + cross-entropy (nbp_ds.model.loss) against F.cross_entropy on whole logits.

Tolerances: fp32 results may differ from the reference only by summation order (rtol 1e-5); bf16 gradients are
held to a relative error of 1e-2 against the reference's own bf16 autograd (both round the same products)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from numerics import relative_error

from nbp_ds.config import load_config
from nbp_ds.model import build_model
from nbp_ds.model.loss import linear_cross_entropy


def inputs(rows: int = 37, dim: int = 16, vocab: int = 50, dtype=torch.float32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(rows, dim, generator=g).to(dtype).requires_grad_()
    weight = (torch.randn(vocab, dim, generator=g) / dim ** 0.5).to(dtype).requires_grad_()
    targets = torch.randint(0, vocab, (rows,), generator=g)
    return hidden, weight, targets


def reference(hidden, weight, targets):
    """Whole logits through the unfused head and F.cross_entropy: (loss_sum, correct, d hidden, d weight)."""
    logits = hidden @ weight.t()
    loss = F.cross_entropy(logits.float(), targets, reduction="sum")
    d_hidden, d_weight = torch.autograd.grad(loss, (hidden, weight))
    return loss.detach(), (logits.detach().argmax(-1) == targets).sum(), d_hidden, d_weight


@pytest.mark.parametrize("chunk", [1, 5, 16, 37, 100])  # 37 rows: chunks that do not divide them, one, more
def test_equals_reference_cross_entropy_fp32(chunk):
    hidden, weight, targets = inputs()
    ref_loss, ref_correct, ref_dh, ref_dw = reference(hidden, weight, targets)
    loss, correct = linear_cross_entropy(hidden, weight, targets, chunk)
    d_hidden, d_weight = torch.autograd.grad(loss, (hidden, weight))
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
    assert int(correct) == int(ref_correct)
    torch.testing.assert_close(d_hidden, ref_dh, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(d_weight, ref_dw, rtol=1e-5, atol=1e-6)


def test_close_to_reference_in_bf16_with_gradients_in_bf16():
    hidden, weight, targets = inputs(rows=64, dim=32, vocab=300, dtype=torch.bfloat16)
    ref_loss, ref_correct, ref_dh, ref_dw = reference(hidden, weight, targets)
    loss, correct = linear_cross_entropy(hidden, weight, targets, chunk=24)
    d_hidden, d_weight = torch.autograd.grad(loss, (hidden, weight))
    assert loss.dtype == torch.float32 and d_hidden.dtype == d_weight.dtype == torch.bfloat16
    torch.testing.assert_close(loss, ref_loss, rtol=1e-4, atol=1e-3)  # same bf16 logits, fp32 loss
    assert int(correct) == int(ref_correct)
    assert relative_error(d_hidden, ref_dh) < 1e-2
    assert relative_error(d_weight, ref_dw) < 1e-2


def test_backward_applies_the_incoming_gradient_and_only_where_needed():
    hidden, weight, targets = inputs()
    _, _, ref_dh, ref_dw = reference(hidden, weight, targets)
    loss, _ = linear_cross_entropy(hidden, weight, targets, chunk=8)
    (loss * 0.25).backward()
    torch.testing.assert_close(hidden.grad, 0.25 * ref_dh, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(weight.grad, 0.25 * ref_dw, rtol=1e-5, atol=1e-6)
    frozen = weight.detach()  # only the hidden states need a gradient: none is made for the weight
    loss, _ = linear_cross_entropy(hidden, frozen, targets, chunk=8)
    (d_hidden,) = torch.autograd.grad(loss, (hidden,))
    torch.testing.assert_close(d_hidden, ref_dh, rtol=1e-5, atol=1e-6)


def test_without_gradients_gives_the_same_loss_and_accuracy():
    hidden, weight, targets = inputs()
    ref_loss, ref_correct, _, _ = reference(hidden, weight, targets)
    with torch.no_grad():
        loss, correct = linear_cross_entropy(hidden, weight, targets, chunk=10)
    assert not loss.requires_grad
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
    assert int(correct) == int(ref_correct)


def test_model_loss_equals_cross_entropy_of_its_logits():
    """model.loss (fused head) against F.cross_entropy over model.logits (head applied to every position), which
    share nothing but the transformer: value, accuracy and every parameter's gradient."""
    torch.manual_seed(0)
    cfg = load_config("tiny", ["model.attention=sdpa", "model.class_dropout=0.0", "model.loss_chunk=7"])
    model = build_model(cfg).train()
    g = torch.Generator().manual_seed(1)
    batch = {"tokens": torch.randint(0, 64, (3, *cfg.layout.grid), generator=g), "label": torch.tensor([0, 1, 3])}
    loss, metrics = model.loss(batch)
    loss.backward()
    fused = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    logits = model.logits(batch)  # [B, N, V], logits[:, j] predicts video token j
    ref = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch["tokens"].reshape(-1))
    ref.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    acc = (logits.argmax(-1) == batch["tokens"].reshape(3, -1)).float().mean()
    torch.testing.assert_close(metrics["acc"], acc)
    assert metrics["tokens"] == 3 * 48
    for name, p in model.named_parameters():
        torch.testing.assert_close(fused[name], p.grad, rtol=1e-4, atol=1e-6, msg=name)
