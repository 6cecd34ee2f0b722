"""The training job: a :class:`Trainer` wires the parts (launch, engine, data, checkpoints, metrics) and
supplies its step, its logging, validation and samples to the skeleton every trainer runs
(nbp_ds.runtime.trainer_loop: the stop agreement, the save cadence, the finished marker, the watchdog)."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
from pathlib import Path

import numpy as np
import torch

from nbp_ds.config import RunConfig, TrainConfig
from nbp_ds.data import DataReport, TokenLoader, build_loader, expand_shards, parse_sources, to_device
from nbp_ds.data.packer import PackSpec, padding_fraction
from nbp_ds.data.report import summarize
from nbp_ds.errors import ConfigError
from nbp_ds.files import write_text_atomic
from nbp_ds.model.sequence_parallel import data_parallel_share
from nbp_ds.packing import Clip, is_packed, pack_rows
from nbp_ds.runtime import distributed, launch
from nbp_ds.runtime.checkpoint import (
    CheckpointManager,
    CheckpointRef,
    find_checkpoint,
    peek_client_state,
    saved_world_size,
    universal_checkpoint,
    with_universal_load,
)
from nbp_ds.runtime.ema import EmaState, WeightsEMA
from nbp_ds.runtime.hooks import TrainerHooks, load_hooks
from nbp_ds.runtime.metrics import MetricsLogger, StepMeter, console_line, peak_tflops, wandb_settings
from nbp_ds.runtime.profiling import StepWindow, oom_snapshot
from nbp_ds.runtime.schedule import lr_factor
from nbp_ds.runtime.stop import stop_request
from nbp_ds.runtime.summary import RunTally, run_summary, summary_table, write_summary
from nbp_ds.runtime.trainer_loop import TrainerLoop, due
from nbp_ds.runtime.watchdog import StepWatchdog
from nbp_ds.train.batch import describe as describe_batch
from nbp_ds.train.batch import plan_batch, recorded_global_batch
from nbp_ds.train.ds_config import build_ds_config, zero_stage
from nbp_ds.train.engine import build_engine
from nbp_ds.train.evaluate import evaluate
from nbp_ds.train.saved_state import EngineState, LoaderPosition
from nbp_ds.train.state import TrainState
from nbp_ds.weights.identity import check_same_experiment

log = logging.getLogger(__name__)


class Trainer:
    """One training run of ``cfg`` in this process (one rank of the job). ``resume`` names a checkpoint to
    continue (default: the run folder's latest); ``universal`` loads it through DeepSpeed's universal format
    (None: when it was saved by another number of processes)."""

    def __init__(self, cfg: RunConfig, resume: str | None = None, hooks: TrainerHooks | None = None,
                 universal: bool | None = None):
        self.hooks = hooks or load_hooks(cfg.train.hooks)
        self.env = launch.detect()
        self.rank, self.world = self.env.rank, self.env.world_size
        # the ranks of a sequence-parallel group read the same batches: the data-parallel rank and world
        self.data_rank, self.data_world = data_parallel_share(self.rank, self.world, cfg.train.sequence_parallel)
        # the batch as it runs here, worked out once: train.grad_accum and train.global_batch fixed for this number
        # of data-parallel processes, before the DeepSpeed config is written from it
        self.batch = plan_batch(cfg.train, self.data_world, cfg.data.pack_tokens)
        cfg = self.cfg = dataclasses.replace(cfg, train=self.batch.applied_to(cfg.train))
        self.out_dir = Path(cfg.train.out_dir)

        # everything that can be wrong is found before the model build, and most of it before the first collective
        try:
            self.train_sources = parse_sources(cfg.data.train)
            self.val_shards = expand_shards(cfg.data.val) if cfg.data.val else None
        except FileNotFoundError as exc:
            raise ConfigError(f"data: {exc}") from exc
        self.ds_config = build_ds_config(cfg, self.data_world, self.batch)
        if cfg.train.wandb and importlib.util.find_spec("wandb") is None:
            raise ConfigError("train.wandb=true needs the wandb package: pip install 'nbp_ds[wandb]' (or wandb), "
                              "or set train.wandb=false")
        self.checkpoints = CheckpointManager(self.out_dir / "checkpoints", cfg.train.keep_last, self.rank)
        named = find_checkpoint(resume) if resume else None

        self.device = distributed.process_device(self.env)
        distributed.init_process_group(self.env, self.device, timeout_s=cfg.train.collective_timeout_s)
        # checked against its manifest, every rank hashing a share of the files (hence after joining the group)
        self.resume_from = self.checkpoints.require_intact(named) if named else self.checkpoints.latest_intact()
        self.saved_world = None
        if self.resume_from:
            client = peek_client_state(self.resume_from)  # read once: with ZeRO-2 it holds the whole model
            self.saved_world = saved_world_size(self.resume_from, client)
            if client is not None and client.get("config") is not None:
                check_same_experiment(recorded_global_batch(client["config"], self.saved_world), cfg,
                                      f"checkpoint {self.resume_from.path}")
        elif (self.out_dir / "config.json").is_file():  # a run started here, stopped before its first checkpoint
            check_same_experiment(json.loads((self.out_dir / "config.json").read_text()), cfg,
                                  f"run folder {self.out_dir}", resuming=False)
        if universal is None:  # ZeRO's optimizer partitions fit only the world size that saved them
            universal = self.saved_world not in (None, self.world) and zero_stage(self.ds_config) > 0
        self.universal = bool(universal and self.resume_from)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.stop = stop_request()
        if self.universal:
            self.load_from = universal_checkpoint(self.resume_from, self.rank)
            self.ds_config = with_universal_load(self.ds_config)
        # seeded per data-parallel rank: the ranks of a sequence-parallel group drop the same labels (class dropout)
        self.engine, self.model = build_engine(cfg, self.ds_config, self.device, self.data_rank,
                                               init_from=None if self.resume_from else cfg.train.init_from)
        self.layout = self.model.layout
        # packed runs: clips of any grid in rows of data.pack_tokens positions (train.micro_batch counts rows)
        self.pack = PackSpec(self.layout, cfg.data.pack_tokens) if cfg.data.pack_tokens else None
        # sequence positions a sample (one grid) or a row (packed) holds: the step's tokens for tokens/s
        self.positions_per_sample = cfg.data.pack_tokens or self.layout.seq_len
        self.ema = WeightsEMA(self.model, cfg.train.ema, self.rank, self.world) if cfg.train.ema > 0 else None
        self.state = TrainState(world_size=self.world)
        self.loader = self._train_loader()
        self.step_lr = float("nan")  # the learning rate the latest step applied (logged as train/lr)
        self.val_report = DataReport()  # what validation met, for the end-of-run summary
        self.tally = RunTally()  # samples, tokens, time, validation losses over every start (summary.json)
        self._register_saved_state()
        if self.resume_from:
            self._load(self.resume_from)
        self.metrics = MetricsLogger(self.out_dir, enabled=self.rank == 0,
                                     wandb=wandb_settings(cfg.train) if cfg.train.wandb else None,
                                     config=cfg.to_dict())
        self.profile_window = StepWindow(cfg.train.profile, self.out_dir / "profile", self.device, self.rank,
                                         enabled=self.rank == 0 or cfg.train.profile_all_ranks)
        self.peak = peak_tflops(cfg.train.peak_tflops, self.device)
        self.watchdog = StepWatchdog(cfg.train.stall_timeout_s, cfg.train.stall_factor, self.rank)
        self.loop = TrainerLoop(self.out_dir, self.rank, cfg.train.steps, cfg.train.save_every, self.metrics,
                                self.stop, self.watchdog, between_steps_s=cfg.train.collective_timeout_s)
        self._report_setup()

    # ---- the loop: the shared skeleton (nbp_ds.runtime.trainer_loop) runs these parts ---------------
    def run(self) -> int:
        """Train to ``train.steps``; 0 when finished or stopped by a signal at a checkpoint. A stalled step ends
        the process (the watchdog); an error is logged with the last step finished."""
        self._batches = iter(self.loader)
        tokens_per_step = self.batch.samples * self.positions_per_sample  # packed: the meter counts the real ones
        self._meter = StepMeter(self.device, tokens_per_step, self.model.flops_per_token(), self.peak)
        self._bad_in_row = 0
        self.engine.train()
        self.tally.start_clock()
        try:
            with oom_snapshot(self.out_dir / "profile", self.device, self.rank, self.cfg.train.profile is not None):
                self.loop.run(self)
        finally:
            self.profile_window.close()
        return 0

    @property
    def step(self) -> int:
        return self.state.step

    def train_step(self) -> None:
        self.profile_window.before_step(self.state.step + 1)
        self._train_step(self._batches, self._meter)
        self.state.step += 1
        if self.pack is None:  # a packed run's clips and real tokens come from its loaders (_report_data)
            self.tally.add_step(self.batch.samples, self.positions_per_sample)

    def step_ended(self, step: int) -> None:
        with self.loop.between_steps():  # writing a trace is no part of a step's time
            self.profile_window.after_step(step)
        self._bad_in_row = self._bad_in_row + 1 if not self.engine.was_step_applied() else 0
        if self._bad_in_row:
            self._skipped_step(self._bad_in_row)
        with self.loop.between_steps():  # a hook's work is no part of a step's time
            self.hooks.on_step_end(step)

    def periodic(self, step: int) -> None:
        tr = self.cfg.train
        if step == 1 or due(step, tr.log_every):
            self._log(self._meter)
        if self.val_shards and (due(step, tr.eval_every) or step == tr.steps and tr.eval_every):
            with self.loop.between_steps():
                self.validate()
        if due(step, tr.sample_every):
            with self.loop.between_steps():
                self.hooks.on_samples_due(self, step)

    def wrap_up(self, finished: bool) -> None:
        self._report_summary("finished" if finished else "stopped", self._report_data())
        # the train loader's workers end here, with their queues' named semaphores: a rank of a multi-process job
        # ends with os._exit (nbp_ds.runtime.distributed), which skips that clean-up, and the resource tracker
        # would warn of every semaphore left behind
        self._batches.close()

    def _train_step(self, batches, meter: StepMeter) -> None:
        """One optimizer step over train.grad_accum micro-batches; nothing here waits for the device."""
        # the rate this step applies, for the log: the scheduler has moved on to the next step's once it is done
        self.step_lr = self.engine.get_lr()[0]
        for _ in range(self.cfg.train.grad_accum):
            with meter.timing_data():
                batch = next(batches)
                if self.layout.condition == "class" and not is_packed(batch):
                    self.layout.check_labels(batch["label"])  # on the host, before the copy (packing checked them)
                # a packed batch's positions that are no padding, counted on the host (tokens/s counts these)
                real = int(batch["clip_positions"]) if is_packed(batch) else None
                batch = to_device(batch, self.device)
            self.state.batches += 1
            loss, metrics = self.engine(batch)
            loss = self.hooks.on_loss(self.state.step + 1, loss)
            self.engine.backward(loss)
            self.engine.step()
            meter.add_micro_batch(loss, metrics["acc"], real)
        if self.ema is not None:
            self.ema.update()
        meter.end_step()

    def _skipped_step(self, in_row: int) -> None:
        self.state.bad_steps += 1
        log.warning("step %d: the update was skipped (%d in a row, %d in all): the loss or a gradient was not finite",
                    self.state.step, in_row, self.state.bad_steps)
        if in_row >= self.cfg.train.max_bad_steps:
            raise FloatingPointError(
                f"{in_row} steps in a row had a non-finite loss or gradient (up to step {self.state.step}); "
                f"stopping. Lower train.lr, check the data, or resume from {self.checkpoints.folder}")

    def _log(self, meter: StepMeter) -> None:
        values = meter.flush()
        values.update({"train/lr": self.step_lr, "train/skipped_steps": self.state.bad_steps,
                       "train/grad_norm": _float(self.engine.get_global_grad_norm())})
        stats = self.loader.stats()
        reduced = dict(zip(stats, distributed.all_reduce(list(stats.values())).tolist(), strict=True))
        values.update({f"data/{k}": v for k, v in reduced.items()})
        if self.pack is not None:
            values["data/padding_fraction"] = padding_fraction(reduced)
        self.metrics.scalars(self.state.step, values)
        self._log0(console_line(self.state.step, self.cfg.train.steps, values))

    # ---- validation, samples, checkpoints ---------------------------------------------------------
    def validate(self) -> float:
        """Mean validation loss over every validation sample once (all ranks in step)."""
        cfg = self.cfg
        loader = build_loader(self.val_shards, grid=cfg.layout.grid, batch_size=cfg.train.micro_batch, mode="val",
                              rank=self.data_rank, world_size=self.data_world,
                              num_workers=min(cfg.data.num_workers, 1),
                              seed=cfg.train.seed, retries=cfg.data.retries, retry_backoff=cfg.data.retry_backoff,
                              pack=self.pack)
        placeholder = {"tokens": torch.zeros(1, *cfg.layout.grid, dtype=torch.long),
                       "label": torch.zeros(1, dtype=torch.long)}
        if self.pack is not None:  # one clip of the run's grid (validation checked that it fits a row)
            placeholder = pack_rows(self.layout, [[Clip(np.zeros(cfg.layout.grid, np.int64), 0)]], self.pack.tokens)
        self.engine.eval()
        loss, batches = evaluate(self.engine, loader, placeholder, self.device, cfg.data.val_batches)
        self.engine.train()
        self.val_report.add(dict(loader.report.counts), loader.problems)
        failed = distributed.all_reduce([loader.report.counts.get("failed_shards", 0)]).tolist()[0]
        self.tally.add_validation(self.state.step, loss, failed_shards=int(failed))
        self.metrics.scalars(self.state.step, {"val/loss": loss, "val/batches": batches})
        self._log0("step %d: val/loss %.4f (%d batches on rank 0)", self.state.step, loss, batches)
        return loss

    def save(self) -> CheckpointRef:
        """A checkpoint of every part registered in :meth:`_register_saved_state` (nbp_ds.train.saved_state)."""
        return self.loop.save(self)

    def save_checkpoint(self) -> CheckpointRef:
        return self.checkpoints.save(self.state.step,
                                     written=lambda ref: self.hooks.on_checkpoint_written(ref.tag, self.rank))

    def _register_saved_state(self) -> None:
        """The trainer's stateful parts, registered once: every save writes them and a resume reads them back,
        in this order (then the RNG streams, which the checkpoint manager keeps itself)."""
        universal = self.universal

        def source(ref: CheckpointRef) -> CheckpointRef:
            return self.load_from if universal else ref

        def after_load() -> None:
            set_optimizer_hyperparameters(self.engine, self.cfg.train)

        self.checkpoints.register("engine", EngineState(
            self.engine, {"train_state": self.state, "run_tally": self.tally}, self.cfg.to_dict(), source=source,
            after_load=after_load,
            before_write=lambda path: self.hooks.on_checkpoint_file(path, self.rank)))
        if self.ema is not None:
            self.checkpoints.register("ema", EmaState(self.ema))
        # a checkpoint from before loaders had a state: read the stream again up to its batch (same layout only)
        self.checkpoints.register("data", LoaderPosition(
            self.loader, self.rank, lambda: self.state.batches if self.saved_world == self.world else None))

    def _load(self, ref: CheckpointRef) -> None:
        """Every registered part as it was at ``ref`` (through its universal copy when the world size changed)."""
        self.checkpoints.load(ref)
        self.state.world_size = self.world
        self.tally.restarts += 1
        how = (f" through its universal copy (saved by {self.saved_world} processes, now {self.world})"
               if self.universal else "")
        self._log0("resumed from %s at step %d%s; LR now %.3g", ref.path, self.state.step, how,
                   self.engine.get_lr()[0])

    # ---- set-up and tear-down ---------------------------------------------------------------------
    def _train_loader(self) -> TokenLoader:
        """The training stream from its start; a resume puts it where the checkpoint left it (LoaderPosition)."""
        cfg, tr = self.cfg, self.cfg.train
        return build_loader(self.train_sources, grid=cfg.layout.grid, batch_size=tr.micro_batch, mode="train",
                            rank=self.data_rank, world_size=self.data_world, num_workers=cfg.data.num_workers,
                            seed=tr.seed,
                            shuffle_buffer=cfg.data.shuffle_buffer, retries=cfg.data.retries,
                            retry_backoff=cfg.data.retry_backoff, pack=self.pack)

    def _report_data(self) -> int:
        """The data problems of every rank (training and validation), summed and named in rank 0's log; the
        number of training shards given up, summed over ranks (the loaders' counts are restored on a resume)."""
        mine = [(self.loader.stats(), self.loader.problems)]
        mine.append((dict(self.val_report.counts), [f"validation {p}" for p in self.val_report.problems]))
        gathered = distributed.all_gather_object(mine)
        if self.pack is not None:  # clips, and positions that are no padding, over every rank and every start
            stats = [rank[0][0] for rank in gathered]
            self.tally.samples = sum(int(s.get("samples", 0)) for s in stats)
            self.tally.tokens = sum(int(s.get("pack_positions", 0)) - int(s.get("pack_padding", 0)) for s in stats)
        if self.rank == 0 and (summary := summarize([item for rank in gathered for item in rank])):
            log.warning(summary)
        return sum(int(rank[0][0].get("failed_shards", 0)) for rank in gathered)

    def _report_summary(self, status: str, failed_shards: int) -> None:
        """summary.json in the run folder and its table in the log (rank 0; nbp_ds.runtime.summary)."""
        if self.rank != 0:
            return
        summary = run_summary(self.tally, status=status, steps=self.state.step, skipped_steps=self.state.bad_steps,
                              failed_shards=failed_shards + self.tally.val_failed_shards,
                              flops_per_token=self.model.flops_per_token(), devices=self.world,
                              peak_tflops=self.peak)
        write_summary(self.out_dir, summary)
        log.info("%s", summary_table(summary))

    def _report_setup(self) -> None:
        model = self.model
        local = sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in model.parameters())
        total = model.num_params()
        info = {"rank": self.rank, "world_size": self.world, "zero_stage": zero_stage(self.ds_config),
                "params_total": total, "params_local": local, "launcher": self.env.launcher,
                "device": str(self.device), "host": launch.hostname()}
        gathered = distributed.all_gather_object(info)
        if self.rank == 0:
            write_text_atomic(self.out_dir / "sharding.json", json.dumps(gathered, indent=1))
            write_text_atomic(self.out_dir / "config.json", json.dumps(self.cfg.to_dict(), indent=1))
            self.metrics.text("config", "```\n" + json.dumps(self.cfg.to_dict(), indent=1) + "\n```")
            log.info("model %.2fM parameters, ZeRO-%d over %d processes (%s): rank 0 holds %.2fM",
                     total / 1e6, info["zero_stage"], self.world, self.env.launcher, local / 1e6)
            log.info("%s", describe_batch(self.cfg.train, self.data_world))
            if self.cfg.train.sequence_parallel > 1:
                log.info("context parallelism (DeepSpeed-Ulysses): %d sequence-parallel groups of %d processes, each "
                         "process holding 1/%d of every sequence", self.data_world, self.cfg.train.sequence_parallel,
                         self.cfg.train.sequence_parallel)

    def _log0(self, *args) -> None:
        if self.rank == 0:
            log.info(*args)

    def close(self) -> None:
        """Leave the process group in step with the other ranks. Call after a run that returned normally
        (not after an exception: a rank that died would leave the others waiting)."""
        self.loop.close()


def set_optimizer_hyperparameters(engine, tr: TrainConfig) -> None:
    """After a checkpoint load, the run config's optimizer settings in every parameter group: the loaded state
    holds the saved run's (its peak LR, betas, weight decay), and a change train.allow_changes let through must
    be what runs. The LR is the schedule's value at the loaded step for the current train.lr. (This also undoes
    what a universal load does under ZeRO-3: it gives every group the first group's hyper-parameters, so norm
    gains, group 1 of nbp_ds.train.engine.param_groups, would be decayed.)"""
    scheduler = engine.lr_scheduler
    factor = lr_factor(scheduler.last_epoch, tr.steps, tr.warmup_steps, tr.min_lr_ratio)
    groups = scheduler.optimizer.param_groups
    decays = (tr.weight_decay, 0.0) if len(groups) == 2 else (tr.weight_decay,) * len(groups)
    for group, decay in zip(groups, decays, strict=True):
        group.update(initial_lr=tr.lr, lr=tr.lr * factor, betas=tuple(tr.betas), weight_decay=decay)
    scheduler.base_lrs = [tr.lr] * len(groups)
    scheduler._last_lr = [group["lr"] for group in groups]  # what get_last_lr() reports until the next step


def train(cfg: RunConfig, resume: str | None = None, hooks: TrainerHooks | None = None,
          universal: bool | None = None) -> int:
    """Run a whole training job in this process (one rank); the exit status."""
    trainer = Trainer(cfg, resume=resume, hooks=hooks, universal=universal)
    status = trainer.run()
    trainer.close()  # only after a normal return: a failed rank would leave the others in the barrier
    return status


def _float(value) -> float:
    return float(value) if value is not None else float("nan")
