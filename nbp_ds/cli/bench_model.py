"""The model the generation benchmarks (nbp-bench-generate, nbp-bench-long-sample) time: the same flags, the same
shrunk default size, the same precision choice, so that their figures describe one model."""

from __future__ import annotations

import argparse

import torch

# the default size of a benchmarked model unless --full-size: the config's layout with a 4-layer, 256-wide network
SMALL = ["model.n_layer=4", "model.d_model=256", "model.n_head=4", "model.vocab_size=64000"]


def add_model_args(parser: argparse.ArgumentParser) -> None:
    """The flags before each benchmark's own: --config, --full-size, --device, --dtype."""
    parser.add_argument("--config", default="ucf101-700m",
                        help="run config whose layout/model to use (default ucf101-700m, shrunk unless --full-size)")
    parser.add_argument("--full-size", action="store_true", help="keep the config's model size (else 4x256)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default=None, help="default: bf16 on CUDA, fp32 on CPU")


def add_model_tail_args(parser: argparse.ArgumentParser) -> None:
    """The flags after each benchmark's own: --temporal-compression, --attention and the overrides."""
    parser.add_argument("--temporal-compression", type=int, default=4, help="video frames per later latent frame")
    parser.add_argument("--attention", default="sdpa", help="model.attention (the eager decoder's backend)")
    parser.add_argument("overrides", nargs="*", help="extra key=value config overrides")


def dtype_name(args: argparse.Namespace, device: torch.device) -> str:
    """--dtype, or bf16 on CUDA and fp32 elsewhere."""
    return args.dtype or ("bf16" if device.type == "cuda" else "fp32")


def base_overrides(args: argparse.Namespace) -> list[str]:
    """The config overrides every benchmarked model gets: the small size unless --full-size, the attention, the
    user's overrides last (they win)."""
    return ([] if args.full_size else SMALL) + [f"model.attention={args.attention}"] + args.overrides
