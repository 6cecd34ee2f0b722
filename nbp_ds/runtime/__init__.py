"""What every program that runs on a job shares: where this process sits (launch), its process group and
collectives (distributed), checkpoints that survive preemption and the parts' protocol (checkpoint: Stateful,
CheckpointPart), the metrics writer (metrics), the learning-rate schedule (schedule), random streams (rng),
graceful-stop flags (stop), the step watchdog (watchdog), the moving average of the weights and its saved
state (ema), the hooks a caller acts through inside a training loop (hooks) and the trainer skeleton
(trainer_loop: the loop, the stop agreement, the save cadence, the finished marker, the teardown).

Both trainers (nbp_ds.train, nbp_ds.tokenizer.trainer) run on it, and export, the sampler and the converters
find checkpoints through it; it imports none of them."""
