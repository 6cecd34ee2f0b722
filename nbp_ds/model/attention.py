"""Attention backends behind one interface.

Every backend answers three calls:

* ``full(q, k, v)``: the whole training sequence under the block-causal rule;
* ``chunk(q, k, v, start)``: KV-cache decoding, queries at positions [start, start + n) against the
  cached keys [0, start + n) (eager decoding, the reference);
* ``masked(q, k, v, mask)``: a static decoding pass against a fixed number of cache slots under a mask
  the pass made (shapes that do not change from step to step, for CUDA graphs).

q, k, v are [B, heads, S, head_dim]. Masks and BlockMasks depend only on the layout, so each
backend builds them once per device and caches them (never per layer or per step).

* ``sdpa``  dense boolean mask through ``scaled_dot_product_attention``; runs everywhere, the reference.
* ``flex``  FlexAttention with a BlockMask from the block ids (fully masked tiles skipped); compiled on
  GPU; forward only on CPU (PyTorch has no CPU backward for it).
* ``flash`` FlashAttention-4 kernels for the block-causal rule (through FlexAttention's ``FLASH``
  kernel backend, which hands the same mask_mod and block sparsity to flash_attn.cute), and
  FlashAttention (4, else 2) directly where no mask is needed: block size 1 (plain causal) and
  decoding steps that feed one block.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
from collections.abc import Callable

import torch
import torch.nn.functional as F

from nbp_ds.errors import UsageError
from nbp_ds.layout import Layout

log = logging.getLogger(__name__)


class AttentionUnavailable(UsageError, RuntimeError):
    """The configured attention backend cannot run on this machine or device."""


class SdpaAttention:
    name = "sdpa"

    def __init__(self, layout: Layout):
        self.layout = layout
        self._masks: dict[torch.device, torch.Tensor] = {}

    def mask(self, device: torch.device) -> torch.Tensor:
        if device not in self._masks:
            self._masks[device] = self.layout.allowed().to(device)
        return self._masks[device]

    def full(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if self.layout.is_causal:  # every position its own block: no mask needed
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=self.mask(q.device))

    def chunk(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int) -> torch.Tensor:
        end = start + q.shape[-2]
        if self.layout.is_one_block(start, end):
            # one block sees the whole cache and itself: no mask at all
            return F.scaled_dot_product_attention(q, k, v)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=self.mask(q.device)[start:end, :end])

    def masked(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """A static decoding pass: queries [B, heads, n, D] against the first kv cache slots under an additive mask
        [n, kv] that the pass made once for every layer (the same call for every backend: masks of any shape are
        what SDPA's memory-efficient kernel takes, and it is capturable in CUDA graphs)."""
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


class FlexAttention(SdpaAttention):
    name = "flex"

    def __init__(self, layout: Layout, kernel_options: dict | None = None):
        super().__init__(layout)
        from torch.nn.attention import flex_attention as fa

        self._fa = fa
        self._block_masks: dict[torch.device, object] = {}
        self._kernel_options = kernel_options
        self._compiled: Callable | None = None

    def block_mask(self, device: torch.device):
        if device not in self._block_masks:
            ids = torch.from_numpy(self.layout.block_ids).to(device)

            def block_causal(b, h, q_idx, kv_idx):
                return ids[kv_idx] <= ids[q_idx]

            n = self.layout.seq_len
            self._block_masks[device] = self._fa.create_block_mask(block_causal, None, None, n, n, device=device)
        return self._block_masks[device]

    def _kernel(self, device: torch.device) -> Callable:
        if device.type != "cuda":
            return self._fa.flex_attention  # eager: CPU forward for checks and tests
        if self._compiled is None:
            self._compiled = torch.compile(self._fa.flex_attention, dynamic=False)
        return self._compiled

    def full(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if q.device.type == "cpu" and torch.is_grad_enabled() and q.requires_grad:
            raise AttentionUnavailable(
                "model.attention=flex has no backward pass on CPU in PyTorch; train on CPU with "
                "model.attention=sdpa (or auto)"
            )
        kwargs = {"kernel_options": self._kernel_options} if self._kernel_options else {}
        return self._kernel(q.device)(q, k, v, block_mask=self.block_mask(q.device), **kwargs)


class FlashAttention(SdpaAttention):
    """FlashAttention: FA4 (flash_attn.cute, Hopper+) for the block-causal rule; FA2 only where exact."""

    name = "flash"

    def __init__(self, layout: Layout):
        super().__init__(layout)
        self.fa4 = _import_optional("flash_attn.cute")
        self.fa2 = _import_optional("flash_attn") if self.fa4 is None else None
        if self.fa4 is None and self.fa2 is None:
            raise AttentionUnavailable(
                "model.attention=flash needs FlashAttention: `pip install flash-attn-4` (Hopper or newer, "
                "module flash_attn.cute) or `pip install flash-attn` (FA2: block size 1 only); "
                "use model.attention=flex or sdpa otherwise"
            )
        if self.fa4 is None and not layout.is_causal:
            raise AttentionUnavailable(
                f"model.attention=flash with FlashAttention-2 is exact only for block size 1 (next-token "
                f"prediction); layout.block={list(layout.block)} needs flash-attn-4 (Hopper or newer) or "
                f"model.attention=flex"
            )
        self._flex = FlexAttention(layout, kernel_options={"BACKEND": "FLASH"}) if self.fa4 else None

    def _check_device(self, q: torch.Tensor) -> None:
        if q.device.type != "cuda":
            raise AttentionUnavailable("model.attention=flash runs only on CUDA GPUs; use sdpa or flex here")
        if q.dtype not in (torch.float16, torch.bfloat16):
            raise AttentionUnavailable(f"model.attention=flash needs bf16 or fp16 activations, got {q.dtype}")

    def _dense(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> torch.Tensor:
        # both FlashAttention generations take [B, S, heads, D]
        fn = self.fa4.flash_attn_func if self.fa4 is not None else self.fa2.flash_attn_func
        out = fn(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=causal)
        out = out[0] if isinstance(out, tuple) else out
        return out.transpose(1, 2)

    def full(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        self._check_device(q)
        if self.layout.is_causal:
            return self._dense(q, k, v, causal=True)
        return self._flex.full(q, k, v)

    def chunk(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int) -> torch.Tensor:
        self._check_device(q)
        if self.layout.is_one_block(start, start + q.shape[-2]):
            return self._dense(q, k, v, causal=False)
        return super().chunk(q, k, v, start)  # the prefix pass of several blocks: once per video


def _import_optional(module: str):
    if importlib.util.find_spec(module.split(".")[0]) is None:
        return None
    try:
        return importlib.import_module(module)
    except Exception as exc:  # a broken CUDA extension is reported, not fatal at import
        log.warning("cannot import %s: %s", module, exc)
        return None


def resolve_backend_name(requested: str, device: torch.device | str | None = None) -> str:
    """``auto`` -> flex on a CUDA device, sdpa elsewhere; other names pass through."""
    if requested != "auto":
        return requested
    dev = torch.device(device) if device is not None else None
    on_gpu = dev.type == "cuda" if dev is not None else torch.cuda.is_available()
    return "flex" if on_gpu else "sdpa"


def make_attention(name: str, layout: Layout, device: torch.device | str | None = None):
    """Build the backend named by ``model.attention`` for a layout."""
    name = resolve_backend_name(name, device)
    if name == "sdpa":
        return SdpaAttention(layout)
    if name == "flex":
        return FlexAttention(layout)
    if name == "flash":
        return FlashAttention(layout)
    raise ValueError(f"model.attention must be auto, sdpa, flex or flash, got {name!r}")


class DeviceBackend:
    """The backend ``model.attention`` names, made once per device the model runs on (``auto`` resolves per
    device: flex on a GPU, sdpa on the CPU). One instance is shared by every attention layer of a model, so
    masks and BlockMasks are built once per layout and device."""

    def __init__(self, name: str, layout: Layout):
        self.name, self.layout = name, layout
        self._made: dict[torch.device, object] = {}

    def on(self, device: torch.device):
        if device not in self._made:
            self._made[device] = make_attention(self.name, self.layout, device)
        return self._made[device]

    def full(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return self.on(q.device).full(q, k, v)

    def chunk(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int) -> torch.Tensor:
        return self.on(q.device).chunk(q, k, v, start)

    def masked(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.on(q.device).masked(q, k, v, mask)
