#!/usr/bin/env bash
# Creates .venv (if missing) and installs everything nbp_ds needs; safe to run again.
# torch comes first and pinned: `torch==2.13.0` is a CPU build that lies on this kind of machine's disk;
# an unpinned torch would pull a multi-GB CUDA build. On a GPU cluster install your CUDA torch first.
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
want=$(cat requirements.txt requirements-dev.txt pyproject.toml | sha256sum | cut -c1-16)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    echo "[setup] installing Python packages into .venv"
    .venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
    .venv/bin/python -m pip install -q torch==2.13.0
    .venv/bin/python -m pip install -q -r requirements.txt -r requirements-dev.txt
    .venv/bin/python -m pip install -q --no-deps -e .
    echo "$want" > "$stamp"
fi
