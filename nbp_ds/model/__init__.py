"""The NBP transformer, its attention backends and the paper's model presets."""

from nbp_ds.model.attention import AttentionUnavailable, make_attention, resolve_backend_name
from nbp_ds.model.build import ModelSpec, build, build_model
from nbp_ds.model.presets import PAPER_PRESETS, PRESET_CONFIGS, count_params
from nbp_ds.model.transformer import KVCache, NBPModel, default_ffn_dim

__all__ = [
    "AttentionUnavailable", "KVCache", "ModelSpec", "NBPModel", "PAPER_PRESETS", "PRESET_CONFIGS", "build",
    "build_model", "count_params", "default_ffn_dim", "make_attention", "resolve_backend_name",
]
