"""Sample videos from a trained NBP model, a few or thousands (FVD uses 2,048-10,000), resumably.

    nbp-sample --weights runs/x/export.safetensors --tokenizer runs/tok/tokenizer --out samples/
    nbp-sample --weights runs/x --tokenizer TOK --label 3 --num 8 --cfg-scale 2 --top-p 0.9
    nbp-sample --weights runs/k600 --tokenizer TOK --context clip.mp4 --num 4
    nbp-sample --weights runs/x --tokenizer TOK --label 3 --frames 129   # 8x the 17-frame clip (docs/sampling.md)
    nbp-sample --weights runs/x --tokenizer TOK --frames 129 --out long/ --tensorboard tb/long   # watch them whole
    nbp-sample --weights converted/ucf_700m.safetensors --tokenizer official:magvit2_ucf.pt \
        --paper-sampling --num 100 --batch-size 32 --no-mp4 --out fvd_samples/   # 101 classes x 100 for FVD
    nbp-eval-fvd --real REAL_VIDEOS --fake fvd_samples/ --i3d i3d_torchscript.pt

--weights is an export of nbp-export (a .safetensors file, or a sharded export's folder or index json) or a
training output folder / DeepSpeed checkpoint folder (consolidated in memory); the model is built on --device and
runs in --dtype.
Batches are generated on the device and written as they come by --writers threads: per video an mp4
(unless --no-mp4), its decoded frames frames/<stem>.npy and its tokens tokens/<stem>.npy, and a line in
videos.jsonl once all three are in place; grid.png shows the first videos (and --tensorboard DIR shows them
whole, an animated GIF each, tagged samples/<stem>). nbp-eval-fvd and
nbp-check-consistency read the folder. Memory stays bounded however many videos are asked for.

An interrupted run (killed, preempted, out of time) continues when run again with the same arguments: finished
videos are skipped, and every video is the one an uninterrupted run gives (video i draws from the random stream
of (--seed, i)). Other arguments for the same --out are refused, naming what changed; --restart discards the
folder's earlier run instead.

Everything that can be checked is checked before any sampling starts: the weights and the tokenizer
load, the tokenizer's codebook fits the model, labels are in range, guidance only for a class-conditional
model with a null class, a context video is given exactly when the model predicts frames, the decoder
runs on --device, --out holds no other run. (The work is nbp_ds.generate.sampler's; this program reads
the flags.)
"""

from __future__ import annotations

import argparse
import sys

import torch

from nbp_ds.cli import command, setup_logging
from nbp_ds.errors import UsageError
from nbp_ds.generate import LONG_MODES, MODES, PAPER_SAMPLING
from nbp_ds.generate.long import DEFAULT_SINK_FRAMES
from nbp_ds.generate.sampler import DTYPES, SamplerOptions, sample_videos


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", required=True,
                   help="an export (.safetensors file, or a sharded export's folder or index json), or a training "
                        "output / checkpoint folder")
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
    p.add_argument("--dtype", choices=list(DTYPES), default=None, help="default: bf16 on CUDA, fp32 elsewhere")
    p.add_argument("--grid", help="the token grid T,H,W to generate (default: the model's layout.grid); another grid "
                                  "only for a model trained on packed rows (data.pack_tokens), within a row")
    p.add_argument("--mode", choices=MODES, default="auto",
                   help="decoder: CUDA graphs, static passes, or the eager reference (auto: graph on CUDA, "
                        "eager elsewhere)")
    p.add_argument("--frames", type=int, default=None,
                   help="video frames per sample (default: the model's clip); past the clip a window of the clip's "
                        "length slides one latent frame at a time")
    p.add_argument("--long-mode", choices=LONG_MODES, default="auto",
                   help="past the clip: recompute (feed each window from scratch: exactly a training clip, any "
                        "model), rolling (keep the window's cache: faster, rotary models, equal to recompute only "
                        "in one-layer models); auto: recompute")
    p.add_argument("--sink-frames", type=int, default=DEFAULT_SINK_FRAMES,
                   help="first latent frames every window keeps at their own places")
    p.add_argument("--tensorboard", metavar="DIR",
                   help="also show the first 16 videos in TensorBoard (tensorboard --logdir DIR): an animated GIF "
                        "each, tagged samples/<stem>, long ones (--frames) whole")
    args = p.parse_args(argv)
    if args.paper_sampling:  # the paper's values become the defaults, so flags given explicitly still win
        p.set_defaults(**PAPER_SAMPLING)
        args = p.parse_args(argv)
    return args


def parse_grid(text: str | None) -> tuple[int, int, int] | None:
    if text is None:
        return None
    parts = text.replace("x", ",").split(",")
    if len(parts) != 3 or not all(p.strip().isdigit() and int(p) > 0 for p in parts):
        raise UsageError(f"--grid takes three positive numbers T,H,W (e.g. 5,8,8), got {text!r}")
    return tuple(int(p) for p in parts)


@command
def main(argv: list[str] | None = None) -> int | None:
    setup_logging()
    args = parse_args(argv)
    summary = sample_videos(SamplerOptions(
        weights=args.weights, tokenizer=args.tokenizer, out=args.out, num=args.num, labels=args.label,
        context=args.context, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
        cfg_scale=args.cfg_scale, seed=args.seed, batch_size=args.batch_size, fps=args.fps, mp4=not args.no_mp4,
        writers=args.writers, restart=args.restart, classes=args.classes, device=args.device, dtype=args.dtype,
        mode=args.mode, grid=parse_grid(args.grid), frames=args.frames, long_mode=args.long_mode,
        sink_frames=args.sink_frames, tensorboard=args.tensorboard))
    done = f"{summary.skipped} finished earlier, " if summary.skipped else ""
    print(f"{summary.finished} videos in {args.out} ({done}{summary.videos} made now): {summary.forward_passes} "
          f"forward passes per video", end="")
    if summary.videos:
        print(f", {summary.frames / summary.generate_seconds:.2f} frames/s generating, "
              f"{summary.frames / summary.seconds:.2f} frames/s with decoding and writing", end="")
    print()


if __name__ == "__main__":
    sys.exit(main())
