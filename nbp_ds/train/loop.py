"""The training job: set-up (fail fast), the DeepSpeed engine, the step loop, validation, sample
logging, checkpoints and graceful stops."""

from __future__ import annotations

import json
import logging
import math
import os
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from nbp_ds.config import ConfigError, RunConfig
from nbp_ds.data import build_loader, expand_shards
from nbp_ds.model import build_model
from nbp_ds.train import launch
from nbp_ds.train.checkpoint import CheckpointManager, check_compatible, peek_client_config, read_latest
from nbp_ds.train.ds_config import build_ds_config, zero_stage
from nbp_ds.train.metrics import MetricsLogger, console_line, memory_gib, peak_tflops
from nbp_ds.train.schedule import lr_factor
from nbp_ds.train.stop import stop_request

log = logging.getLogger("nbp_ds.train")


def resolve_resume(cfg: RunConfig, resume: str | None, ckpt_dir: Path) -> tuple[Path, str] | None:
    """(checkpoint folder, tag) to resume from: --resume (a folder with 'latest', or a tag folder),
    else the run's own checkpoints, else None."""
    if resume:
        path = Path(resume)
        if (path / "latest").is_file():
            return path, read_latest(path)
        if (path / "checkpoints" / "latest").is_file():
            return path / "checkpoints", read_latest(path / "checkpoints")
        if path.is_dir() and any(path.glob("*model_states.pt")):
            return path.parent, path.name
        raise ConfigError(f"--resume {resume}: not a checkpoint folder (no 'latest' file and no model states)")
    tag = read_latest(ckpt_dir)
    return (ckpt_dir, tag) if tag else None


