"""What users already have keeps working: a run folder, its checkpoint and its exports written by the code of
commit d6685d1 (tests/data/compat, made by its make_fixture.py) load and resume with today's code to the very same
weights and step, and to the same losses (up to the order another CPU sums float32 terms in). The expected figures
were computed by that day's code (expected.json), not by the code under test."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from nbp_ds.weights.export import consolidate, load_exported

FIXTURE = Path(__file__).parent / "data" / "compat"
ROOT = Path(__file__).resolve().parents[1]
EXPECTED = json.loads((FIXTURE / "expected.json").read_text())


def fixture_module():
    sys.path.insert(0, str(FIXTURE))
    try:
        import make_fixture
    finally:
        sys.path.remove(str(FIXTURE))
    return make_fixture


# Figures computed by floating-point kernels (a loss, a gradient norm) are compared to within a millionth: another
# CPU's vector width sums the same float32 terms in another order (a machine gave the step-3 gradient norm
# 0.686511467250862 against the recorded 0.6865114673694479). A wrong weight, batch or step moves them by far more.
# What is read from files (weights, averages, steps) is compared exactly.
COMPUTED = {"rel": 1e-6, "abs": 0.0}


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_an_old_export_loads_to_its_weights_and_its_loss():
    recorded = load_file(FIXTURE / "export.safetensors")  # read by safetensors itself, not by the code under test
    for where in (FIXTURE / "export.safetensors", FIXTURE / "export_sharded"):
        model, cfg = load_exported(where)
        assert_same_tensors(dict(model.state_dict()), recorded)
        assert (cfg.model.n_layer, cfg.model.d_model, cfg.train.ema) == (1, 16, 0.9)
        with torch.no_grad():
            loss, metrics = model.loss(fixture_module().first_batch(FIXTURE / "shards"))
        assert loss.item() == pytest.approx(EXPECTED["export_loss"], **COMPUTED)
        assert float(metrics["acc"]) == EXPECTED["export_acc"]


def test_an_old_checkpoint_consolidates_to_its_export_and_its_average():
    state, cfg = consolidate(FIXTURE / "run")
    assert_same_tensors(state, load_file(FIXTURE / "export.safetensors"))
    average, _ = consolidate(FIXTURE / "run", ema=True)
    # one ZeRO-3 rank saved flat partitions padded to its size: cut and shaped back by hand
    saved = torch.load(FIXTURE / "run/checkpoints/step00000002/ema_rank00000.pt", weights_only=True)
    assert saved["partitioned"]
    assert_same_tensors(average, {name: flat.reshape(-1)[:state[name].numel()].reshape(state[name].shape)
                                  for name, flat in saved["average"].items()})
    assert any(not torch.equal(average[k], state[k]) for k in state)  # the average is not the weights


@pytest.mark.slow
def test_an_old_run_resumes_at_its_step_with_the_same_next_step(tmp_path):
    run = tmp_path / "run"
    shutil.copytree(FIXTURE / "run", run)
    # the recorded data.train is relative to the repository root, where the fixture was made
    result = subprocess.run([sys.executable, str(FIXTURE / "make_fixture.py"), "--train", str(run),
                             "tests/data/compat/shards", "train.steps=3", "train.allow_changes=[train.steps]"],
                            cwd=ROOT, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "train/loss" in r] == [3]  # resumed at step 2: steps 1 and 2 not run again
    step3 = next(r for r in rows if "train/loss" in r)
    assert step3["train/loss"] == pytest.approx(EXPECTED["step3_loss"], **COMPUTED)
    assert step3["train/grad_norm"] == pytest.approx(EXPECTED["step3_grad_norm"], **COMPUTED)
