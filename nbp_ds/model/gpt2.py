"""The GPT-2-style decoder of the NBP authors' released generators (``model.arch: gpt2``).

Pre-LayerNorm blocks (LayerNorm with bias), learned absolute position embeddings added to the token
embeddings (position = index in the sequence), separate query / key / value / output projections with
biases, an exact-GELU MLP of width 4d with biases, a final LayerNorm and an untied output layer without
bias. It runs over the same layouts, attention backends and KV cache as the LLaMA-style NBPModel, and
keeps NBPModel's batch-level surface (``loss``, ``logits``, ``new_cache``, labels, activation
checkpointing): only the layers differ. nbp-convert-official turns the released ``.ckpt`` files
into this model's weights; the layout options ``bov``, ``class_prefixes`` and ``token_ids=official``
reproduce their sequences and attention masks (see nbp_ds.layout).

The released output layer has a row for every input id (BOV, placeholders, text and video); ``head``
returns the logits of the video codes only, so that sampling, ``logits`` and the loss live in code space.

Weights are initialized inside each leaf module's constructor (ZeRO-3 partitions a module's parameters
as soon as its constructor returns).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from nbp_ds.config import ModelConfig
from nbp_ds.errors import UsageError
from nbp_ds.model.attention import DeviceBackend
from nbp_ds.model.transformer import (
    DecodeWindow,
    Embedding,
    KVCache,
    Linear,
    NBPModel,
    SequenceLayer,
    attend,
    logits_or_loss,
)


class TokenAndPositionEmbedding(nn.Module):
    """Token embedding plus a learned embedding of the sequence position."""

    def __init__(self, num_tokens: int, num_positions: int, dim: int, std: float):
        super().__init__()
        self.tokens = Embedding(num_tokens, dim, std)
        self.positions = Embedding(num_positions, dim, std)

    def forward(self, ids: torch.Tensor, start: int | DecodeWindow) -> torch.Tensor:
        if isinstance(start, DecodeWindow):  # static decoding: the positions are a tensor on the device
            where = start.positions
        else:
            where = torch.arange(start, start + ids.shape[1], device=ids.device)
        return self.tokens(ids) + self.positions(where)


class SelfAttention(nn.Module):
    def __init__(self, d_model: int, n_head: int, std: float, out_std: float, backend: DeviceBackend, index: int):
        super().__init__()
        self.n_head, self.head_dim = n_head, d_model // n_head
        self.query = Linear(d_model, d_model, std, bias=True)
        self.key = Linear(d_model, d_model, std, bias=True)
        self.value = Linear(d_model, d_model, std, bias=True)
        self.proj = Linear(d_model, d_model, out_std, bias=True)
        self.backend = backend  # shared by all layers; not a submodule (it holds no weights)
        self.index = index  # this layer's slot in a KV cache

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        return x.view(b, n, self.n_head, self.head_dim).transpose(1, 2)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, start: int | DecodeWindow = 0) -> torch.Tensor:
        b, n, _ = x.shape
        q, k, v = self._heads(self.query(x)), self._heads(self.key(x)), self._heads(self.value(x))
        y = attend(q, k, v, self.backend, cache, self.index, start)
        return self.proj(y.transpose(1, 2).reshape(b, n, -1))


class GeluMLP(nn.Module):
    def __init__(self, d_model: int, hidden: int, std: float, out_std: float):
        super().__init__()
        self.fc = Linear(d_model, hidden, std, bias=True)
        self.proj = Linear(hidden, d_model, out_std, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.gelu(self.fc(x)))  # the exact (erf) GELU, as nn.GELU() in the released code


class GPT2Block(SequenceLayer):
    """Pre-LayerNorm attention + GELU MLP; no positional arguments (positions are in the embedding)."""

    def __init__(self, m: ModelConfig, ffn_dim: int, out_std: float, backend: DeviceBackend, index: int):
        super().__init__()
        self.ln1 = nn.LayerNorm(m.d_model, eps=m.norm_eps)
        self.attn = SelfAttention(m.d_model, m.n_head, m.init_std, out_std, backend, index)
        self.ln2 = nn.LayerNorm(m.d_model, eps=m.norm_eps)
        self.mlp = GeluMLP(m.d_model, ffn_dim, m.init_std, out_std)

    def block(self, x: torch.Tensor, cache: KVCache | None = None, start: int | DecodeWindow = 0) -> torch.Tensor:
        x = x + self.attn(self.ln1(x), cache, start)
        return x + self.mlp(self.ln2(x))


class VideoHead(nn.Module):
    """Untied output layer over every input id (as released); its logits and loss are those of the video codes
    only (the rows video_offset .. video_offset + vocab_size)."""

    compiled = False  # the loss' elementwise kernel compiled (set with the model's layer execution)

    def __init__(self, d_model: int, rows: int, video_offset: int, vocab_size: int, std: float):
        super().__init__()
        self.video_offset, self.vocab_size = video_offset, vocab_size
        self.weight = nn.Parameter(torch.empty(rows, d_model))
        nn.init.normal_(self.weight, mean=0.0, std=std)

    def forward(self, x: torch.Tensor, targets: torch.Tensor | None = None, chunk: int = 4096):
        video = self.weight[self.video_offset:self.video_offset + self.vocab_size]
        return logits_or_loss(x, video, targets, chunk, self.compiled)


class GPT2Model(NBPModel):
    """NBP's batch-level surface over GPT-2-style layers (the architecture of the released generators)."""

    rotary = False  # learned absolute position embeddings, added to the input

    def build_layers(self, m: ModelConfig, out_std: float) -> None:
        lay = self.layout
        self.ffn_dim = m.ffn_dim or 4 * m.d_model
        self.embed = TokenAndPositionEmbedding(lay.embedding_size, lay.seq_len, m.d_model, m.init_std)
        self.layers = nn.ModuleList(GPT2Block(m, self.ffn_dim, out_std, self.backend, i) for i in range(m.n_layer))
        self.norm = nn.LayerNorm(m.d_model, eps=m.norm_eps)
        self.head = VideoHead(m.d_model, lay.embedding_size, lay.video_token_offset, m.vocab_size, m.init_std)

    def embed_positions(self, input_ids: torch.Tensor, start: int | DecodeWindow) -> tuple[torch.Tensor, tuple]:
        """Token plus learned position embeddings; the layers take no positional arguments."""
        return self.embed(input_ids, start), ()

    def packed_positions(self, positions: torch.Tensor) -> tuple:
        raise UsageError("model.arch=gpt2 learns one absolute position per sequence slot, so its clips cannot start "
                         "at position zero inside a packed row; packed training (data.pack_tokens) needs "
                         "model.arch=llama")

    def flops_per_token(self) -> float:
        """Training FLOPs per sequence position: 6 x (layer matrices + the video rows of the head) + attention."""
        d, n = self.d_model, self.n_layer
        matmul_params = n * (4 * d * d + 2 * d * self.ffn_dim) + d * self.vocab_size
        attention = 3 * 2 * 2 * d * (self.layout.seq_len / 2) * n
        return 6 * matmul_params + attention
