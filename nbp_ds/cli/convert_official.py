"""Convert the NBP authors' released files (github.com/RenShuhuai-Andy/NBP) for nbp_ds.

    # a generator (.ckpt) -> OUT.safetensors + OUT.json (+ classes.json), what nbp-export writes
    nbp-convert-official generator ucf_base_nbp16_hybrid.ckpt converted/ucf_700m.safetensors \\
        --classes shards/ucf101/classes.json --llama-tokenizer llama-2-7b-chat-hf/tokenizer.model
    nbp-convert-official generator k600_base_nbp16.ckpt converted/k600_700m.safetensors

    # a tokenizer (.pt) -> .safetensors, only needed when the .pt cannot be read without pickle
    nbp-convert-official tokenizer magvit2_ucf.pt converted/magvit2_ucf.safetensors --trust-pickle

The converted generator loads with nbp_ds.weights.export.load_exported, samples with nbp-sample
(--weights OUT.safetensors --tokenizer official:magvit2_ucf.pt) and fine-tunes with
`nbp-train --config OUT.json train.init_from=OUT.safetensors data.train=...`.

UCF-101 models are conditioned on the class name as text: --classes gives the names in label order (the
classes.json nbp-tokenize wrote for your shards, or the dataset folder with one sub-folder per
class) and --llama-tokenizer the Llama-2 tokenizer's sentencepiece model (tokenizer.model; never
downloaded); the 101 text prefixes are stored in the converted config.

Files are read with torch.load(weights_only=True). A file that pickles other Python objects is refused
unless you pass --trust-pickle, which reads it with weights_only=False: that can run code stored in the
file, so use it only for files you trust.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from nbp_ds.cli import command, setup_logging


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="what", required=True)
    g = sub.add_parser("generator", help="a released .ckpt -> .safetensors + run config")
    g.add_argument("ckpt", help="the released generator checkpoint (.ckpt)")
    g.add_argument("out", help="output .safetensors (the run config goes to the same name with .json)")
    g.add_argument("--classes", help="UCF-101: classes.json (name -> id) or a folder of class sub-folders")
    g.add_argument("--llama-tokenizer", help="UCF-101: the Llama-2 sentencepiece model (tokenizer.model)")
    g.add_argument("--kind", choices=["ucf", "k600"], help="only for a checkpoint without hyper_parameters")
    g.add_argument("--n-head", type=int, help="only for a checkpoint without hyper_parameters")
    g.add_argument("--block-size", type=int, help="tokens per block; only without hyper_parameters (default 16)")
    g.add_argument("--grid", type=int, nargs=3, metavar=("T", "H", "W"),
                   help="latent grid; only without hyper_parameters (default 5 16 16)")
    g.add_argument("--context-frames", type=int, default=2, help="K600: latent frames given when sampling (2)")
    g.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="stored precision (default fp32)")
    g.add_argument("--shard-size", metavar="SIZE",
                   help="write OUT as a folder of shards of at most SIZE each (5GB, 2GiB) with an index, as "
                        "nbp-export --shard-size does")
    g.add_argument("--trust-pickle", action="store_true",
                   help="read the file with torch.load(weights_only=False) if it needs it (runs code from the file)")
    t = sub.add_parser("tokenizer", help="a released tokenizer .pt -> .safetensors (loadable as official:OUT)")
    t.add_argument("pt", help="magvit2_ucf.pt or magvit2_k600.pt")
    t.add_argument("out", help="output .safetensors")
    t.add_argument("--trust-pickle", action="store_true",
                   help="read the file with torch.load(weights_only=False) if it needs it (runs code from the file)")
    return p.parse_args(argv)


@command
def main(argv: list[str] | None = None) -> int:
    setup_logging()
    args = parse_args(argv)
    if args.what == "generator":
        from nbp_ds.official.generator import convert_generator  # local: --help answers before torch loads
        from nbp_ds.weights.files import output_shard_bytes  # local: --help answers before torch loads

        shard_bytes = output_shard_bytes(args.out, args.shard_size)
        cfg = convert_generator(args.ckpt, args.out, trust_pickle=args.trust_pickle, classes=args.classes,
                                sentencepiece_model=args.llama_tokenizer, kind=args.kind, n_head=args.n_head,
                                block_size=args.block_size, grid=args.grid, context_frames=args.context_frames,
                                dtype=args.dtype, shard_bytes=shard_bytes)
        written = f"{args.out}/ (shards, index, config.json)" if shard_bytes else \
            f"{args.out} and {Path(args.out).with_suffix('.json')}"
        print(f"wrote {written}: {cfg.name}, {len(cfg.layout.class_prefixes) or 'no'} class prefixes")
    else:
        from nbp_ds.tokenizer.official import load_official_tokenizer, save_official_tokenizer  # local: start-up time

        tokenizer = load_official_tokenizer(args.pt, trust_pickle=args.trust_pickle)
        out = save_official_tokenizer(tokenizer, args.out)
        print(f"wrote {out}: load it with --tokenizer official:{out} (version {tokenizer.version})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
