"""One AdamW step per implementation, on the tensors a ZeRO rank steps: which AdamW the GPU configs should use.

Under ZeRO-2 and ZeRO-3 (without offload) each rank's optimizer steps its fp32 partition of the parameters,
flattened into one tensor per parameter group (weight-decayed matrices, and the norm gains without decay). The
candidates, as a DeepSpeed JSON selects them (``"optimizer": {"type": "AdamW", "params": {...}}``):

    torch-fused      {"torch_adam": true, "fused": true}   torch.optim.AdamW(fused=True): the shipped configs
    torch-foreach    {"torch_adam": true}                  torch.optim.AdamW, its default multi-tensor path
    deepspeed-fused  {}                                    DeepSpeed's FusedAdam (CUDA; its op is compiled by
                                                           DeepSpeed at first use unless pre-built)

:func:`time_optimizers` checks that every candidate computes the same update and times one step of each.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from nbp_ds.config import RunConfig
from nbp_ds.model import build_model

CANDIDATES = ("torch-fused", "torch-foreach", "deepspeed-fused")
SHIPPED = "torch-fused"  # what nbp_ds/ds_configs/zero2.json and zero3.json select


def partition_sizes(cfg: RunConfig, world_size: int) -> tuple[int, int]:
    """Elements of one rank's flat fp32 partition per parameter group (decayed, not decayed) for ``cfg``'s model
    over ``world_size`` ranks (nbp_ds.train.engine.param_groups: matrices decay, vectors do not)."""
    model = build_model(cfg, device="meta")
    decay = sum(p.numel() for p in model.parameters() if p.dim() >= 2)
    rest = sum(p.numel() for p in model.parameters() if p.dim() < 2)
    return -(-decay // world_size), max(-(-rest // world_size), 1)


def make_optimizer(name: str, params: list[torch.Tensor], lr: float, betas: tuple[float, float],
                   weight_decay: float) -> torch.optim.Optimizer:
    """The candidate ``name`` over ``params`` (raises what its import or build raises when it is unavailable)."""
    if name == "torch-fused":
        return torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=weight_decay, fused=True)
    if name == "torch-foreach":
        return torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=weight_decay, foreach=True)
    if name == "deepspeed-fused":
        from deepspeed.ops.adam import FusedAdam

        return FusedAdam(params, lr=lr, betas=betas, weight_decay=weight_decay, adam_w_mode=True)
    raise ValueError(f"no optimizer {name!r}; candidates: {', '.join(CANDIDATES)}")


@dataclass
class OptimizerTiming:
    name: str
    ms: float | None  # one step, the median of the repeats; None: unavailable
    max_error: float | None  # largest difference of its updated weights from torch-foreach's
    note: str = ""


def _timed(step: Callable[[], None], device: torch.device, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        began = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - began)
    return sorted(times)[len(times) // 2] * 1e3


def time_optimizers(sizes: tuple[int, ...], device: torch.device, names: tuple[str, ...] = CANDIDATES,
                    repeats: int = 5, lr: float = 3e-4, betas: tuple[float, float] = (0.9, 0.95),
                    weight_decay: float = 0.05) -> list[OptimizerTiming]:
    """Each candidate on fp32 tensors of ``sizes`` (the first decayed, the others not) with the same gradients:
    its first step's weights compared with torch-foreach's, then ``repeats`` steps timed (after a warm-up)."""
    g = torch.Generator(device="cpu").manual_seed(0)
    start = [torch.randn(n, generator=g).to(device) for n in sizes]
    grads = [torch.randn(n, generator=g).to(device) for n in sizes]
    reference = None
    results = []
    for name in ("torch-foreach", *[n for n in names if n != "torch-foreach"]):
        if name == "deepspeed-fused" and device.type != "cuda":
            results.append(OptimizerTiming(name, None, None, "CUDA only"))
            continue
        params = [torch.nn.Parameter(t.clone()) for t in start]
        for p, grad in zip(params, grads, strict=True):
            p.grad = grad.clone()
        groups = [{"params": params[:1], "weight_decay": weight_decay}, {"params": params[1:], "weight_decay": 0.0}]
        try:
            optimizer = make_optimizer(name, groups, lr, betas, weight_decay)
            optimizer.step()
        except Exception as exc:  # an op DeepSpeed cannot build here is a finding, not a failure of the check
            results.append(OptimizerTiming(name, None, None, f"unavailable: {type(exc).__name__}: {exc}"[:160]))
            continue
        updated = torch.cat([p.detach().flatten() for p in params])
        if reference is None:
            reference = updated
        error = float((updated - reference).abs().max())
        ms = _timed(optimizer.step, device, repeats)
        results.append(OptimizerTiming(name, ms, error))
    order = {name: i for i, name in enumerate(names)}
    return sorted((r for r in results if r.name in order), key=lambda r: order[r.name])


def table(results: list[OptimizerTiming], sizes: tuple[int, ...], device: torch.device) -> str:
    total = sum(sizes)
    lines = [f"one AdamW step on {total / 1e6:.1f}M fp32 parameters ({len(sizes)} flat tensors, as a ZeRO rank "
             f"holds them) on {device}", f"  {'optimizer':<16} {'ms/step':>9} {'max diff':>9}  note"]
    for r in results:
        ms = f"{r.ms:9.2f}" if r.ms is not None else f"{'-':>9}"
        error = f"{r.max_error:9.1e}" if r.max_error is not None else f"{'-':>9}"
        shipped = " (shipped configs)" if r.name == SHIPPED else ""
        lines.append(f"  {r.name:<16} {ms} {error}  {r.note}{shipped}".rstrip())
    timed = [r for r in results if r.ms is not None]
    if timed:
        fastest = min(timed, key=lambda r: r.ms)
        lines.append(f"fastest here: {fastest.name}")
    return "\n".join(lines)
