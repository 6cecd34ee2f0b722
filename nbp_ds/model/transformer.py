"""The NBP transformer: a LLaMA-style decoder (RMSNorm, SwiGLU, no biases, 3D rotary positions)
over the block-causal sequence that nbp_ds.layout describes.

Weights are initialized inside each leaf module's own constructor so that the model can be built
under ``deepspeed.zero.Init`` (ZeRO-3 partitions a module's parameters as soon as its constructor
returns; initializing afterwards would touch empty shards).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from nbp_ds.config import ModelConfig
from nbp_ds.layout import Layout
from nbp_ds.model.attention import DeviceBackend
from nbp_ds.model.execution import LayerExecution
from nbp_ds.model.loss import linear_cross_entropy
from nbp_ds.model.packed_attention import make_packed_attention
from nbp_ds.model.rope import apply_rope, rope_angles
from nbp_ds.model.sequence_parallel import SequenceShard, UlyssesAttention
from nbp_ds.packing import is_packed


def default_ffn_dim(d_model: int) -> int:
    """SwiGLU hidden width: 8/3 * d_model rounded up to a multiple of 256 (LLaMA's rule)."""
    return int(math.ceil(8 * d_model / 3 / 256) * 256)


class Linear(nn.Linear):
    """Linear layer initialized N(0, std), its bias (none by default) 0, in its own constructor (ZeRO-3 safe)."""

    def __init__(self, d_in: int, d_out: int, std: float, bias: bool = False):
        object.__setattr__(self, "_init_std", std)
        super().__init__(d_in, d_out, bias=bias)

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, mean=0.0, std=self._init_std)
        if self.bias is not None:
            nn.init.zeros_(self.bias)


class OutputHead(Linear):
    """The output layer. ``head(hidden)`` gives logits (decoding); ``head(hidden, targets, chunk)`` gives
    (summed cross-entropy, correct argmax count) through the fused, chunked head + loss of nbp_ds.model.loss,
    never holding more than one chunk of logits. Both go through the module call, so DeepSpeed ZeRO-3 gathers
    the weight for either."""

    compiled = False  # the loss' elementwise kernel compiled (set with the model's layer execution)

    def forward(self, hidden: torch.Tensor, targets: torch.Tensor | None = None, chunk: int = 4096):
        return logits_or_loss(hidden, self.weight, targets, chunk, self.compiled)


def logits_or_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor | None, chunk: int,
                   compiled: bool):
    """An output layer's work: logits ``hidden @ weight.T`` (targets None), else (summed cross-entropy, correct
    argmax count) through the fused, chunked head + loss (nbp_ds.model.loss)."""
    if targets is None:
        return F.linear(hidden, weight)
    device = hidden.device.type
    # the compute dtype: autocast's where it is on (its weight cast, made explicit), else the weight's own
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype
    with torch.autocast(device, enabled=False):
        return linear_cross_entropy(hidden.to(dtype), weight.to(dtype), targets, chunk, compiled)


class Embedding(nn.Embedding):
    def __init__(self, num: int, dim: int, std: float):
        object.__setattr__(self, "_init_std", std)
        super().__init__(num, dim)

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, mean=0.0, std=self._init_std)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


@dataclass(frozen=True)
class DecodeWindow:
    """Where a static decoding pass writes and what it reads, as tensors on the device (nbp_ds.generate).

    ``positions`` [n]: the sequence positions fed (rotary angles, cache slots written); ``mask`` [n, kv]: an
    additive attention mask (0 visible, -inf not) over the first ``kv`` cache slots, made once per pass and
    shared by every layer. Passing it as ``start`` lets one pass of a fixed shape serve every generation step
    of that shape, which is what CUDA graphs replay."""

    positions: torch.Tensor
    mask: torch.Tensor


