"""nbp_ds as a cluster user installs it: a wheel built from the checkout, installed into a fresh virtual
environment outside it (no network: the wheel with --no-deps, its dependencies seen from this test's
environment), then used from an unrelated folder: the commands exist, the shipped DeepSpeed configs are real files
found by name, nbp-train runs 2 steps, and the Slurm scripts written by nbp-slurm-template run as a smoke test."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from train_helpers import ROOT, make_shards

pytestmark = pytest.mark.slow


def sh(cmd: list[str], cwd: Path, env: dict, timeout: float = 600) -> subprocess.CompletedProcess:
    result = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{cmd}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> tuple[Path, dict]:
    tmp = tmp_path_factory.mktemp("install")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    # built from the tracked files alone: a checkout's own build leftovers (*.egg-info) must not add files
    source = tmp / "source"
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    for name in files:
        if (ROOT / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, source / name)
    sh([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", tmp / "dist", source],
       tmp, env)
    venv = tmp / "venv"
    sh([sys.executable, "-m", "venv", venv], tmp, env)
    (wheel,) = (tmp / "dist").glob("nbp_ds-*.whl")
    sh([venv / "bin" / "python", "-m", "pip", "install", "-q", "--no-deps", "--no-index", wheel], tmp, env)
    # the dependencies, from this test's environment (after the install, so pip never sees the checkout's
    # editable nbp_ds there; a path in a .pth file adds that folder, not the .pth files inside it)
    site = subprocess.run([venv / "bin" / "python", "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                          capture_output=True, text=True, check=True).stdout.strip()
    Path(site, "deps-from-test-env.pth").write_text(sysconfig.get_path("purelib") + "\n")
    env = {**env, "PATH": f"{venv / 'bin'}{os.pathsep}{env['PATH']}", "DS_ACCELERATOR": "cpu",
           "OMP_NUM_THREADS": "1"}
    return venv, env


def test_the_installed_package_trains_and_writes_its_slurm_scripts(installed, tmp_path):
    venv, env = installed
    where = sh([venv / "bin" / "python", "-c", "import nbp_ds; print(nbp_ds.__file__)"], tmp_path, env).stdout
    assert str(venv) in where and str(ROOT) not in where
    # the DeepSpeed JSONs of the checkout's ds_configs/ (a link into the package) travel as real files
    shipped = Path(where.strip()).parent / "ds_configs"
    assert sorted(p.name for p in shipped.iterdir()) == sorted(p.name for p in (ROOT / "ds_configs").glob("*.json"))
    assert all(p.is_file() and not p.is_symlink() for p in shipped.iterdir())
    for tool in ("nbp-tokenize", "nbp-sample", "nbp-export", "nbp-train-tokenizer", "nbp-bench-train"):
        assert "usage:" in sh([venv / "bin" / tool, "--help"], tmp_path, env).stdout
    shards = tmp_path / "shards"
    make_shards(shards, train=40, val=8)
    common = ["--config", "tiny", f"data.train={shards / 'train'}", f"data.val={shards / 'val'}", "train.steps=2",
              "train.log_every=1", "deepspeed.config=zero3"]
    sh([venv / "bin" / "nbp-train", *common, f"train.out_dir={tmp_path / 'run'}"], tmp_path, env)
    assert (tmp_path / "run" / "finished").is_file()

    sh([venv / "bin" / "nbp-slurm-template", "--out", tmp_path / "jobs"], tmp_path, env)
    env_sh = (tmp_path / "jobs" / "slurm" / "env.sh").read_text()
    assert f'NBP_VENV="${{NBP_VENV:-{venv}}}"' in env_sh  # the venv it ran in is the scripts' default
    smoke = sh(["bash", tmp_path / "jobs" / "slurm" / "train.sbatch", *common[2:],
                f"train.out_dir={tmp_path / 'smoke'}"], tmp_path / "jobs", {**env, "NBP_CPU": "1"})
    assert "not in a Slurm job" in smoke.stdout and (tmp_path / "smoke" / "finished").is_file()
    refused = subprocess.run([venv / "bin" / "nbp-slurm-template", "--out", tmp_path / "jobs"], env=env,
                             capture_output=True, text=True)
    assert refused.returncode == 2 and "--force" in refused.stderr
