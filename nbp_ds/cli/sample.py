"""Sample videos from a trained NBP model, a few or thousands (FVD uses 2,048-10,000), resumably.

    nbp-sample --weights runs/x/export.safetensors --tokenizer runs/tok/tokenizer --out samples/
    nbp-sample --weights runs/x --tokenizer TOK --label 3 --num 8 --cfg-scale 2 --top-p 0.9
    nbp-sample --weights runs/k600 --tokenizer TOK --context clip.mp4 --num 4
    nbp-sample --weights converted/ucf_700m.safetensors --tokenizer official:magvit2_ucf.pt \
        --paper-sampling --num 100 --batch-size 32 --no-mp4 --out fvd_samples/   # 101 classes x 100 for FVD
    nbp-eval-fvd --real REAL_VIDEOS --fake fvd_samples/ --i3d i3d_torchscript.pt

--weights is an exported .safetensors file (nbp-export) or a training output folder /
DeepSpeed checkpoint folder (consolidated in memory); the model is built on --device and runs in --dtype.
Batches are generated on the device and written as they come by --writers threads: per video an mp4
(unless --no-mp4), its decoded frames frames/<stem>.npy and its tokens tokens/<stem>.npy, and a line in
videos.jsonl once all three are in place; grid.png shows the first videos. nbp-eval-fvd and
nbp-check-consistency read the folder. Memory stays bounded however many videos are asked for.

An interrupted run (killed, preempted, out of time) continues when run again with the same arguments: finished
videos are skipped, and every video is the one an uninterrupted run gives (video i draws from the random stream
of (--seed, i)). Other arguments for the same --out are refused, naming what changed; --restart discards the
folder's earlier run instead.

Everything that can be checked is checked before any sampling starts: the weights and the tokenizer
load, the tokenizer's codebook and latent grid fit the model, labels are in range, a context video is
given exactly when the model predicts frames, --out holds no other run.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import torch

from nbp_ds.cli import command, setup_logging
from nbp_ds.errors import UsageError

log = logging.getLogger(__name__)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", required=True, help="exported .safetensors, or a training output / checkpoint folder")
    p.add_argument("--tokenizer", required=True,
                   help="tokenizer folder (nbp-train-tokenizer), official:PATH (a released magvit2_*.pt) "
                        "or random:<preset>")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--num", type=int, default=1, help="samples per label (or in all, for unconditional models)")
    p.add_argument("--label", type=int, action="append",
                   help="class index; repeat for several; default: every class of a class-conditional model")
    p.add_argument("--context", help="video whose first frames condition a frame-prediction model")
    p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--cfg-scale", type=float, default=None, help="classifier-free guidance scale (class models)")
    p.add_argument("--paper-sampling", action="store_true",
                   help="the NBP paper's settings for its FVD: temperature 1, top-k 16000, top-p 0.9, no CFG "
                        "(flags given explicitly still win)")
    p.add_argument("--seed", type=int, default=0, help="video i draws from the random stream of (seed, i)")
    p.add_argument("--batch-size", type=int, default=16, help="videos generated together")
    p.add_argument("--fps", type=float, default=8.0, help="frame rate of the written mp4 files")
    p.add_argument("--no-mp4", action="store_true", help="write frames and tokens only (FVD reads the frames)")
    p.add_argument("--writers", type=int, default=4, help="threads writing videos while the next batch generates")
    p.add_argument("--restart", action="store_true", help="discard an earlier run's output in --out and start over")
    p.add_argument("--classes", help="classes.json (name -> id) to name the files; default: looked up beside --weights")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default=None, help="default: bf16 on CUDA, fp32 elsewhere")
    p.add_argument("--mode", choices=["auto", "graph", "static", "eager"], default="auto",
                   help="decoder: CUDA graphs, static passes, or the eager reference (auto: graph on CUDA, "
                        "eager elsewhere)")
    args = p.parse_args(argv)
    if args.paper_sampling:  # the paper's values become the defaults, so flags given explicitly still win
        from nbp_ds.generate import PAPER_SAMPLING

        p.set_defaults(**PAPER_SAMPLING)
        args = p.parse_args(argv)
    return args


def load_everything(args: argparse.Namespace):
    """Load and cross-check weights, tokenizer, labels and context; raise UsageError before any work."""
    from nbp_ds.tokenizer import load_tokenizer
    from nbp_ds.train.export import load_exported

    weights = Path(args.weights)
    if not weights.exists():
        raise UsageError(f"--weights {weights}: no such file or folder")
    try:
        model, cfg = load_exported(weights, device=args.device)
    except (FileNotFoundError, ValueError, KeyError, RuntimeError) as exc:
        raise UsageError(f"--weights {weights}: cannot load ({exc})") from exc
    try:
        tokenizer = load_tokenizer(args.tokenizer, device=args.device)
    except (FileNotFoundError, ValueError, KeyError, OSError) as exc:
        raise UsageError(f"--tokenizer {args.tokenizer}: cannot load ({exc})") from exc
    lay = model.layout
    if tokenizer.codebook_size != cfg.model.vocab_size:
        raise UsageError(f"--tokenizer {args.tokenizer} has {tokenizer.codebook_size} codes but the model was "
                         f"trained on model.vocab_size={cfg.model.vocab_size}")
    for name, value in (("--num", args.num), ("--batch-size", args.batch_size), ("--writers", args.writers)):
        if value < 1:
            raise UsageError(f"{name} must be >= 1, got {value}")
    if args.seed < 0:
        raise UsageError(f"--seed must be >= 0, got {args.seed}")
    if args.mode == "graph" and not str(args.device).startswith("cuda"):
        raise UsageError(f"--mode graph needs a CUDA device, got --device {args.device}")
    if lay.condition == "class":
        labels = args.label if args.label is not None else list(range(lay.num_classes))
        try:
            lay.check_labels(torch.tensor(labels))
        except ValueError as exc:
            raise UsageError(f"--label: {exc}") from exc
    else:
        if args.label is not None or args.cfg_scale is not None:
            raise UsageError(f"--label/--cfg-scale need a class-conditional model; this one has "
                             f"layout.condition={lay.condition}")
        labels = [None]
    context = None
    if lay.condition == "frames":
        if not args.context:
            raise UsageError(f"this model predicts frames after {lay.context_frames} given latent frames: "
                             f"pass --context VIDEO")
        context = encode_context(Path(args.context), tokenizer, lay)
    elif args.context:
        raise UsageError(f"--context is for frame-prediction models; this one has layout.condition={lay.condition}")
    return model, cfg, tokenizer, labels, context


def encode_context(path: Path, tokenizer, layout) -> torch.Tensor:
    """The first latent frames of a video, as the frame-prediction model's context [1, c, H, W]."""
    from nbp_ds.video_io import VideoError, read_clips

    frames, height, width = tokenizer.clip_shape(layout.grid)
    try:
        clip = read_clips(path, frames=frames, fps=8.0, resolution=height, clips=1)[0]
    except VideoError as exc:
        raise UsageError(f"--context {path}: {exc}") from exc
    tokens = tokenizer.encode(torch.from_numpy(clip).unsqueeze(0))
    return tokens[:, : layout.context_frames].cpu()


