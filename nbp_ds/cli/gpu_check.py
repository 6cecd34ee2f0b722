"""Prove the GPU paths of nbp_ds on this CUDA machine in one command (``make gpu-check``).

    nbp-gpu-check                        # every step, logs under ./gpu_check (or $OUT when set)
    nbp-gpu-check --skip 3b-offload      # leave a step out; --only STEP runs one
    nbp-gpu-check --list                 # the steps, their time limits and what they run

Steps, in order, each a subprocess under its own time limit, its name and time printed as it ends, its log in
the output folder: the environment (CUDA, the card, the packages: a missing one is named with the way to install
it, and nothing else runs); the ``gpu`` tests (trainer with NCCL + bf16 on ZeRO-2/3, resume, export -> sample ->
mp4, tokenizer training, attention backends against sdpa); the attention benchmark; training throughput of the
700M preset per attention backend (tokens/s, MFU, peak memory); one AdamW step per implementation on a ZeRO
rank's share of the 700M model (torch fused, the shipped configs' choice; torch foreach; DeepSpeed's FusedAdam);
generation speed of the 700M model (frames/s); its long sampling at 17, 65 and 257 frames (frames/s and peak
memory, CUDA graphs, rolling and recomputed windows); DeepSpeed-Ulysses on two GPUs (equal to one rank, and
the time of a sequence-parallel attention pass against one GPU's; skipped on a one-GPU machine); with --only
packing-700m, packed against padded training on a mixed set of 700M grids (padding fraction, real tokens/s);
and, with --with-3b, the 3B preset with optimizer offload (minutes of its own: it saves ~50 GB of optimizer
state). A table ends the run; the exit status is non-zero when any step failed. The default steps share a
budget of 470 s (--budget), one call of under 8 minutes.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from nbp_ds import ffmpeg_tools
from nbp_ds.cli import command
from nbp_ds.errors import UsageError
from nbp_ds.tied_process import run_tied

# every runtime dependency of nbp_ds but torch, and the import name that proves it is there: a GPU image has some,
# scripts/gpu_wheels.sh ships the rest; one missing is named before any step runs, not in the middle of one
NEEDED = {"deepspeed": "deepspeed", "webdataset": "webdataset", "pyyaml": "yaml", "tensorboard": "tensorboard",
          "ffmpeg-python": "ffmpeg", "safetensors": "safetensors", "numpy": "numpy", "scipy": "scipy", "tqdm": "tqdm",
          "pillow": "PIL", "braceexpand": "braceexpand", "hjson": "hjson", "pydantic": "pydantic",
          "huggingface_hub": "huggingface_hub"}
INSTALL_HINT = ("on a machine with network, in the checkout: `bash scripts/gpu_wheels.sh`; copy .whl/ over, then: "
                "python3 -m pip install --no-index --no-deps --target /tmp/site .whl/*.whl && "
                "export PYTHONPATH=/tmp/site:$PWD")


@dataclass(frozen=True)
class Step:
    name: str
    limit_s: int
    command: list[str]
    summary_lines: int = 8  # the end of the step's output that the final report repeats (its table)
    default: bool = True  # run unless asked not to


def steps(py: str, tests: Path | None) -> list[Step]:
    bench = [py, "-m"]
    found = [
        Step("gpu-tests", 260, [py, "-m", "pytest", str(tests), "-m", "gpu", "-k", "not 3b and not ulysses", "-q",
                                "-rs", "-p", "no:cacheprovider"], 4) if tests else None,
        Step("attention", 60, [*bench, "nbp_ds.cli.bench_attention", "--device", "cuda"], 14),
        Step("train-700m", 150, [*bench, "nbp_ds.cli.bench_train", "--config", "ucf101-700m", "--device", "cuda",
                                 "--dtype", "bf16", "--attention", "flex", "sdpa", "--micro-batch", "8", "--steps", "6",
                                 "--warmup", "3"], 6),
        Step("optimizer", 90, [*bench, "nbp_ds.cli.bench_optimizer", "--device", "cuda", "--config", "ucf101-700m",
                               "--world-size", "8"], 7),
        Step("generate-700m", 90, [*bench, "nbp_ds.cli.bench_generate", "--config", "ucf101-700m", "--full-size",
                                   "--device", "cuda", "--dtype", "bf16", "--repeats", "1"], 13),
        Step("long-sample-700m", 150, [*bench, "nbp_ds.cli.bench_long_sample", "--config", "ucf101-700m",
                                       "--full-size", "--device", "cuda", "--dtype", "bf16", "--decoders", "graph"], 8),
        Step("ulysses", 90, [py, "-m", "pytest", str(tests / "test_gpu_sequence_parallel.py"), "-m", "gpu", "-q",
                             "-s", "-rs", "-p", "no:cacheprovider"], 4) if tests else None,
        # packed (flex BlockMask per batch) against padded-to-the-longest on a mixed set of 700M grids; not default:
        # the default steps fill the budget
        Step("packing-700m", 240, [*bench, "nbp_ds.cli.bench_packing", "--config", "ucf101-700m", "--device", "cuda",
                                   "--grids", "5x16x16,3x16x16,5x16x32", "--clips", "48", "--pack-tokens", "4096",
                                   "--micro-batch", "4", "--repeats", "2"], 4, default=False),
        Step("3b-offload", 600, [py, "-m", "pytest", str(tests), "-m", "gpu", "-k", "3b", "-q", "-s", "-rs",
                                 "-p", "no:cacheprovider"], 4, default=False) if tests else None,
    ]
    return [s for s in found if s is not None]


def check_environment() -> list[str]:
    """Lines describing the machine; raises UsageError naming what is missing."""
    import torch  # local: --help answers before torch loads

    if not torch.cuda.is_available():
        raise UsageError("no CUDA device is visible to torch: gpu-check needs a GPU (CUDA_VISIBLE_DEVICES?)")
    missing = [pkg for pkg, module in NEEDED.items() if importlib.util.find_spec(module) is None]
    if missing:
        raise UsageError(f"missing Python packages: {', '.join(missing)}; {INSTALL_HINT}")
    props = torch.cuda.get_device_properties(0)
    lines = [f"torch {torch.__version__}, CUDA {torch.version.cuda}, {props.name}, "
             f"{props.total_memory / 2**30:.0f} GiB, {props.multi_processor_count} SMs"]
    flash = [m for m in ("flash_attn.cute", "flash_attn") if _importable(m)]
    lines.append(f"flash attention: {', '.join(flash) if flash else 'not installed (optional: flash-attn-4)'}")
    lines.append(f"ffmpeg: {ffmpeg_tools.find_tool('ffmpeg') or 'not found (mp4 steps of the tests skip)'}")
    return lines


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


def run_step(step: Step, out: Path, env: dict[str, str], limit: float) -> tuple[str, float, list[str]]:
    """(status, seconds, the last lines of its output); the whole output goes to OUT/<name>.log."""
    log = out / f"{step.name}.log"
    began = time.perf_counter()
    if limit < 10:
        print(f"--- {step.name}: skipped, the budget is spent", flush=True)
        return "skipped (budget)", 0.0, []
    print(f"--> {step.name}: {' '.join(step.command)} (limit {limit:.0f} s)", flush=True)
    try:
        done = run_tied(step.command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                        timeout=limit)
        text, status = done.stdout, "ok" if done.returncode == 0 else f"failed ({done.returncode})"
    except subprocess.TimeoutExpired as exc:
        out_text = exc.stdout or ""
        text = out_text.decode(errors="replace") if isinstance(out_text, bytes) else out_text
        status = f"timeout ({limit:.0f} s)"
    seconds = time.perf_counter() - began
    log.write_text(text)
    tail = [line for line in text.splitlines() if line.strip()][-step.summary_lines:]
    print(f"<-- {step.name}: {status} in {seconds:.0f} s (log {log})", flush=True)
    return status, seconds, tail


@command
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="nbp-gpu-check", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.environ.get("OUT") or "gpu_check",
                   help="logs folder (default $OUT or gpu_check)")
    p.add_argument("--skip", action="append", default=[], help="leave this step out (repeatable)")
    p.add_argument("--only", action="append", default=[], help="run only this step (repeatable)")
    p.add_argument("--with-3b", action="store_true", help="also the 3B offload step (not counted in the budget)")
    p.add_argument("--budget", type=float, default=470, help="seconds the default steps may take together (470)")
    p.add_argument("--list", action="store_true", help="print the steps and exit")
    args = p.parse_args(argv)
    checkout_tests = Path(__file__).resolve().parents[2] / "tests"
    plan = steps(sys.executable, checkout_tests if checkout_tests.is_dir() else None)
    names = [s.name for s in plan]
    for name in args.skip + args.only:
        if name not in names:
            raise UsageError(f"no step {name!r}; steps: {', '.join(names)}")
    if args.list:
        for s in plan:
            print(f"{s.name:<14} {s.limit_s:>4} s  {' '.join(s.command)}")
        return 0
    plan = [s for s in plan if s.name not in args.skip and (s.name in args.only if args.only else
                                                             s.default or (args.with_3b and s.name == "3b-offload"))]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    began = time.perf_counter()
    print("--> environment", flush=True)
    for line in check_environment():
        print(f"    {line}", flush=True)
    env = {**os.environ, "DS_ACCELERATOR": "cuda", "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
    results = []
    for s in plan:
        left = args.budget - (time.perf_counter() - began) if s.default else s.limit_s
        results.append((s, *run_step(s, out, env, min(s.limit_s, left))))
    print(f"\n==== nbp-gpu-check: {len(results)} steps in {time.perf_counter() - began:.0f} s, logs in {out}")
    for step, status, seconds, tail in results:
        print(f"\n[{step.name}] {status}, {seconds:.0f} s")
        for line in tail:
            print(f"    {line}")
    print("\n| step | status | seconds |\n|---|---|---|")
    for step, status, seconds, _ in results:
        print(f"| {step.name} | {status} | {seconds:.0f} |")
    return 0 if all(status == "ok" for _, status, _, _ in results) else 1


if __name__ == "__main__":
    sys.exit(main())