class KVCache:
    """Keys and values of every layer for the whole sequence, allocated once before decoding.

    With ``keep_unrotated`` it also holds every key as it was before the rotary rotation, so that a slot can be
    moved to another position and its key rotated there exactly (``slide``: the rolling window of long sampling,
    nbp_ds.generate.long). Only rotary models fill it (``NBPModel.rotary``)."""

    def __init__(self, n_layer: int, batch: int, n_head: int, seq_len: int, head_dim: int,
                 device: torch.device, dtype: torch.dtype, keep_unrotated: bool = False):
        shape = (n_layer, batch, n_head, seq_len, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.unrotated_k = torch.zeros(shape, device=device, dtype=dtype) if keep_unrotated else None

    def store_unrotated(self, layer: int, k: torch.Tensor, start: int | DecodeWindow) -> None:
        """Keep a pass's keys [B, heads, n, D] before rotation in ``layer``'s slots (where ``attend`` puts the
        rotated ones); a cache made without ``keep_unrotated`` ignores them."""
        if self.unrotated_k is None:
            return
        if isinstance(start, DecodeWindow):
            self.unrotated_k[layer].index_copy_(2, start.positions, k)
        else:
            self.unrotated_k[layer, :, :, start:start + k.shape[-2]] = k

    def slide(self, begin: int, end: int, by: int, cos: torch.Tensor, sin: torch.Tensor) -> None:
        """Move the slots [begin + by, end) of every layer to [begin, end - by) and rotate their keys afresh at the
        positions whose angles ``cos``/``sin`` [end - by - begin, D/2] give (from the unrotated keys: no rounding
        builds up however often a slot moves). Slots [end - by, end) keep stale values, to be written before
        they are read."""
        if self.unrotated_k is None:
            raise ValueError("slide needs a cache made with keep_unrotated=True")
        for buffer in (self.v, self.unrotated_k):
            buffer[:, :, :, begin:end - by] = buffer[:, :, :, begin + by:end].clone()
        self.k[:, :, :, begin:end - by] = apply_rope(self.unrotated_k[:, :, :, begin:end - by], cos, sin)

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int | DecodeWindow,
               backend: DeviceBackend) -> torch.Tensor:
        """Store a pass's keys and values [B, heads, n, D] in ``layer``'s slots and attend to the cache.

        ``start`` an int: the pass feeds positions [start, start + n) and sees the keys [0, start + n) under the
        layout's rule (eager decoding, the reference). A DecodeWindow: the pass writes at its positions and
        reads its first ``kv`` slots through its mask (static decoding: shapes do not depend on the step)."""
        if isinstance(start, DecodeWindow):
            self.k[layer].index_copy_(2, start.positions, k)
            self.v[layer].index_copy_(2, start.positions, v)
            kv = start.mask.shape[-1]
            return backend.masked(q, self.k[layer, :, :, :kv], self.v[layer, :, :, :kv], start.mask)
        end = start + q.shape[-2]
        self.k[layer, :, :, start:end] = k
        self.v[layer, :, :, start:end] = v
        return backend.chunk(q, self.k[layer, :, :, :end], self.v[layer, :, :, :end], start)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: DeviceBackend, cache: KVCache | None,
           layer: int, start: int | DecodeWindow) -> torch.Tensor:
    """One layer's attention for q, k, v [B, heads, n, D]: over the whole sequence (training, scoring), or,
    given a cache, through ``layer``'s slots of it (decoding; see KVCache.attend for ``start``)."""
    if cache is None:
        return backend.full(q, k, v)
    return cache.attend(layer, q, k, v, start, backend)


class Attention(nn.Module):
    """Multi-head self-attention under the layout's block-causal rule, run by the model's backend."""

    def __init__(self, d_model: int, n_head: int, std: float, out_std: float, backend: DeviceBackend, index: int):
        super().__init__()
        self.n_head = n_head
        self.head_dim = d_model // n_head
        self.qkv = Linear(d_model, 3 * d_model, std)
        self.out = Linear(d_model, d_model, out_std)
        self.backend = backend  # shared by all layers; not a submodule (it holds no weights)
        self.index = index  # this layer's slot in a KV cache

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVCache | None = None,
                start: int | DecodeWindow = 0) -> torch.Tensor:
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.n_head, self.head_dim).permute(2, 0, 3, 1, 4)
        if cache is not None:
            cache.store_unrotated(self.index, k, start)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        y = attend(q, k, v, self.backend, cache, self.index, start)
        return self.out(y.transpose(1, 2).reshape(b, n, -1))


class SwiGLU(nn.Module):
    def __init__(self, d_model: int, hidden: int, std: float, out_std: float):
        super().__init__()
        self.gate_up = Linear(d_model, 2 * hidden, std)
        self.down = Linear(hidden, d_model, out_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


class SequenceLayer(nn.Module):
    """A transformer layer whose whole-sequence pass runs as ``execution`` says (checkpointed, compiled:
    nbp_ds.model.execution) inside this module's call; decoding with a cache runs eagerly. Subclasses define
    ``block(x, *positions, cache=None, start=0)``."""

    execution = LayerExecution()

    def forward(self, x: torch.Tensor, *positions: torch.Tensor, cache: KVCache | None = None,
                start: int | DecodeWindow = 0) -> torch.Tensor:
        if cache is not None:
            return self.block(x, *positions, cache=cache, start=start)
        with_backward = self.training and torch.is_grad_enabled()
        run = self.execution.training if with_backward else self.execution.inference
        return run(self, x, *positions)


class TransformerLayer(SequenceLayer):
    """Pre-norm attention + SwiGLU block (LLaMA-style)."""

    def __init__(self, m: ModelConfig, ffn_dim: int, out_std: float, backend: DeviceBackend, index: int):
        super().__init__()
        self.attn_norm = RMSNorm(m.d_model, m.norm_eps)
        self.attn = Attention(m.d_model, m.n_head, m.init_std, out_std, backend, index)
        self.mlp_norm = RMSNorm(m.d_model, m.norm_eps)
        self.mlp = SwiGLU(m.d_model, ffn_dim, m.init_std, out_std)

    def block(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVCache | None = None,
              start: int | DecodeWindow = 0) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin, cache, start)
        return x + self.mlp(self.mlp_norm(x))