class Trainer:
    def __init__(self, cfg: RunConfig, resume: str | None = None):
        self.cfg = cfg
        tr = cfg.train
        self.env = launch.detect()
        launch.export_for_torch(self.env)
        self.rank, self.world = self.env.rank, self.env.world_size
        self.out_dir = Path(tr.out_dir)
        self.ckpt_dir = self.out_dir / "checkpoints"

        # everything that can be wrong is found before the first collective or the model build
        try:
            self.train_shards = expand_shards(cfg.data.train)
            self.val_shards = expand_shards(cfg.data.val) if cfg.data.val else None
        except FileNotFoundError as exc:
            raise ConfigError(f"data: {exc}") from exc
        self.ds_config = build_ds_config(cfg, self.world)
        self.resume_from = resolve_resume(cfg, resume, self.ckpt_dir)
        if self.resume_from:
            saved = peek_client_config(*self.resume_from)
            if saved is not None:
                check_compatible(saved, cfg, str(self.resume_from[0] / self.resume_from[1]))

        import deepspeed

        self.deepspeed = deepspeed
        self.device = (torch.device("cuda", self.env.local_rank) if torch.cuda.is_available()
                       else torch.device("cpu"))
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        deepspeed.init_distributed(dist_backend="nccl" if self.device.type == "cuda" else "gloo",
                                   auto_mpi_discovery=False)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.stop = stop_request()

        # identical initial weights on every rank, then a different dropout stream per rank
        self._seed(tr.seed)
        stage = zero_stage(self.ds_config)
        with deepspeed.zero.Init(config_dict_or_path=self.ds_config, enabled=stage == 3):
            model = build_model(cfg)
        if tr.activation_checkpointing:
            model.enable_activation_checkpointing()
        self._seed(tr.seed + 1 + self.rank)
        self.model = model
        total = tr.steps

        def schedule(optimizer):
            return torch.optim.lr_scheduler.LambdaLR(
                optimizer, lambda s: lr_factor(s, total, tr.warmup_steps, tr.min_lr_ratio))

        self.engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=self._param_groups(model),
                                                    config=self.ds_config, lr_scheduler=schedule)
        self.ckpt = CheckpointManager(self.ckpt_dir, tr.keep_last, self.rank)
        self.step, self.batches, self.bad_total = 0, 0, 0
        if self.resume_from:
            folder, tag = self.resume_from
            client = CheckpointManager(folder, tr.keep_last, self.rank).load(self.engine, tag, cfg)
            self.step, self.batches = client["step"], client["batches"]
            self.bad_total = client.get("bad_steps", 0)
            if client.get("world_size", self.world) != self.world:
                log.warning("resuming with %d processes instead of %d: the data stream restarts differently",
                            self.world, client["world_size"])
            self._log0("resumed from %s at step %d", folder / tag, self.step)
        self.metrics = MetricsLogger(self.out_dir, enabled=self.rank == 0)
        self.peak = peak_tflops(tr.peak_tflops, self.device)
        self._report_setup(stage)

    # ---- set-up helpers -----------------------------------------------------------------------
    @staticmethod
    def _seed(seed: int) -> None:
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)

    def _param_groups(self, model) -> list[dict]:
        """Weight decay on matrices (embedding, projections, head), not on norm gains."""
        decay, no_decay = [], []
        for p in model.parameters():
            (decay if len(getattr(p, "ds_shape", p.shape)) >= 2 else no_decay).append(p)
        return [{"params": decay, "weight_decay": self.cfg.train.weight_decay},
                {"params": no_decay, "weight_decay": 0.0}]

    def _log0(self, *args) -> None:
        if self.rank == 0:
            log.info(*args)

    def _report_setup(self, stage: int) -> None:
        model = self.model
        local = sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in model.parameters())
        total = model.num_params()
        info = {"rank": self.rank, "world_size": self.world, "zero_stage": stage, "params_total": total,
                "params_local": local, "launcher": self.env.launcher, "device": str(self.device),
                "host": launch.hostname()}
        gathered = [None] * self.world
        dist.all_gather_object(gathered, info)
        if self.rank == 0:
            (self.out_dir / "sharding.json").write_text(json.dumps(gathered, indent=1))
            self.metrics.text("config", "```\n" + json.dumps(self.cfg.to_dict(), indent=1) + "\n```")
            log.info("model %.2fM parameters, ZeRO-%d over %d processes (%s): rank 0 holds %.2fM",
                     total / 1e6, stage, self.world, self.env.launcher, local / 1e6)
            (self.out_dir / "config.json").write_text(json.dumps(self.cfg.to_dict(), indent=1))

    # ---- the loop -------------------------------------------------------------------------------
    def _to_device(self, batch: dict) -> dict:
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    def run(self) -> int:
        cfg, tr = self.cfg, self.cfg.train
        loader = build_loader(self.train_shards, grid=cfg.layout.grid, batch_size=tr.micro_batch, mode="train",
                              rank=self.rank, world_size=self.world, num_workers=cfg.data.num_workers,
                              seed=tr.seed, shuffle_buffer=cfg.data.shuffle_buffer, start_batch=self.batches)
        data = iter(loader)
        positions = self.model.layout.seq_len
        bad_in_row = 0
        # test hooks: poison the loss at these steps; slow each step down so a test can interrupt it
        nan_steps = {int(s) for s in os.environ.get("NBP_TEST_NAN_STEPS", "").split(",") if s}
        step_sleep = float(os.environ.get("NBP_TEST_STEP_SLEEP", "0"))
        self.engine.train()
        if self.rank == 0 and self.step < tr.steps:
            (self.out_dir / "finished").unlink(missing_ok=True)  # e.g. a finished run continued with more steps
        while self.step < tr.steps:
            began, waited = time.perf_counter(), 0.0
            sums = torch.zeros(4, dtype=torch.float64)  # loss, acc, micro-batches, stop flag
            for _ in range(tr.grad_accum):
                t0 = time.perf_counter()
                batch = self._to_device(next(data))
                waited += time.perf_counter() - t0
                self.batches += 1
                loss, metrics = self.engine(batch)
                if self.step + 1 in nan_steps:
                    loss = loss * float("nan")
                self.engine.backward(loss)
                self.engine.step()
                sums += torch.tensor([loss.item(), float(metrics["acc"]), 1.0, 0.0], dtype=torch.float64)
            self.step += 1
            if step_sleep:
                time.sleep(step_sleep)
            sums[3] = 1.0 if self.stop.signal is not None else 0.0
            dist.all_reduce(sums)
            loss_mean, acc_mean = (sums[0] / sums[2]).item(), (sums[1] / sums[2]).item()
            applied = getattr(self.engine, "_step_applied", True) and math.isfinite(loss_mean)
            if not applied:
                bad_in_row, self.bad_total = bad_in_row + 1, self.bad_total + 1
                log.warning("step %d: loss %s, the update was skipped (%d in a row, %d in all)",
                            self.step, loss_mean, bad_in_row, self.bad_total)
                if bad_in_row >= tr.max_bad_steps:
                    raise FloatingPointError(
                        f"{bad_in_row} steps in a row had a non-finite loss or gradient (up to step {self.step}); "
                        f"stopping. Lower train.lr, check the data, or resume from {self.ckpt_dir}")
            else:
                bad_in_row = 0
            step_time = time.perf_counter() - began
            if self.step == 1 or (tr.log_every and self.step % tr.log_every == 0):
                tokens = tr.micro_batch * tr.grad_accum * self.world * positions
                values = {"train/loss": loss_mean, "train/acc": acc_mean,
                          "lr": self.engine.get_lr()[0], "grad_norm": _float(self.engine.get_global_grad_norm()),
                          "tokens_per_s": tokens / step_time, "step_time": step_time, "data_wait": waited,
                          "data_wait_share": waited / step_time, "memory_gib": memory_gib(self.device),
                          "skipped_steps": self.bad_total}
                values["mfu"] = (self.model.flops_per_token() * tokens / step_time / (self.world * self.peak * 1e12)
                                 if self.peak else None)
                values.update({f"data/{k}": v for k, v in loader.stats().items()})
                self.metrics.scalars(self.step, values)
                self._log0(console_line(self.step, tr.steps, values))
            if self.val_shards and tr.eval_every and (self.step % tr.eval_every == 0 or self.step == tr.steps):
                self.evaluate()
            if tr.sample_every and self.step % tr.sample_every == 0:
                self.log_samples()
            if sums[3] > 0:
                self.save()
                self._log0("stopped by signal at step %d; a restart resumes from here", self.step)
                return 0
            if tr.save_every and self.step % tr.save_every == 0:
                self.save()
        if tr.save_every == 0 or self.step % tr.save_every != 0:
            self.save()  # flushes the metrics too; Trainer.close() closes them
        if self.rank == 0:  # the completion marker slurm/train.sbatch reads to decide whether to requeue
            (self.out_dir / "finished").write_text(json.dumps({"step": self.step}) + "\n")
        self._log0("finished %d steps; checkpoints in %s", self.step, self.ckpt_dir)
        return 0

    def close(self) -> None:
        """Leave the process group in step with the other ranks. Call after a run that returned normally
        (not after an exception: a rank that died would leave the barrier waiting). Without it a rank that
        exits first can tear down gloo's threads under its peer, which then aborts (SIGABRT) although
        the work is done."""
        self.metrics.close()
        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()

    def save(self) -> None:
        client = {"step": self.step, "batches": self.batches, "world_size": self.world,
                  "config": self.cfg.to_dict(), "bad_steps": self.bad_total}
        self.ckpt.save(self.engine, self.step, client)
        self.metrics.flush()

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean validation loss over the deterministic validation stream (all ranks in step)."""
        cfg = self.cfg
        self.engine.eval()
        loader = build_loader(self.val_shards, grid=cfg.layout.grid, batch_size=cfg.train.micro_batch, mode="val",
                              rank=self.rank, world_size=self.world, num_workers=min(cfg.data.num_workers, 1),
                              seed=cfg.train.seed)
        it, n = iter(loader), 0
        sums = torch.zeros(2, dtype=torch.float64)
        while cfg.data.val_batches == 0 or n < cfg.data.val_batches:
            batch = next(it, None)
            have = torch.tensor([0.0 if batch is None else 1.0])
            dist.all_reduce(have, op=dist.ReduceOp.MIN)  # ZeRO-3 forwards are collective: stop together
            if have.item() == 0:
                break
            loss, metrics = self.engine(self._to_device(batch))
            sums += torch.tensor([loss.item() * metrics["tokens"], metrics["tokens"]], dtype=torch.float64)
            n += 1
        dist.all_reduce(sums)
        self.engine.train()
        val = (sums[0] / sums[1]).item() if sums[1] > 0 else float("nan")
        self.metrics.scalars(self.step, {"val/loss": val, "val/batches": n})
        self._log0("step %d: val/loss %.4f over %d batches per rank", self.step, val, n)
        return val

    @torch.no_grad()
    def log_samples(self) -> None:
        """A few sampled videos as frame grids in TensorBoard (all ranks generate: ZeRO-3 gathers)."""
        from nbp_ds.generate import generate
        from nbp_ds.visualize import frame_grid

        tr, lay = self.cfg.train, self.model.layout
        if not tr.sample_tokenizer:
            log.warning("train.sample_every is set but train.sample_tokenizer is not: no samples logged")
            return
        n = min(lay.num_classes, 4) if lay.condition == "class" else 2
        label = torch.arange(n) if lay.condition == "class" else None
        if lay.condition == "frames":
            return  # needs real context frames: see tools/sample.py --context
        self.engine.eval()
        tokens, stats = generate(self.engine.module, n, label=label, temperature=1.0, seed=self.step)
        self.engine.train()
        if self.rank == 0:
            from nbp_ds.tokenizer import load_tokenizer

            if not hasattr(self, "_tokenizer"):
                self._tokenizer = load_tokenizer(tr.sample_tokenizer, device=self.device)
            videos = self._tokenizer.decode(tokens.to(self.device)).cpu().numpy()
            self.metrics.image("samples", frame_grid(videos), self.step)


def _float(value) -> float:
    return float(value) if value is not None else float("nan")
