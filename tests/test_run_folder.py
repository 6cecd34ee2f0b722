"""One experiment per run folder (nbp_ds.weights.identity): a start whose train.out_dir holds another experiment
is refused before the model is built, naming what differs, unless train.allow_changes lets the change through,
which then takes effect (a changed LR is the LR the optimizer runs with). The settings that give weights their
meaning never change: one list for resume, train.init_from, export and sampling. Real DeepSpeed (ZeRO-3, gloo, one
process)."""

from __future__ import annotations

import json
import math
import sys

import pytest
from train_helpers import make_shards, run

from nbp_ds.config import load_config
from nbp_ds.errors import ConfigError
from nbp_ds.weights.identity import check_same_experiment, check_weights_meaning

STEPS = ["train.steps=4", "train.warmup_steps=2", "train.save_every=2", "train.eval_every=0", "train.log_every=1",
         "data.num_workers=0"]


@pytest.fixture(scope="module")
def started(tmp_path_factory):
    """A run folder trained to step 2 of 4 on shards A (seed 0, LR 1e-3), and a second shard set B."""
    root = tmp_path_factory.mktemp("runfolder")
    a, b = make_shards(root / "a", train=64, val=0)[0], make_shards(root / "b", train=64, val=0, seed=1)[0]
    out = root / "run"
    result = run([sys.executable, "-m", "nbp_ds.train", "--config", "tiny", f"data.train={a}",
                  f"train.out_dir={out}", *STEPS, "train.steps=2"])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return out, a, b


def overrides(out, shards, *extra: str) -> list[str]:
    return [f"data.train={shards}", f"train.out_dir={out}", *STEPS, *extra]


@pytest.mark.parametrize("change, named, how", [
    ("data=b", "data.train", "train.allow_changes=[data.train]"),
    ("train.lr=5e-3", "train.lr: 0.001 -> 0.005", "train.allow_changes=[train.lr]"),
    ("train.warmup_steps=3", "train.warmup_steps: 2 -> 3", "train.allow_changes=[train.warmup_steps]"),
    # the seed: a resume continues the saved random streams, so even allowed it could not take effect
    ("train.seed=7", "train.seed: 0 -> 7 (cannot change on a resume: the random streams", "another train.out_dir"),
    ("train.seed=7 train.allow_changes=[train.seed]", "train.seed: 0 -> 7 (cannot change on a resume",
     "another train.out_dir"),
])
def test_another_experiment_in_the_folder_is_refused_before_any_work(started, change, named, how, monkeypatch):
    from nbp_ds.runtime import distributed
    from nbp_ds.train import loop

    def build_engine(*args, **kwargs):
        raise AssertionError("the engine was built before the refusal")

    # the checkpoint is verified first (its manifest, hashed over the ranks' process group): it is the one resumed;
    # the refusal then comes before DeepSpeed and the model
    monkeypatch.setattr(loop, "build_engine", build_engine)
    out, a, b = started
    extra = [] if change == "data=b" else change.split()
    cfg = load_config("tiny", overrides(out, b if change == "data=b" else a, "train.steps=2", *extra))
    before = sorted((p.name, p.stat().st_mtime_ns) for p in out.rglob("*"))
    try:
        with pytest.raises(ConfigError, match="holds another experiment") as info:
            loop.Trainer(cfg)
    finally:
        distributed.leave_process_group()
    assert named in str(info.value)
    assert how in str(info.value)  # says how to go on
    assert sorted((p.name, p.stat().st_mtime_ns) for p in out.rglob("*")) == before  # nothing written


def test_a_weights_setting_is_refused_even_when_allowed(started):
    from nbp_ds.runtime import distributed
    from nbp_ds.train.loop import Trainer

    out, a, _ = started
    cfg = load_config("tiny", overrides(out, a, "model.arch=gpt2", "train.allow_changes=[model.arch]"))
    try:
        with pytest.raises(ConfigError, match=r"model.arch: 'llama' -> 'gpt2'.*cannot change"):
            Trainer(cfg)
    finally:
        distributed.leave_process_group()


