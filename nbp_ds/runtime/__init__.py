"""What every program that runs on a job shares: where this process sits (launch), its process group and
collectives (distributed), checkpoints that survive preemption (checkpoint), the metrics writer (metrics),
the learning-rate schedule (schedule), random streams (rng) and graceful-stop flags (stop).

The transformer trainer (nbp_ds.train), the tokenizer trainer, the sampler and the converters use it; it
imports none of them."""
