"""Video tokenizer (causal 3D CNN + FSQ) and video I/O through ffmpeg."""

from nbp_ds.tokenizer.model import PRESETS, TokenizerConfig, VideoTokenizer, build_tokenizer, load_tokenizer

__all__ = ["PRESETS", "TokenizerConfig", "VideoTokenizer", "build_tokenizer", "load_tokenizer"]
