"""Attention forward + backward time per backend at the presets' shapes, next to causal FlashAttention.

For each config, the block-causal rule of its layout at [batch, heads, sequence, head_dim] through every
backend that runs here (sdpa with a dense mask, flex, flex with candidate tile settings (--sweep), flash =
flash-attn-4), and the same sequence under plain causal masking through PyTorch's FlashAttention-2 and cuDNN
kernels (and the flash-attn package where installed): the figure the block-causal rule is held to (target:
at most 1.3x causal FlashAttention-2; goal 1.1x). With --sweep, the fastest flex setting is printed as a
run-config override (model.flex_kernel_options=...), which ``model.attention=auto`` and ``flex`` then use.

    nbp-bench-attention                                   # CPU: the tiny config, CPU-capable backends
    nbp-bench-attention --device cuda                     # GPU: the 700M, 1.2B and 3B presets and K600, bf16
    nbp-bench-attention --device cuda --config ucf101-700m --batch 8 --sweep
"""

from __future__ import annotations

import argparse
import sys

from nbp_ds.cli import command

GPU_CONFIGS = ["ucf101-700m", "ucf101-1.2b", "ucf101-3b", "k600-700m"]
HEADER = ("backend", "rule", "fwd+bwd ms", "x causal ref", "TFLOP/s")


def report(name: str, cfg, args, device, dtype) -> tuple[list[str], bool]:
    """The lines of one config's table, and whether anything was measured."""
    from nbp_ds.layout import Layout  # local: --help answers before torch loads
    from nbp_ds.model.attention import resolve_backend_name  # local: --help answers before torch loads
    from nbp_ds.perf.attention_bench import best_flex, measure, tflops, visible_pairs  # local: start-up time

    layout = Layout.from_config(cfg.layout, cfg.model.vocab_size)
    heads, head_dim = cfg.model.n_head, cfg.model.d_model // cfg.model.n_head
    batch = args.batch or (cfg.train.micro_batch if device.type == "cuda" else 2)
    rows = measure(layout, batch, heads, head_dim, device, dtype, cfg.model.flex_kernel_options, args.sweep,
                   args.repeats, args.warmup)
    reference = next((r for r in rows if r.rule == "causal" and r.seconds is not None), None)
    density = visible_pairs(layout, "block-causal") / layout.seq_len ** 2
    lines = [f"{name}: {batch} x {heads} heads x {layout.seq_len} positions x {head_dim} ({dtype}, {device}); "
             f"block {list(layout.block)}{' hybrid' if layout.hybrid else ''}, {100 * density:.0f}% of pairs visible"]
    table = [HEADER]
    for r in rows:
        ratio = f"{r.seconds / reference.seconds:.2f}" if r.seconds is not None and reference else "-"
        flops = tflops(r, layout, batch, heads, head_dim)
        table.append((r.label, r.rule, f"{r.seconds * 1e3:.3f}" if r.seconds is not None else "-", ratio,
                      f"{flops:.3g}" if flops is not None else "-"))
    widths = [max(len(str(t[i])) for t in table) for i in range(len(HEADER))]
    lines += ["  " + "  ".join(str(v).ljust(w) for v, w in zip(t, widths, strict=True)) for t in table]
    lines += [f"  not measured: {r.label}: {r.note}" for r in rows if r.seconds is None]
    best = min((r for r in rows if r.rule == "block-causal" and r.seconds is not None), key=lambda r: r.seconds,
               default=None)
    if best and reference:
        lines.append(f"  fastest block-causal: {best.label}, {best.seconds / reference.seconds:.2f}x "
                     f"{reference.label} (target <= 1.3x, goal 1.1x)")
    flex = best_flex(rows)
    if args.sweep and flex is not None:
        options = {k: v for k, v in flex.options.items() if k not in ("ROWS_GUARANTEED_SAFE", "BLOCKS_ARE_CONTIGUOUS")}
        lines.append(f"  fastest flex setting: model.flex_kernel_options={_yaml_flow(options)}")
    lines.append(f"  model.attention=auto picks: {resolve_backend_name('auto', device, layout, head_dim)}")
    return lines, any(r.seconds is not None for r in rows)


def _yaml_flow(options: dict) -> str:
    """A mapping as one YAML flow line (what a key=value override takes)."""
    return "{" + ", ".join(f"{k}: {str(v).lower() if isinstance(v, bool) else v}" for k, v in options.items()) + "}"


@command
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", nargs="+", help="run configs whose layout and heads to measure (default: the "
                                                f"presets {' '.join(GPU_CONFIGS)} on a GPU, tiny on the CPU)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch", type=int, help="sequences (default: the config's train.micro_batch on a GPU, 2 on CPU)")
    p.add_argument("--dtype", choices=["bf16", "fp32"], help="default: bf16 on a GPU, fp32 on the CPU")
    p.add_argument("--sweep", action="store_true", help="also time flex's candidate tile settings (GPU)")
    p.add_argument("--repeats", type=int, default=20, help="timed forward+backward passes per row (default 20)")
    p.add_argument("--warmup", type=int, default=5, help="untimed passes first (compilation)")
    p.add_argument("overrides", nargs="*", help="key=value run-config overrides (e.g. model.flex_kernel_options=...)")
    args = p.parse_intermixed_args(argv)

    import torch  # local: --help answers before torch loads

    from nbp_ds.config import load_config  # local: --help answers before torch loads

    device = torch.device(args.device)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype or ("bf16" if device.type == "cuda"
                                                                          else "fp32")]
    names = args.config or (GPU_CONFIGS if device.type == "cuda" else ["tiny"])
    configs = [(name, load_config(name, args.overrides)) for name in names]  # bad keys refused before any work
    measured = False
    for name, cfg in configs:
        lines, ok = report(name, cfg, args, device, dtype)
        measured |= ok
        print("\n".join(lines))
    return 0 if measured else 1


if __name__ == "__main__":
    sys.exit(main())
