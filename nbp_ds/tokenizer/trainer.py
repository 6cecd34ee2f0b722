"""Training the video tokenizer (causal 3D CNN + FSQ): MSE (+ L1) reconstruction, optionally a 3D PatchGAN.

Built on the same parts as the transformer trainer: the launcher's rank detection
(:mod:`nbp_ds.runtime.launch`: torchrun, the deepspeed launcher and srun), its process group and
collectives (:mod:`nbp_ds.runtime.distributed`), the warmup + cosine schedule, the metrics logger
(TensorBoard + ``metrics.jsonl``) and the checkpoint manager (``checkpoints/stepNNNNNNNN`` + ``latest``,
each with its manifest; a rerun resumes from the newest intact one). Several processes train data-parallel
(DDP). What a checkpoint keeps is the list of parts registered with the manager
(:mod:`nbp_ds.tokenizer.saved_state`): weights and optimizer, discriminator, EMA, the clip stream's position.

Training clips are streamed (:mod:`nbp_ds.tokenizer.clip_stream`). A run folder holds ``clips_val.npy`` (the
held-out clips, decoded once), ``skipped_videos/``, ``checkpoints/``, ``tb/``, ``metrics.jsonl``, and at the end
``tokenizer/`` (what ``nbp-tokenize --tokenizer`` and ``nbp-sample --tokenizer`` take) and ``report.json``
(held-out PSNR and codebook use).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from nbp_ds.errors import ConfigError, UsageError
from nbp_ds.files import write_text_atomic
from nbp_ds.runtime import distributed, launch
from nbp_ds.runtime.checkpoint import CheckpointManager, CheckpointRef
from nbp_ds.runtime.ema import EmaState, WeightsEMA
from nbp_ds.runtime.metrics import MetricsLogger
from nbp_ds.runtime.rng import seed_everything
from nbp_ds.runtime.schedule import lr_factor
from nbp_ds.runtime.stop import stop_request
from nbp_ds.runtime.trainer_loop import TrainerLoop
from nbp_ds.runtime.watchdog import StepWatchdog
from nbp_ds.tokenizer.clip_stream import Augment, ClipLoader
from nbp_ds.tokenizer.config import TokenizerTrainConfig
from nbp_ds.tokenizer.dataset_listing import list_dataset
from nbp_ds.tokenizer.model import build_tokenizer, load_tokenizer, to_float, to_uint8
from nbp_ds.tokenizer.perceptual import load_perceptual_loss
from nbp_ds.tokenizer.saved_state import ClipStreamPosition, Discriminator, SharedState
from nbp_ds.tokenizer.training import (
    LeCam,
    PatchDiscriminator3D,
    adaptive_generator_weight,
    cached_clips,
    hinge_d_loss,
    psnr,
    ssim,
)
from nbp_ds.tokenizer.video_shards import VideoShards, expand_video_shards, names_shards
from nbp_ds.visualize import frame_grid

log = logging.getLogger(__name__)


class TokenizerTrainer:
    """One tokenizer training run in this process (one rank of the job)."""

    def __init__(self, cfg: TokenizerTrainConfig, rfvd: RFVD | None = None):

        self.cfg, self.rfvd = cfg, rfvd
        self.stop = stop_request()  # SIGUSR1 / SIGTERM: checkpoint at the next step boundary and exit 0
        self.env = launch.detect()
        self.rank, self.world = self.env.rank, self.env.world_size
        self.device = distributed.process_device(self.env, cfg.train.device)
        if cfg.train.precision == "bf16" and self.device.type != "cuda":
            raise ConfigError(f"train.precision=bf16 needs a CUDA device; this run is on {self.device.type}: "
                              f"train.precision=fp32")
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        distributed.init_process_group(self.env, self.device)
        self.out = Path(cfg.train.out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.model = self._initial_model().to(self.device)
        self.model.check_clip_shape(cfg.data.clip.frames, cfg.data.clip.resolution, cfg.data.clip.resolution)
        self.model.activation_checkpointing = cfg.train.activation_checkpointing
        self.ddp = torch.nn.parallel.DistributedDataParallel(self.model) if self.world > 1 else self.model
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=cfg.train.lr, betas=tuple(cfg.train.betas),
                                     weight_decay=cfg.train.weight_decay)
        self.disc = self.disc_opt = None
        if cfg.loss.adversarial_weight > 0:
            self.disc = PatchDiscriminator3D().to(self.device)
            self.disc_ddp = torch.nn.parallel.DistributedDataParallel(self.disc) if self.world > 1 else self.disc
            self.disc_opt = torch.optim.AdamW(self.disc.parameters(), lr=cfg.train.lr,
                                              betas=tuple(cfg.train.disc_betas))
        self.lecam = LeCam(cfg.loss.lecam_decay)
        self.perceptual = None
        if cfg.loss.perceptual_weight > 0:
            self.perceptual = load_perceptual_loss(cfg.loss.perceptual_file)
            self.perceptual = self.perceptual.to(self.device) if self.perceptual is not None else None
        # DDP keeps every rank's weights equal: rank 0 alone keeps the average
        self.ema = WeightsEMA(self.model, cfg.train.ema, self.rank, self.world) if cfg.train.ema > 0 else None
        self.step = 0
        self.train_videos, self.val = self._split_videos()
        self.stream = self._clip_stream()
        self.checkpoints = self._checkpoint_manager()
        if (ref := self.checkpoints.latest_intact()) is not None:  # checked against its manifest
            self.checkpoints.load(ref)
            log.info("resumed from %s at step %d", ref.path, self.step)
        self.metrics = MetricsLogger(self.out, enabled=self.rank == 0)
        # the shared skeleton (nbp_ds.runtime.trainer_loop); no step watchdog here (timeout 0): DDP's collectives
        # bound a lost peer, and a stalled rank holds no GPU-hours at the tokenizer's scale
        self.loop = TrainerLoop(self.out, self.rank, cfg.train.steps, cfg.train.save_every, self.metrics, self.stop,
                                StepWatchdog(0.0, 1.0, self.rank))
        self._gan_from = int(cfg.loss.adversarial_start * cfg.train.steps)  # the step the GAN joins at
        log.info("tokenizer %s: %.2fM parameters, %d codes; %d training %s streamed, %d held-out clips; "
                 "%d process(es) on %s", self.model.name, sum(p.numel() for p in self.model.parameters()) / 1e6,
                 self.model.codebook_size, len(self.train_videos), self._train_unit, len(self.val), self.world,
                 self.device)

    @property
    def _train_unit(self) -> str:
        return "videos" if isinstance(self.train_videos, list) else "shards"

    def _initial_model(self):
        """The preset's untrained tokenizer, or with model.init_from the tokenizer it names (fine-tuning: the same
        architecture and code grid, so shards made with either stay compatible)."""
        spec = self.cfg.model.init_from
        if spec is None:
            return build_tokenizer(self.cfg.model.preset, seed=self.cfg.train.seed)
        model = load_tokenizer(spec).train()
        log.info("fine-tuning %s (version %s, %d codes)", model.name, model.version, model.codebook_size)
        return model

    def _split_videos(self) -> tuple[list[Path] | VideoShards, np.ndarray]:
        """(training videos or shards, held-out clips): the held-out videos are data.val_videos or else the last 5%
        of the training listing (shards need data.val_videos), at most data.val_max_videos of them, their middle
        clips decoded once by rank 0 into the run folder and memory-mapped. Files that are not videos and held-out
        videos that give no clip are listed with rank 0's skipped videos."""
        c = self.cfg.data
        held_out: list[Path]
        if names_shards(c.videos):  # raw videos in shards: no listing to cut the held-out videos from
            listing, train = None, expand_video_shards(c.videos)
            held_out = [e.path for e in list_dataset(c.val_videos).videos]
        else:
            listing = list_dataset(c.videos)
            train = [e.path for e in listing.videos[:c.max_videos]]
            if c.val_videos:
                held_out = [e.path for e in list_dataset(c.val_videos).videos]
            else:
                cut = max(1, len(train) // 20)
                train, held_out = train[:-cut], train[-cut:]
        held_out = held_out[:c.val_max_videos]
        cache = self.out / "clips_val.npy"
        self.skipped: dict[str, str] = {}
        if self.rank == 0:
            _, failures = cached_clips(held_out, cache, c.clip, self.cfg.decode_workers, c.val_video_timeout)
            not_videos = listing.not_video_records() if listing is not None else []
            self.skipped = {r["video"]: r["reason"] for r in not_videos + failures}
            self._write_skipped()
        distributed.barrier()
        return train, cached_clips(held_out, cache, c.clip, self.cfg.decode_workers, c.val_video_timeout)[0]

    def _clip_stream(self):
        c, t = self.cfg.data, self.cfg.train
        return ClipLoader(self.train_videos, c.clip, t.batch_size, t.seed, self.rank, self.world,
                          self.cfg.decode_workers, Augment(c.random_crop, c.flip), c.cache_mb * 2**20, c.prefetch,
                          pin_memory=self.device.type == "cuda")

    def _checkpoint_manager(self) -> CheckpointManager:
        """The run's checkpoints, with every stateful part registered (nbp_ds.tokenizer.saved_state)."""
        manager = CheckpointManager(self.out / "checkpoints", self.cfg.train.keep_last, self.rank)
        manager.register("weights", SharedState("state.pt", self, self.rank))
        if self.disc is not None:
            manager.register("discriminator", Discriminator(self.disc, self.disc_opt, self.lecam, self.rank))
        if self.ema is not None:
            manager.register("ema", EmaState(self.ema))
        manager.register("clip_stream", ClipStreamPosition(self.stream, self.rank))
        return manager

    def _write_skipped(self) -> None:
        """OUT/skipped_videos/rankNNNNN.json: every video this rank skipped so far, with the reason."""
        if hasattr(self, "stream"):
            self.skipped.update(self.stream.skipped)
        records = [{"video": v, "reason": r} for v, r in sorted(self.skipped.items())]
        (self.out / "skipped_videos").mkdir(exist_ok=True)
        write_text_atomic(self.out / "skipped_videos" / f"rank{self.rank:05d}.json", json.dumps(records, indent=1))

    # ---- the loop: the shared skeleton (nbp_ds.runtime.trainer_loop) runs these parts ---------------
    def run(self) -> dict | None:
        """Train to cfg.steps; rank 0 returns the held-out report (others None, and every rank None when stopped
        by a signal)."""
        self._bar = tqdm(total=self.cfg.train.steps, initial=self.step, unit="step", disable=self.rank != 0,
                         desc="tokenizer")
        self._report = None
        finished = self.loop.run(self)
        self.loop.close()
        return self._report if finished else None

    def train_step(self) -> None:
        c = self.cfg.train
        x = to_float(next(self.stream).to(self.device, non_blocking=True))
        for group in self.opt.param_groups:
            group["lr"] = c.lr * lr_factor(self.step, c.steps, c.warmup, c.min_lr_ratio)
        use_gan = self.disc is not None and self.step >= self._gan_from
        recon, codes, scalars = self._reconstruction_step(x, use_gan)
        if use_gan:
            scalars.update(self._discriminator_step(x, recon))
        self.step += 1
        self._latest = (x, recon.detach(), codes, scalars)  # what periodic() logs

    def _reconstruction_step(self, x: torch.Tensor, use_gan: bool
                             ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """The tokenizer's update: MSE + loss.l1_weight x L1 (+ perceptual) reconstruction loss and, with the GAN on,
        the generator's hinge loss at its (adaptive) weight. Returns the reconstruction, the codes and the scalars to
        log."""
        loss_cfg = self.cfg.loss
        scalars = {}
        with self._autocast():
            recon, codes = self.ddp(x)
            recon = recon.float()  # the losses in float32 whatever the networks compute in
            l1, l2 = (recon - x).abs().mean(), F.mse_loss(recon, x)
            loss = loss_cfg.l1_weight * l1 + l2
            if self.perceptual is not None:
                scalars["train/perceptual"] = perceptual = self.perceptual(recon, x).float()
                loss = loss + loss_cfg.perceptual_weight * perceptual
            if use_gan:
                g_loss = -self.disc(recon).float().mean()
                g_weight = torch.tensor(loss_cfg.adversarial_weight, device=self.device)
                if loss_cfg.adaptive_weight:
                    g_weight = g_weight * adaptive_generator_weight(loss, g_loss, self.model.output_weight)
                loss = loss + g_weight * g_loss
                scalars.update({"gan/g": g_loss, "gan/g_weight": g_weight})
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        if self.ema is not None:
            self.ema.update()
        scalars.update({"train/loss": loss, "train/l1": l1, "train/grad_norm": grad_norm})
        return recon, codes, scalars

    def _discriminator_step(self, x: torch.Tensor, recon: torch.Tensor) -> dict[str, torch.Tensor]:
        """The PatchGAN's update: hinge loss on real clips against reconstructions (+ the LeCAM penalty)."""
        with self._autocast():
            real_logits = self.disc_ddp(x).float()
            fake_logits = self.disc_ddp(recon.detach()).float()
        d_loss = hinge_d_loss(real_logits, fake_logits)
        if self.cfg.loss.lecam_weight > 0:
            d_loss = d_loss + self.cfg.loss.lecam_weight * self.lecam.penalty(real_logits, fake_logits)
        self.disc_opt.zero_grad(set_to_none=True)
        d_loss.backward()
        self.disc_opt.step()
        return {"gan/d": d_loss}

    def step_ended(self, step: int) -> None:
        self._bar.update(1)
        if len(self.stream.skipped.keys() - self.skipped.keys()):
            self._write_skipped()

    def periodic(self, step: int) -> None:
        c = self.cfg.train
        if step % c.log_every == 0 or step == 1:
            self._log_step(step)
        if self.rank == 0 and step % c.image_every == 0:
            self._log_reconstructions()

    def _log_step(self, step: int) -> None:
        """The step's scalars to the metrics (TensorBoard, metrics.jsonl) and the progress bar."""
        x, recon, codes, scalars = self._latest
        scalars = {**scalars, "train/psnr": psnr(recon, x),
                   "train/codebook_used": codes.unique().numel() / self.model.codebook_size,
                   "train/lr": self.opt.param_groups[0]["lr"], "data/skipped_videos": len(self.skipped)}
        if self._train_unit == "shards":  # read as the token loader reads: retries and shards given up
            scalars.update({f"data/{k}": self.stream.report.counts[k] for k in ("failed_shards", "shard_retries")})
        scalars = {k: float(v.detach()) if torch.is_tensor(v) else float(v) for k, v in scalars.items()}
        self.metrics.scalars(step, scalars)
        self._bar.set_postfix(loss=f"{scalars['train/loss']:.4f}", psnr=f"{scalars['train/psnr']:.1f}")

    def wrap_up(self, finished: bool) -> None:
        self._bar.close()
        self.stream.close()
        if finished and self.rank == 0:
            self._report = self._finish()

    def _autocast(self) -> torch.autocast:
        """bf16 autocast of the networks' forward when train.precision=bf16 (CUDA only), else a no-op."""
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.cfg.train.precision == "bf16")

    # ---- checkpoints ------------------------------------------------------------------------------
    def save(self) -> CheckpointRef:
        return self.loop.save(self)

    def save_checkpoint(self) -> CheckpointRef:
        return self.checkpoints.save(self.step)  # every registered part (see _checkpoint_manager)

    def state_dict(self) -> dict:
        """The tokenizer's weights, its optimizer, the step and the run config (the checkpoint's ``state.pt``)."""
        return {"model": self.model.state_dict(), "opt": self.opt.state_dict(), "step": self.step,
                "config": self.cfg.to_dict()}

    def load_state_dict(self, state: dict) -> None:
        """Back to :meth:`state_dict`'s state; a checkpoint of another tokenizer is refused."""
        saved, current = state["config"]["model"], self.cfg.model
        if saved.get("init_from") != current.init_from:
            raise UsageError(f"the checkpoint was started from model.init_from={saved.get('init_from')}, this run "
                             f"from {current.init_from}: use another --out")
        if current.init_from is None and saved["preset"] != current.preset:
            raise UsageError(f"the checkpoint is a '{saved['preset']}' tokenizer, not --preset {current.preset}")
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["opt"])
        self.step = state["step"]

    # ---- results ----------------------------------------------------------------------------------
    def _finish(self) -> dict:
        self.model.eval()
        if self.ema is not None:  # the tokenizer saved and reported is the moving average
            with torch.no_grad():
                for name, param in self.model.named_parameters():
                    param.copy_(self.ema.average[name])
        folder = self.model.save(self.out / "tokenizer")
        report = held_out_report(self.model, self.val, self.device, rfvd=self.rfvd)
        report.update({"preset": self.cfg.model.preset, "init_from": self.cfg.model.init_from,
                       "version": self.model.version, "steps": self.step,
                       f"train_{self._train_unit}": len(self.train_videos),
                       "clip": dataclasses.asdict(self.cfg.data.clip)})
        write_text_atomic(self.out / "report.json", json.dumps(report, indent=1) + "\n")
        self._log_reconstructions()
        log.info("tokenizer saved to %s (version %s)", folder, self.model.version)
        return report

    def _log_reconstructions(self, n: int = 4) -> None:
        """Originals above reconstructions, a row of frames per clip, as one TensorBoard image."""
        was_training = self.model.training
        self.model.eval()
        with torch.no_grad():
            recon = to_uint8(self.model(to_float(torch.from_numpy(self.val[:n].copy()).to(self.device)))[0])
        self.model.train(was_training)
        grid = frame_grid(np.concatenate([np.asarray(self.val[:n]), recon.cpu().numpy()]))
        self.metrics.image("reconstructions", grid, self.step)


