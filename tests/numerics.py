"""Comparing tensors computed in different precisions or by different kernels."""

from __future__ import annotations

import torch


def relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    """||value - reference|| / ||reference||, in fp32."""
    value, reference = value.float(), reference.float()
    return float((value - reference).norm() / reference.norm().clamp_min(1e-12))


def assert_within_bf16_error(grads: dict, bf16: dict, fp32: dict, what: str = "gradient") -> None:
    """Each of ``grads`` is as close to its fp32 reference as 3x the error of a plain bf16 run (+1e-2)."""
    assert grads.keys() == fp32.keys()
    for name, g in grads.items():
        assert torch.isfinite(g).all(), name
        allowed = 3 * relative_error(bf16[name], fp32[name]) + 1e-2
        err = relative_error(g, fp32[name])
        assert err <= allowed, f"{name}: {what} {err:.3g} off fp32 (allowed {allowed:.3g})"
