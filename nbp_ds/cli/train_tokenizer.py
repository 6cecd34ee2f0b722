"""Train the causal 3D CNN + FSQ video tokenizer on a folder of videos.

    nbp-train-tokenizer --videos data/train --val-videos data/val --out runs/tok --preset tiny \\
        --frames 9 --resolution 32 --steps 1500
    nbp-train-tokenizer --config ucf101 data.videos=UCF-101/train data.val_videos=UCF-101/val train.out_dir=runs/tok
    torchrun --nproc_per_node 8 -m nbp_ds.cli.train_tokenizer --config ucf101 --videos UCF-101 --out runs/tok

--config is a shipped tokenizer config (nbp_ds/configs/tokenizer: quickstart, ucf101) or a YAML file; without
it the defaults below apply. key=value arguments (values are YAML: train.lr=3e-4, data.clip.frames=17) and the
flags set config keys; each flag names its key. --print-config prints the resolved config and exits.

Loss: L1 + MSE reconstruction; with --adversarial-weight > 0 a 3D PatchGAN (hinge loss) joins after
--adversarial-start of the steps (worth it on real footage; the synthetic quickstart does without).
Clips are streamed: --workers processes decode fresh random clips every epoch (data.random_crop, data.flip),
keeping at most data.cache_mb of decoded videos each; only the held-out clips are decoded once, into
OUT/clips_val.npy. Skipped videos are listed in OUT/skipped_videos/. Several processes (torchrun) train
data-parallel; a checkpoint keeps the stream's position, so a resume continues it exactly.

Writes OUT/checkpoints/ (every --save-every steps; a rerun resumes from the latest), OUT/tb (TensorBoard:
losses, PSNR, codebook use, reconstructions as images), OUT/metrics.jsonl, and at the end OUT/tokenizer
(config.json + tokenizer.safetensors, what nbp-tokenize --tokenizer and nbp-sample take) and
OUT/report.json with the reconstruction PSNR on the held-out clips.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from nbp_ds.cli import command, setup_logging


def build_parser() -> argparse.ArgumentParser:
    from nbp_ds.tokenizer.config import FLAGS, default_of  # local: --help answers before torch loads

    p = argparse.ArgumentParser(prog="nbp-train-tokenizer", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="tokenizer config name or YAML path (default: the defaults shown here)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    for flag, key, kind, text in FLAGS:
        default = default_of(key)
        shown = "" if default is None or "default" in text else f"; default {default}"
        # no argparse default: an unset flag leaves the config's value alone (one source of defaults)
        p.add_argument(flag, dest=key, type=kind, default=argparse.SUPPRESS, metavar=kind.__name__.upper(),
                       help=f"{key}: {text}{shown}")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.steps=1000 data.clip.fps=4")
    return p


def config_from_arguments(argv: list[str] | None = None):
    """The resolved TokenizerTrainConfig of a command line (flags applied before key=value overrides), and
    whether --print-config was given."""
    from nbp_ds.tokenizer.config import FLAGS, load_tokenizer_config  # local: --help answers before torch loads

    args = build_parser().parse_intermixed_args(argv)
    flags = {key: getattr(args, key) for _, key, _, _ in FLAGS if hasattr(args, key)}
    return load_tokenizer_config(args.config, args.overrides, settings=flags), args.print_config


def reconstruction_fvd(i3d: str):
    """The held-out report's rFVD with the I3D detector file ``i3d`` (nbp-eval-fvd's code; the first
    min(16, frames) frames of each clip)."""
    from nbp_ds.eval.fvd import DEFAULT_NUM_FRAMES, I3DFeatureExtractor, compute_fvd  # local: start-up time

    def rfvd(real, fake, device) -> float:
        extractor = I3DFeatureExtractor(i3d, device, num_frames=min(DEFAULT_NUM_FRAMES, real.shape[1]))
        return compute_fvd(real, fake, extractor)

    return rfvd


@command
def main(argv: list[str] | None = None) -> int:
    from nbp_ds.runtime.stop import stop_request  # local: --help answers before torch loads

    stop_request()  # before the slow start-up: a SIGUSR1 during it is remembered, not fatal
    cfg, print_config = config_from_arguments(argv)
    if print_config:
        import yaml  # local: --help answers before torch loads

        print(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        return 0
    setup_logging(ranked=True)
    from nbp_ds.runtime import distributed
    from nbp_ds.tokenizer.trainer import train_tokenizer  # local: --help answers before torch loads

    report = train_tokenizer(cfg, reconstruction_fvd(cfg.train.i3d) if cfg.train.i3d else None)
    if report is not None:
        print(f"tokenizer saved to {Path(cfg.train.out_dir) / 'tokenizer'} (version {report['version']}); held-out "
              f"reconstruction PSNR {report['val_psnr']:.2f} dB over {report['val_clips']} clips, codebook use "
              f"{100 * report['val_codebook_used']:.0f}%")
    return distributed.end_launched_process(0)  # a finished rank of a job ends here (see there why)


if __name__ == "__main__":
    sys.exit(main())
