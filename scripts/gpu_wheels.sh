#!/usr/bin/env bash
# Collect into .whl/ the wheels a GPU machine without network needs to run nbp_ds on top of its own CUDA
# torch (an air-gapped cluster node): DeepSpeed (built here as a pure-Python
# wheel) and the small packages that image lacks, at the versions this checkout's .venv tests with.
#
#   bash scripts/gpu_wheels.sh                      # for a GPU machine's Python 3.12 (the default)
#   PY_VERSION=3.11 bash scripts/gpu_wheels.sh      # another Python there
#   bash scripts/gpu_wheels.sh --flash4             # also flash-attn-4 and its CUTLASS DSL (Hopper+)
#
# Then copy .whl/ (and the checkout) to the GPU machine and install there, without network, into a
# folder on PYTHONPATH (or into its venv with the same pip line minus --target):
#
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
#     && export PYTHONPATH=/tmp/site:$PWD
#
# The CUTLASS DSL library wheel (nvidia-cutlass-dsl-libs-*) is ~92 MB. For transfers limited in size,
# --flash4 also splits it into .whl-parts/*.part-aa, -ab (48 MB each): send the parts and join them on the GPU
# machine before installing:
#
#   cat .whl-parts/NAME.whl.part-* > .whl/NAME.whl
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
PY_VERSION=${PY_VERSION:-3.12}
FLASH4=0
[ "${1:-}" = "--flash4" ] && FLASH4=1

version() {  # the version the local environment tests with, so both sides run the same code
    "$PY" -m pip show "$1" 2>/dev/null | sed -n 's/^Version: //p'
}

mkdir -p .whl
rm -f .whl/*.whl
echo "[gpu_wheels] DeepSpeed $(version deepspeed) as a pure-Python wheel (its CUDA ops build on first use there)"
DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-build-isolation -w .whl "deepspeed==$(version deepspeed)" 2>/dev/null \
    || "$PY" -m pip wheel -q --no-deps -w .whl "deepspeed==$(version deepspeed)"

platforms=(--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
           --platform manylinux1_x86_64)
download() {  # NAME==VERSION for the GPU machine's Python (binary wheels only: nothing compiles there)
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PY_VERSION" --implementation cp \
        "${platforms[@]}" -d .whl "$1"
}
# nbp_ds's dependencies that a CUDA torch image brings with it (nbp-gpu-check names any that is missing there);
# every other one is shipped, with what it needs beyond them (tests/test_requirements.py checks both lists)
IMAGE_HAS="torch numpy scipy pillow pyyaml tqdm tensorboard"
SHIPPED="hjson pydantic pydantic-core annotated-types typing-inspection typing-extensions webdataset braceexpand
         ffmpeg-python future safetensors huggingface_hub"
echo "[gpu_wheels] counted on in the GPU image: $IMAGE_HAS"
for p in $SHIPPED; do
    v=$(version "$p")
    [ -n "$v" ] || { echo "[gpu_wheels] $p is not installed in $PY's environment: run 'make setup' first" >&2; exit 1; }
    echo "[gpu_wheels] $p $v"
    download "$p==$v"
done

if [ "$FLASH4" = 1 ]; then
    for p in flash-attn-4 nvidia-cutlass-dsl nvidia-cutlass-dsl-libs-cu13 apache-tvm-ffi torch-c-dlpack-ext \
             quack-kernels; do
        echo "[gpu_wheels] $p (latest)"
        download "$p"
    done
    mkdir -p .whl-parts
    for big in .whl/nvidia_cutlass_dsl_libs*.whl; do
        [ -e "$big" ] || continue
        split -b 48M "$big" ".whl-parts/$(basename "$big").part-"
        rm "$big"
        echo "[gpu_wheels] split $(basename "$big") into .whl-parts/ (join with cat before installing)"
    done
fi
du -sh .whl | sed 's/^/[gpu_wheels] /'
echo "[gpu_wheels] install there: python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir" \
     "--upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:\$PWD"
