"""Video tokenizer (causal 3D CNN + FSQ): the model, its training, the released tokenizer's port, and tokenizing
videos into shards (video I/O itself is nbp_ds.video_io)."""

from nbp_ds.tokenizer.model import PRESETS, TokenizerConfig, VideoTokenizer, build_tokenizer, load_tokenizer

__all__ = ["PRESETS", "TokenizerConfig", "VideoTokenizer", "build_tokenizer", "load_tokenizer"]
