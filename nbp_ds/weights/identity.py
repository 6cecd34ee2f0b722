"""What a run folder holds: one experiment, and weights whose meaning travels with them.

Two lists decide it, both over the run config's dotted keys:

- :data:`WEIGHT_KEYS`, the settings the weights were trained for (architecture, shapes, positions, the sequence
  layout and its token ids): read with another value, the same numbers mean something else or do not fit.
  Resuming, ``train.init_from``, nbp-export and nbp-sample all check these and never let them change, but for one
  case: ``train.init_from`` fine-tunes a rotary-position model on another number of latent frames
  (nbp_ds.train.init_weights: the weights do not depend on the clip length).
- :data:`FREE_KEYS`, the settings of *how* a run is carried out (logging, checkpoint cadence, attention kernel,
  loader workers, DeepSpeed tuning): they may differ between the starts of one experiment. Every other key (data
  sources, seed, LR schedule, batch, precision, optimizer, ...) is part of the experiment: a run folder whose
  recorded config differs in one of them holds another experiment, and starting there is refused before any work
  unless ``train.allow_changes`` names each changed key.
"""

from __future__ import annotations

import logging
from typing import Any

from nbp_ds.config import RunConfig, config_keys
from nbp_ds.errors import ConfigError

log = logging.getLogger(__name__)

# settings the weights were trained for: a run that changes one reads them with another meaning (or shape)
WEIGHT_KEYS = ("model.arch", "model.n_layer", "model.d_model", "model.n_head", "model.vocab_size", "model.ffn_dim",
               "model.rope_theta", "model.norm_eps",
               "layout.grid", "layout.block", "layout.hybrid", "layout.hybrid_blocks",
               "layout.condition", "layout.num_classes",
               "layout.context_frames", "layout.bov", "layout.class_prefixes", "layout.text_vocab_size",
               "layout.token_ids")

# how a run is carried out, not what it learns: free to differ between the starts of one experiment
FREE_KEYS = ("name", "train.out_dir", "train.allow_changes", "train.save_every", "train.keep_last",
             "train.eval_every", "train.log_every", "train.sample_every", "train.sample_tokenizer", "train.hooks",
             "train.peak_tflops", "train.wandb", "train.wandb_project", "train.max_bad_steps",
             "train.wandb_entity", "train.wandb_group", "train.wandb_tags", "train.profile", "train.profile_all_ranks",
             "train.activation_checkpointing",
             "train.collective_timeout_s", "train.stall_timeout_s", "train.stall_factor",  # failure detection
             "train.micro_batch", "train.grad_accum",  # how the global batch is made: train.global_batch is compared
             "model.attention", "model.compile", "model.flex_kernel_options", "model.loss_chunk",
             "data.num_workers", "data.val_batches", "data.retries", "data.retry_backoff",
             "deepspeed.set")  # DeepSpeed's tuning: what would change the experiment there is refused

# experiment keys a resume cannot honour, whatever train.allow_changes says: the checkpoint decides them
FIXED_ON_RESUME = {
    "train.seed": "the random streams (data order, class dropout) continue from the checkpoint's saved states",
    "train.init_from": "a resume continues from the checkpoint's weights; train.init_from only starts a run",
    "model.init_std": "a resume continues from the checkpoint's weights; the initialization only starts a run",
}

_MISSING = object()  # a key the recorded config does not have (written by an older version): not compared


def _get(config: dict[str, Any], key: str) -> Any:
    node: Any = config
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return _MISSING
        node = node[part]
    return node


def differences(recorded: dict[str, Any], current: dict[str, Any], keys) -> dict[str, tuple[Any, Any]]:
    """``{key: (recorded value, current value)}`` for each of ``keys`` whose values differ; a key the recorded
    config does not hold is not compared."""
    found = {}
    for key in keys:
        old, new = _get(recorded, key), _get(current, key)
        if old is not _MISSING and old != new:
            found[key] = (old, new)
    return found


def _describe(changed: dict[str, tuple[Any, Any]]) -> str:
    return "; ".join(f"{key}: {_short(old)} -> {_short(new)}" for key, (old, new) in changed.items())


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def check_weights_meaning(recorded: dict[str, Any], cfg: RunConfig, what: str, hint: str = "") -> None:
    """Refuse weights trained under ``recorded`` (a run config as a dict) for the run ``cfg`` when a setting of
    :data:`WEIGHT_KEYS` differs, naming each; ``what`` names the weights in the message, ``hint`` ends it."""
    changed = differences(recorded, cfg.to_dict(), WEIGHT_KEYS)
    if changed:
        raise ConfigError(f"{what} was trained for another model or sequence ({_describe(changed)}): these settings "
                          f"give the weights their meaning and cannot change{hint}")


def warn_unrecorded_weight_keys(recorded: dict[str, Any], what: str) -> list[str]:
    """The :data:`WEIGHT_KEYS` a stored config (an export's, a checkpoint's) does not record, written by a version
    before they existed: the model is built with their defaults, which a warning names. Returns them."""
    missing = [key for key in WEIGHT_KEYS if _get(recorded, key) is _MISSING]
    if missing:
        defaults = RunConfig().to_dict()
        log.warning("%s does not record %s: read with the defaults %s", what, ", ".join(missing),
                    ", ".join(f"{key}={_short(_get(defaults, key))}" for key in missing))
    return missing


def experiment_changes(recorded: dict[str, Any], cfg: RunConfig) -> dict[str, tuple[Any, Any]]:
    """The experiment keys (neither weight keys nor :data:`FREE_KEYS`) whose values differ from ``recorded``."""
    keys = [k for k in config_keys() if k not in FREE_KEYS and k not in WEIGHT_KEYS]
    return differences(recorded, cfg.to_dict(), keys)


def check_same_experiment(recorded: dict[str, Any], cfg: RunConfig, where: str,
                          resuming: bool = True) -> dict[str, tuple[Any, Any]]:
    """Starting ``cfg`` where the run recorded as ``recorded`` was (``resuming``: its checkpoint; else its run
    folder's config.json, a run stopped before its first checkpoint): refused when the weights' meaning differs,
    when a key of :data:`FIXED_ON_RESUME` differs on a resume, or when an experiment key differs that
    ``train.allow_changes`` does not name. Returns the allowed changes, each logged as a warning."""
    check_weights_meaning(recorded, cfg, where, hint=": start another run folder (train.out_dir)")
    changed = experiment_changes(recorded, cfg)
    fixed = {k: v for k, v in changed.items() if resuming and k in FIXED_ON_RESUME}
    refused = {k: v for k, v in changed.items() if k not in cfg.train.allow_changes and k not in fixed}
    if fixed or refused:
        reasons = [f"{_describe({k: v})} (cannot change on a resume: {FIXED_ON_RESUME[k]})" for k, v in fixed.items()]
        batch = refused.get("train.global_batch")
        keep_batch = (f" (to keep the batch on another number of processes: train.global_batch={batch[0]})"
                      if batch else "")
        allowable = ",".join(sorted(set(changed) - set(fixed)))
        allow = (f", or continue this one with the changes allowed: train.allow_changes=[{allowable}]"
                 if refused and not fixed else "")
        raise ConfigError(f"{where} holds another experiment: "
                          + "; ".join(reasons + ([_describe(refused) + keep_batch] if refused else []))
                          + f". Use another train.out_dir for a new experiment{allow}")
    for key, (old, new) in changed.items():
        log.warning("%s changes from %s to %s (allowed by train.allow_changes): it takes effect from here", key,
                    _short(old), _short(new))
    return changed
