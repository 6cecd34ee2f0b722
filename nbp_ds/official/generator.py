"""Convert the NBP authors' released generators (Lightning ``.ckpt``) into nbp_ds' export format.

A released checkpoint holds ``state_dict`` (the GPT under ``transformer.*``, possibly the tokenizer under
``first_stage_model.*``, which is dropped) and ``hyper_parameters`` (the training ``args``). The result is
a ``model.arch: gpt2`` model (nbp_ds.model.gpt2) whose layout reproduces the authors' sequences exactly:

* UCF-101 (class-conditional, hybrid): vocabulary BOV 0, placeholders 1..L-1, Llama-2 text ids + L, video
  codes after the text vocabulary; input = the class's 8-token text prefix (seen by every position), BOV,
  video block 0 token by token, its last token with the L-1 placeholders, then blocks of L.
* Kinetics-600 (frame prediction, unconditional training): vocabulary = the video codes; input = video
  blocks 0..n-2, each predicting the next block, block-causal in blocks of L; the first 2 latent frames are
  given when sampling.

Shapes come from the weights, the rest (heads, grid, block, kind) from ``hyper_parameters['args']`` when
the file has them, else from the caller. Every key is accounted for: a key that is neither converted nor a
known one to drop, or a missing one, or a shape that does not fit, is refused by name.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from nbp_ds.config import RunConfig
from nbp_ds.errors import CheckpointError
from nbp_ds.model import build_model
from nbp_ds.official.class_text import PREFIX_LENGTH, class_prefixes, read_class_names
from nbp_ds.official.files import ConversionError, read_torch_file, require_matching_state
from nbp_ds.weights.export import save_export

log = logging.getLogger(__name__)

KINDS = ("ucf", "k600")
PREFIX = "transformer."
# keys a released checkpoint may hold that the converted model does not need
DROPPED = (
    (re.compile(r"first_stage_model\..*"), "the tokenizer's weights (load the tokenizer .pt on its own)"),
    (re.compile(r"transformer\.uncond_embedding"), "a random buffer for classifier-free guidance, never trained"),
    (re.compile(r"transformer\.blocks\.\d+\.attn\.mask"), "a stored attention mask (the layout builds its own)"),
)
# our parameter name -> the released one, per transformer block
BLOCK_KEYS = {
    "ln1.weight": "ln1.weight", "ln1.bias": "ln1.bias", "ln2.weight": "ln2.weight", "ln2.bias": "ln2.bias",
    **{f"attn.{p}.{t}": f"attn.{p}.{t}" for p in ("query", "key", "value", "proj") for t in ("weight", "bias")},
    "mlp.fc.weight": "mlp.0.weight", "mlp.fc.bias": "mlp.0.bias",
    "mlp.proj.weight": "mlp.2.weight", "mlp.proj.bias": "mlp.2.bias",
}
TOP_KEYS = {"embed.tokens.weight": "tok_emb.weight", "norm.weight": "ln_f.weight", "norm.bias": "ln_f.bias",
            "head.weight": "head.weight"}
POSITIONS = ("embed.positions.weight", "pos_emb")  # ours [S, d] = released [1, P >= S, d][0, :S]


@dataclass(frozen=True)
class ReleasedGenerator:
    """What a released checkpoint says about itself: weights (``transformer.*`` without the prefix) and args."""

    path: Path
    weights: dict[str, torch.Tensor]
    args: dict[str, Any]

    @property
    def n_layer(self) -> int:
        return len({k.split(".")[1] for k in self.weights if re.fullmatch(r"blocks\.\d+\.ln1\.weight", k)})

    def shape(self, key: str) -> tuple[int, ...]:
        if key not in self.weights:
            raise CheckpointError(f"{self.path}: no {PREFIX}{key} in the state_dict: not an NBP generator checkpoint")
        return tuple(self.weights[key].shape)


def read_released_generator(path: str | Path, trust_pickle: bool = False) -> ReleasedGenerator:
    """Read a released ``.ckpt``: its ``transformer.*`` weights and its training args (empty if absent)."""
    path = Path(path)
    package = read_torch_file(path, trust_pickle=trust_pickle)
    if not isinstance(package, dict):
        raise CheckpointError(f"{path}: not an NBP generator checkpoint (a {type(package).__name__}, not a dict)")
    state = package.get("state_dict", package)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: not an NBP generator checkpoint (no state_dict of tensors; top-level keys "
                              f"{sorted(map(str, package))[:8]})")
    for wrapper in ("_forward_module.", "module."):  # DeepSpeed / DDP wrappers, as the authors' loader strips
        if state and all(k.startswith(wrapper) for k in state):
            state = {k.removeprefix(wrapper): v for k, v in state.items()}
    kept, unexpected = {}, []
    for key, value in state.items():
        reason = next((why for pattern, why in DROPPED if pattern.fullmatch(key)), None)
        if reason is not None:
            log.info("dropping %s: %s", key, reason)
        elif key.startswith(PREFIX):
            kept[key.removeprefix(PREFIX)] = value
        else:
            unexpected.append(key)
    if unexpected or not kept:
        raise CheckpointError(f"{path}: not an NBP generator checkpoint: " + (
            f"unexpected keys ({len(unexpected)}): {', '.join(sorted(unexpected)[:8])}" if unexpected
            else f"no {PREFIX}* keys"))
    hyper = package.get("hyper_parameters")
    args = hyper.get("args") if isinstance(hyper, dict) else None
    args = {} if args is None else dict(args) if isinstance(args, dict) else dict(vars(args))
    return ReleasedGenerator(path, kept, args)


def _pick(name: str, from_args: Any, given: Any, path: Path, default: Any = None) -> Any:
    """A setting from the checkpoint's args or the caller; both given must agree; one of the three is needed."""
    if from_args is not None and given is not None and from_args != given:
        raise CheckpointError(f"{path}: the checkpoint says {name}={from_args!r}, you gave {given!r}")
    value = from_args if from_args is not None else given if given is not None else default
    if value is None:
        raise CheckpointError(f"{path}: the checkpoint has no hyper_parameters naming {name}: give it "
                              f"(--{name.replace('_', '-')})")
    return value


