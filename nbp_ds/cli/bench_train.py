"""Training throughput of one device: tokens/s, step time, MFU and peak memory, per attention backend.

One process runs the model's own training step (forward with the chunked loss, backward, AdamW) on random
tokens of the config's grid, so the figures are the model's compute ceiling on this device; the
DeepSpeed trainer reports the same figures for real runs (TensorBoard: tokens_per_s, mfu, step_time).

    nbp-bench-train --config tiny                               # CPU, fp32
    nbp-bench-train --config ucf101-700m --device cuda --dtype bf16 --attention flex sdpa \\
        --micro-batch 8 model.checkpoint_activations=false

MFU = model FLOPs per token (6 x non-embedding params + attention, as nbp_ds.model reports) x tokens/s /
the device's dense bf16 peak (looked up from its name, or --peak-tflops).
"""

from __future__ import annotations

import argparse
import sys
import time

from nbp_ds.cli import command


def measure(args: argparse.Namespace, backend: str, device, peak: float | None) -> tuple:
    """One table row: a few warm-up steps, then the median step time of the model's own training step."""
    import torch

    from nbp_ds.config import load_config
    from nbp_ds.model import build_model

    cfg = load_config(args.config, [*args.overrides, f"model.attention={backend}"])
    batch_size = args.micro_batch or cfg.train.micro_batch
    torch.manual_seed(0)
    model = build_model(cfg).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    grid = cfg.layout.grid
    batch = {"tokens": torch.randint(0, cfg.model.vocab_size, (batch_size, *grid), device=device),
             "label": torch.randint(0, max(1, cfg.layout.num_classes), (batch_size,), device=device)}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for i in range(args.warmup + args.steps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.dtype == "bf16"):
            loss, _ = model.loss(batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    step = sorted(times)[len(times) // 2]  # the median: robust to a stray slow step
    tokens = batch_size * model.layout.seq_len
    tok_s = tokens / step
    mfu = model.flops_per_token() * tok_s / (peak * 1e12) if peak else None
    mem = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return (backend, f"{model.num_params() / 1e6:.1f}M", batch_size, tokens, f"{step * 1e3:.1f}",
            f"{tok_s:,.0f}", "-" if mfu is None else f"{100 * mfu:.1f}%", "-" if mem is None else f"{mem:.1f}")


@command
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="tiny", help="run config name or YAML (default tiny)")
    p.add_argument("--attention", nargs="+", default=["sdpa"], help="backends to compare: sdpa flex flash")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="bf16 = autocast, fp32 master weights")
    p.add_argument("--micro-batch", type=int, help="sequences per step (default: the config's train.micro_batch)")
    p.add_argument("--steps", type=int, default=10, help="timed steps (default 10)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation, allocator)")
    p.add_argument("--peak-tflops", type=float, help="device peak for MFU (default: looked up on GPUs)")
    p.add_argument("overrides", nargs="*", help="key=value run-config overrides")
    args = p.parse_intermixed_args(argv)

    import torch

    from nbp_ds.model.attention import AttentionUnavailable
    from nbp_ds.train.metrics import peak_tflops

    device = torch.device(args.device)
    peak = peak_tflops(args.peak_tflops, device)
    rows, notes = [], []
    for backend in args.attention:
        try:
            rows.append(measure(args, backend, device, peak))
        except AttentionUnavailable as exc:  # e.g. flex has no backward on CPU: say so, measure the rest
            rows.append((backend, *["-"] * 7))
            notes.append(f"{backend}: {exc}")
        except torch.OutOfMemoryError:
            rows.append((backend, *["-"] * 6, "OOM"))
            notes.append(f"{backend}: out of memory at micro-batch {args.micro_batch or 'of the config'}")
            torch.cuda.empty_cache()
    header = ("attention", "params", "batch", "tokens/step", "step ms", "tokens/s", "MFU", "peak GiB")
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    print(f"{args.config} on {device} ({args.dtype})" + (f", peak {peak:g} TFLOP/s" if peak else ", no MFU on CPU"))
    for r in [header, *rows]:
        print("  ".join(str(v).rjust(w) for v, w in zip(r, widths, strict=True)))
    for note in notes:
        print(f"not measured: {note}")
    return 0 if len(notes) < len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
