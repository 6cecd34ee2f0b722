"""The whole product on one small machine, stage by stage (what `make quickstart` runs):

  1. videos     synthetic labelled mp4s: 3 shapes x 4 directions of motion, train and held-out split
  2. tokenizer  train the `tiny-skip` causal 3D CNN + FSQ tokenizer on them (1,000 codes, 9x32x32 -> 3x8x8)
  3. shards     tokenize both splits into WebDataset shards
  4. train      a class-conditional NBP model with DeepSpeed ZeRO-3 on 2 CPU processes (torchrun)
  5. export     consolidate the ZeRO checkpoint into one safetensors file
  6. sample     8 videos per class: mp4s, a PNG grid, tokens
  7. check      does each sample show its class' shape moving in its class' direction? Then the quality
                ladder: the same checker (shape, direction, colour) on the held-out source clips (its ceiling),
                on the tokenizer's reconstructions of them and on the samples -> quality.json, TensorBoard
  8. long       one long sample per class (65 frames, 7 clips' length; all classes in one batch) and the
                check window by window (9-frame windows): does each keep its class, shape and colour over time?
                -> long_samples/windows.json

Every stage writes a marker when it completes; a second run reuses finished stages whose inputs
did not change (a stage's marker covers its own parameters and every earlier stage's, so a new
tokenizer re-tokenizes the shards and retrains), and whose outputs are still there. Pass --redo STAGE
to run one again, and with it every stage after it. Each stage shows its own progress, and the run ends
with a table of stage times.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import time
from pathlib import Path

from nbp_ds.cli import command
from nbp_ds.cli.options import add_object_size_argument, add_sampling_arguments
from nbp_ds.config import load_config
from nbp_ds.eval.quality import RUNGS, format_ladder
from nbp_ds.eval.windows import format_window_table
from nbp_ds.generate.draw import QUICKSTART_SAMPLING
from nbp_ds.tied_process import run_tied
from nbp_ds.tokenizer.config import TOKENIZER_CONFIG_DIR, TokenizerTrainConfig, load_tokenizer_config
from nbp_ds.tokenizer.model import PRESETS
from nbp_ds.typed_yaml import load_dataclass_tree

STAGES = ("videos", "tokenizer", "shards", "train", "export", "sample", "check", "long")
# the synthetic videos', the tokenizer's and the model's clip, and the long samples' check window (passed to the
# commands as text, as the stages' digests always saw it)
CLIP_FRAMES = 9
TOKENIZER_CONFIG = "quickstart"  # nbp_ds/configs/tokenizer/quickstart.yaml: the tokenizer's recipe


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="quickstart_out", help="everything goes here (default quickstart_out/)")
    p.add_argument("--per-class", type=int, default=64, help="training videos per class")
    p.add_argument("--val-per-class", type=int, default=8,
                   help="held-out videos per class (the ladder's source and reconstruction rungs)")
    add_object_size_argument(p)
    # The tokenizer's recipe is nbp_ds/configs/tokenizer/quickstart.yaml's and the model's quickstart.yaml's: these
    # flags change a value of theirs only when given (their help shows the config's value).
    recipe = load_dataclass_tree(TokenizerTrainConfig, TOKENIZER_CONFIG, config_dir=TOKENIZER_CONFIG_DIR)
    p.add_argument("--tokenizer-steps", type=int, help=f"tokenizer training steps (default {recipe.train.steps})")
    p.add_argument("--tokenizer-lr", type=float,
                   help=f"tokenizer peak learning rate (default {recipe.train.lr:g}; 3e-3 keeps grey objects: "
                        f"docs/quality.md)")
    p.add_argument("--tokenizer-preset", choices=sorted(PRESETS),
                   help=f"tokenizer architecture (default {recipe.model.preset}: tiny with the linear colour path)")
    p.add_argument("--tokenizer-l1-weight", type=float,
                   help=f"weight of the tokenizer's L1 loss beside its MSE (default {recipe.loss.l1_weight:g}: the "
                        f"L1 term keeps colour out)")
    p.add_argument("--train-steps", type=int,
                   help=f"NBP training steps (default: the run config's train.steps, quickstart.yaml's "
                        f"{load_config('quickstart').train.steps})")
    p.add_argument("--nproc", type=int, default=2, help="training processes (ZeRO-3 data parallel)")
    p.add_argument("--samples-per-class", type=int, default=8,
                   help="sampled videos per class (the ladder's samples rung: 8 x 12 classes = 96)")
    add_sampling_arguments(p)
    p.add_argument("--long-frames", type=int, default=65,
                   help="frames of the long sample of each class (stage 8; 1 + 4k, at least 9)")
    p.add_argument("--config", default="quickstart", help="run config of the NBP model")
    p.add_argument("--redo", action="append", default=[], choices=STAGES, help="run this stage again")
    p.add_argument("overrides", nargs="*", help="key=value overrides for the NBP run config")
    args = p.parse_intermixed_args(argv)
    if args.long_frames < CLIP_FRAMES or (args.long_frames - 1) % 4:  # checked now, not after the training
        p.error(f"--long-frames must be 1 + 4k and at least the clip's {CLIP_FRAMES} frames, got {args.long_frames}")
    if args.tokenizer_l1_weight is not None and args.tokenizer_l1_weight < 0:
        p.error(f"--tokenizer-l1-weight must be >= 0, got {args.tokenizer_l1_weight}")
    return args


def tokenizer_overrides(args: argparse.Namespace) -> list[str]:
    """The tokenizer flags given, as key=value overrides of the tokenizer config (none given: its recipe)."""
    keys = {"train.steps": args.tokenizer_steps, "train.lr": args.tokenizer_lr,
            "model.preset": args.tokenizer_preset, "loss.l1_weight": args.tokenizer_l1_weight}
    return [f"{key}={value}" for key, value in keys.items() if value is not None]


class Pipeline:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.out = Path(args.out).resolve()
        self.out.mkdir(parents=True, exist_ok=True)
        self.python = sys.executable
        self.env = {**os.environ, "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu")}
        self.upstream = ""  # digest of the stages before this one: their changes invalidate this one
        self.timings: list[tuple[str, float | None]] = []  # (stage, seconds), None when reused

    def path(self, *parts: str) -> Path:
        return self.out.joinpath(*parts)

    def _marker(self, stage: str) -> Path:
        return self.path(".done", stage)

    def stage(self, name: str, number: int, params: dict, commands: list[list[str]],
              outputs: tuple[Path, ...] = ()) -> None:
        """Run a stage's commands unless it already completed with the same inputs (its own and upstream)."""
        inputs = [self.upstream, params, commands]
        digest = hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()
        self.upstream = digest
        marker = self._marker(name)
        header = f"[{number}/{len(STAGES)}] {name}"
        done = marker.is_file() and marker.read_text() == digest and all(output.exists() for output in outputs)
        if name not in self.args.redo and done:
            print(f"{header}: done in an earlier run, reused", flush=True)
            self.timings.append((name, None))
            return
        interrupted = marker.is_file() and marker.read_text() == f"running {digest}"
        if name in self.args.redo or (marker.is_file() and not interrupted):
            # It ran before with other inputs (or --redo): start it afresh, since the trainers would
            # otherwise resume the old run's checkpoint. Interrupted with these same inputs, it resumes.
            why = "--redo" if name in self.args.redo else "its inputs changed"
            for output in outputs:
                if output.exists():
                    print(f"{header}: {why}; removing the old {output}", flush=True)
                    if output.is_dir():
                        shutil.rmtree(output)
                    else:
                        output.unlink()
        # the stages after this one read what it makes: even with their own inputs unchanged they must start afresh
        # (--redo of an earlier stage), so their markers no longer say done
        for later in STAGES[STAGES.index(name) + 1:]:
            if self._marker(later).is_file():
                self._marker(later).write_text(f"stale: {name} ran again")
        marker.parent.mkdir(exist_ok=True)
        marker.write_text(f"running {digest}")
        print(f"{header}: running", flush=True)
        began = time.time()
        for cmd in commands:
            print("  $ " + " ".join(str(c) for c in cmd), flush=True)
            result = run_tied([str(c) for c in cmd], env=self.env)
            if result.returncode != 0:
                raise SystemExit(f"quickstart stage '{name}' failed (exit {result.returncode}); fix the error "
                                 f"above and run again: finished stages are reused")
        marker.write_text(digest)
        seconds = time.time() - began
        self.timings.append((name, seconds))
        print(f"{header}: finished in {seconds:.0f} s", flush=True)

    def print_timings(self) -> None:
        """The table of stage times that ends a run (where the quickstart's minutes went)."""
        print("\nstage        time")
        for name, seconds in self.timings:
            print(f"  {name:<10} {'reused' if seconds is None else f'{seconds:6.0f} s':>8}")
        total = sum(seconds or 0.0 for _, seconds in self.timings)
        print(f"  {'total':<10} {total:6.0f} s")

    def sampling_args(self) -> list:
        """nbp-sample's settings for both sampling stages; --restart: a rerun means new weights, so sample anew."""
        top_k = [] if self.args.top_k is None else ["--top-k", self.args.top_k]
        return ["--temperature", str(QUICKSTART_SAMPLING["temperature"]), *top_k, "--top-p", self.args.top_p,
                "--cfg-scale", self.args.cfg_scale, "--seed", "0", "--restart"]

    def long_stage(self, export: Path, tokenizer: Path, classes: Path, num_classes: int) -> Path:
        """Stage 8: one long sample per class, every class in one batch (one generate_long call, the cheapest way
        on a CPU), then the consistency check window by window (the clip's 9 frames each); returns its folder."""
        a, py, long = self.args, self.python, self.path("long_samples")
        self.stage("long", 8, {"frames": a.long_frames, "cfg": a.cfg_scale}, [[
            py, "-m", "nbp_ds.cli.sample", "--weights", export, "--tokenizer", tokenizer, "--out", long,
            "--num", "1", "--batch-size", num_classes, "--frames", a.long_frames, "--classes", classes,
            *self.sampling_args()], [
            py, "-m", "nbp_ds.cli.check_consistency", long, "--classes", classes, "--window-frames", str(CLIP_FRAMES),
            "--json", long / "windows.json"]])
        return long

    def print_long_table(self, long: Path) -> None:
        windows = json.loads((long / "windows.json").read_text())["window_consistency"]
        print(f"\nlong samples ({self.args.long_frames} frames, one per class), window by window: does each keep "
              f"its class (both), and the shape and colour its first window showed?")
        print(format_window_table(windows))

    def run(self) -> None:
        a, py = self.args, self.python
        videos, tok_run = self.path("videos"), self.path("tokenizer")
        tokenizer = tok_run / "tokenizer"
        shards, train = self.path("shards"), self.path("train")
        export, samples = train / "export.safetensors", self.path("samples")
        clip = ["--frames", str(CLIP_FRAMES), "--resolution", "32", "--fps", "8"]
        steps = [] if a.train_steps is None else [f"train.steps={a.train_steps}"]
        overrides = [f"data.train={shards / 'train'}", f"data.val={shards / 'val'}", f"train.out_dir={train}",
                     *steps, f"train.sample_tokenizer={tokenizer}", *a.overrides]
        tok_paths = [f"data.videos={videos / 'train'}", f"data.val_videos={videos / 'val'}", f"train.out_dir={tok_run}"]
        tok_overrides = tokenizer_overrides(a)
        # Both configs are checked before the first stage (a bad key is refused now, not after the tokenizer's
        # minutes); the resolved configs, not just their names, are the stages' inputs: an edited yaml retrains.
        run_config = load_config(a.config, overrides).to_dict()
        tok_config = load_tokenizer_config(TOKENIZER_CONFIG, tok_paths + tok_overrides).to_dict()
        self.stage("videos", 1, {}, [[
            py, "-m", "nbp_ds.cli.make_synthetic_videos", "--out", videos, "--per-class", a.per_class,
            "--val-per-class", a.val_per_class, "--frames", str(CLIP_FRAMES), "--size", "32", "--fps", "8",
            "--object-size", *a.object_size, "--seed", "0"]],
            outputs=(videos,))
        # configs/tokenizer/quickstart.yaml's recipe, with the --tokenizer-* flags given
        self.stage("tokenizer", 2, {"config": tok_config}, [[
            py, "-m", "nbp_ds.cli.train_tokenizer", "--config", TOKENIZER_CONFIG, "--videos", videos / "train",
            "--val-videos", videos / "val", "--out", tok_run, *clip, "--seed", "0", *tok_overrides]],
            outputs=(tok_run,))
        self.stage("shards", 3, {}, [
            [py, "-m", "nbp_ds.cli.tokenize", "--videos", videos / split, "--out", shards / split,
             "--tokenizer", tokenizer, *clip, "--shard-size", "200"]
            for split in ("train", "val")], outputs=(shards,))
        self.stage("train", 4, {"config": run_config, "nproc": a.nproc}, [[
            py, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", a.nproc,
            "-m", "nbp_ds.train", "--config", a.config, *overrides]], outputs=(train,))
        self.stage("export", 5, {"train": str(train)}, [[py, "-m", "nbp_ds.cli.export", train, export]],
                   outputs=(export,))
        self.stage("sample", 6, {"n": a.samples_per_class, "cfg": a.cfg_scale}, [[
            py, "-m", "nbp_ds.cli.sample", "--weights", export, "--tokenizer", tokenizer, "--out", samples,
            "--num", a.samples_per_class, "--classes", shards / "train" / "classes.json", *self.sampling_args()]])
        self.stage("check", 7, {"n": a.samples_per_class}, [[
            py, "-m", "nbp_ds.cli.check_consistency", samples, "--classes", shards / "train" / "classes.json",
            "--json", samples / "consistency.json"], [
            py, "-m", "nbp_ds.cli.quality_ladder", "--videos", videos / "val", "--tokenizer", tokenizer,
            "--samples", samples, "--classes", shards / "train" / "classes.json", *clip,
            "--json", self.path("quality.json"), "--tensorboard", self.path("quality")]])
        long = self.long_stage(export, tokenizer, shards / "train" / "classes.json",
                               run_config["layout"]["num_classes"])
        self.print_timings()
        ladder = json.loads(self.path("quality.json").read_text())
        print("\nquality ladder (the class checker on each rung: where shape, direction and colour are kept)")
        print(format_ladder({k: v for k, v in ladder.items() if k in RUNGS}))
        self.print_long_table(long)
        print("\nDone. Look at:")
        print(f"  sampled videos   {samples}/*.mp4")
        print(f"  frame grid       {samples / 'grid.png'}")
        print(f"  class check      {samples / 'consistency.json'}")
        print(f"  quality ladder   {self.path('quality.json')}   (source -> reconstruction -> samples)")
        print(f"  long samples     {long}/*.mp4   (window by window: {long / 'windows.json'})")
        print(f"  TensorBoard      tensorboard --logdir {self.out}   (training: {train / 'tb'}, tokenizer: "
              f"{tok_run / 'tb'}; the training's sample videos: Time Series tab, filter tags by 'samples')")


@command
def main(argv: list[str] | None = None) -> int | None:
    Pipeline(parse_args(argv)).run()


if __name__ == "__main__":
    sys.exit(main())