def _kind_from_args(args: dict[str, Any]) -> str | None:
    if not args:
        return None
    if args.get("hybrid") and args.get("cond_stage_key") == "text":
        return "ucf"
    if args.get("unconditional"):
        return "k600"
    raise CheckpointError(f"the checkpoint's args (hybrid={args.get('hybrid')}, cond_stage_key="
                          f"{args.get('cond_stage_key')!r}, unconditional={args.get('unconditional')}) are neither "
                          f"the released UCF-101 (hybrid text) nor the Kinetics-600 (unconditional) setting")


def _block_shape(grid: list[int], size: int, path: Path) -> list[int]:
    """The authors' blocks are ``size`` consecutive raster tokens: part of a row, or whole rows of a frame."""
    _, h, w = grid
    if w % size == 0:
        return [1, 1, size]
    if size % w == 0 and h % (size // w) == 0:
        return [1, size // w, w]
    raise CheckpointError(f"{path}: blocks of {size} consecutive tokens do not tile a {h}x{w} frame")


def generator_config(released: ReleasedGenerator, *, kind: str | None = None, n_head: int | None = None,
                     block_size: int | None = None, grid: list[int] | None = None, context_frames: int = 2,
                     class_names: list[str] | None = None, sentencepiece_model: str | Path | None = None) -> RunConfig:
    """The run config of the converted model: shapes from the weights, the rest from args or the caller."""
    path, args = released.path, released.args
    kind = _pick("kind", _kind_from_args(args), kind, path)
    if kind not in KINDS:
        raise ConversionError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
    if args.get("vtokens_pos"):
        raise CheckpointError(f"{path}: trained with vtokens_pos (learned per-(t,h,w) positions), which the "
                              f"released models do not use and nbp_ds does not convert")
    rows, d_model = released.shape("tok_emb.weight")
    ffn_dim = released.shape("blocks.0.mlp.0.weight")[0]
    n_layer = released.n_layer
    _pick("n_layer", args.get("n_layer"), n_layer, path)
    n_head = _pick("n_head", args.get("n_head"), n_head, path)
    size = _pick("block_size", args.get("token_number_per_step"), block_size, path, default=16)
    if grid is None and args.get("sequence_length") and args.get("resolution"):
        grid = [(args["sequence_length"] - 1) // 4 + 1, args["resolution"] // 8, args["resolution"] // 8]
    grid = list(grid or [5, 16, 16])
    layout: dict[str, Any] = {"grid": grid, "block": _block_shape(grid, size, path), "token_ids": "official"}
    if kind == "ucf":
        if class_names is None or sentencepiece_model is None:
            raise ConversionError("a UCF-101 generator is conditioned on class names through the Llama-2 tokenizer: "
                             "give the class names (--classes) and the tokenizer's sentencepiece model "
                             "(--llama-tokenizer PATH/tokenizer.model)")
        length = int(args.get("cond_token_num") or PREFIX_LENGTH)
        prefixes, text_vocab = class_prefixes(class_names, sentencepiece_model, length)
        vocab = rows - size - text_vocab
        if vocab <= 0:
            raise CheckpointError(f"{path}: tok_emb has {rows} rows, fewer than the {size} special and {text_vocab} "
                                  f"text tokens of {sentencepiece_model}: not this tokenizer's model")
        layout.update(hybrid=True, condition="class", num_classes=len(class_names), class_prefixes=prefixes,
                      text_vocab_size=text_vocab)
    else:
        vocab = rows
        layout.update(condition="frames", context_frames=context_frames, bov=False, loss_on_context=True)
    if vocab != 64000:
        log.warning("%s: %d video codes, not the 64,000 of the released tokenizers", path, vocab)
    model = {"arch": "gpt2", "n_layer": n_layer, "d_model": d_model, "n_head": n_head, "vocab_size": vocab,
             "ffn_dim": ffn_dim,
             "norm_eps": 1e-5, "class_dropout": 0.0}
    name = f"official-{kind}-{n_layer}x{d_model}"
    return RunConfig.from_dict({"name": name, "layout": layout, "model": model}, source=str(path))


def official_key(ours: str) -> str:
    """The released name (without ``transformer.``) of one of our gpt2 parameters."""
    if ours in TOP_KEYS:
        return TOP_KEYS[ours]
    match = re.fullmatch(r"layers\.(\d+)\.(.+)", ours)
    if match is None or match.group(2) not in BLOCK_KEYS:
        raise KeyError(ours)
    return f"blocks.{match.group(1)}.{BLOCK_KEYS[match.group(2)]}"


def convert_weights(released: ReleasedGenerator, cfg: RunConfig) -> dict[str, torch.Tensor]:
    """The released weights under our names; every key and shape checked against the model ``cfg`` builds."""
    expected = {k: v.shape for k, v in build_model(cfg, device="meta").state_dict().items()}
    ours_pos, theirs_pos = POSITIONS
    seq_len = expected.pop(ours_pos)[0]
    names = {official_key(k): k for k in expected}
    weights = dict(released.weights)
    pos = weights.pop(theirs_pos, None)
    require_matching_state({name: expected[ours] for name, ours in names.items()}, weights,
                           f"{released.path} does not fit a {cfg.model.n_layer}-layer width-{cfg.model.d_model} "
                           f"generator (keys without the '{PREFIX}' prefix)")
    if pos is None or pos.ndim != 3 or pos.shape[0] != 1 or pos.shape[1] < seq_len \
            or pos.shape[2] != cfg.model.d_model:
        found = "missing" if pos is None else list(pos.shape)
        raise CheckpointError(f"{released.path}: {PREFIX}{theirs_pos} must be [1, >= {seq_len}, "
                              f"{cfg.model.d_model}] for this layout, got {found}")
    state = {ours: weights[name].float().contiguous() for name, ours in names.items()}
    state[ours_pos] = pos[0, :seq_len].float().contiguous()
    return state


def convert_generator(path: str | Path, out: str | Path, *, trust_pickle: bool = False,
                      classes: str | Path | None = None, sentencepiece_model: str | Path | None = None,
                      kind: str | None = None, n_head: int | None = None, block_size: int | None = None,
                      grid: list[int] | None = None, context_frames: int = 2, dtype: str = "fp32",
                      shard_bytes: int | None = None) -> RunConfig:
    """Convert a released ``.ckpt`` into ``out`` (.safetensors + .json as nbp_ds.weights.export writes, or with
    ``shard_bytes`` its sharded form in the folder ``out``; classes.json beside the weights for a class-conditional
    model) and return its run config."""
    released = read_released_generator(path, trust_pickle=trust_pickle)
    names = read_class_names(classes) if classes is not None else None
    cfg = generator_config(released, kind=kind, n_head=n_head, block_size=block_size, grid=grid,
                           context_frames=context_frames, class_names=names, sentencepiece_model=sentencepiece_model)
    state = convert_weights(released, cfg)
    out = save_export(state, cfg, out, dtype, shard_bytes)
    if names is not None:
        (out.parent / "classes.json").write_text(json.dumps({n: i for i, n in enumerate(names)}, indent=1))
    log.info("converted %s -> %s (%s, %d layers, width %d, %d heads)", path, out, cfg.name, cfg.model.n_layer,
             cfg.model.d_model, cfg.model.n_head)
    return cfg