LR_SCRIPT = """
import json, sys
from nbp_ds.config import load_config
from nbp_ds.train.loop import Trainer
trainer = Trainer(load_config("tiny", sys.argv[1:]))
lrs = [g["lr"] for g in trainer.engine.optimizer.param_groups]
trainer.run()
lrs_end = [g["lr"] for g in trainer.engine.optimizer.param_groups]
prefetch = trainer.engine.zero_prefetch_bucket_size()
trainer.close()
print("LRS " + json.dumps({"after_load": lrs, "after_run": lrs_end, "prefetch": prefetch}))
"""


def test_an_allowed_lr_change_is_the_lr_that_runs(started, tmp_path):
    out, a, _ = started
    script = tmp_path / "lr.py"
    script.write_text(LR_SCRIPT)
    result = run([sys.executable, str(script),
                  *overrides(out, a, "train.lr=5e-3", "train.steps=6", "train.allow_changes=[train.lr,train.steps]",
                             # DeepSpeed tuning from the command line, free to change in a run folder
                             "deepspeed.set.zero_optimization.stage3_prefetch_bucket_size=2e6")])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "train.lr changes from 0.001 to 0.005 (allowed by train.allow_changes)" in result.stderr
    lrs = json.loads(result.stdout.split("LRS ", 1)[1])
    assert lrs["prefetch"] == 2_000_000  # the engine runs with the JSON key set on the command line (zero3.json: 5e7)

    def expected(step: int) -> float:  # warmup 2 steps, then cosine over 6 - 2 to 10% of 5e-3 (by hand)
        return 5e-3 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - 2) / 4)))

    # resumed at step 2: the next update uses the new schedule's LR for step index 2, in both parameter groups
    assert lrs["after_load"] == pytest.approx([expected(2)] * 2)
    assert lrs["after_run"] == pytest.approx([expected(6)] * 2)
    logged = {}
    for line in (out / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if "train/lr" in row:
            logged[row["step"]] = row["train/lr"]
    # the logged train/lr of step s is the rate that step applied: step index s - 1
    assert [logged[s] for s in (3, 4, 5, 6)] == pytest.approx([expected(s - 1) for s in (3, 4, 5, 6)])
    # what the folder now records is the new experiment: the same start again needs no allow-list
    assert json.loads((out / "config.json").read_text())["train"]["lr"] == 5e-3


def test_the_weights_settings_are_one_list_for_every_reader():
    cfg = load_config("tiny")
    recorded = cfg.to_dict()
    check_weights_meaning(recorded, cfg, "ckpt")  # identical: fine
    for key, value in (("layout.token_ids", "official"), ("model.arch", "gpt2"), ("layout.bov", False),
                       ("layout.class_prefixes", [[1], [2], [3], [4]]), ("model.d_model", 128)):
        changed = json.loads(json.dumps(recorded))
        section, name = key.split(".")
        changed[section][name] = value
        with pytest.raises(ConfigError, match=f"{key}: .* -> "):
            check_weights_meaning(changed, cfg, "ckpt")
        with pytest.raises(ConfigError, match=key):  # resume: never allowed
            check_same_experiment(changed, load_config("tiny", [f"train.allow_changes=[{key}]"]), "ckpt")
    older = json.loads(json.dumps(recorded))
    del older["layout"]["token_ids"]  # a file from before the key existed: not compared
    check_weights_meaning(older, cfg, "ckpt")


def test_free_settings_change_silently_and_the_allow_list_names_real_keys():
    cfg = load_config("tiny", ["train.log_every=5", "data.num_workers=3", "train.out_dir=elsewhere"])
    assert check_same_experiment(load_config("tiny").to_dict(), cfg, "ckpt") == {}
    with pytest.raises(ConfigError, match="train.allow_changes names 'train.learning_rate', not a config key"):
        load_config("tiny", ["train.allow_changes=[train.learning_rate]"])


def test_an_export_from_before_a_weights_setting_existed_is_read_with_its_default_named(tmp_path, caplog):
    from safetensors.torch import save_file

    from nbp_ds.model import build_model
    from nbp_ds.weights.export import load_exported

    cfg = load_config("tiny")
    recorded = cfg.to_dict()
    del recorded["layout"]["token_ids"]
    weights = tmp_path / "old.safetensors"
    save_file({k: v.contiguous() for k, v in build_model(cfg).state_dict().items()}, str(weights),
              metadata={"nbp_ds_config": json.dumps(recorded)})
    with caplog.at_level("WARNING"):
        _, loaded = load_exported(weights)
    assert f"{weights} does not record layout.token_ids: read with the defaults layout.token_ids='nbp_ds'" \
        in caplog.text
    assert loaded.layout.token_ids == "nbp_ds"


def test_a_resume_on_another_number_of_processes_must_keep_the_global_batch():
    import dataclasses

    from nbp_ds.train.batch import recorded_global_batch, resolve_global_batch

    def on(world: int, *overrides: str):
        cfg = load_config("tiny", list(overrides))
        return dataclasses.replace(cfg, train=resolve_global_batch(cfg.train, world))

    saved = on(2).to_dict()  # micro-batch 4 on 2 processes: 8 samples a step
    assert saved["train"]["global_batch"] == 8
    with pytest.raises(ConfigError, match=r"train.global_batch: 8 -> 4 \(to keep the batch on another number of "
                                          r"processes: train.global_batch=8\)"):
        check_same_experiment(saved, on(1), "ckpt")
    assert check_same_experiment(saved, on(1, "train.global_batch=8"), "ckpt") == {}  # accumulates 2 instead
    older = json.loads(json.dumps(saved))
    del older["train"]["global_batch"]  # a checkpoint from before the key: its batch from the processes that saved it
    with pytest.raises(ConfigError, match="train.global_batch: 8 -> 4"):
        check_same_experiment(recorded_global_batch(older, world=2), on(1), "ckpt")


@pytest.mark.parametrize("key, value", [("train.seed", "7"), ("train.init_from", "other.safetensors"),
                                        ("model.init_std", "0.05")])
def test_the_seed_and_the_initialization_cannot_change_on_a_resume_even_when_allowed(key, value):
    """README: train.seed, train.init_from and model.init_std cannot change on a resume even when allowed (the
    random streams and the weights continue from the checkpoint); other allowed keys go through."""
    recorded = load_config("tiny").to_dict()
    cfg = load_config("tiny", [f"{key}={value}", f"train.allow_changes=[{key}]"])
    with pytest.raises(ConfigError, match=rf"{key}: .* -> .*\(cannot change on a resume"):
        check_same_experiment(recorded, cfg, "ckpt")
    allowed = load_config("tiny", ["train.lr=5e-3", "train.allow_changes=[train.lr]"])
    assert set(check_same_experiment(recorded, allowed, "ckpt")) == {"train.lr"}


@pytest.mark.parametrize("named", ["train.lr", "train.warmup_steps", "data.train"])
def test_naming_one_changed_key_lets_only_that_one_through(named):
    """Three experiment keys changed, one named in train.allow_changes: the other two are refused by name, the
    named one is not among the refused (issue 36: a rule letting every change through once any key is named
    passed the earlier tests, which changed one key at a time)."""
    recorded = load_config("tiny").to_dict()
    changes = {"train.lr": "5e-3", "train.warmup_steps": "3", "data.train": "elsewhere/shard-{000000..000003}.tar"}
    cfg = load_config("tiny", [f"{k}={v}" for k, v in changes.items()] + [f"train.allow_changes=[{named}]"])
    with pytest.raises(ConfigError) as refused:
        check_same_experiment(recorded, cfg, "ckpt")
    message = str(refused.value).split(". Use another")[0]  # the refused keys, not the hint listing all three
    assert sorted(k for k in changes if f"{k}: " in message) == sorted(set(changes) - {named})
    everything = load_config("tiny", [f"{k}={v}" for k, v in changes.items()]
                             + [f"train.allow_changes=[{','.join(changes)}]"])
    assert set(check_same_experiment(recorded, everything, "ckpt")) == set(changes)
