"""Weights & Biases: entity, group and tags from the run config, and one W&B run per run folder whatever the
number of starts (the id kept in the folder, resume="allow"), checked with a real wandb in offline mode."""

from __future__ import annotations

import pytest

from nbp_ds.config import load_config
from nbp_ds.runtime.metrics import WANDB_ID_FILE, MetricsLogger, wandb_init_arguments, wandb_settings

wandb = pytest.importorskip("wandb")  # in the dev extra: installed wherever the suite runs


def settings(*overrides: str):
    return wandb_settings(load_config("tiny", ["train.wandb=true", *overrides]).train)


def test_the_init_arguments_carry_entity_group_tags_and_a_kept_id(tmp_path):
    ours = settings("train.wandb_project=nbp", "train.wandb_entity=lab", "train.wandb_group=700m",
                    "train.wandb_tags=[ucf101, zero2]")
    (tmp_path / "run7").mkdir()
    first = wandb_init_arguments(tmp_path / "run7", ours, {"a": 1})
    again = wandb_init_arguments(tmp_path / "run7", ours, {"a": 1})  # a requeued job in the same folder
    assert first == again and first["id"] == (tmp_path / "run7" / WANDB_ID_FILE).read_text()
    assert {k: first[k] for k in ("project", "entity", "group", "tags", "resume", "name")} == {
        "project": "nbp", "entity": "lab", "group": "700m", "tags": ["ucf101", "zero2"], "resume": "allow",
        "name": "run7"}
    (tmp_path / "other").mkdir()
    assert wandb_init_arguments(tmp_path / "other", ours, {})["id"] != first["id"]  # another folder, another run
    plain = wandb_init_arguments(tmp_path / "other", settings(), {})
    assert (plain["entity"], plain["group"], plain["tags"]) == (None, None, None)  # wandb's own defaults


def test_an_offline_wandb_run_resumes_as_the_same_run(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    ours = settings("train.wandb_group=sweep3", "train.wandb_tags=[a, b]")
    ids = []
    for start in range(2):  # a run and its requeue
        logger = MetricsLogger(tmp_path, enabled=True, wandb=ours, config={"start": start})
        run = logger.wandb
        assert (run.group, tuple(run.tags)) == ("sweep3", ("a", "b"))
        ids.append(run.id)
        logger.scalars(start + 1, {"train/loss": 1.0 / (start + 1)})
        logger.close()
    assert ids[0] == ids[1] == (tmp_path / WANDB_ID_FILE).read_text()
    assert len(list((tmp_path / "wandb").glob(f"offline-run-*-{ids[0]}"))) >= 1
