"""The NBP run configuration: its typed dataclass tree and its validation, loaded from YAML and overridden from
the command line by the generic loader (nbp_ds.typed_yaml, which the tokenizer's config uses too).

    cfg = load_config("tiny", ["model.n_layer=2", "layout.block=[1,1,16]"])

A name refers to ``nbp_ds/configs/<name>.yaml``; anything else is a path to a YAML file. A YAML
file may start from another with ``base: <name or path>`` and then set only what differs.
Unknown keys, wrong types and inconsistent values are refused with a ``ConfigError`` that names
the key and the value.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nbp_ds.errors import ConfigError
from nbp_ds.layout import Layout
from nbp_ds.typed_yaml import from_mapping, load_dataclass_tree, shipped_configs

CONFIG_DIR = Path(__file__).parent / "configs"


@dataclass
class LayoutConfig:
    """How a video's token grid becomes a sequence (see nbp_ds.layout)."""

    grid: list[int] = field(default_factory=lambda: [5, 16, 16])  # latent (T, H, W)
    block: list[int] = field(default_factory=lambda: [1, 1, 16])  # (bt, bh, bw); [1,1,1] = next-token
    hybrid: bool = False  # first video block token by token (the paper's UCF-101 models)
    hybrid_blocks: int = 1  # with hybrid: leading video blocks token by token (a frame's rows: the first frame)
    condition: str = "none"  # none | class | frames
    num_classes: int = 0  # for condition=class
    context_frames: int = 0  # latent frames given, for condition=frames
    loss_on_context: bool = False  # also train on the given context frames
    bov: bool = True  # false: no BOV block, the input starts at video block 0 (condition=frames only; official K600)
    # condition=class by text: one list of text token ids per class (the prefix that class sees) instead of a
    # single class token; the ids lie in [0, text_vocab_size). Written by nbp-convert-official (UCF-101).
    class_prefixes: list[list[int]] = field(default_factory=list)
    text_vocab_size: int = 0  # size of the text vocabulary class_prefixes use
    token_ids: str = "nbp_ds"  # nbp_ds | official: how tokens map to embedding rows (see nbp_ds.layout)


@dataclass
class ModelConfig:
    """A LLaMA-style decoder (RMSNorm, SwiGLU, no biases, 3D rotary positions), or with ``arch: gpt2`` the
    NBP authors' GPT-2-style one (LayerNorm, GELU MLP, biases, learned absolute positions; nbp_ds.model.gpt2)."""

    arch: str = "llama"  # llama | gpt2
    n_layer: int = 24
    d_model: int = 1536
    n_head: int = 16
    vocab_size: int = 64000  # video codes; special tokens are added on top
    ffn_dim: int | None = None  # MLP hidden width; None = 8/3 * d_model rounded up to 256 (llama), 4 * d_model (gpt2)
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6  # the released gpt2 models use LayerNorm's 1e-5
    init_std: float = 0.02
    attention: str = "auto"  # auto | sdpa | flex | flash
    compile: bool | str = "auto"  # torch.compile each transformer layer and the loss kernel; auto = on CUDA only
    flex_kernel_options: Any = None  # FlexAttention kernel options, e.g. {BLOCK_M: 128} (see nbp-bench-attention)
    class_dropout: float = 0.1  # label -> null class during training, for classifier-free guidance
    loss_chunk: int = 4096  # positions per output-layer + loss chunk: bounds logits memory (B*S*vocab floats)


@dataclass
class DataConfig:
    """Token shards: local paths (a folder, a brace pattern, a glob, a list of .tar files), ``pipe:`` commands
    or http(s) URLs; ``train`` may also be a mixture, a list of ``{shards, weight, name}`` entries
    (nbp_ds.data.sources)."""

    train: Any = None
    val: Any = None
    num_workers: int = 2
    shuffle_buffer: int = 1000
    val_batches: int = 8  # validation batches per evaluation (0 = the whole validation set)
    retries: int = 3  # a shard that fails to open or breaks mid-stream is read again this many times, then skipped
    retry_backoff: float = 1.0  # seconds before the first retry of a shard; doubled for each further one
    # 0: every clip has layout.grid; N: clips of any grid the block tiles, packed into rows of N sequence positions,
    # each clip attending only to itself (nbp_ds.packing, nbp_ds.data.packer; train.micro_batch then counts rows)
    pack_tokens: int = 0


