"""Training the video tokenizer (causal 3D CNN + FSQ): L1 + MSE reconstruction, optionally a 3D PatchGAN.

Built on the same parts as the transformer trainer: the launcher's rank detection
(:mod:`nbp_ds.runtime.launch`: torchrun, the deepspeed launcher and srun), its process group and
collectives (:mod:`nbp_ds.runtime.distributed`), the warmup + cosine schedule, the metrics logger
(TensorBoard + ``metrics.jsonl``) and the checkpoint manager (``checkpoints/stepNNNNNNNN`` + ``latest``,
a rerun resumes). Several processes train data-parallel (DDP).

A run folder holds ``clips_*.npy`` (the clips, decoded once), ``checkpoints/``, ``tb/``,
``metrics.jsonl``, and at the end ``tokenizer/`` (what ``nbp-tokenize --tokenizer`` and
``nbp-sample --tokenizer`` take) and ``report.json`` (held-out PSNR and codebook use).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from nbp_ds.errors import UsageError
from nbp_ds.files import atomic_output, write_text_atomic
from nbp_ds.runtime import distributed, launch
from nbp_ds.runtime.checkpoint import CheckpointManager, CheckpointRef
from nbp_ds.runtime.metrics import MetricsLogger
from nbp_ds.runtime.rng import seed_everything
from nbp_ds.runtime.schedule import lr_factor
from nbp_ds.video_io import ClipSpec

log = logging.getLogger(__name__)


@dataclass
class TokenizerTrainConfig:
    """Everything a tokenizer training run needs (``nbp-train-tokenizer --help`` documents each field)."""

    videos: str
    out: str
    clip: ClipSpec = field(default_factory=ClipSpec)
    val_videos: str | None = None
    preset: str = "tiny"
    max_videos: int | None = None
    steps: int = 10000
    batch_size: int = 8
    lr: float = 1e-3
    warmup: int = 50
    min_lr_ratio: float = 0.05
    adversarial_weight: float = 0.0
    adversarial_start: float = 0.5
    save_every: int = 250
    keep_last: int = 2
    log_every: int = 25
    image_every: int = 250
    workers: int = 4
    device: str = "auto"
    threads: int = 0
    seed: int = 0


class TokenizerTrainer:
    """One tokenizer training run in this process (one rank of the job)."""

    def __init__(self, cfg: TokenizerTrainConfig):
        from nbp_ds.tokenizer import PRESETS, build_tokenizer
        from nbp_ds.tokenizer.training import PatchDiscriminator3D

        if cfg.preset not in PRESETS:
            raise UsageError(f"--preset {cfg.preset!r} is not one of {', '.join(PRESETS)}")
        self.cfg = cfg
        self.env = launch.detect()
        self.rank, self.world = self.env.rank, self.env.world_size
        self.device = distributed.process_device(self.env, cfg.device)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        distributed.init_process_group(self.env, self.device)
        self.out = Path(cfg.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.model = build_tokenizer(cfg.preset, seed=cfg.seed).to(self.device)
        self.model.check_clip_shape(cfg.clip.frames, cfg.clip.resolution, cfg.clip.resolution)
        self.clips, self.val = self._load_clips()
        self.ddp = torch.nn.parallel.DistributedDataParallel(self.model) if self.world > 1 else self.model
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=1e-4)
        self.disc = self.disc_opt = None
        if cfg.adversarial_weight > 0:
            self.disc = PatchDiscriminator3D().to(self.device)
            self.disc_ddp = torch.nn.parallel.DistributedDataParallel(self.disc) if self.world > 1 else self.disc
            self.disc_opt = torch.optim.AdamW(self.disc.parameters(), lr=cfg.lr, betas=(0.5, 0.9))
        self.step = 0
        self.checkpoints = CheckpointManager(self.out / "checkpoints", cfg.keep_last, self.rank)
        if (ref := self.checkpoints.latest_intact()) is not None:  # checked against its manifest
            self._load(ref)
        self.metrics = MetricsLogger(self.out, enabled=self.rank == 0)
        log.info("tokenizer %s: %.2fM parameters, %d codes; %d training clips, %d held out; %d process(es) on %s",
                 cfg.preset, sum(p.numel() for p in self.model.parameters()) / 1e6, self.model.codebook_size,
                 len(self.clips), len(self.val), self.world, self.device)

    def _load_clips(self) -> tuple[np.ndarray, np.ndarray]:
        """(training clips, held-out clips), decoded once by rank 0 into the run folder, memory-mapped."""
        from nbp_ds.tokenizer.training import cached_clips

        c = self.cfg
        args = (c.clip, c.workers, c.max_videos)
        if self.rank == 0:
            cached_clips(c.videos, self.out / "clips_train.npy", *args)
            if c.val_videos:
                cached_clips(c.val_videos, self.out / "clips_val.npy", *args)
        distributed.barrier()
        clips = cached_clips(c.videos, self.out / "clips_train.npy", *args)
        if c.val_videos:
            return clips, cached_clips(c.val_videos, self.out / "clips_val.npy", *args)
        cut = max(1, len(clips) // 20)  # hold out the last 5% of the training clips
        return clips[:-cut], clips[-cut:]

    # ---- the loop -------------------------------------------------------------------------------
    def run(self) -> dict | None:
        """Train to cfg.steps; rank 0 returns the held-out report (others None)."""
        from nbp_ds.tokenizer.model import to_float
        from nbp_ds.tokenizer.training import hinge_d_loss, psnr

        c = self.cfg
        bar = tqdm(total=c.steps, initial=self.step, unit="step", disable=self.rank != 0, desc="tokenizer")
        gan_from = int(c.adversarial_start * c.steps)
        while self.step < c.steps:
            x = to_float(torch.from_numpy(self._batch(self.step)).to(self.device))
            for group in self.opt.param_groups:
                group["lr"] = c.lr * lr_factor(self.step, c.steps, c.warmup, c.min_lr_ratio)
            recon, codes = self.ddp(x)
            l1, l2 = (recon - x).abs().mean(), F.mse_loss(recon, x)
            loss = l1 + l2
            use_gan = self.disc is not None and self.step >= gan_from
            if use_gan:
                g_loss = -self.disc(recon).mean()
                loss = loss + c.adversarial_weight * g_loss
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
            self.opt.step()
            scalars = {}
            if use_gan:
                d_loss = hinge_d_loss(self.disc_ddp(x), self.disc_ddp(recon.detach()))
                self.disc_opt.zero_grad(set_to_none=True)
                d_loss.backward()
                self.disc_opt.step()
                scalars = {"gan/g": g_loss, "gan/d": d_loss}
            self.step += 1
            bar.update(1)
            if self.step % c.log_every == 0 or self.step == 1:
                scalars.update({"train/loss": loss, "train/l1": l1, "train/psnr": psnr(recon.detach(), x),
                                "train/codebook_used": codes.unique().numel() / self.model.codebook_size,
                                "train/grad_norm": grad_norm, "train/lr": self.opt.param_groups[0]["lr"]})
                scalars = {k: float(v) for k, v in scalars.items()}
                self.metrics.scalars(self.step, scalars)
                bar.set_postfix(loss=f"{scalars['train/loss']:.4f}", psnr=f"{scalars['train/psnr']:.1f}")
            if self.rank == 0 and self.step % c.image_every == 0:
                self._log_reconstructions()
            if self.step % c.save_every == 0 or self.step == c.steps:
                self.save()
        bar.close()
        report = self._finish() if self.rank == 0 else None
        self.metrics.close()
        distributed.leave_process_group()
        return report

    def _batch(self, step: int) -> np.ndarray:
        """This rank's clips at ``step``: a function of (seed, rank, step) only, so a resumed run draws the same."""
        rng = np.random.default_rng([self.cfg.seed, self.rank, step])
        idx = np.sort(rng.choice(len(self.clips), size=min(self.cfg.batch_size, len(self.clips)), replace=False))
        return np.asarray(self.clips[idx])

    # ---- checkpoints ------------------------------------------------------------------------------
    def save(self) -> CheckpointRef:
        def write(folder: Path, tag: str) -> None:
            if self.rank != 0:  # DDP keeps every rank's weights identical: one copy is the checkpoint
                return
            state = {"model": self.model.state_dict(), "opt": self.opt.state_dict(), "step": self.step,
                     "config": dataclasses.asdict(self.cfg),
                     "disc": self.disc.state_dict() if self.disc else None,
                     "disc_opt": self.disc_opt.state_dict() if self.disc else None}
            with atomic_output(folder / tag / "state.pt") as tmp:
                torch.save(state, tmp)

        ref = self.checkpoints.save(self.step, write)
        self.metrics.flush()
        return ref

    def _load(self, ref: CheckpointRef) -> None:
        state = torch.load(ref.path / "state.pt", map_location=self.device, weights_only=False)
        if state["config"]["preset"] != self.cfg.preset:
            raise UsageError(f"{ref.path} is a '{state['config']['preset']}' tokenizer, not --preset {self.cfg.preset}")
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["opt"])
        if self.disc is not None and state.get("disc"):
            self.disc.load_state_dict(state["disc"])
            self.disc_opt.load_state_dict(state["disc_opt"])
        self.step = state["step"]
        self.checkpoints.load(ref)  # the parts registered with the manager: this rank's RNG streams
        log.info("resumed from %s at step %d", ref.path, self.step)

    # ---- results ----------------------------------------------------------------------------------
    def _finish(self) -> dict:
        self.model.eval()
        folder = self.model.save(self.out / "tokenizer")
        report = held_out_report(self.model, self.val, self.device)
        report.update({"preset": self.cfg.preset, "version": self.model.version, "steps": self.step,
                       "train_clips": len(self.clips), "clip": dataclasses.asdict(self.cfg.clip)})
        write_text_atomic(self.out / "report.json", json.dumps(report, indent=1) + "\n")
        self._log_reconstructions()
        log.info("tokenizer saved to %s (version %s)", folder, self.model.version)
        return report

    def _log_reconstructions(self, n: int = 4) -> None:
        """Originals above reconstructions, a row of frames per clip, as one TensorBoard image."""
        from nbp_ds.tokenizer.model import to_float, to_uint8
        from nbp_ds.visualize import frame_grid

        was_training = self.model.training
        self.model.eval()
        with torch.no_grad():
            recon = to_uint8(self.model(to_float(torch.from_numpy(self.val[:n].copy()).to(self.device)))[0])
        self.model.train(was_training)
        grid = frame_grid(np.concatenate([np.asarray(self.val[:n]), recon.cpu().numpy()]))
        self.metrics.image("reconstructions", grid, self.step)


@torch.no_grad()
def held_out_report(model, clips: np.ndarray, device: torch.device, batch: int = 16) -> dict:
    """Mean PSNR (dB) over held-out clips and the share of the codebook they use."""
    from nbp_ds.tokenizer.model import to_float
    from nbp_ds.tokenizer.training import psnr

    scores, codes = [], set()
    for i in range(0, len(clips), batch):
        x = to_float(torch.from_numpy(np.asarray(clips[i:i + batch]).copy()).to(device))
        recon, idx = model(x)
        scores += [psnr(recon[j], x[j]) for j in range(len(x))]
        codes |= set(idx.unique().tolist())
    return {"val_psnr": float(sum(scores) / len(scores)), "val_clips": len(scores),
            "val_codebook_used": len(codes) / model.codebook_size}


def train_tokenizer(cfg: TokenizerTrainConfig) -> dict | None:
    """Run a whole tokenizer training job in this process; rank 0 returns the held-out report."""
    seed_everything(cfg.seed)
    return TokenizerTrainer(cfg).run()
