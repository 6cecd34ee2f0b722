"""The training step on a CUDA GPU, as the trainer runs it (bf16 weights, fp32 master weights): compiled
layers against eager, no host synchronisation inside a step, flex against sdpa through the whole model, the
backend ``auto`` picks, and a profile whose categories see every part of the step.

bf16 tolerances: bf16 moves every gradient away from its fp32 value by some relative amount; a compiled or
flex run may round differently from the eager sdpa run, so it is held to 3x the eager bf16 run's own error
against fp32, plus 1% for parameters whose bf16 error happens to be tiny. A wrong mask, a missing backward
term or a stale compiled graph moves gradients by O(1)."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo
from numerics import assert_within_bf16_error

from nbp_ds.config import load_config
from nbp_ds.perf.profile import profile_steps, step_shares
from nbp_ds.perf.train_step import build_training, make_step, random_batch

pytestmark = pytest.mark.gpu

# the 700M preset's sequence (hybrid 1x1x16 rows, class token) and head size (96), two narrow layers
SMALL = ["layout.grid=[5,16,16]", "layout.block=[1,1,16]", "layout.hybrid=true", "layout.num_classes=10",
         "model.n_layer=2", "model.d_model=384", "model.n_head=4", "model.vocab_size=1000",
         "model.class_dropout=0.0", "model.loss_chunk=3000"]
CUDA = torch.device("cuda")


@pytest.fixture(autouse=True)
def fresh_compiler():
    """Each test compiles its own models: graphs of an earlier test's models must not fill the recompile limit."""
    torch._dynamo.reset()
    yield


def setup(attention: str, compile: bool, precision: str, checkpointing: str = "none", *extra: str):
    cfg = load_config("tiny", SMALL + [f"model.attention={attention}", f"model.compile={str(compile).lower()}",
                                       f"train.activation_checkpointing={checkpointing}", *extra])
    model, optimizer, autocast = build_training(cfg, CUDA, precision)
    return model, optimizer, autocast, random_batch(cfg, 4, CUDA, seed=1)


def loss_and_grads(attention: str, compile: bool, precision: str, checkpointing: str = "none"):
    model, _, _, batch = setup(attention, compile, precision, checkpointing)
    loss, _ = model.loss(batch)
    loss.backward()
    return loss.detach().float(), {n: p.grad.float() for n, p in model.named_parameters()}




@pytest.mark.parametrize("checkpointing", ["none", "selective"])
def test_compiled_bf16_step_matches_eager(checkpointing):
    fp32_loss, fp32 = loss_and_grads("flex", False, "fp32")
    eager_loss, eager = loss_and_grads("flex", False, "bf16", checkpointing)
    loss, grads = loss_and_grads("flex", True, "bf16", checkpointing)
    torch.testing.assert_close(eager_loss, fp32_loss, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(loss, eager_loss, rtol=1e-2, atol=1e-2)
    assert_within_bf16_error(grads, eager, fp32)


def test_compiled_flex_gradients_match_sdpa():
    """The whole model: compiled flex in bf16 against eager dense-mask sdpa (fp32 and bf16)."""
    fp32_loss, fp32 = loss_and_grads("sdpa", False, "fp32")
    _, sdpa_bf16 = loss_and_grads("sdpa", False, "bf16")
    loss, grads = loss_and_grads("flex", True, "bf16")
    torch.testing.assert_close(loss, fp32_loss, rtol=2e-2, atol=2e-2)
    assert_within_bf16_error(grads, sdpa_bf16, fp32)


def test_no_host_synchronisation_inside_a_step():
    """After warm-up (compilation may synchronise), the model's forward and backward and the optimizer step
    queue their work without waiting for the GPU: any synchronising call raises in sync-debug mode."""
    model, optimizer, autocast, batch = setup("auto", True, "bf16", "selective", "model.class_dropout=0.1")
    step = make_step(model, optimizer, autocast, batch)
    for _ in range(2):
        step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss, metrics = model.loss(batch)
        loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(loss) and 0 <= float(metrics["acc"]) <= 1


def test_auto_picks_the_fastest_exact_backend():
    block_causal, _, _, _ = setup("auto", False, "bf16")
    assert block_causal.backend.on(CUDA).name in ("flex", "flash")
    causal, _, _, _ = setup("auto", False, "bf16", "none", "layout.block=[1,1,1]", "layout.hybrid=false")
    assert causal.backend.on(CUDA).name == "sdpa"  # is_causal: cuDNN / FlashAttention-2 inside PyTorch


def test_a_gpu_profile_sees_every_part_of_the_step(tmp_path):
    model, optimizer, autocast, batch = setup("auto", True, "bf16", "none")
    step = make_step(model, optimizer, autocast, batch)
    for _ in range(2):
        step()
    prof, trace = profile_steps(step, tmp_path, steps=2, device=CUDA)
    shares = step_shares(prof.events(), CUDA)
    for category in ("matmul", "attention", "norm/rope/activation", "loss/head", "optimizer"):
        assert shares.ms[category] > 0, (category, shares.table())
    assert sum(shares.ms.values()) == pytest.approx(shares.step_ms, rel=0.05), shares.table()


def test_training_batches_arrive_pinned(tmp_path):
    """A batch copied to the GPU from pageable memory synchronises the host with the GPU's queue; the loader
    pins batches on a GPU machine so the trainer's non-blocking copy does not."""
    from train_helpers import make_shards

    from nbp_ds.data import build_loader

    make_shards(tmp_path, train=16, val=4)
    loader = build_loader(tmp_path / "train", grid=(3, 4, 4), batch_size=4, mode="train", num_workers=1)
    batch = next(iter(loader))
    assert batch["tokens"].is_pinned() and batch["label"].is_pinned()

