"""Attention backends behind one interface.

Every backend answers three calls:

* ``full(q, k, v)``: the whole training sequence under the block-causal rule;
* ``chunk(q, k, v, start)``: KV-cache decoding, queries at positions [start, start + n) against the
  cached keys [0, start + n) (eager decoding, the reference);
* ``masked(q, k, v, mask)``: a static decoding pass against a fixed number of cache slots under a mask
  the pass made (shapes that do not change from step to step, for CUDA graphs).

q, k, v are [B, heads, S, head_dim]. A backend is made for one device and builds what depends only on
the layout (dense mask, BlockMask) once, in its constructor: ``full`` then touches plain attributes and
tensors only, so a compiled transformer layer traces through it without a graph break.

* ``sdpa``  ``scaled_dot_product_attention``: with ``is_causal`` where the rule is plain causal (block size 1,
  ``Layout.is_causal``; cuDNN or FlashAttention-2 inside PyTorch on a GPU), else with a dense boolean mask.
  Runs everywhere; the reference.
* ``flex``  FlexAttention with a BlockMask from the block ids (fully masked tiles skipped, full tiles run
  without the mask function); compiled on GPU; forward only on CPU (PyTorch has no CPU backward for it).
  Kernel options come from ``model.flex_kernel_options`` (tile sizes measured by ``nbp-bench-attention``)
  on top of two facts of every layout: each query sees itself (rows are never fully masked) and the key
  tiles a query tile sees form one contiguous run from the start.
* ``flash`` FlashAttention-4 kernels for the block-causal rule (through FlexAttention's ``FLASH``
  kernel backend, which hands the same mask_mod and block sparsity to flash_attn.cute), and
  FlashAttention (4, else 2) directly where no mask is needed: block size 1 (plain causal) and
  decoding steps that feed one block.
* ``auto``  the fastest exact choice for the layout on the device: on a GPU ``sdpa`` (is_causal) for a
  plain-causal layout, ``flash`` where flash-attn-4 is installed on a Hopper-or-newer GPU and passes a
  one-off check against ``sdpa``, else ``flex``; ``sdpa`` on the CPU.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
from typing import Any

import torch
import torch.nn.functional as F

from nbp_ds.errors import UsageError
from nbp_ds.layout import Layout

log = logging.getLogger(__name__)

# true for every block-causal layout: a query sees its own block (no row is fully masked), and the key tiles
# a query tile sees are the run [0, last visible tile] (FlexAttention may then skip per-tile index lookups)
FLEX_LAYOUT_OPTIONS = {"ROWS_GUARANTEED_SAFE": True, "BLOCKS_ARE_CONTIGUOUS": True}


class AttentionUnavailable(UsageError, RuntimeError):
    """The configured attention backend cannot run on this machine or device."""


class SdpaAttention:
    name = "sdpa"

    def __init__(self, layout: Layout, device: torch.device):
        self.layout, self.device = layout, device
        self.causal = layout.is_causal
        # the dense rule; a plain-causal layout trains without it (is_causal) and only decoding reads it
        self._dense: torch.Tensor | None = None if self.causal else layout.allowed().to(device)

    def dense_mask(self) -> torch.Tensor:
        if self._dense is None:
            self._dense = self.layout.allowed().to(self.device)
        return self._dense

    def full(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if self.causal:  # every position its own block: no mask needed
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=self._dense)

    def chunk(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int) -> torch.Tensor:
        end = start + q.shape[-2]
        if self.layout.is_one_block(start, end):
            # one block sees the whole cache and itself: no mask at all
            return F.scaled_dot_product_attention(q, k, v)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=self.dense_mask()[start:end, :end])

    def masked(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """A static decoding pass: queries [B, heads, n, D] against the first kv cache slots under an additive mask
        [n, kv] that the pass made once for every layer (the same call for every backend: masks of any shape are
        what SDPA's memory-efficient kernel takes, and it is capturable in CUDA graphs)."""
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


class FlexAttention(SdpaAttention):
    name = "flex"

    def __init__(self, layout: Layout, device: torch.device, kernel_options: dict[str, Any] | None = None):
        super().__init__(layout, device)
        from torch.nn.attention import flex_attention as fa  # local: torch's compiler stack, for this backend only

        self._flex = fa.flex_attention
        ids = torch.from_numpy(layout.block_ids).to(device)

        def block_causal(b, h, q_idx, kv_idx):
            return ids[kv_idx] <= ids[q_idx]

        n = layout.seq_len
        self.block_mask = fa.create_block_mask(block_causal, None, None, n, n, device=device)
        self.kernel_options = dict(kernel_options or {})
        # eager callers get a compiled kernel (flex is slow uncompiled); a compiled layer traces flex itself
        self._compiled = torch.compile(self._flex, dynamic=False) if device.type == "cuda" else self._flex

    def full(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if q.device.type == "cpu" and torch.is_grad_enabled() and q.requires_grad:
            raise AttentionUnavailable(
                "model.attention=flex has no backward pass on CPU in PyTorch; train on CPU with "
                "model.attention=sdpa (or auto)"
            )
        kernel = self._flex if torch.compiler.is_compiling() else self._compiled
        return kernel(q, k, v, block_mask=self.block_mask, kernel_options=self.kernel_options or None)


class FlashAttention(SdpaAttention):
    """FlashAttention: FA4 (flash_attn.cute, Hopper+) for the block-causal rule; FA2 only where exact."""

    name = "flash"

    def __init__(self, layout: Layout, device: torch.device):
        super().__init__(layout, device)
        self.fa4 = import_optional("flash_attn.cute")
        self.fa2 = import_optional("flash_attn") if self.fa4 is None else None
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
        self._flex = FlexAttention(layout, device, kernel_options={"BACKEND": "FLASH"}) if self.fa4 else None

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
        if self.causal:
            return self._dense(q, k, v, causal=True)
        return self._flex.full(q, k, v)

    def chunk(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int) -> torch.Tensor:
        self._check_device(q)
        if self.layout.is_one_block(start, start + q.shape[-2]):
            return self._dense(q, k, v, causal=False)
        return super().chunk(q, k, v, start)  # the prefix pass of several blocks: once per video


def import_optional(module: str):
    if importlib.util.find_spec(module.split(".")[0]) is None:
        return None
    try:
        return importlib.import_module(module)
    except Exception as exc:  # a broken CUDA extension is reported, not fatal at import
        log.warning("cannot import %s: %s", module, exc)
        return None


def flash4_available(device: torch.device) -> bool:
    """flash-attn-4 (module flash_attn.cute) importable, and ``device`` a Hopper-or-newer GPU."""
    if device.type != "cuda" or torch.cuda.get_device_capability(device) < (9, 0):
        return False
    return import_optional("flash_attn.cute") is not None


def _flash_matches_sdpa(layout: Layout, device: torch.device, head_dim: int) -> bool:
    """Run the FA4 block-causal path once (forward and backward, bf16, one head) against dense-mask sdpa.
    FlexAttention's FLASH backend is young: ``auto`` takes it only where it runs and agrees here."""
    try:
        g = torch.Generator(device=device).manual_seed(0)
        q, k, v = (torch.randn(1, 1, layout.seq_len, head_dim, device=device, dtype=torch.bfloat16, generator=g)
                   .requires_grad_() for _ in range(3))
        grad = torch.randn(1, 1, layout.seq_len, head_dim, device=device, dtype=torch.bfloat16, generator=g)
        flash, reference = FlashAttention(layout, device), SdpaAttention(layout, device)
        results = []
        for backend in (flash, reference):
            out = backend.full(q, k, v)
            results.append([out, *torch.autograd.grad(out, (q, k, v), grad)])
        return all(torch.allclose(a.float(), b.float(), rtol=5e-2, atol=5e-2) for a, b in zip(*results, strict=True))
    except Exception as exc:  # any failure of an optional kernel means "not this one", said once
        log.warning("flash-attn-4 is installed but its block-causal kernel failed a check (%s); using flex", exc)
        return False


def resolve_backend_name(requested: str, device: torch.device | str | None = None, layout: Layout | None = None,
                         head_dim: int | None = None) -> str:
    """``auto`` -> the fastest exact backend for ``layout`` on ``device`` (see the module docstring); other names
    pass through. Without a layout, ``auto`` means flex on a GPU and sdpa elsewhere. With ``head_dim``, an
    installed flash-attn-4 is checked once against sdpa before ``auto`` picks it."""
    if requested != "auto":
        return requested
    dev = torch.device(device) if device is not None else None
    on_gpu = dev.type == "cuda" if dev is not None else torch.cuda.is_available()
    if not on_gpu:
        return "sdpa"
    if layout is None:
        return "flex"
    if layout.is_causal:
        return "sdpa"  # is_causal: cuDNN / FlashAttention-2 inside PyTorch, no mask
    dev = dev if dev is not None else torch.device("cuda", torch.cuda.current_device())
    if flash4_available(dev) and (head_dim is None or _flash_matches_sdpa(layout, dev, head_dim)):
        return "flash"
    return "flex"


def make_attention(name: str, layout: Layout, device: torch.device | str | None = None,
                   flex_kernel_options: dict[str, Any] | None = None, head_dim: int | None = None):
    """Build the backend named by ``model.attention`` for a layout, on ``device`` (default: the current one)."""
    dev = torch.device(device) if device is not None else torch.device("cpu")
    name = resolve_backend_name(name, dev, layout, head_dim)
    if name == "sdpa":
        return SdpaAttention(layout, dev)
    if name == "flex":
        return FlexAttention(layout, dev, {**FLEX_LAYOUT_OPTIONS, **(flex_kernel_options or {})})
    if name == "flash":
        return FlashAttention(layout, dev)
    raise ValueError(f"model.attention must be auto, sdpa, flex or flash, got {name!r}")


class DeviceBackend:
    """The backend ``model.attention`` names, made once per device the model runs on (``auto`` resolves per
    device and layout). One instance is shared by every attention layer of a model, so masks and BlockMasks
    are built once per layout and device. :meth:`on` makes a device's backend; call it outside compiled code
    (the model's forward does) so that a compiled layer only looks the backend up."""

    def __init__(self, name: str, layout: Layout, head_dim: int | None = None,
                 flex_kernel_options: dict[str, Any] | None = None):
        self.name, self.layout, self.head_dim = name, layout, head_dim
        self.flex_kernel_options = dict(flex_kernel_options or {})
        self._made: dict[torch.device, Any] = {}
        # per device, the backend holding the current packed batch's mask (nbp_ds.model.packed_attention), if any
        self._rows: dict[torch.device, Any] = {}

    def on(self, device: torch.device):
        if device not in self._made:
            made = make_attention(self.name, self.layout, device, self.flex_kernel_options, self.head_dim)
            if self.name == "auto":
                log.info("model.attention=auto on %s: %s", device, made.name)
            self._made[device] = made
        return self._made[device]

    def use_rows(self, device: torch.device, packed: Any | None) -> None:
        """Whole-sequence passes on ``device`` run under ``packed``'s mask (a packed batch's backend, its mask
        already built), or, with None, under the layout's rule again. Called eagerly, before the layers."""
        if packed is None:
            self._rows.pop(device, None)
        else:
            self._rows[device] = packed

    def full(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        packed = self._rows.get(q.device)
        return (packed if packed is not None else self.on(q.device)).full(q, k, v)

    def chunk(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int) -> torch.Tensor:
        return self.on(q.device).chunk(q, k, v, start)

    def masked(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.on(q.device).masked(q, k, v, mask)
