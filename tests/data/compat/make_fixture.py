"""How tests/data/compat was made: with the code of commit d6685d1 (before the weights' format left train/ and the
runtime took the EMA, the saved-parts protocol and the trainer skeleton), run from the repository root:

    DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 python tests/data/compat/make_fixture.py tests/data/compat

It writes, all from one tiny run (1 layer, width 16, ZeRO-3 on one CPU process, train.ema=0.9):

    shards/train-000000.tar    16 token clips of the tests' learnable pattern (grid 3x4x4, 4 classes)
    run/                       the run folder after 2 steps: checkpoints/step00000002 (engine, EMA, loader
                               position, RNG, manifest) and config.json
    export.safetensors/.json   nbp-export of that checkpoint (one file)
    export_sharded/            nbp-export --shard-size 4KB of it (shards + index + config.json)
    expected.json              what the code of that day computed: the exported model's loss and accuracy on
                               the batch below, and the train/loss and train/grad_norm of step 3 when the run
                               resumes from step 2 (tests/test_compat_fixture.py checks today's code against it)

The batch: the first 4 clips of the shard, in order (their tokens and labels).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

OVERRIDES = ["model.n_layer=1", "model.d_model=16", "model.n_head=2", "train.steps=2", "train.save_every=2",
             "train.eval_every=0", "train.ema=0.9", "data.num_workers=0", "train.log_every=1",
             "deepspeed.config=zero3"]


def make_shards(folder: Path) -> Path:
    from nbp_ds.data import TokenShardWriter

    rng = np.random.default_rng(0)
    with TokenShardWriter(folder, maxcount=16) as writer:
        for i in range(16):
            label = i % 4
            base = (np.arange(48) * (label + 1)) % 64
            noisy = rng.random(48) < 0.1
            writer.write(f"train{i:05d}", np.where(noisy, rng.integers(0, 64, 48), base).reshape(3, 4, 4), label, {})
    return folder


def first_batch(shards: Path) -> dict[str, torch.Tensor]:
    import tarfile
    from io import BytesIO

    tokens, labels = {}, {}
    with tarfile.open(next(shards.glob("*.tar"))) as tar:
        for member in tar.getmembers():
            key, _, ext = member.name.partition(".")
            data = tar.extractfile(member).read()
            if ext == "tokens.npy":
                tokens[key] = np.load(BytesIO(data))
            elif ext == "cls":
                labels[key] = int(data)
    keys = sorted(tokens)[:4]
    return {"tokens": torch.from_numpy(np.stack([tokens[k] for k in keys]).astype(np.int64)),
            "label": torch.tensor([labels[k] for k in keys])}


def train(run: Path, shards: Path, *extra: str) -> None:
    from nbp_ds.config import load_config
    from nbp_ds.train.loop import train as run_training

    torch.set_num_threads(1)
    cfg = load_config("tiny", [f"data.train={shards}", f"train.out_dir={run}", *OVERRIDES, *extra])
    assert run_training(cfg) == 0


def main(out: Path) -> None:
    from nbp_ds.train.export import export, load_exported

    shards = make_shards(out / "shards")
    run = out / "run"
    train(run, shards)
    for extra in ("tb", "metrics.jsonl", "sharding.json", "finished", "checkpoints/zero_to_fp32.py",
                  "checkpoints/zero_to_torch.py"):  # not read by a resume; kept out (size)
        path = run / extra
        shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    export(run, out / "export.safetensors")
    export(run, out / "export_sharded", shard_bytes=4000)
    model, _ = load_exported(out / "export.safetensors")
    with torch.no_grad():
        loss, metrics = model.loss(first_batch(shards))
    with tempfile.TemporaryDirectory() as tmp:  # the continuation, in a copy: the fixture keeps step 2
        resumed = Path(tmp) / "run"
        shutil.copytree(run, resumed)
        # a process of its own: DeepSpeed keeps its process groups for the life of a process
        subprocess.run([sys.executable, __file__, "--train", str(resumed), str(shards), "train.steps=3",
                        "train.allow_changes=[train.steps]"], check=True)
        rows = [json.loads(line) for line in (resumed / "metrics.jsonl").read_text().splitlines()]
        step3 = next(r for r in rows if r.get("step") == 3 and "train/loss" in r)
    expected = {"export_loss": loss.item(), "export_acc": float(metrics["acc"]), "step3_loss": step3["train/loss"],
                "step3_grad_norm": step3["train/grad_norm"]}
    (out / "expected.json").write_text(json.dumps(expected, indent=1) + "\n")
    print(json.dumps(expected, indent=1))


if __name__ == "__main__":
    if sys.argv[1] == "--train":
        train(Path(sys.argv[2]), Path(sys.argv[3]), *sys.argv[4:])
    else:
        main(Path(sys.argv[1]))