class NBPModel(nn.Module):
    """Semi-autoregressive video transformer; the layout decides NBP, NTP or hybrid.

    This class holds the batch-level surface (``loss``, ``logits``, KV caches, labels, how layers execute)
    and builds the project's LLaMA-style layers; another architecture over the same surface overrides
    ``build_layers`` and ``embed_positions`` (``nbp_ds.model.gpt2``)."""

    rotary = True  # positions are rotary angles of queries and keys (not embeddings added to the input)

    def __init__(self, m: ModelConfig, layout: Layout):
        super().__init__()
        self.config, self.layout = m, layout
        self.n_layer, self.d_model, self.n_head = m.n_layer, m.d_model, m.n_head
        self.head_dim = m.d_model // m.n_head
        self.vocab_size = m.vocab_size
        self.class_dropout = m.class_dropout
        self.loss_chunk = m.loss_chunk
        self.backend = DeviceBackend(m.attention, layout, self.head_dim, m.flex_kernel_options)  # shared by layers
        self._packed_backends: dict[torch.device, object] = {}  # per device, the backend of packed batches
        self.build_layers(m, out_std=m.init_std / math.sqrt(2 * m.n_layer))  # residual branches scaled (GPT-2)
        self.execution = LayerExecution()
        self.shard: SequenceShard | None = None  # set by enable_sequence_parallel
        self.ulysses: UlyssesAttention | None = None

    def enable_sequence_parallel(self, group) -> None:
        """Run whole-sequence passes (training, scoring) sequence-parallel over the ranks of ``group`` (DeepSpeed-
        Ulysses: nbp_ds.model.sequence_parallel); every rank of the group must be given the same batch. Decoding
        with a KV cache stays on one rank. Refused when the group's size does not divide model.n_head."""
        self.shard = SequenceShard(self.layout, group)
        self.ulysses = UlyssesAttention(self.backend, self.shard, self.n_head)
        for module in self.modules():
            if getattr(module, "backend", None) is self.backend and module is not self:
                module.backend = self.ulysses

    def build_layers(self, m: ModelConfig, out_std: float) -> None:
        """Embedding, layers, final norm, output layer and rotary tables (LLaMA-style)."""
        layout = self.layout
        self.ffn_dim = m.ffn_dim or default_ffn_dim(m.d_model)
        self.embed = Embedding(layout.embedding_size, m.d_model, m.init_std)
        self.layers = nn.ModuleList(TransformerLayer(m, self.ffn_dim, out_std, self.backend, i)
                                    for i in range(m.n_layer))
        self.norm = RMSNorm(m.d_model, m.norm_eps)
        self.head = OutputHead(m.d_model, m.vocab_size, m.init_std)
        # on the device the model is being built on (torch.device context), like the weights
        here = self.norm.weight.device
        angles = rope_angles(torch.from_numpy(layout.positions).to(here), self.head_dim, m.rope_theta)
        self.register_buffer("rope_cos", angles.cos(), persistent=False)
        self.register_buffer("rope_sin", angles.sin(), persistent=False)

    def embed_positions(self, input_ids: torch.Tensor, start: int | DecodeWindow) -> tuple[torch.Tensor, tuple]:
        """(token embeddings, the positional arguments every layer takes): here the rotary tables' rows (picked on
        the device for a DecodeWindow: static decoding)."""
        if isinstance(start, DecodeWindow):
            return self.embed(input_ids), (self.rope_cos.index_select(0, start.positions),
                                           self.rope_sin.index_select(0, start.positions))
        n = input_ids.shape[1]
        return self.embed(input_ids), (self.rope_cos[start:start + n], self.rope_sin[start:start + n])

    # ---- building blocks ------------------------------------------------------------------------
    def set_execution(self, execution: LayerExecution) -> None:
        """How every layer runs a whole sequence (activation checkpointing, compilation) and whether the loss
        kernel is compiled; see nbp_ds.model.execution."""
        self.execution = execution
        for layer in self.layers:
            layer.execution = execution
        self.head.compiled = execution.compiled

    def enable_activation_checkpointing(self, mode: bool | str = "full") -> None:
        """Recompute activations in backward: ``full`` (each layer from its input) or ``selective`` (keep the
        matmul and attention outputs, recompute the elementwise work); ``none`` turns it off."""
        self.set_execution(LayerExecution.from_settings(mode, self.execution.compiled))

    def compile_layers(self, enabled: bool = True) -> None:
        """Compile each layer's sequence pass (and the loss kernel) with torch.compile; see execution."""
        self.set_execution(LayerExecution(self.execution.checkpointing, enabled))

    def forward(self, input_ids: torch.Tensor | dict, start: int | DecodeWindow = 0, cache: KVCache | None = None):
        """Input ids [B, n] at sequence positions [start, start + n) -> final hidden states [B, n, d].

        A batch dict instead of ids returns ``self.loss(batch)``: that is how a DeepSpeed engine,
        which only calls ``forward``, trains the model (``loss, metrics = engine(batch)``). With a cache,
        ``start`` may be a DecodeWindow: the positions then come from the device (static decoding).
        """
        if isinstance(input_ids, dict):
            return self.loss(input_ids)
        x, positions = self.embed_positions(input_ids, start)
        if self.shard is not None and cache is None:
            # this rank's share of the sequence (the whole one embedded: a lookup, cheaper than a second path)
            x = self.shard.split(x, 1)
            positions = tuple(self.shard.split(p, 0) for p in positions)
            self.ulysses.on(x.device)  # the padded sequence's masks, made here like the backend's below
        self.backend.on(x.device)  # masks made here, eagerly, so compiled layers only look them up
        self.backend.use_rows(x.device, None)  # one grid: the layout's rule, not a packed batch's
        for layer in self.layers:
            x = layer(x, *positions, cache=cache, start=start)
        return self.norm(x)

    def packed_positions(self, positions: torch.Tensor) -> tuple:
        """The positional arguments every layer takes for packed rows with rotary positions [B, S, 3] (each clip's
        own): cos / sin [B, 1, S, head_dim / 2], broadcast over the heads."""
        rows, length, _ = positions.shape
        angles = rope_angles(positions.reshape(-1, 3), self.head_dim, self.config.rope_theta)
        angles = angles.view(rows, 1, length, -1)
        return angles.cos(), angles.sin()

    def forward_packed(self, batch: dict) -> torch.Tensor:
        """Packed rows (nbp_ds.packing) -> final hidden states [B, S, d]: each clip attends only to itself, under
        its own block rule and positions. The batch's mask is built here, once, and every layer reuses it."""
        positions = self.packed_positions(batch["positions"])
        x = self.embed(self.drop_packed_labels(batch["packed_ids"]))
        if x.device not in self._packed_backends:
            self._packed_backends[x.device] = make_packed_attention(self.config.attention, x.device,
                                                                    self.config.flex_kernel_options)
        packed = self._packed_backends[x.device]
        packed.use_rows(batch["clip_ids"], batch["block_ids"])
        self.backend.use_rows(x.device, packed)
        for layer in self.layers:
            x = layer(x, *positions)
        return self.norm(x)

    def packed_loss(self, batch: dict) -> tuple[torch.Tensor, dict]:
        """Cross-entropy over the video targets of packed rows, every counted token weighing the same (a clip
        counts for its tokens, whatever it was packed with) -> (loss, {"acc", "tokens"})."""
        rows = batch["loss_rows"]
        hidden = self.forward_packed(batch).reshape(-1, self.d_model).index_select(0, rows)
        targets = batch["targets"].reshape(-1).index_select(0, rows)
        n = rows.numel()  # made on the host with the batch: no synchronisation
        loss_sum, correct = self.head(hidden, targets, self.loss_chunk)
        return loss_sum / n, {"acc": correct.float() / n, "tokens": n}

    def drop_packed_labels(self, ids: torch.Tensor) -> torch.Tensor:
        """Packed input ids with each class token replaced by the null class's at rate model.class_dropout
        (training only), for classifier-free guidance."""
        if not self.training or self.class_dropout <= 0 or not self.layout.has_null_class:
            return ids
        first, null = self.layout.class_token(0), self.layout.class_token(self.layout.null_class)
        drop = (ids >= first) & (ids < null) & (torch.rand(ids.shape, device=ids.device) < self.class_dropout)
        return torch.where(drop, torch.full_like(ids, null), ids)

    def new_cache(self, batch: int, device: torch.device, dtype: torch.dtype, length: int | None = None,
                  keep_unrotated: bool = False) -> KVCache:
        """An empty KV cache for ``batch`` rows and ``length`` positions (default: the whole sequence);
        ``keep_unrotated`` also keeps the keys before rotation (rotary models only: see KVCache)."""
        if keep_unrotated and not self.rotary:
            raise ValueError(f"{type(self).__name__} has no rotary positions: its keys cannot be rotated afresh")
        return KVCache(self.n_layer, batch, self.n_head, length or self.layout.seq_len, self.head_dim, device, dtype,
                       keep_unrotated)

    def drop_labels(self, label: torch.Tensor) -> torch.Tensor:
        """Replace labels by the null class at rate model.class_dropout (training only), for CFG."""
        if not self.training or self.class_dropout <= 0 or self.layout.condition != "class":
            return label
        drop = torch.rand(label.shape, device=label.device) < self.class_dropout
        return torch.where(drop, torch.full_like(label, self.layout.null_class), label)

    def _labels(self, batch: dict) -> torch.Tensor | None:
        if self.layout.condition != "class":
            return None
        if "label" not in batch:
            raise KeyError("this model is class-conditional: the batch needs 'label' (LongTensor[B])")
        return self.layout.check_labels(batch["label"])

    def _check_tokens(self, tokens: torch.Tensor) -> None:
        if tuple(tokens.shape[1:]) != self.layout.grid:
            raise ValueError(f"tokens must be [B, {', '.join(map(str, self.layout.grid))}] for layout.grid="
                             f"{list(self.layout.grid)}, got {list(tokens.shape)}")

    # ---- stable surface --------------------------------------------------------------------------
    def loss(self, batch: dict) -> tuple[torch.Tensor, dict]:
        """Cross-entropy over video targets -> (loss, {"acc": tensor, "tokens": int}); a packed batch (keys of
        nbp_ds.packing) goes through :meth:`packed_loss`."""
        if is_packed(batch):
            return self.packed_loss(batch)
        tokens = batch["tokens"].long()
        self._check_tokens(tokens)
        label = self._labels(batch)
        if label is not None:
            label = self.drop_labels(label)
        ids = self.layout.input_ids(tokens, label)
        # the head only where a target counts; an index table, not a boolean mask (which syncs with the host)
        rows = self.layout.loss_rows(ids.device)
        n = tokens.shape[0] * rows.numel()  # from shapes: no host synchronisation
        local_rows = rows
        if self.shard is not None:  # this rank's rows of the sequence; the mean stays over the whole sequence's
            local_rows, rows = self.shard.loss_rows(ids.device)
        hidden = self.forward(ids).index_select(1, local_rows).reshape(-1, self.d_model)
        targets = self.layout.targets(tokens).index_select(1, rows).reshape(-1)
        # the fused head + cross-entropy, model.loss_chunk rows at a time (never all B x S x vocab logits)
        loss_sum, correct = self.head(hidden, targets, self.loss_chunk)
        if self.shard is not None:
            loss_sum, correct = self.shard.whole_sequence(loss_sum), self.shard.whole_sequence(correct.float())
        return loss_sum / n, {"acc": correct.float() / n, "tokens": n}

    def logits(self, batch: dict) -> torch.Tensor:
        """[B, T*H*W, vocab]: logits[:, j] predicts video token j (raster order t, h, w)."""
        tokens = batch["tokens"].long()
        self._check_tokens(tokens)
        ids = self.layout.input_ids(tokens, self._labels(batch))
        hidden = self.forward(ids)
        if self.shard is not None:
            hidden = self.shard.gather(hidden)
        return self.layout.to_raster(self.head(hidden))

    # ---- accounting ------------------------------------------------------------------------------
    def num_params(self, exclude_embeddings: bool = False) -> int:
        """Parameter count (ZeRO-3 aware: partitioned parameters report their full size)."""
        total = 0
        for name, p in self.named_parameters():
            if exclude_embeddings and name.startswith("embed."):
                continue
            total += getattr(p, "ds_numel", p.numel())
        return total

    def flops_per_token(self) -> float:
        """Training FLOPs per sequence position: 6 x matmul params + attention scores and mixing
        (forward 2 x 2 x d per visible key; a block-causal query sees about half the sequence)."""
        matmul_params = self.num_params(exclude_embeddings=True) - sum(
            getattr(p, "ds_numel", p.numel()) for n, p in self.named_parameters() if n.endswith("norm.weight")
        )
        attention = 3 * 2 * 2 * self.d_model * (self.layout.seq_len / 2) * self.n_layer
        return 6 * matmul_params + attention
