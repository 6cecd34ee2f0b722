"""Fine-tuning with nbp-train-tokenizer --init-from: from a released tokenizer (official:PATH, its structure at
reduced width with seeded weights, in the released file layout) and from a trained nbp_ds tokenizer. The code
grid is kept, the run starts from the given weights, and the result loads wherever a tokenizer is taken."""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch
from official_fixtures import write_tokenizer_pt
from video_fixtures import dataset

from nbp_ds.tokenizer import build_tokenizer, load_tokenizer
from nbp_ds.tokenizer.official import OfficialTokenizer

ROOT = Path(__file__).resolve().parents[1]
LR = 1e-3
pytestmark = pytest.mark.slow


def released_file(folder: Path) -> Path:
    torch.manual_seed(0)
    model = OfficialTokenizer(32)  # the released structure at a quarter of its width
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("beta"):
                p.uniform_(0.5, 1.5)
    path = folder / "magvit2_test.pt"
    write_tokenizer_pt(path, model.state_dict())
    return path


def nbp_ds_tokenizer(folder: Path) -> Path:
    return build_tokenizer("tiny", seed=5).save(folder / "trained")


def run(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)})


@pytest.mark.parametrize("source", ["official", "nbp_ds"])
def test_fine_tuning_starts_from_the_given_tokenizer_and_its_result_is_a_tokenizer(tmp_path, source):
    videos = dataset(tmp_path / "videos", classes=2, per_class=2)
    spec = f"official:{released_file(tmp_path)}" if source == "official" else str(nbp_ds_tokenizer(tmp_path))
    start = load_tokenizer(spec)
    out = tmp_path / "run"
    trained = run("nbp_ds.cli.train_tokenizer", "--videos", str(videos), "--out", str(out), "--init-from", spec,
                  "--frames", "9", "--resolution", "32", "--steps", "2", "--batch-size", "2", "--workers", "1",
                  "--lr", str(LR), "--warmup", "0", "--log-every", "1", "--save-every", "2")
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert f"fine-tuning {start.name}" in trained.stderr

    tuned = load_tokenizer(out)  # the run folder, as nbp-tokenize / nbp-sample --tokenizer take it
    assert type(tuned) is type(start) and tuned.codebook_size == start.codebook_size
    assert tuned.latent_shape(9, 32, 32) == start.latent_shape(9, 32, 32)
    assert tuned.version != start.version
    before, after = start.state_dict(), tuned.state_dict()
    assert before.keys() == after.keys()
    # two Adam steps move a weight by at most about 2 x lr: the run started from the given weights
    moved = max(float((after[k].float() - before[k].float()).abs().max()) for k in before)
    assert 0 < moved <= 2.5 * LR

    shards = run("nbp_ds.cli.tokenize", "--videos", str(videos), "--out", str(tmp_path / "shards"), "--tokenizer",
                 str(out), "--frames", "9", "--resolution", "32", "--workers", "0", "--no-progress")
    assert shards.returncode == 0, shards.stderr[-3000:]
    with tarfile.open(sorted((tmp_path / "shards").glob("*.tar"))[0]) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith(".json"))
        record = json.loads(tar.extractfile(member).read())
    assert tuned.version in json.dumps(record)  # the shards name the fine-tuned tokenizer
