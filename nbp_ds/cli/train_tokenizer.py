"""Train the causal 3D CNN + FSQ video tokenizer on a folder of videos.

    nbp-train-tokenizer --videos data/train --val-videos data/val --out runs/tok --preset tiny \\
        --frames 9 --resolution 32 --steps 1500
    torchrun --nproc_per_node 8 -m nbp_ds.cli.train_tokenizer --videos UCF-101 --val-videos ucf_val --out runs/tok \\
        --preset paper --frames 17 --resolution 128 --batch-size 4 --steps 200000 --adversarial-weight 0.1

Loss: L1 + MSE reconstruction; with --adversarial-weight > 0 a 3D PatchGAN (hinge loss) joins after
--adversarial-start of the steps (worth it on real footage; the synthetic quickstart does without).
Clips are decoded once into OUT/clips_*.npy. Several processes (torchrun) train data-parallel.

Writes OUT/checkpoints/ (every --save-every steps; a rerun resumes from the latest), OUT/tb (TensorBoard:
losses, PSNR, codebook use, reconstructions as images), OUT/metrics.jsonl, and at the end OUT/tokenizer
(config.json + tokenizer.safetensors, what nbp-tokenize --tokenizer and nbp-sample take) and
OUT/report.json with the reconstruction PSNR on the held-out clips.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from nbp_ds.cli import command, setup_logging
from nbp_ds.video_io import add_clip_arguments, clip_from_arguments


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--videos", required=True, help="training videos (folder with class sub-folders, CSV or list)")
    p.add_argument("--val-videos", help="held-out videos for the PSNR report (default: 5%% of the training clips)")
    p.add_argument("--out", required=True, help="run folder")
    p.add_argument("--preset", default="tiny", help="architecture: tiny, small or paper (default tiny)")
    add_clip_arguments(p)
    p.add_argument("--max-videos", type=int, help="use at most this many videos (quick runs)")
    p.add_argument("--steps", type=int, default=10000, help="optimizer steps (default 10000)")
    p.add_argument("--batch-size", type=int, default=8, help="clips per process per step (default 8)")
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (default 1e-3)")
    p.add_argument("--warmup", type=int, default=50, help="linear warmup steps (default 50)")
    p.add_argument("--min-lr-ratio", type=float, default=0.05, help="cosine decays to lr x this (default 0.05)")
    p.add_argument("--adversarial-weight", type=float, default=0.0, help="PatchGAN loss weight (default 0: off)")
    p.add_argument("--adversarial-start", type=float, default=0.5, help="fraction of steps before the GAN joins")
    p.add_argument("--save-every", type=int, default=250, help="checkpoint every N steps (default 250)")
    p.add_argument("--keep-last", type=int, default=2, help="checkpoints kept (default 2)")
    p.add_argument("--log-every", type=int, default=25, help="console/TensorBoard scalars every N steps")
    p.add_argument("--image-every", type=int, default=250, help="reconstruction images every N steps")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="video decoding processes")
    p.add_argument("--device", default="auto", help="cpu, cuda (default: cuda when available)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads per process (default: torch's)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


@command
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging(ranked=True)
    from nbp_ds.tokenizer.trainer import TokenizerTrainConfig, train_tokenizer

    clip = clip_from_arguments(args)
    fields = {k: v for k, v in vars(args).items() if k not in ("frames", "resolution", "fps", "clips_per_video")}
    report = train_tokenizer(TokenizerTrainConfig(clip=clip, **fields))
    if report is not None:
        print(f"tokenizer saved to {Path(args.out) / 'tokenizer'} (version {report['version']}); held-out "
              f"reconstruction PSNR {report['val_psnr']:.2f} dB over {report['val_clips']} clips, codebook use "
              f"{100 * report['val_codebook_used']:.0f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