# (held-out uint8 clips, their uint8 reconstructions, device) -> the reconstruction FVD; the program supplies it
# (nbp-train-tokenizer: nbp_ds.eval.fvd with train.i3d), as the FVD code sits above the tokenizer
RFVD = Callable[[np.ndarray, np.ndarray, torch.device], float]


@torch.no_grad()
def held_out_report(model, clips: np.ndarray, device: torch.device, batch: int = 16, rfvd: RFVD | None = None) -> dict:
    """Mean PSNR (dB) and SSIM over held-out clips, the share of the codebook they use and, given ``rfvd``, the
    reconstruction FVD (held-out clips against their reconstructions)."""
    scores, similarity, codes, reconstructions = [], [], set(), []
    for i in range(0, len(clips), batch):
        x = to_float(torch.from_numpy(np.asarray(clips[i:i + batch]).copy()).to(device))
        recon, idx = model(x)
        scores += [psnr(recon[j], x[j]) for j in range(len(x))]
        similarity += [ssim(recon[j:j + 1], x[j:j + 1]) for j in range(len(x))]
        codes |= set(idx.unique().tolist())
        if rfvd is not None:
            reconstructions.append(to_uint8(recon).cpu().numpy())
    report = {"val_psnr": float(sum(scores) / len(scores)), "val_ssim": float(sum(similarity) / len(similarity)),
              "val_clips": len(scores), "val_codebook_used": len(codes) / model.codebook_size}
    if rfvd is not None:
        report["val_rfvd"] = rfvd(np.asarray(clips), np.concatenate(reconstructions), device)
    return report


def train_tokenizer(cfg: TokenizerTrainConfig, rfvd: RFVD | None = None) -> dict | None:
    """Run a whole tokenizer training job in this process; rank 0 returns the held-out report (with ``rfvd``,
    its reconstruction FVD too)."""
    seed_everything(cfg.train.seed)
    return TokenizerTrainer(cfg, rfvd).run()
