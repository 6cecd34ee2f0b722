#!/usr/bin/env bash
# Installs torch into a virtual environment, the step of scripts/setup_env.sh that decides which build, and says
# in one line which torch it installed and why.
#
#   bash scripts/install_torch.sh .venv/bin/python
#
# In this order:
#   - a torch already installed that satisfies the package's range (pyproject.toml) is kept: a cluster's own CUDA
#     build, put into the venv first;
#   - NBP_TORCH_WHEEL=/path/to/torch-...whl: that wheel (an offline machine, a site's own build);
#   - NBP_TORCH_INDEX_URL=URL: torch==$NBP_TORCH_VERSION from that index, e.g. the CPU-only build of a machine
#     without a GPU: NBP_TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu (PyPI's Linux torch is the CUDA
#     build, with several GB of NVIDIA libraries);
#   - otherwise torch==$NBP_TORCH_VERSION as pip finds it with its own configuration (index, find-links).
# NBP_TORCH_VERSION defaults to 2.13.0, the version the project is tested with (NBP_CPU_TORCH, its former name,
# is still read).
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${1:?usage: install_torch.sh PYTHON, the python of the virtual environment}
VERSION=${NBP_TORCH_VERSION:-${NBP_CPU_TORCH:-2.13.0}}

describe() {
    # the version and the build of the torch now installed, read from torch itself
    "$PY" -c 'import torch; cuda = torch.version.cuda; build = f"CUDA {cuda}" if cuda else "CPU-only"
print(f"torch {torch.__version__} ({build} build)")'
}

if "$PY" scripts/torch_satisfies.py; then
    echo "[setup] $(describe): kept, already installed and within pyproject.toml's range"
    exit 0
fi
if [ -n "${NBP_TORCH_WHEEL:-}" ]; then
    [ -f "$NBP_TORCH_WHEEL" ] || { echo "[setup] NBP_TORCH_WHEEL=$NBP_TORCH_WHEEL: no such file" >&2; exit 1; }
    "$PY" -m pip install -q "$NBP_TORCH_WHEEL"
    why="from the wheel NBP_TORCH_WHEEL=$NBP_TORCH_WHEEL"
elif [ -n "${NBP_TORCH_INDEX_URL:-}" ]; then
    "$PY" -m pip install -q --index-url "$NBP_TORCH_INDEX_URL" "torch==$VERSION"
    why="from the index NBP_TORCH_INDEX_URL=$NBP_TORCH_INDEX_URL"
else
    "$PY" -m pip install -q "torch==$VERSION"
    why="torch==$VERSION as pip's configuration finds it (the default; NBP_TORCH_INDEX_URL or NBP_TORCH_WHEEL choose)"
fi
"$PY" scripts/torch_satisfies.py || {
    echo "[setup] $(describe) was installed $why, but pyproject.toml asks for another version" >&2
    exit 1
}
echo "[setup] $(describe): installed $why"
