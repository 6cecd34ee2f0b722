"""Train the causal 3D CNN + FSQ video tokenizer on a folder of videos.

    python tools/train_tokenizer.py --videos data/train --val-videos data/val --out runs/tok --preset tiny \\
        --frames 9 --resolution 32 --steps 1500
    torchrun --nproc_per_node 8 tools/train_tokenizer.py --videos UCF-101 --val-videos ucf_val --out runs/tok \\
        --preset paper --frames 17 --resolution 128 --batch-size 4 --steps 200000 --adversarial-weight 0.1

Loss: L1 + MSE reconstruction; with --adversarial-weight > 0 a 3D PatchGAN (hinge loss) joins after
--adversarial-start of the steps (worth it on real footage; the synthetic quickstart does without).
Clips are decoded once into OUT/clips_*.npy. Several processes (torchrun) train data-parallel.

Writes OUT/checkpoint.pt (every --save-every steps; a rerun resumes from it), OUT/tb (TensorBoard:
losses, PSNR, codebook use, reconstructions as images), and at the end OUT/tokenizer (config.json +
tokenizer.safetensors, what tools/tokenize_videos.py --tokenizer and tools/sample.py take) and
OUT/report.json with the reconstruction PSNR on the held-out clips.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

log = logging.getLogger("train_tokenizer")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--videos", required=True, help="training videos (folder with class sub-folders, CSV or list)")
    p.add_argument("--val-videos", help="held-out videos for the PSNR report (default: 5%% of the training clips)")
    p.add_argument("--out", required=True, help="run folder")
    p.add_argument("--preset", default="tiny", help="architecture: tiny, small or paper (default tiny)")
    p.add_argument("--frames", type=int, default=17, help="frames per clip, 1 + 4k (default 17)")
    p.add_argument("--resolution", type=int, default=128, help="square clip side (default 128)")
    p.add_argument("--fps", type=float, default=8.0, help="frame rate (default 8)")
    p.add_argument("--clips-per-video", type=int, default=1, help="clips decoded per video (default 1)")
    p.add_argument("--max-videos", type=int, help="use at most this many videos (quick runs)")
    p.add_argument("--steps", type=int, default=10000, help="optimizer steps (default 10000)")
    p.add_argument("--batch-size", type=int, default=8, help="clips per process per step (default 8)")
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (default 1e-3)")
    p.add_argument("--warmup", type=int, default=50, help="linear warmup steps (default 50)")
    p.add_argument("--adversarial-weight", type=float, default=0.0, help="PatchGAN loss weight (default 0: off)")
    p.add_argument("--adversarial-start", type=float, default=0.5, help="fraction of steps before the GAN joins")
    p.add_argument("--save-every", type=int, default=250, help="checkpoint every N steps (default 250)")
    p.add_argument("--log-every", type=int, default=25, help="console/TensorBoard scalars every N steps")
    p.add_argument("--image-every", type=int, default=250, help="reconstruction images every N steps")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="video decoding processes")
    p.add_argument("--device", default="auto", help="cpu, cuda (default: cuda when available)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads per process (default: torch's)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def lr_at(step: int, args: argparse.Namespace) -> float:
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import numpy as np
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F

    from nbp_ds.tokenizer import PRESETS, build_tokenizer
    from nbp_ds.tokenizer.model import to_float, to_uint8
    from nbp_ds.tokenizer.training import PatchDiscriminator3D, cached_clips, hinge_d_loss, psnr
    from nbp_ds.tokenizer.video_io import VideoError

    world, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"%(asctime)s [rank {rank}] %(name)s: %(message)s")
    if args.preset not in PRESETS:
        print(f"error: --preset {args.preset!r} is not one of {', '.join(PRESETS)}", file=sys.stderr)
        return 2
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    if args.threads:
        torch.set_num_threads(args.threads)
    if world > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = build_tokenizer(args.preset, seed=args.seed).to(device)
    try:
        model.check_clip_shape(args.frames, args.resolution, args.resolution)
        clip_args = (args.frames, args.fps, args.resolution, args.clips_per_video, args.workers, args.max_videos)
        if rank == 0:  # decode once; the other ranks wait and map the cache
            cached_clips(args.videos, out / "clips_train.npy", *clip_args)
            if args.val_videos:
                cached_clips(args.val_videos, out / "clips_val.npy", *clip_args)
        if world > 1:
            dist.barrier()
        clips = cached_clips(args.videos, out / "clips_train.npy", *clip_args)
        val = cached_clips(args.val_videos, out / "clips_val.npy", *clip_args) if args.val_videos else None
    except (ValueError, VideoError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if val is None:  # hold out the last 5% of the training clips
        cut = max(1, len(clips) // 20)
        clips, val = clips[:-cut], clips[-cut:]
    log.info("tokenizer %s: %.2fM parameters, %d codes; %d training clips, %d held out; %d process(es) on %s",
             args.preset, sum(p.numel() for p in model.parameters()) / 1e6, model.codebook_size, len(clips),
             len(val), world, device)

    ddp = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=1e-4)
    disc = disc_opt = None
    if args.adversarial_weight > 0:
        disc = PatchDiscriminator3D().to(device)
        disc_ddp = torch.nn.parallel.DistributedDataParallel(disc) if world > 1 else disc
        disc_opt = torch.optim.AdamW(disc.parameters(), lr=args.lr, betas=(0.5, 0.9))
    step = 0
    ckpt_path = out / "checkpoint.pt"
    if ckpt_path.is_file():
        state = torch.load(ckpt_path, map_location=device, weights_only=False)
        if state["args"]["preset"] != args.preset:
            print(f"error: {ckpt_path} is a '{state['args']['preset']}' tokenizer, not --preset {args.preset}",
                  file=sys.stderr)
            return 2
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        if disc is not None and state.get("disc"):
            disc.load_state_dict(state["disc"])
            disc_opt.load_state_dict(state["disc_opt"])
        step = state["step"]
        log.info("resumed from %s at step %d", ckpt_path, step)

    writer = None
    if rank == 0:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(out / "tb"))
        writer.add_text("args", "```\n" + json.dumps(vars(args), indent=1) + "\n```", step)
    from tqdm import tqdm

    bar = tqdm(total=args.steps, initial=step, unit="step", disable=rank != 0, desc="tokenizer")
    gan_from = int(args.adversarial_start * args.steps)
    began = time.perf_counter()
    while step < args.steps:
        rng = np.random.default_rng([args.seed, rank, step])  # the batch depends only on (seed, rank, step)
        idx = np.sort(rng.choice(len(clips), size=min(args.batch_size, len(clips)), replace=False))
        x = to_float(torch.from_numpy(np.asarray(clips[idx])).to(device))
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args)
        recon, codes = ddp(x)
        l1, l2 = (recon - x).abs().mean(), F.mse_loss(recon, x)
        loss = l1 + l2
        use_gan = disc is not None and step >= gan_from
        if use_gan:
            g_loss = -disc(recon).mean()
            loss = loss + args.adversarial_weight * g_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if use_gan:
            d_loss = hinge_d_loss(disc_ddp(x), disc_ddp(recon.detach()))
            disc_opt.zero_grad(set_to_none=True)
            d_loss.backward()
            disc_opt.step()
        step += 1
        bar.update(1)
        if writer is not None and (step % args.log_every == 0 or step == 1):
            scalars = {"loss": loss.item(), "l1": l1.item(), "psnr": psnr(recon.detach(), x),
                       "codebook_used": codes.unique().numel() / model.codebook_size, "grad_norm": float(grad_norm),
                       "lr": lr_at(step - 1, args), "clips_per_s": step and args.batch_size * world * (
                           step - bar.initial) / (time.perf_counter() - began)}
            if use_gan:
                scalars.update({"gan/g": g_loss.item(), "gan/d": d_loss.item()})
            for k, v in scalars.items():
                writer.add_scalar(f"train/{k}", v, step)
            bar.set_postfix(loss=f"{scalars['loss']:.4f}", psnr=f"{scalars['psnr']:.1f}")
        if writer is not None and step % args.image_every == 0:
            log_reconstructions(writer, model, val, step, to_float, to_uint8, device)
        if rank == 0 and (step % args.save_every == 0 or step == args.steps):
            state = {"model": model.state_dict(), "opt": opt.state_dict(), "step": step, "args": vars(args),
                     "disc": disc.state_dict() if disc else None, "disc_opt": disc_opt.state_dict() if disc else None}
            torch.save(state, out / "checkpoint.pt.tmp")
            os.replace(out / "checkpoint.pt.tmp", ckpt_path)  # a kill mid-save keeps the previous checkpoint
    bar.close()
    if rank == 0:
        model.eval()
        folder = model.save(out / "tokenizer")
        report = evaluate(model, val, device, to_float, psnr)
        report.update({"preset": args.preset, "version": model.version, "steps": step,
                       "train_clips": len(clips), "clip": [args.frames, args.resolution, args.resolution]})
        (out / "report.json").write_text(json.dumps(report, indent=1) + "\n")
        log_reconstructions(writer, model, val, step, to_float, to_uint8, device)
        writer.close()
        print(f"tokenizer saved to {folder} (version {model.version}); held-out reconstruction PSNR "
              f"{report['val_psnr']:.2f} dB over {report['val_clips']} clips, codebook use "
              f"{100 * report['val_codebook_used']:.0f}%")
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return 0


def evaluate(model, val, device, to_float, psnr, batch: int = 16) -> dict:
    """Mean PSNR (dB) over the held-out clips and the share of the codebook they use."""
    import torch

    scores, codes = [], set()
    with torch.no_grad():
        for i in range(0, len(val), batch):
            x = to_float(torch.from_numpy(val[i:i + batch].copy()).to(device))
            recon, idx = model(x)
            scores += [psnr(recon[j], x[j]) for j in range(len(x))]
            codes |= set(idx.unique().tolist())
    return {"val_psnr": float(sum(scores) / len(scores)), "val_clips": len(scores),
            "val_codebook_used": len(codes) / model.codebook_size}


def log_reconstructions(writer, model, val, step: int, to_float, to_uint8, device, n: int = 4) -> None:
    """Originals above reconstructions, a row of frames per clip, as one TensorBoard image."""
    import numpy as np
    import torch

    from nbp_ds.visualize import frame_grid

    was_training = model.training
    model.eval()
    with torch.no_grad():
        x = to_float(torch.from_numpy(val[:n].copy()).to(device))
        recon = to_uint8(model(x)[0]).cpu().numpy()
    model.train(was_training)
    grid = frame_grid(np.concatenate([np.asarray(val[:n]), recon]))
    writer.add_image("reconstructions", grid, step, dataformats="HWC")


if __name__ == "__main__":
    sys.exit(main())
