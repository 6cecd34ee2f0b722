"""Model sizes of the NBP paper (arXiv 2502.07737, Table of model configurations) and their
parameter counts."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Preset:
    n_layer: int
    d_model: int
    n_head: int


# layers / width / heads as published
PAPER_PRESETS: dict[str, Preset] = {
    "700m": Preset(n_layer=24, d_model=1536, n_head=16),
    "1.2b": Preset(n_layer=24, d_model=2048, n_head=32),
    "3b": Preset(n_layer=32, d_model=3072, n_head=32),
}

# the shipped run config that uses each preset
PRESET_CONFIGS: dict[str, str] = {"700m": "ucf101-700m", "1.2b": "ucf101-1.2b", "3b": "ucf101-3b"}


def count_params(n_layer: int, d_model: int, ffn_dim: int, vocab_size: int, embedding_rows: int) -> dict[str, int]:
    """Analytic parameter count of nbp_ds' transformer (no biases, SwiGLU, untied head)."""
    per_layer = 4 * d_model * d_model + 3 * d_model * ffn_dim + 2 * d_model
    body = n_layer * per_layer + d_model
    head = d_model * vocab_size
    embedding = embedding_rows * d_model
    return {"non_embedding": body + head, "embedding": embedding, "total": body + head + embedding,
            "transformer_layers": n_layer * per_layer}
