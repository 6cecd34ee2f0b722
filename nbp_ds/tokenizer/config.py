"""The tokenizer trainer's configuration: one typed dataclass tree, loaded like the transformer's run config.

    cfg = load_tokenizer_config("quickstart", ["data.videos=data/train", "train.out_dir=runs/tok", "train.steps=50"])

A name refers to ``nbp_ds/configs/tokenizer/<name>.yaml``; anything else is a path to a YAML file (``base:``
works as for run configs). The dataclass defaults below are the only defaults: ``nbp-train-tokenizer``'s flags
(``--steps``, ``--frames``, ...) are spellings of the keys in ``FLAGS`` and take their defaults from here.
Unknown keys, wrong types and values that cannot work are refused with a ``ConfigError`` naming the key.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nbp_ds.errors import ConfigError
from nbp_ds.tokenizer.model import PRESETS
from nbp_ds.tokenizer.video_shards import names_shards
from nbp_ds.typed_yaml import load_dataclass_tree
from nbp_ds.video_io import ClipSpec

TOKENIZER_CONFIG_DIR = Path(__file__).parents[1] / "configs" / "tokenizer"
PRECISIONS = ("fp32", "bf16")  # train.precision


@dataclass
class TokenizerModelConfig:
    preset: str = "tiny"  # architecture: tiny, tiny-skip, small or paper (nbp_ds.tokenizer.PRESETS)
    # fine-tuning: start from this tokenizer instead (official:PATH, a released MAGVIT-v2 tokenizer, or a trained
    # nbp_ds tokenizer's folder); its architecture and code grid are kept and model.preset is not used
    init_from: str | None = None


@dataclass
class TokenizerDataConfig:
    # training videos: a folder with class sub-folders, a CSV path,label or a list; or WebDataset shards of raw
    # videos (KEY.mp4 [+ KEY.cls]): a brace pattern or path of .tar files, a folder of them, a list of shard
    # addresses, pipe:COMMAND or http(s):// (nbp_ds.tokenizer.video_shards)
    videos: str | None = None
    # held-out videos for the report (a folder, CSV or list); None = the last 5% of the training videos (required
    # with shards)
    val_videos: str | None = None
    max_videos: int | None = None  # use at most this many videos (quick runs)
    workers: int | None = None  # video decoding processes (DataLoader workers); None = min(8, CPU count)
    prefetch: int = 2  # batches each decoding process prepares ahead
    cache_mb: int = 64  # decoded videos each decoding process keeps for later epochs (bounded; 0 = none)
    random_crop: float = 0.0  # decode the clip side this much larger and cut a random window (0.125 = 1/8)
    flip: bool = False  # flip half of the clips horizontally
    val_max_videos: int = 256  # held-out videos in the report at most (their clips are kept decoded)
    val_video_timeout: float = 600.0  # seconds a held-out video may decode before it is stopped and listed
    clip: ClipSpec = field(default_factory=ClipSpec)  # per_video: random clips per video per epoch


@dataclass
class TokenizerLossConfig:
    # the reconstruction loss is l1_weight * L1 + MSE; 0 = MSE alone, which the small tokenizers learn faster with
    l1_weight: float = 1.0
    adversarial_weight: float = 0.0  # 3D PatchGAN (hinge) loss weight; 0 = off
    adversarial_start: float = 0.5  # fraction of the steps before the GAN joins (the warm-up)
    adaptive_weight: bool = True  # scale the GAN loss by VQGAN's gradient-norm ratio at the decoder's last layer
    lecam_weight: float = 0.0  # LeCAM regularisation of the discriminator (MAGVIT-v2: 0.001); 0 = off
    lecam_decay: float = 0.999  # decay of LeCAM's moving averages of the discriminator's logits
    perceptual_weight: float = 0.0  # LPIPS-style VGG16 perceptual loss weight (MAGVIT-v2 uses one); 0 = off
    perceptual_file: str | None = None  # VGG16 weights (torchvision's vgg16-397923af.pth), never downloaded


@dataclass
class TokenizerOptimConfig:
    out_dir: str | None = None  # the run folder
    steps: int = 10000
    batch_size: int = 8  # clips per process per step
    lr: float = 1e-3
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])  # AdamW's, for the tokenizer
    weight_decay: float = 1e-4  # AdamW's, for the tokenizer
    disc_betas: list[float] = field(default_factory=lambda: [0.5, 0.9])  # the discriminator's AdamW (GAN practice)
    warmup: int = 50  # linear warmup steps
    min_lr_ratio: float = 0.05  # cosine decays to lr * min_lr_ratio
    save_every: int = 250
    keep_last: int = 2
    log_every: int = 25
    image_every: int = 250  # reconstruction images to TensorBoard every N steps
    device: str = "auto"  # auto (cuda when available), cpu, cuda
    threads: int = 0  # torch CPU threads per process; 0 = torch's choice
    seed: int = 0
    ema: float = 0.0  # decay of a moving average of the weights (e.g. 0.999); the saved tokenizer is the average
    i3d: str | None = None  # StyleGAN-V's i3d_torchscript.pt: the report adds the held-out rFVD (nbp-eval-fvd's code)
    precision: str = "fp32"  # fp32, or bf16: autocast of the networks on CUDA (losses and quantization in fp32)
    activation_checkpointing: bool = False  # recompute each layer's activations in backward (paper size on a GPU)


@dataclass
class TokenizerTrainConfig:
    """Everything a tokenizer training run needs."""

    model: TokenizerModelConfig = field(default_factory=TokenizerModelConfig)
    data: TokenizerDataConfig = field(default_factory=TokenizerDataConfig)
    loss: TokenizerLossConfig = field(default_factory=TokenizerLossConfig)
    train: TokenizerOptimConfig = field(default_factory=TokenizerOptimConfig)
    name: str = "custom"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def decode_workers(self) -> int:
        return self.data.workers if self.data.workers is not None else min(8, os.cpu_count() or 1)


# nbp-train-tokenizer's flags, each a spelling of one config key: (flag, key, type, help)
FLAGS: list[tuple[str, str, type, str]] = [
    ("--videos", "data.videos", str, "training videos (folder with class sub-folders, CSV or list) or shards of "
                                     "raw videos (.tar pattern, folder or list of shards, pipe:CMD, http(s)://)"),
    ("--val-videos", "data.val_videos", str, "held-out videos for the PSNR report (default: 5%% of the clips)"),
    ("--out", "train.out_dir", str, "run folder"),
    ("--preset", "model.preset", str, "architecture: tiny, tiny-skip, small or paper"),
    ("--init-from", "model.init_from", str, "fine-tune this tokenizer: official:PATH or a trained tokenizer folder"),
    ("--frames", "data.clip.frames", int, "frames per clip, 1 + 4k"),
    ("--resolution", "data.clip.resolution", int, "square clip side in pixels"),
    ("--fps", "data.clip.fps", float, "frame rate clips are resampled to"),
    ("--clips-per-video", "data.clip.per_video", int, "random clips per video per epoch"),
    ("--max-videos", "data.max_videos", int, "use at most this many videos (quick runs)"),
    ("--workers", "data.workers", int, "video decoding processes (default: min(8, CPU count))"),
    ("--steps", "train.steps", int, "optimizer steps"),
    ("--batch-size", "train.batch_size", int, "clips per process per step"),
    ("--lr", "train.lr", float, "peak learning rate"),
    ("--warmup", "train.warmup", int, "linear warmup steps"),
    ("--min-lr-ratio", "train.min_lr_ratio", float, "cosine decays to lr x this"),
    ("--adversarial-weight", "loss.adversarial_weight", float, "PatchGAN loss weight (0: off)"),
    ("--adversarial-start", "loss.adversarial_start", float, "fraction of the steps before the GAN joins"),
    ("--save-every", "train.save_every", int, "checkpoint every N steps"),
    ("--keep-last", "train.keep_last", int, "checkpoints kept"),
    ("--log-every", "train.log_every", int, "console/TensorBoard scalars every N steps"),
    ("--image-every", "train.image_every", int, "reconstruction images every N steps"),
    ("--device", "train.device", str, "auto, cpu or cuda (auto: cuda when available)"),
    ("--threads", "train.threads", int, "torch CPU threads per process (0: torch's choice)"),
    ("--seed", "train.seed", int, "seed of the weights and the clip draws"),
]


def default_of(key: str) -> Any:
    """The dataclass default of a dotted key (what --help shows)."""
    node: Any = TokenizerTrainConfig()
    for part in key.split("."):
        node = getattr(node, part)
    return node


def load_tokenizer_config(name_or_path: str | Path | None = None, overrides: list[str] | None = None,
                          settings: dict[str, Any] | None = None) -> TokenizerTrainConfig:
    """A named (``nbp_ds/configs/tokenizer``) or YAML tokenizer config, or the defaults when None, with
    ``settings`` (dotted key -> value: the flags) and then ``key=value`` overrides applied, validated."""
    cfg = load_dataclass_tree(TokenizerTrainConfig, name_or_path, overrides, config_dir=TOKENIZER_CONFIG_DIR,
                              settings=settings)
    validate(cfg)
    return cfg


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def validate(cfg: TokenizerTrainConfig) -> None:
    """Refuse configurations that cannot work, naming the key and value."""
    d, t, lo = cfg.data, cfg.train, cfg.loss
    _require(cfg.model.preset in PRESETS,
             f"model.preset: --preset {cfg.model.preset!r} is not one of {', '.join(PRESETS)}")
    _require(bool(d.videos), "data.videos (--videos) is required: the training videos")
    _require(bool(t.out_dir), "train.out_dir (--out) is required: the run folder")
    if names_shards(d.videos):
        _require(bool(d.val_videos), f"data.val_videos (--val-videos) is required when data.videos names shards "
                                     f"({d.videos}): the held-out videos (a folder, CSV or list of video files); "
                                     f"the last 5% rule needs a listing of the training videos")
        _require(d.max_videos is None, f"data.max_videos ({d.max_videos}) applies to a listing of video files, "
                                       f"not to shards ({d.videos}): name fewer shards instead")
    for key, value in (("data.clip.frames", d.clip.frames), ("data.clip.resolution", d.clip.resolution),
                       ("data.clip.per_video", d.clip.per_video), ("train.steps", t.steps),
                       ("train.batch_size", t.batch_size), ("train.keep_last", t.keep_last),
                       ("train.save_every", t.save_every), ("train.log_every", t.log_every),
                       ("train.image_every", t.image_every)):
        _require(value >= 1, f"{key} must be >= 1, got {value}")
    _require(d.clip.fps > 0, f"data.clip.fps must be > 0, got {d.clip.fps}")
    _require(d.max_videos is None or d.max_videos >= 1, f"data.max_videos must be >= 1, got {d.max_videos}")
    _require(d.workers is None or d.workers >= 0, f"data.workers must be >= 0, got {d.workers}")
    _require(d.prefetch >= 1, f"data.prefetch must be >= 1, got {d.prefetch}")
    _require(d.cache_mb >= 0, f"data.cache_mb must be >= 0, got {d.cache_mb}")
    _require(0.0 <= d.random_crop <= 1.0, f"data.random_crop is a margin in [0, 1], got {d.random_crop}")
    _require(d.val_max_videos >= 1, f"data.val_max_videos must be >= 1, got {d.val_max_videos}")
    _require(d.val_video_timeout > 0, f"data.val_video_timeout must be > 0 seconds, got {d.val_video_timeout}")
    _require(t.lr > 0, f"train.lr must be positive, got {t.lr}")
    for key, betas in (("train.betas", t.betas), ("train.disc_betas", t.disc_betas)):
        _require(len(betas) == 2 and all(0.0 <= b < 1.0 for b in betas),
                 f"{key} must be two numbers in [0, 1) (AdamW's beta1, beta2), got {betas}")
    _require(t.weight_decay >= 0, f"train.weight_decay must be >= 0, got {t.weight_decay}")
    _require(t.warmup >= 0, f"train.warmup must be >= 0, got {t.warmup}")
    _require(0.0 <= t.min_lr_ratio <= 1.0, f"train.min_lr_ratio must be in [0, 1], got {t.min_lr_ratio}")
    _require(t.threads >= 0, f"train.threads must be >= 0, got {t.threads}")
    _require(t.precision in PRECISIONS, f"train.precision must be one of {', '.join(PRECISIONS)}, got {t.precision!r}")
    _require(0.0 <= t.ema < 1.0, f"train.ema is a decay in [0, 1) (0 = no moving average), got {t.ema}")
    _require(lo.l1_weight >= 0, f"loss.l1_weight must be >= 0, got {lo.l1_weight}")
    _require(lo.adversarial_weight >= 0, f"loss.adversarial_weight must be >= 0, got {lo.adversarial_weight}")
    _require(lo.perceptual_weight >= 0, f"loss.perceptual_weight must be >= 0, got {lo.perceptual_weight}")
    _require(lo.lecam_weight >= 0, f"loss.lecam_weight must be >= 0, got {lo.lecam_weight}")
    _require(0.0 <= lo.lecam_decay < 1.0, f"loss.lecam_decay must be in [0, 1), got {lo.lecam_decay}")
    _require(0.0 <= lo.adversarial_start <= 1.0,
             f"loss.adversarial_start is a fraction of the steps in [0, 1], got {lo.adversarial_start}")
