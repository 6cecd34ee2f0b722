#!/usr/bin/env bash
# Creates .venv (if missing) and installs nbp_ds into it (editable) with what it needs; safe to run again.
#
# torch: an installed torch that satisfies the package's range (pyproject.toml) is kept, e.g. a cluster's own
# CUDA build put into .venv first. Only when there is none does this install the CPU build that lies on this
# kind of machine's disk (NBP_CPU_TORCH, default 2.13.0): a plain `torch` would download a multi-GB CUDA build.
# The other packages come at the versions in constraints.txt (what the project is tested with).
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v ffmpeg >/dev/null 2>&1 || need_apt+=(ffmpeg)
command -v curl >/dev/null 2>&1 || need_apt+=(curl)  # webdataset reads http(s) shards through curl
if [ ${#need_apt[@]} -gt 0 ]; then
    echo "[setup] installing system packages: ${need_apt[*]}"
    if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || { echo "[setup] creating .venv"; "$PY" -m venv .venv; }

stamp=.venv/.nbp_ds_installed
want=$(cat pyproject.toml constraints.txt scripts/setup_env.sh | sha256sum | cut -c1-16)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    echo "[setup] installing Python packages into .venv"
    .venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
    if .venv/bin/python scripts/torch_satisfies.py; then
        echo "[setup] keeping the installed torch $(.venv/bin/python -c 'import torch; print(torch.__version__)')"
    else
        .venv/bin/python -m pip install -q "torch==${NBP_CPU_TORCH:-2.13.0}"
    fi
    .venv/bin/python -m pip install -q -c constraints.txt -e ".[dev]"
    echo "$want" > "$stamp"
fi
