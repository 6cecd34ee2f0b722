"""KV-cache block decoding: NBP (a block per pass), NTP (block 1x1x1) and hybrid layouts.

The layout's ``generation_steps`` say what each forward pass feeds: step 0 the prefix (condition, BOV, and for
frame prediction the given context blocks), each later step the block just sampled. A pass reads one set of
logits per token of the block it predicts. The KV cache is allocated once for the whole sequence.

* ``decode``: ``generate`` and the eager reference decoder; the modes (eager, static, graph, auto).
* ``static``: the static decoder (fixed-shape passes, no host synchronisation, CUDA graphs).
* ``plan``: the generation steps as device tables grouped by pass shape.
* ``draw``: sampling on the device (temperature, top-k, top-p, guidance) from a counter-based random stream.
* ``conditions``: the label, guidance and context a model's condition takes, checked once for every caller.
* ``long``: videos longer than the training clip, a window of the clip's length sliding one latent frame at a
  time (a rolling cache, or each window recomputed).
* ``sampler``: nbp-sample's work: loading weights, tokenizer, labels and context, checked before any work.
* ``folder``: a sampler output folder: videos streamed to per-video files as they come, a record, resume.

``sampler`` and ``folder`` load tokenizers and write files: import them by module (``nbp_ds.generate.sampler``);
``import nbp_ds.generate`` stays the decoder alone.
"""

from nbp_ds.generate.decode import MODES, generate, release_decoders, resolve_mode
from nbp_ds.generate.draw import (
    PAPER_SAMPLING,
    QUICKSTART_SAMPLING,
    Sampling,
    filter_logits,
    guided_logits,
    inverse_cdf,
    sample_tokens,
    stream_uniforms,
    video_keys,
)
from nbp_ds.generate.long import LONG_MODES, generate_long
from nbp_ds.generate.static import StaticDecoder

__all__ = [
    "LONG_MODES", "MODES", "PAPER_SAMPLING", "QUICKSTART_SAMPLING", "Sampling", "StaticDecoder", "filter_logits",
    "generate", "generate_long", "guided_logits", "inverse_cdf", "release_decoders", "resolve_mode", "sample_tokens",
    "stream_uniforms", "video_keys",
]