@dataclass
class TrainConfig:
    out_dir: str = "runs/default"
    steps: int = 1000
    micro_batch: int = 8  # per device
    grad_accum: int = 1
    # samples per optimizer step over all processes; when set it stays fixed and grad_accum is derived from it, the
    # micro-batch and the number of processes (nbp_ds.train.batch); None = micro_batch x grad_accum x processes
    global_batch: int | None = None
    # packed runs (data.pack_tokens): the global batch in sequence positions, a multiple of data.pack_tokens; it
    # sets train.global_batch (rows) to global_batch_tokens / pack_tokens
    global_batch_tokens: int | None = None
    lr: float = 3e-4
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 100
    weight_decay: float = 0.05
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    grad_clip: float = 1.0
    seed: int = 0
    precision: str = "bf16"  # bf16 | fp32
    activation_checkpointing: bool | str = "none"  # none | full | selective (keep matmul outputs); true = full
    save_every: int = 500
    keep_last: int = 3
    eval_every: int = 500
    log_every: int = 10
    sample_every: int = 0  # log sample videos to TensorBoard every N steps (0 = never)
    sample_tokenizer: str | None = None  # tokenizer used to decode logged samples
    max_bad_steps: int = 5  # stop after this many NaN/Inf losses in a row
    # a peer that died or hangs makes every collective (and a checkpoint's agreement) raise after this long, so
    # the job ends and is requeued; longer than the slowest save, validation or sample logging
    collective_timeout_s: float = 1800.0
    # the step watchdog: a rank that finishes no step for max(stall_factor x the median step time,
    # stall_timeout_s) dumps every thread's stack and exits non-zero (stall_timeout_s=0: no watchdog)
    stall_timeout_s: float = 600.0
    stall_factor: float = 20.0
    init_from: str | None = None  # exported .safetensors whose weights start a new run (fine-tuning); not on resume
    # keys that may differ from the run folder's recorded experiment (e.g. [train.steps, train.lr]); any other
    # change of data, schedule, seed, ... is refused on resume (nbp_ds.weights.identity)
    allow_changes: list[str] = field(default_factory=list)
    peak_tflops: float | None = None  # device peak for MFU; None = looked up from the device name
    hooks: str | None = None  # "module:Class", a nbp_ds.runtime.hooks.TrainerHooks subclass (profiling, custom logs)
    ema: float = 0.0  # decay of an exponential moving average of the weights (0 = none; e.g. 0.9999); nbp-export --ema
    wandb: bool = False  # also log to Weights & Biases (pip install 'nbp_ds[wandb]'; WANDB_MODE=offline works)
    wandb_project: str = "nbp_ds"
    wandb_entity: str | None = None  # the W&B team or user (None: the account's default)
    wandb_group: str | None = None  # W&B group, e.g. one sweep or one model size
    wandb_tags: list[str] = field(default_factory=list)
    # [start, stop]: a torch.profiler trace of steps start..stop (1-based, both included) in <out_dir>/profile,
    # for TensorBoard's profiler view and Perfetto (nbp_ds.runtime.profiling); None = no profiling
    profile: list[int] | None = None
    profile_all_ranks: bool = False  # trace every rank, not only rank 0
    # context parallelism: DeepSpeed-Ulysses over groups of this many processes, each holding 1/N of every
    # sequence (nbp_ds.model.sequence_parallel); 1 = off. Must divide model.n_head and the number of processes
    sequence_parallel: int = 1


@dataclass
class DeepSpeedConfig:
    config: str = "zero3"  # a shipped DeepSpeed JSON (zero2, zero3, zero3_offload) or a path to one
    # DeepSpeed JSON keys set over the file's, by dotted path: deepspeed.set.zero_optimization.reduce_bucket_size=5e8
    # (nbp_ds.train.ds_config; the keys the run config owns, batch, optimizer, clipping, precision, are refused)
    set: Any = field(default_factory=dict)


@dataclass
class RunConfig:
    """The whole run: what the model sees (layout), what it is (model), how it learns."""

    layout: LayoutConfig = field(default_factory=LayoutConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    name: str = "custom"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "<dict>") -> RunConfig:
        cfg = from_mapping(cls, data, source)
        validate(cfg)
        return cfg


ATTENTION_BACKENDS = ("auto", "sdpa", "flex", "flash")
CHECKPOINTING_MODES = ("none", "full", "selective")
# FlexAttention kernel options a run config may set (torch.nn.attention.flex_attention.FlexKernelOptions; each
# may carry a fwd_ or bwd_ prefix to apply to one pass only)
FLEX_KERNEL_OPTIONS = {"BLOCK_M": int, "BLOCK_N": int, "BLOCK_M1": int, "BLOCK_N1": int, "BLOCK_M2": int,
                       "BLOCK_N2": int, "num_warps": int, "num_stages": int, "PRESCALE_QK": bool,
                       "ROWS_GUARANTEED_SAFE": bool, "BLOCKS_ARE_CONTIGUOUS": bool, "WRITE_DQ": bool,
                       "USE_TMA": bool, "BACKEND": str}