def class_names(args: argparse.Namespace) -> dict[int, str]:
    candidates = [Path(args.classes)] if args.classes else [Path(args.weights).parent / "classes.json",
                                                            Path(args.weights) / "classes.json"]
    for path in candidates:
        if path.is_file():
            return {int(i): name for name, i in json.loads(path.read_text()).items()}
    return {}


def run_settings(args: argparse.Namespace, model, tokenizer, labels: list) -> dict:
    """What identifies a run's videos (sampling.json): a rerun with the same settings resumes it."""
    from nbp_ds.sampling import weights_fingerprint

    return {"weights": str(Path(args.weights).resolve()), "weights_fingerprint": weights_fingerprint(model),
            "tokenizer": args.tokenizer, "tokenizer_name": tokenizer.name, "labels": labels, "num": args.num,
            "seed": args.seed, "temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p,
            "cfg_scale": args.cfg_scale, "batch_size": args.batch_size, "dtype": args.dtype,
            "context": str(Path(args.context).resolve()) if args.context else None, "fps": args.fps,
            "mp4": not args.no_mp4}


@command
def main(argv: list[str] | None = None) -> int | None:
    setup_logging()
    args = parse_args(argv)
    args.dtype = args.dtype or ("bf16" if str(args.device).startswith("cuda") else "fp32")
    model, cfg, tokenizer, labels, context = load_everything(args)
    from nbp_ds.sampling import plan_jobs, sample_to_folder

    settings = run_settings(args, model, tokenizer, labels)
    model.to({"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype])
    out = Path(args.out)
    jobs = plan_jobs(labels, args.num, class_names(args))
    began = time.perf_counter()
    summary = sample_to_folder(
        model, tokenizer, jobs, out, settings, batch_size=args.batch_size, seed=args.seed,
        sampling={"temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p,
                  "cfg_scale": args.cfg_scale},
        context=context, fps=args.fps, mp4=not args.no_mp4, writers=args.writers, mode=args.mode,
        restart=args.restart)
    total = time.perf_counter() - began
    done = f"{summary.skipped} finished earlier, " if summary.skipped else ""
    print(f"{len(jobs)} videos in {out} ({done}{summary.videos} made now): {summary.forward_passes} forward passes "
          f"per video", end="")
    if summary.videos:
        print(f", {summary.frames / summary.generate_seconds:.2f} frames/s generating, "
              f"{summary.frames / total:.2f} frames/s with decoding and writing", end="")
    print()


if __name__ == "__main__":
    sys.exit(main())
