"""nbp-bench-optimizer on the CPU: the AdamW candidates compute the same update, AdamW's first step written out
by hand, and the table make gpu-check prints."""

from __future__ import annotations

import torch

from nbp_ds.cli.bench_optimizer import main as bench_optimizer
from nbp_ds.perf.optimizer_bench import make_optimizer, time_optimizers


def test_each_torch_candidate_takes_adamws_first_step():
    """Step 1 of AdamW: bias-corrected moments are g and g^2, so the update is lr * g / (|g| + eps) after the
    decoupled decay p * (1 - lr * wd): within eps of p (1 - lr wd) - lr sign(g)."""
    lr, wd = 1e-2, 0.1
    g = torch.Generator().manual_seed(1)
    start, grad = torch.randn(1000, generator=g), torch.randn(1000, generator=g)
    for name in ("torch-fused", "torch-foreach"):
        p = torch.nn.Parameter(start.clone())
        p.grad = grad.clone()
        make_optimizer(name, [p], lr=lr, betas=(0.9, 0.95), weight_decay=wd).step()
        torch.testing.assert_close(p.detach(), start * (1 - lr * wd) - lr * grad.sign(), rtol=0, atol=1e-6)


def test_the_candidates_agree_and_are_timed():
    results = {r.name: r for r in time_optimizers((5000, 70), torch.device("cpu"), repeats=2)}
    assert list(results) == ["torch-fused", "torch-foreach", "deepspeed-fused"]
    for name in ("torch-fused", "torch-foreach"):
        assert results[name].ms > 0 and results[name].max_error < 1e-6
    assert results["deepspeed-fused"].ms is None and results["deepspeed-fused"].note == "CUDA only"


def test_bench_optimizer_prints_the_table(capsys):
    assert bench_optimizer(["--world-size", "2", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert "tiny, 1 rank of 2" in out and "(shipped configs)" in out and "fastest here: torch-" in out
