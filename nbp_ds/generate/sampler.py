"""The sampler behind ``nbp-sample``: load a trained model and a tokenizer, check them and the request against
each other before any work, and generate the videos into an output folder that a rerun resumes
(``nbp_ds.generate.folder``).

Everything that can be checked is checked before the folder is touched: the weights and the tokenizer load, the
tokenizer's codebook fits the model, the labels, guidance and context fit the model's condition
(``check_conditions``, the same check ``generate`` makes), the decoder runs on the device, the counts are
positive. Errors are UsageErrors naming nbp-sample's flags, which ``SamplerOptions`` mirrors field by field.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from nbp_ds.errors import UsageError
from nbp_ds.generate.conditions import check_conditions
from nbp_ds.generate.decode import resolve_mode
from nbp_ds.generate.draw import check_seed
from nbp_ds.generate.folder import SamplingSummary, plan_jobs, sample_to_folder
from nbp_ds.generate.grids import model_for_grid
from nbp_ds.generate.long import DEFAULT_SINK_FRAMES, LongWindow, resolve_long_mode
from nbp_ds.generate.tensorboard_videos import videos_to_tensorboard
from nbp_ds.tokenizer import load_tokenizer
from nbp_ds.video_io import VideoError, read_clips
from nbp_ds.weights.export import load_exported

if TYPE_CHECKING:
    from nbp_ds.layout import Layout
    from nbp_ds.model import NBPModel
    from nbp_ds.tokenizer.base import VideoTokenizerBase

FLAGS = {"label": "--label", "cfg_scale": "--cfg-scale", "context": "--context"}  # how check_conditions names them
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class SamplerOptions:
    """One sampling run, field by field nbp-sample's flags (see its --help)."""

    weights: str  # an export (.safetensors file, sharded folder or its index), or a training output / checkpoint folder
    tokenizer: str  # a tokenizer folder, official:PATH or random:<preset>
    out: str
    num: int = 1  # videos per label (in all, for models without classes)
    labels: list[int] | None = None  # None: every class of a class-conditional model
    context: str | None = None  # a video whose first frames condition a frame-prediction model
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    cfg_scale: float | None = None
    seed: int = 0
    batch_size: int = 16
    fps: float = 8.0
    mp4: bool = True
    writers: int = 4
    restart: bool = False
    classes: str | None = None  # classes.json (name -> id); None: looked up beside the weights
    device: str = "cpu"
    dtype: str | None = None  # fp32 or bf16; None: bf16 on CUDA, fp32 elsewhere
    mode: str = "auto"
    grid: tuple[int, int, int] | None = None  # the token grid to generate; None: the model's layout.grid
    frames: int | None = None  # video frames of each sample; None: the model's clip
    long_mode: str = "auto"  # past the clip: rolling, recompute or auto (nbp_ds.generate.long)
    sink_frames: int = DEFAULT_SINK_FRAMES
    tensorboard: str | None = None  # a TensorBoard log folder to show the first videos in (nbp-sample --tensorboard)

    @property
    def precision(self) -> str:
        return self.dtype or ("bf16" if str(self.device).startswith("cuda") else "fp32")


@dataclass
class SamplerInputs:
    """What a run samples with, loaded and checked against each other."""

    model: NBPModel
    tokenizer: VideoTokenizerBase
    labels: list[int | None]  # [None] for a model without classes
    context: torch.Tensor | None  # [1, c, H, W] latent frames for a frame-prediction model
    mode: str  # the decoder, resolved for the model's device
    trained_grid: tuple[int, int, int]  # the weights' own layout.grid (the model may generate another: --grid)
    long: dict | None = None  # generate_long's latent_frames, long_mode and sink_frames; None: the model's clip


def load_inputs(options: SamplerOptions) -> SamplerInputs:
    """Load and cross-check weights, tokenizer, labels and context; raise UsageError before any work."""
    for name, value in (("--num", options.num), ("--batch-size", options.batch_size), ("--writers", options.writers)):
        if value < 1:
            raise UsageError(f"{name} must be >= 1, got {value}")
    if options.dtype not in (None, *DTYPES):
        raise UsageError(f"--dtype must be one of {', '.join(DTYPES)}, got {options.dtype!r}")
    try:
        check_seed(options.seed, "--seed")
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    weights = Path(options.weights)
    if not weights.exists():
        raise UsageError(f"--weights {weights}: no such file or folder")
    try:
        model, cfg = load_exported(weights, device=options.device)
    except (FileNotFoundError, ValueError, KeyError, RuntimeError) as exc:
        raise UsageError(f"--weights {weights}: cannot load ({exc})") from exc
    trained_grid = model.layout.grid
    if options.grid is not None:  # another grid of those it trained on (packed training), or refused
        model = model_for_grid(model, cfg, tuple(options.grid), options.device)
    try:
        tokenizer = load_tokenizer(options.tokenizer, device=options.device)
    except (FileNotFoundError, ValueError, KeyError, OSError) as exc:
        raise UsageError(f"--tokenizer {options.tokenizer}: cannot load ({exc})") from exc
    if tokenizer.codebook_size != cfg.model.vocab_size:
        raise UsageError(f"--tokenizer {options.tokenizer} has {tokenizer.codebook_size} codes but the model was "
                         f"trained on model.vocab_size={cfg.model.vocab_size}")
    try:
        mode = resolve_mode(options.mode, model)
    except ValueError as exc:
        raise UsageError(f"--mode {options.mode}: {exc}") from None
    lay = model.layout
    labels = options.labels
    if labels is None and lay.condition == "class":
        labels = list(range(lay.num_classes))
    try:
        check_conditions(lay, None if labels is None else torch.tensor(labels), options.cfg_scale,
                         options.context is not None, FLAGS)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    context = encode_context(Path(options.context), tokenizer, lay) if options.context else None
    return SamplerInputs(model, tokenizer, labels if labels is not None else [None], context, mode,
                         trained_grid, long_video(options, model, tokenizer))


