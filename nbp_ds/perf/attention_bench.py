"""Forward + backward time of the attention backends at a layout's shape, next to plain causal attention.

A row is one kernel: the block-causal rule through the model's backends (``sdpa`` with its dense mask, ``flex``
with the layout's kernel options and each candidate tile setting, ``flash`` = flash-attn-4), and the causal
references the block-causal rule is held to (the same sequence under plain causal masking: PyTorch's
FlashAttention-2 and cuDNN kernels, and the flash-attn package where installed). A row that cannot run here
(a kernel not built for this device, flex's backward on the CPU, a tile setting that does not fit) says why
instead of a time.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from nbp_ds.layout import Layout
from nbp_ds.model.attention import (
    FLEX_LAYOUT_OPTIONS,
    FlashAttention,
    FlexAttention,
    SdpaAttention,
    import_optional,
)
from nbp_ds.perf.timing import median, time_repeats

log = logging.getLogger(__name__)

Kernel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

# flex tile settings tried by --sweep on a GPU (kernel_options; {} = flex's own choice); the BlockMask's
# 128-wide tiles are a multiple of each
FLEX_CANDIDATES: tuple[dict, ...] = (
    {},
    {"fwd_BLOCK_M": 128, "fwd_BLOCK_N": 64, "fwd_num_warps": 8, "fwd_num_stages": 3},
    {"fwd_BLOCK_M": 128, "fwd_BLOCK_N": 128, "fwd_num_warps": 8, "fwd_num_stages": 2},
    {"fwd_BLOCK_M": 64, "fwd_BLOCK_N": 64, "fwd_num_warps": 4, "fwd_num_stages": 3},
    {"bwd_BLOCK_M1": 64, "bwd_BLOCK_N1": 128, "bwd_BLOCK_M2": 128, "bwd_BLOCK_N2": 64, "bwd_num_warps": 8,
     "bwd_num_stages": 3},
    {"bwd_BLOCK_M1": 32, "bwd_BLOCK_N1": 64, "bwd_BLOCK_M2": 64, "bwd_BLOCK_N2": 32, "bwd_num_warps": 4,
     "bwd_num_stages": 3},
)


@dataclass
class Row:
    label: str
    rule: str  # "block-causal" or "causal"
    seconds: float | None = None
    note: str = ""
    options: dict | None = None  # flex kernel options of a flex row


def visible_pairs(layout: Layout, rule: str) -> int:
    """(query, key) pairs a kernel computes: the layout's rule, or plain causal over the same length."""
    n = layout.seq_len
    return int(layout.allowed().sum()) if rule == "block-causal" else n * (n + 1) // 2


def tflops(row: Row, layout: Layout, batch: int, heads: int, head_dim: int) -> float | None:
    """Achieved TFLOP/s over the visible pairs (forward 4 B H D per pair, backward 2.5x forward)."""
    if row.seconds is None:
        return None
    return 3.5 * 4 * batch * heads * head_dim * visible_pairs(layout, row.rule) / row.seconds / 1e12


def _causal_sdpa(backend) -> Kernel:
    def run(q, k, v):
        with sdpa_kernel([backend]):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    return run


def _causal_default(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def _flash_package_causal(q, k, v):
    module = import_optional("flash_attn.cute") or import_optional("flash_attn")
    out = module.flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True)
    return (out[0] if isinstance(out, tuple) else out).transpose(1, 2)


def candidates(layout: Layout, device: torch.device, flex_options: dict | None, sweep: bool) -> list[tuple]:
    """(label, rule, kernel factory, flex options) for every row to measure on ``device``."""
    rows: list[tuple] = []
    if device.type == "cuda":
        rows.append(("causal FlashAttention-2 (torch sdpa)", "causal", lambda: _causal_sdpa(SDPBackend.FLASH_ATTENTION),
                     None))
        rows.append(("causal cuDNN (torch sdpa)", "causal", lambda: _causal_sdpa(SDPBackend.CUDNN_ATTENTION), None))
        if import_optional("flash_attn") is not None:
            rows.append(("causal flash-attn package", "causal", lambda: _flash_package_causal, None))
    else:
        rows.append(("causal sdpa", "causal", lambda: _causal_default, None))
    rows.append(("sdpa (dense mask)", "block-causal", lambda: SdpaAttention(layout, device).full, None))
    configured = {**FLEX_LAYOUT_OPTIONS, **(flex_options or {})}
    rows.append(("flex", "block-causal", lambda: FlexAttention(layout, device, configured).full, configured))
    if sweep and device.type == "cuda":
        for extra in FLEX_CANDIDATES[1:]:
            options = {**configured, **extra}
            label = "flex " + " ".join(f"{k}={v}" for k, v in extra.items())
            rows.append((label, "block-causal", lambda o=options: FlexAttention(layout, device, o).full, options))
    if device.type == "cuda":
        rows.append(("flash (flash-attn-4 via flex FLASH)", "block-causal",
                     lambda: FlashAttention(layout, device).full, None))
    return rows


def measure(layout: Layout, batch: int, heads: int, head_dim: int, device: torch.device, dtype: torch.dtype,
            flex_options: dict | None = None, sweep: bool = False, repeats: int = 20, warmup: int = 5) -> list[Row]:
    """Median forward + backward seconds of every candidate at [batch, heads, seq_len, head_dim]."""
    g = torch.Generator(device="cpu").manual_seed(0)
    shape = (batch, heads, layout.seq_len, head_dim)
    q, k, v, grad = (torch.randn(shape, generator=g, dtype=torch.float32).to(device=device, dtype=dtype)
                     for _ in range(4))
    for t in (q, k, v):
        t.requires_grad_()
    rows = []
    for label, rule, factory, options in candidates(layout, device, flex_options, sweep):
        row = Row(label, rule, options=options)
        try:
            kernel = factory()

            def step(kernel=kernel):
                q.grad = k.grad = v.grad = None
                kernel(q, k, v).backward(grad)

            row.seconds = median(time_repeats(step, repeats, warmup, device))
        except Exception as exc:  # not here: a kernel not built for this device, no CPU backward, a tile setting
            # the compiler cannot fit (shared memory, registers); the row says which, the others are measured
            text = str(exc).strip()
            row.note = (text.splitlines()[0][:160] if text else type(exc).__name__)
        rows.append(row)
        torch._dynamo.reset()  # each flex setting compiles its own kernel
    return rows


def best_flex(rows: list[Row]) -> Row | None:
    timed = [r for r in rows if r.options is not None and r.seconds is not None]
    return min(timed, key=lambda r: r.seconds) if timed else None