ARCHS = ("llama", "gpt2")


def available_configs(config_dir: Path = CONFIG_DIR) -> list[str]:
    """Names of the configs shipped with the package in ``config_dir`` (default: the run configs)."""
    return shipped_configs(config_dir)


def load_config(name_or_path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """Load a named or YAML run config, apply ``key=value`` overrides, and validate it."""
    cfg = load_dataclass_tree(RunConfig, name_or_path, overrides, config_dir=CONFIG_DIR)
    validate(cfg)
    return cfg


def config_keys() -> list[str]:
    """Every dotted key of a run config (``section.field``, and the top-level ``name``)."""
    keys = []
    for name, section in RunConfig().to_dict().items():
        keys += [f"{name}.{key}" for key in section] if isinstance(section, dict) else [name]
    return keys


def checkpointing_mode(value: bool | str) -> str:
    """train.activation_checkpointing as one of CHECKPOINTING_MODES (true and false, as older configs say,
    mean full and none)."""
    if isinstance(value, bool):
        return "full" if value else "none"
    if value not in CHECKPOINTING_MODES:
        raise ConfigError(f"train.activation_checkpointing must be one of {', '.join(CHECKPOINTING_MODES)} "
                          f"(or true / false), got {value!r}")
    return value


def _check_flex_options(options: Any) -> None:
    _require(isinstance(options, dict), f"model.flex_kernel_options must be a mapping such as "
                                        f"{{BLOCK_M: 128, BLOCK_N: 64}}, got {options!r}")
    for key, value in options.items():
        base = str(key).removeprefix("fwd_").removeprefix("bwd_")
        _require(base in FLEX_KERNEL_OPTIONS, f"model.flex_kernel_options: unknown option {key!r}; known: "
                                              f"{', '.join(FLEX_KERNEL_OPTIONS)} (each may start with fwd_ or bwd_)")
        kind = FLEX_KERNEL_OPTIONS[base]
        ok = isinstance(value, kind) and (kind is bool or not isinstance(value, bool))
        _require(ok, f"model.flex_kernel_options.{key} must be {kind.__name__}, got {value!r}")
        if base.startswith("BLOCK_"):
            _require(value >= 16 and value & (value - 1) == 0,
                     f"model.flex_kernel_options.{key} must be a power of two >= 16, got {value}")


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def validate(cfg: RunConfig) -> None:
    """Refuse configurations that cannot work, naming the key and value."""
    lay, mod, tr = cfg.layout, cfg.model, cfg.train
    Layout.from_config(lay, mod.vocab_size)  # the layout checks its own rules
    if lay.class_prefixes:  # a text prefix has no null class to drop labels to (classifier-free guidance)
        _require(mod.class_dropout == 0.0,
                 f"model.class_dropout={mod.class_dropout} needs a null class, which layout.class_prefixes "
                 f"do not have: set model.class_dropout=0")
    _require(mod.arch in ARCHS, f"model.arch must be one of {', '.join(ARCHS)}, got {mod.arch!r}")
    _require(mod.n_layer > 0, f"model.n_layer must be positive, got {mod.n_layer}")
    _require(mod.n_head > 0 and mod.d_model % mod.n_head == 0,
             f"model.n_head={mod.n_head} does not divide model.d_model={mod.d_model}")
    head_dim = mod.d_model // max(mod.n_head, 1)
    if mod.arch == "llama":
        _require(head_dim % 2 == 0 and head_dim >= 6,
                 f"model.d_model / model.n_head = {head_dim} must be even and >= 6 for 3D rotary positions")
    _require(mod.vocab_size > 1, f"model.vocab_size must be > 1, got {mod.vocab_size}")
    _require(mod.attention in ATTENTION_BACKENDS,
             f"model.attention must be one of {', '.join(ATTENTION_BACKENDS)}, got {mod.attention!r}")
    _require(0.0 <= mod.class_dropout < 1.0, f"model.class_dropout must be in [0, 1), got {mod.class_dropout}")
    _require(mod.loss_chunk > 0, f"model.loss_chunk must be positive, got {mod.loss_chunk}")
    _require(mod.compile in (True, False, "auto"), f"model.compile must be auto, true or false, got {mod.compile!r}")
    if mod.flex_kernel_options is not None:
        _check_flex_options(mod.flex_kernel_options)
    checkpointing_mode(tr.activation_checkpointing)
    _require(tr.steps > 0, f"train.steps must be positive, got {tr.steps}")
    _require(tr.micro_batch > 0, f"train.micro_batch must be positive, got {tr.micro_batch}")
    _require(tr.grad_accum > 0, f"train.grad_accum must be positive, got {tr.grad_accum}")
    _require(tr.global_batch is None or tr.global_batch > 0,
             f"train.global_batch must be positive (or unset), got {tr.global_batch}")
    _require(tr.lr > 0, f"train.lr must be positive, got {tr.lr}")
    _require(0.0 <= tr.min_lr_ratio <= 1.0, f"train.min_lr_ratio must be in [0, 1], got {tr.min_lr_ratio}")
    _require(tr.warmup_steps >= 0, f"train.warmup_steps must be >= 0, got {tr.warmup_steps}")
    _require(len(tr.betas) == 2, f"train.betas must be two numbers, got {tr.betas}")
    _require(tr.precision in ("bf16", "fp32"), f"train.precision must be bf16 or fp32, got {tr.precision!r}")
    for key in ("save_every", "eval_every", "log_every", "sample_every"):
        _require(getattr(tr, key) >= 0, f"train.{key} must be >= 0, got {getattr(tr, key)}")
    _require(tr.keep_last >= 1, f"train.keep_last must be >= 1, got {tr.keep_last}")
    _require(tr.max_bad_steps >= 1, f"train.max_bad_steps must be >= 1, got {tr.max_bad_steps}")
    unknown = sorted(set(tr.allow_changes) - set(config_keys()))
    _require(not unknown, f"train.allow_changes names {unknown[0] if unknown else ''!r}, not a config key "
                          f"(keys are dotted, e.g. train.lr, data.train)")
    _require(tr.collective_timeout_s > 0, f"train.collective_timeout_s must be positive, got {tr.collective_timeout_s}")
    for key in ("stall_timeout_s", "stall_factor"):
        _require(getattr(tr, key) >= 0, f"train.{key} must be >= 0, got {getattr(tr, key)}")
    _require(0.0 <= tr.ema < 1.0, f"train.ema is a decay in [0, 1) (0 = no moving average), got {tr.ema}")
    _require(tr.profile is None or (len(tr.profile) == 2 and 1 <= tr.profile[0] <= tr.profile[1]),
             f"train.profile is [start, stop], steps with 1 <= start <= stop (e.g. train.profile=[10,12]), "
             f"got {tr.profile}")
    _require(tr.sequence_parallel >= 1, f"train.sequence_parallel must be >= 1 (1 = off), got {tr.sequence_parallel}")
    _require(mod.n_head % tr.sequence_parallel == 0,
             f"train.sequence_parallel={tr.sequence_parallel} must divide model.n_head={mod.n_head}: Ulysses gives "
             f"every rank of a sequence-parallel group n_head / sequence_parallel whole heads")
    _require(isinstance(cfg.deepspeed.set, dict),
             f"deepspeed.set must be a mapping of DeepSpeed JSON keys (set one with "
             f"deepspeed.set.zero_optimization.reduce_bucket_size=5e8), got {cfg.deepspeed.set!r}")
    _validate_data(cfg.data)
    _validate_packing(cfg)


def _validate_packing(cfg: RunConfig) -> None:
    data, tr = cfg.data, cfg.train
    _require(data.pack_tokens >= 0, f"data.pack_tokens must be >= 0 (0: no packing), got {data.pack_tokens}")
    # Ulysses splits one clip's sequence over ranks with the one-grid block rule; a packed row's per-clip rule is
    # not carried through its all-to-all (nbp_ds.model.sequence_parallel)
    _require(data.pack_tokens == 0 or tr.sequence_parallel == 1,
             f"data.pack_tokens={data.pack_tokens} with train.sequence_parallel={tr.sequence_parallel}: packed rows "
             f"train on one rank per sequence; set one of them off")
    if tr.global_batch_tokens is not None:
        _require(data.pack_tokens > 0, f"train.global_batch_tokens={tr.global_batch_tokens} counts the positions "
                                       f"of packed rows: it needs data.pack_tokens > 0")
        rows, rest = divmod(tr.global_batch_tokens, data.pack_tokens)
        _require(rows > 0 and rest == 0, f"train.global_batch_tokens={tr.global_batch_tokens} must be a positive "
                                         f"multiple of data.pack_tokens={data.pack_tokens}")
        _require(tr.global_batch in (None, rows), f"train.global_batch={tr.global_batch} contradicts "
                                                  f"train.global_batch_tokens={tr.global_batch_tokens} (= {rows} rows "
                                                  f"of data.pack_tokens={data.pack_tokens}): set one of them")
    if data.pack_tokens == 0:
        return
    lay, mod = cfg.layout, cfg.model
    _require(lay.token_ids == "nbp_ds", "data.pack_tokens needs layout.token_ids=nbp_ds: the released sequences "
                                        "(official) have one fixed grid")
    _require(mod.arch == "llama", f"data.pack_tokens needs model.arch=llama: {mod.arch} learns one absolute position "
                                  f"per sequence slot, so a clip cannot start at position zero inside a row")
    _require(mod.attention != "flash", "data.pack_tokens cannot run with model.attention=flash (FlashAttention-2 "
                                       "takes no mask; the FlashAttention-4 path is not checked on packed rows): use "
                                       "flex or auto on a GPU, sdpa on the CPU")
    seq_len = Layout.from_config(lay, mod.vocab_size).seq_len
    _require(seq_len <= data.pack_tokens, f"data.pack_tokens={data.pack_tokens} is shorter than one clip of "
                                          f"layout.grid={list(lay.grid)} ({seq_len} positions)")


def _validate_data(data: DataConfig) -> None:
    check_shard_spec(data.train, "data.train", mixture_allowed=True)
    check_shard_spec(data.val, "data.val", mixture_allowed=False)
    _require(data.num_workers >= 0, f"data.num_workers must be >= 0, got {data.num_workers}")
    _require(data.shuffle_buffer >= 1, f"data.shuffle_buffer must be >= 1, got {data.shuffle_buffer}")
    _require(data.val_batches >= 0, f"data.val_batches must be >= 0, got {data.val_batches}")
    _require(data.retries >= 0, f"data.retries must be >= 0, got {data.retries}")
    _require(data.retry_backoff >= 0, f"data.retry_backoff must be >= 0, got {data.retry_backoff}")


MIXTURE_KEYS = ("shards", "weight", "name")
_SOURCE_NAME = re.compile(r"[A-Za-z0-9_.-]+")


def check_shard_spec(value: Any, key: str, mixture_allowed: bool) -> list[dict[str, Any]] | None:
    """Check the structure of a shard spec (``data.train``, ``data.val``) without touching any file: None
    (unset), a string, or a list of strings are shards (returns None); a list of ``{shards, weight, name}``
    mappings is a mixture (returned as given). Errors name the key, e.g. ``data.train[1].weight``."""
    if value is None or isinstance(value, str):
        return None
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f"{key}: expected shards (a path, pattern, URL or list of them)"
                          + (" or a list of {shards, weight} entries" if mixture_allowed else "")
                          + f", got {value!r}")
    if all(isinstance(item, str) for item in value):
        return None
    if not mixture_allowed:
        raise ConfigError(f"{key}: expected shards (a path, pattern, URL or list of them), got {value!r}; "
                          f"mixtures with weights are for data.train only")
    kinds = [isinstance(item, dict) for item in value]
    if not all(kinds):
        i = kinds.index(False)
        raise ConfigError(f"{key}[{i}]: a mixture is a list of {{shards, weight}} mappings, got {value[i]!r}")
    names = []
    for i, entry in enumerate(value):
        unknown = sorted(set(entry) - set(MIXTURE_KEYS))
        _require(not unknown, f"unknown key {key}[{i}].{unknown[0] if unknown else ''}; "
                              f"a mixture entry has {', '.join(MIXTURE_KEYS)}")
        shards = entry.get("shards")
        _require(bool(shards) and (isinstance(shards, str) or (isinstance(shards, list)
                                                                and all(isinstance(s, str) for s in shards))),
                 f"{key}[{i}].shards must be shards (a path, pattern, URL or list of them), got {shards!r}")
        weight = entry.get("weight", 1.0)
        _require(isinstance(weight, (int, float)) and not isinstance(weight, bool) and weight > 0,
                 f"{key}[{i}].weight must be a positive number, got {weight!r}")
        name = entry.get("name") or f"source{i}"
        _require(isinstance(name, str) and _SOURCE_NAME.fullmatch(name) is not None,
                 f"{key}[{i}].name must be letters, digits, '_', '.' or '-' (it names data/source/<name>), "
                 f"got {name!r}")
        _require(name not in names, f"{key}[{i}].name {name!r} is used twice")
        names.append(name)
    return list(value)
