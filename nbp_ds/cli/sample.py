"""Sample videos from a trained NBP model.

    nbp-sample --weights runs/x/export.safetensors --tokenizer runs/tok/tokenizer --out samples/
    nbp-sample --weights runs/x --tokenizer TOK --label 3 --num 8 --cfg-scale 2 --top-p 0.9
    nbp-sample --weights runs/k600 --tokenizer TOK --context clip.mp4 --num 4
    nbp-sample --weights converted/ucf_700m.safetensors --tokenizer official:magvit2_ucf.pt \
        --paper-sampling --out samples/    # a converted release (nbp-convert-official)

--weights is an exported .safetensors file (nbp-export) or a training output folder /
DeepSpeed checkpoint folder (consolidated in memory). Writes one mp4 per sample, grid.png (a row of
frames per sample), tokens.npy (+ labels.npy), and prints forward passes and frames per second.
Everything that can be checked is checked before any sampling starts: the weights and the tokenizer
load, the tokenizer's codebook and latent grid fit the model, labels are in range, a context video is
given exactly when the model predicts frames.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
import torch

from nbp_ds.cli import command
from nbp_ds.errors import UsageError

log = logging.getLogger("sample")


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
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=16, help="videos generated together")
    p.add_argument("--fps", type=float, default=8.0, help="frame rate of the written mp4 files")
    p.add_argument("--classes", help="classes.json (name -> id) to name the files; default: looked up beside --weights")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
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
    for name, value in (("--num", args.num), ("--batch-size", args.batch_size)):
        if value < 1:
            raise UsageError(f"{name} must be >= 1, got {value}")
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
    from nbp_ds.tokenizer.video_io import VideoError, read_clips

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


@command
def main(argv: list[str] | None = None) -> int | None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    args = parse_args(argv)
    model, cfg, tokenizer, labels, context = load_everything(args)
    from nbp_ds.generate import generate
    from nbp_ds.tokenizer.video_io import write_video
    from nbp_ds.visualize import frame_grid, save_png

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    names = class_names(args)
    all_tokens, all_labels, videos = [], [], []
    passes, gen_seconds, began = 0, 0.0, time.perf_counter()
    for label in labels:
        done = 0
        while done < args.num:
            n = min(args.batch_size, args.num - done)
            ctx = context.expand(n, *context.shape[1:]).to(args.device) if context is not None else None
            tokens, stats = generate(model, n, label=label, context=ctx, temperature=args.temperature,
                                     top_k=args.top_k, top_p=args.top_p, cfg_scale=args.cfg_scale,
                                     seed=args.seed + len(all_tokens))
            passes, gen_seconds = stats["forward_passes"], gen_seconds + stats["seconds"]
            with torch.no_grad():
                frames = tokenizer.decode(tokens.to(tokenizer.device)).cpu().numpy()
            for i in range(n):
                prefix = "sample" if label is None else names.get(label, f"class{label}")
                stem = f"{prefix}_{done + i:03d}"
                write_video(frames[i], out / f"{stem}.mp4", fps=args.fps)
            all_tokens.append(tokens.cpu().numpy())
            all_labels += [-1 if label is None else label] * n
            videos.append(frames)
            done += n
    tokens = np.concatenate(all_tokens)
    videos = np.concatenate(videos)
    np.save(out / "tokens.npy", tokens)
    np.save(out / "videos.npy", videos)  # decoded frames, before mp4 compression (nbp-check-consistency)
    np.save(out / "labels.npy", np.array(all_labels))
    save_png(out / "grid.png", frame_grid(videos))
    total = time.perf_counter() - began
    frames_made = videos.shape[0] * videos.shape[1]
    print(f"{videos.shape[0]} videos of {videos.shape[1]} frames in {out}: {passes} forward passes per video, "
          f"{frames_made / gen_seconds:.2f} frames/s generating, {frames_made / total:.2f} frames/s with decoding "
          f"and writing")


if __name__ == "__main__":
    sys.exit(main())
