""""auto" in a DeepSpeed JSON: the Hugging Face convention for "the trainer fills this in".

A JSON may say ``"auto"`` for the keys the run config owns (the batch sizes, gradient accumulation, gradient
clipping, the optimizer's learning rate, betas and weight decay, bf16): :func:`drop_auto` removes those values so
that :func:`nbp_ds.train.ds_config.build_ds_config` fills them from the run config, exactly as it fills a key the
JSON leaves out. ``"auto"`` anywhere else (bucket sizes, a scheduler's parameters) has no run-config value behind
it here and is refused, naming the key.
"""

from __future__ import annotations

from typing import Any

from nbp_ds.errors import ConfigError

AUTO = "auto"

# dotted JSON paths whose "auto" the run config fills, and the run config's key that fills each
AUTO_KEYS = {
    "train_batch_size": "train.global_batch (micro-batch x accumulation x processes)",
    "train_micro_batch_size_per_gpu": "train.micro_batch",
    "gradient_accumulation_steps": "train.grad_accum",
    "gradient_clipping": "train.grad_clip",
    "optimizer.params.lr": "train.lr",
    "optimizer.params.betas": "train.betas",
    "optimizer.params.weight_decay": "train.weight_decay",
    "bf16.enabled": "train.precision",
    "bf16": "train.precision",
}


def drop_auto(ds: dict[str, Any], source: str) -> list[str]:
    """Remove every ``"auto"`` value of :data:`AUTO_KEYS` from ``ds`` (in place); the paths removed. An ``"auto"``
    elsewhere raises a ConfigError naming ``source`` and the key."""
    dropped = []
    for path in sorted(_auto_paths(ds, "")):
        if path.startswith("scheduler."):
            continue  # the whole scheduler section is refused (the run config's schedule runs), with that reason
        if path not in AUTO_KEYS:
            raise ConfigError(f"{source}: {path} is \"auto\", but the run config fills only "
                              f"{', '.join(k for k in AUTO_KEYS if k != 'bf16')}; give {path} a value")
        *parents, last = path.split(".")
        node = ds
        for part in parents:
            node = node[part]
        del node[last]
        dropped.append(path)
    return dropped


def _auto_paths(tree: dict[str, Any], prefix: str):
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from _auto_paths(value, f"{prefix}{key}.")
        elif isinstance(value, str) and value.lower() == AUTO:
            yield f"{prefix}{key}"
