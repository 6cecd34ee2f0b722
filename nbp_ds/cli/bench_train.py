"""Training throughput of one device: step time, tokens/s, MFU and peak memory, per attention backend and
micro-batch; with --profile, a profiler trace and the share of the step per category.

One process runs the model's own training step (forward with the fused head + loss, backward, gradient
clipping, AdamW) on random tokens of the config's grid, in the trainer's precision, so the figures are the
model's compute ceiling on this device; the DeepSpeed trainer reports the same figures for real runs
(TensorBoard: perf/tokens_per_s, perf/mfu, perf/step_time). Run-config overrides choose what is measured:
model.compile=true|false (default auto: on for CUDA), train.activation_checkpointing=none|full|selective,
model.loss_chunk, model.flex_kernel_options.

    nbp-bench-train --config tiny                                            # CPU, fp32
    nbp-bench-train --config ucf101-700m --device cuda --micro-batch 8 16 32 # bf16, compiled, attention auto
    nbp-bench-train --config ucf101-700m --device cuda --micro-batch 8 --profile runs/profile
    nbp-bench-train --config ucf101-700m --device cuda --dtype autocast model.compile=false --attention flex

--dtype: bf16 = bf16 weights and activations with fp32 master weights and Adam states (what the trainer runs
with train.precision=bf16; the default on a GPU); autocast = fp32 weights under torch.autocast; fp32.
MFU = model FLOPs per token (6 x non-embedding params + attention, as nbp_ds.model reports) x tokens/s / the
device's dense bf16 peak (looked up from its name, or --peak-tflops).
"""

from __future__ import annotations

import argparse
import gc
import sys
from pathlib import Path

from nbp_ds.cli import command

HEADER = ("attention", "compile", "ckpt", "batch", "tokens/step", "step ms", "tokens/s", "MFU", "peak GiB")


def measure(args: argparse.Namespace, backend: str, batch_size: int, device, peak: float | None):
    """One table row (and, with --profile, the step's time by category)."""
    import torch  # local: --help answers before torch loads

    from nbp_ds.config import load_config  # local: --help answers before torch loads
    from nbp_ds.perf.profile import profile_steps, step_shares  # local: --help answers before torch loads
    from nbp_ds.perf.timing import median, time_repeats  # local: --help answers before torch loads
    from nbp_ds.perf.train_step import build_training, make_step, random_batch  # local: start-up time

    cfg = load_config(args.config, [*args.overrides, f"model.attention={backend}"])
    model, optimizer, autocast = build_training(cfg, device, args.dtype)
    step = make_step(model, optimizer, autocast, random_batch(cfg, batch_size, device))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    seconds = median(time_repeats(step, args.steps, args.warmup, device))
    tokens = batch_size * model.layout.seq_len
    tok_s = tokens / seconds
    mfu = model.flops_per_token() * tok_s / (peak * 1e12) if peak else None
    mem = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    name = model.backend.on(device).name
    row = (name if backend == name else f"{backend}->{name}", "on" if model.execution.compiled else "off",
           model.execution.checkpointing, batch_size, tokens, f"{seconds * 1e3:.1f}", f"{tok_s:,.0f}",
           "-" if mfu is None else f"{100 * mfu:.1f}%", "-" if mem is None else f"{mem:.1f}")
    report = None
    if args.profile:
        folder = Path(args.profile) / f"{backend}-mb{batch_size}"
        prof, trace = profile_steps(step, folder, args.profile_steps, device)
        shares = step_shares(prof.events(), device)
        report = f"{backend}, micro-batch {batch_size}: trace {trace}\n{shares.table()}"
    return row, report


def _release(device) -> None:
    import torch  # local: --help answers before torch loads

    gc.collect()
    torch._dynamo.reset()  # each row compiles its own model; earlier graphs would count as recompilations
    if device.type == "cuda":
        torch.cuda.empty_cache()


@command
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="tiny", help="run config name or YAML (default tiny)")
    p.add_argument("--attention", nargs="+", default=["auto"], help="backends to compare: auto sdpa flex flash "
                                                                     "(default auto: the model's own choice)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=["fp32", "bf16", "autocast"],
                   help="bf16 = the trainer's bf16 (bf16 weights, fp32 master weights); autocast = fp32 weights "
                        "under torch.autocast; fp32 (default: bf16 on a GPU, fp32 on the CPU)")
    p.add_argument("--micro-batch", type=int, nargs="+",
                   help="sequences per step, one row each (default: the config's train.micro_batch)")
    p.add_argument("--steps", type=int, default=10, help="timed steps (default 10)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation, allocator)")
    p.add_argument("--peak-tflops", type=float, help="device peak for MFU (default: looked up on GPUs)")
    p.add_argument("--profile", metavar="DIR", help="also profile each row: a trace under DIR/<attention>-mb<N>/ "
                                                    "(Perfetto, or tensorboard --logdir DIR) and the step's time "
                                                    "by category")
    p.add_argument("--profile-steps", type=int, default=3, help="profiled steps per row (default 3)")
    p.add_argument("overrides", nargs="*", help="key=value run-config overrides")
    args = p.parse_intermixed_args(argv)

    import torch  # local: --help answers before torch loads

    from nbp_ds.config import load_config  # local: --help answers before torch loads
    from nbp_ds.model.attention import AttentionUnavailable  # local: --help answers before torch loads
    from nbp_ds.runtime.metrics import peak_tflops  # local: --help answers before torch loads

    device = torch.device(args.device)
    args.dtype = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    cfg = load_config(args.config, args.overrides)  # bad keys are refused before anything is built
    peak = peak_tflops(args.peak_tflops, device)
    rows, notes, reports = [], [], []
    for backend in args.attention:
        for batch_size in args.micro_batch or [cfg.train.micro_batch]:
            try:
                row, report = measure(args, backend, batch_size, device, peak)
                rows.append(row)
                reports += [report] if report else []
            except AttentionUnavailable as exc:  # e.g. flex has no backward on CPU: say so, measure the rest
                rows.append((backend, *["-"] * 2, batch_size, *["-"] * 5))
                notes.append(f"{backend}: {exc}")
            except torch.OutOfMemoryError:
                rows.append((backend, *["-"] * 2, batch_size, *["-"] * 4, "OOM"))
                notes.append(f"{backend}: out of memory at micro-batch {batch_size}")
            _release(device)
    widths = [max(len(str(r[i])) for r in [HEADER, *rows]) for i in range(len(HEADER))]
    print(f"{args.config} on {device} ({args.dtype})" + (f", peak {peak:g} TFLOP/s" if peak else ", no MFU on CPU"))
    for r in [HEADER, *rows]:
        print("  ".join(str(v).rjust(w) for v, w in zip(r, widths, strict=True)))
    for note in dict.fromkeys(notes):  # once each, in order
        print(f"not measured: {note}")
    for report in reports:
        print(report)
    return 0 if len(notes) < len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