def long_video(options: SamplerOptions, model: NBPModel, tokenizer: VideoTokenizerBase) -> dict | None:
    """generate_long's arguments for --frames past the model's clip (None for the clip itself), checked."""
    if options.frames is None:
        return None
    if options.grid is not None:
        raise UsageError(f"--frames {options.frames} with --grid: a long video is sampled at the model's own grid, "
                         f"one clip-length window at a time")
    lay = model.layout
    clip_frames = tokenizer.clip_shape(lay.grid)[0]
    f = tokenizer.temporal_factor
    if options.frames < clip_frames or (options.frames - 1) % f:
        raise UsageError(f"--frames must be {clip_frames} (the model's clip) or more, of the form 1 + {f}k "
                         f"(the tokenizer's time compression), got {options.frames}")
    latent_frames = 1 + (options.frames - 1) // f
    if latent_frames == lay.grid[0]:
        return None
    try:
        LongWindow.of(lay, options.sink_frames)
        long_mode = resolve_long_mode(options.long_mode, model)
    except ValueError as exc:
        raise UsageError(f"--frames {options.frames}: {exc}") from None
    return {"latent_frames": latent_frames, "long_mode": long_mode, "sink_frames": options.sink_frames}


def encode_context(path: Path, tokenizer: VideoTokenizerBase, layout: Layout) -> torch.Tensor:
    """The first latent frames of a video, as the frame-prediction model's context [1, c, H, W]."""
    frames, height, width = tokenizer.clip_shape(layout.grid)
    try:
        clip = read_clips(path, frames=frames, fps=8.0, resolution=height, clips=1)[0]
    except VideoError as exc:
        raise UsageError(f"--context {path}: {exc}") from exc
    tokens = tokenizer.encode(torch.from_numpy(clip).unsqueeze(0))
    return tokens[:, : layout.context_frames].cpu()


def class_names(options: SamplerOptions) -> dict[int, str]:
    """Class index -> name from --classes, or a classes.json beside the weights; empty when there is none."""
    weights = Path(options.weights)
    candidates = [Path(options.classes)] if options.classes else [weights.parent / "classes.json",
                                                                  weights / "classes.json"]
    for path in candidates:
        if path.is_file():
            return {int(i): name for name, i in json.loads(path.read_text()).items()}
    return {}


def weights_fingerprint(model: torch.nn.Module) -> str:
    """A short digest of a model's weights (each tensor's sum, to 6 significant digits: the same on any device and
    reduction order), so that a run is never resumed with other weights."""
    with torch.no_grad():
        sums = [f"{name}:{float(torch.sum(p, dtype=torch.float64)):.6e}" for name, p in model.state_dict().items()
                if p.is_floating_point()]
    return hashlib.sha256("\n".join(sums).encode()).hexdigest()[:16]


def run_settings(options: SamplerOptions, inputs: SamplerInputs) -> dict:
    """What identifies a run's videos (sampling.json): a rerun with the same settings resumes it. The weights'
    fingerprint is taken as loaded, before the model is cast to the run's precision."""
    return {"weights": str(Path(options.weights).resolve()), "weights_fingerprint": weights_fingerprint(inputs.model),
            "tokenizer": options.tokenizer, "tokenizer_name": inputs.tokenizer.name, "labels": inputs.labels,
            "num": options.num, "seed": options.seed, "temperature": options.temperature, "top_k": options.top_k,
            "top_p": options.top_p, "cfg_scale": options.cfg_scale, "batch_size": options.batch_size,
            "dtype": options.precision, "context": str(Path(options.context).resolve()) if options.context else None,
            "fps": options.fps, "mp4": options.mp4,
            # the grid, the long-video settings and --classes (it names the files) only when they are used:
            # folders written before they were recorded resume as they were
            **({"grid": list(inputs.model.layout.grid)} if inputs.model.layout.grid != inputs.trained_grid else {}),
            **({"long": inputs.long} if inputs.long is not None else {}),
            **({"classes": str(Path(options.classes).resolve())} if options.classes else {})}


def sample_videos(options: SamplerOptions, progress: bool = True) -> SamplingSummary:
    """Make (or finish) the run ``options`` describes in its output folder; see nbp_ds.generate.folder."""
    inputs = load_inputs(options)
    settings = run_settings(options, inputs)
    inputs.model.to(DTYPES[options.precision])
    jobs = plan_jobs(inputs.labels, options.num, class_names(options))
    sampling = {"temperature": options.temperature, "top_k": options.top_k, "top_p": options.top_p,
                "cfg_scale": options.cfg_scale}
    summary = sample_to_folder(inputs.model, inputs.tokenizer, jobs, options.out, settings,
                               batch_size=options.batch_size, seed=options.seed, sampling=sampling,
                               context=inputs.context, fps=options.fps, mp4=options.mp4, writers=options.writers,
                               mode=inputs.mode, restart=options.restart, progress=progress, long=inputs.long)
    if options.tensorboard:
        videos_to_tensorboard(options.out, options.tensorboard, options.fps)
    return summary
