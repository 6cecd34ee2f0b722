"""Inspect token shards: samples, shapes and their token counts, token range, labels, tokenizers, corrupt
members, duplicates.

    nbp-inspect-shards shards/ucf101                     # a folder of *.tar
    nbp-inspect-shards 'shards/ucf101/shard-t{000..003}-{000000..000009}.tar'
    nbp-inspect-shards shards/ucf101 --json report.json --expect-grid 5,16,16
    nbp-inspect-shards shards/mixed --mixed            # clips of several shapes, for packed training
    nbp-inspect-shards 'https://host/ucf101/shard-{000000..000099}.tar'
    nbp-inspect-shards 'pipe:aws s3 cp s3://bucket/ucf101/shard-{000000..000099}.tar -'

Shards are named as data.train names them: paths, brace patterns, globs, folders, http(s) URLs and
pipe: commands (see nbp_ds/data/shards.py). A shard that cannot be read is retried (--retries), then
counted as failed and named.

Exit status: 0 when every shard and sample is readable, unique and of one shape (of several with --mixed,
for packed training: data.pack_tokens; and of --expect-grid when given); 1 otherwise (so a Slurm dependency
job can check the union of an array job's shards).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

from nbp_ds.cli import command
from nbp_ds.errors import UsageError


def inspect(spec: str | list[str], retries: int = 3, retry_backoff: float = 1.0) -> dict:
    """One pass over the shards -> a report dict (see main for the fields)."""
    import numpy as np  # local: --help answers before torch loads
    from tqdm import tqdm  # local: --help answers before torch loads

    from nbp_ds.data import (  # local: --help answers before torch loads
        DataReport,
        RetryPolicy,
        SampleError,
        decode_sample,
        expand_shards,
        read_shard,
    )

    shards = expand_shards(spec)
    reader = DataReport(cap=10)
    policy = RetryPolicy(retries, retry_backoff)
    counts: Counter = Counter()
    shapes: Counter = Counter()
    tokens_of: Counter = Counter()  # per shape: video tokens in all
    labels: Counter = Counter()
    tokenizers: Counter = Counter()
    keys: Counter = Counter()
    per_shard: dict[str, int] = {}
    low, high, corrupt_examples = None, None, []
    for shard in tqdm(shards, unit="shard", disable=len(shards) < 5, file=sys.stderr):
        n = 0
        for _, sample in read_shard(shard, policy=policy, report=reader):
            try:
                tokens, label, meta = decode_sample(sample)
            except SampleError as exc:
                counts["corrupt"] += 1
                if len(corrupt_examples) < 10:
                    corrupt_examples.append(f"{Path(shard).name}: {exc}")
                continue
            n += 1
            keys[sample["__key__"]] += 1
            shape = "x".join(map(str, tokens.shape))
            shapes[shape] += 1
            tokens_of[shape] += int(tokens.size)
            labels[label] += 1
            tokenizers[f"{meta.get('tokenizer', '?')} ({meta.get('tokenizer_version', '?')})"] += 1
            lo, hi = int(np.min(tokens)), int(np.max(tokens))
            low, high = lo if low is None else min(low, lo), hi if high is None else max(high, hi)
        per_shard[shard] = n
    duplicates = {k: c for k, c in keys.items() if c > 1}
    return {
        "shards": len(shards), "samples": sum(per_shard.values()), "unique_keys": len(keys),
        "duplicate_keys": len(duplicates), "duplicate_examples": sorted(duplicates)[:10],
        "corrupt_members": counts["corrupt"], "failed_shards": reader.counts["failed_shards"],
        "shard_retries": reader.counts["shard_retries"], "failed_examples": reader.problems,
        "corrupt_examples": corrupt_examples, "shapes": dict(shapes),
        "shape_tokens": {shape: {"per_sample": tokens_of[shape] // count, "total": tokens_of[shape]}
                         for shape, count in shapes.items()},
        "token_min": low, "token_max": high,
        "labels": {str(k): v for k, v in sorted(labels.items())}, "tokenizers": dict(tokenizers),
        "samples_per_shard": {"min": min(per_shard.values(), default=0), "max": max(per_shard.values(), default=0)},
    }


@command
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("shards", nargs="+", help="folders, brace patterns, globs, tar files, http(s) URLs or pipe: "
                                              "commands")
    p.add_argument("--json", help="also write the report to this JSON file")
    p.add_argument("--expect-grid", help="T,H,W every sample must have, e.g. 5,16,16")
    p.add_argument("--mixed", action="store_true",
                   help="samples of several shapes are expected (packed training, data.pack_tokens): not an error")
    p.add_argument("--retries", type=int, default=3, help="times a shard that fails is read again (default 3)")
    p.add_argument("--retry-backoff", type=float, default=1.0,
                   help="seconds before the first retry, doubled for each further one (default 1)")
    args = p.parse_args(argv)
    if args.retries < 0 or args.retry_backoff < 0:
        raise UsageError("--retries and --retry-backoff must be >= 0")
    try:
        report = inspect(args.shards, args.retries, args.retry_backoff)
    except FileNotFoundError as exc:
        raise UsageError(str(exc)) from exc
    print(f"shards           {report['shards']}  ({report['samples_per_shard']['min']}.."
          f"{report['samples_per_shard']['max']} samples each)")
    print(f"samples          {report['samples']}  ({report['unique_keys']} unique keys, "
          f"{report['duplicate_keys']} duplicated)")
    print(f"shapes           {len(report['shapes'])}")
    for shape, count in sorted(report["shapes"].items(), key=lambda item: -item[1]):
        sizes = report["shape_tokens"][shape]
        print(f"  {shape:>12} {count:7d} samples x {sizes['per_sample']} tokens = {sizes['total']} tokens")
    print(f"token range      [{report['token_min']}, {report['token_max']}]")
    print(f"tokenizers       {report['tokenizers']}")
    print(f"corrupt          {report['corrupt_members']} member(s)")
    for line in report["corrupt_examples"]:
        print(f"  {line}")
    print(f"failed shards    {report['failed_shards']} (unreadable or broken after their retries; "
          f"{report['shard_retries']} retries in all)")
    for line in report["failed_examples"]:
        print(f"  {line}")
    hist = report["labels"]
    if hist:
        print(f"labels           {len(hist)} classes" + ("" if "-1" not in hist else f" ({hist['-1']} unlabelled)"))
        peak = max(hist.values())
        for label, count in hist.items():
            print(f"  {label:>6} {count:7d} {'#' * max(1, round(40 * count / peak))}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
    ok = report["duplicate_keys"] == 0 and report["corrupt_members"] == 0 and report["failed_shards"] == 0
    ok = ok and (len(report["shapes"]) <= 1 or args.mixed)
    if len(report["shapes"]) > 1 and not args.mixed:
        print(f"{len(report['shapes'])} shapes: one run trains on one grid unless it packs (data.pack_tokens; "
              f"then say --mixed)", file=sys.stderr)
    if args.expect_grid:
        want = args.expect_grid.replace(",", "x")
        ok = ok and set(report["shapes"]) <= {want}
        if set(report["shapes"]) - {want}:
            print(f"shapes {sorted(report['shapes'])} differ from --expect-grid {want}", file=sys.stderr)
    if report["duplicate_keys"]:
        print(f"duplicate keys, e.g. {report['duplicate_examples']}", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
