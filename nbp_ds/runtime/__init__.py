"""What every program that runs on a job shares: where this process sits (launch), its process group and
collectives (distributed), checkpoints that survive preemption (checkpoint), the metrics writer (metrics),
the learning-rate schedule (schedule), random streams (rng) and graceful-stop flags (stop).

Both trainers (nbp_ds.train, nbp_ds.tokenizer.trainer) run on it, and export, the sampler and the converters
find checkpoints through it; it imports none of them."""
