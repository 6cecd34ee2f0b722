"""Write the Slurm scripts of nbp_ds into a folder, for an installed copy (a checkout has them in slurm/).

    nbp-slurm-template                      # ./slurm/: every sbatch script, env.sh, README.md
    nbp-slurm-template --out ~/jobs         # ~/jobs/slurm/...
    sbatch slurm/train.sbatch data.train=... data.val=...      (from the folder holding slurm/)

env.sh is the one file to edit for your cluster (modules, NCCL settings); its default virtual environment is
the one this command runs in. Existing files are kept unless --force.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from nbp_ds.cli import command
from nbp_ds.errors import UsageError
from nbp_ds.files import write_text_atomic

SOURCE = Path(__file__).resolve().parents[1] / "slurm"
# every file of the package's slurm/ folder: a script added there is written too (the README names them all)
FILES = tuple(sorted(p.name for p in SOURCE.iterdir() if p.is_file() and not p.name.startswith(".")))
VENV_LINE = 'NBP_VENV="${NBP_VENV:-$NBP_ROOT/.venv}"'


@command
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="nbp-slurm-template", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=".", help="folder to write slurm/ into (default: here)")
    p.add_argument("--force", action="store_true", help="overwrite existing files")
    args = p.parse_args(argv)
    target = Path(args.out) / "slurm"
    existing = [name for name in FILES if (target / name).exists()]
    if existing and not args.force:
        raise UsageError(f"{target} already holds {', '.join(existing)}: pass --force to overwrite")
    target.mkdir(parents=True, exist_ok=True)
    venv = Path(sys.prefix)
    for name in FILES:
        text = (SOURCE / name).read_text()
        if name == "env.sh" and (venv / "bin" / "activate").is_file():
            assert VENV_LINE in text, "env.sh changed: update nbp-slurm-template's VENV_LINE"
            text = text.replace(VENV_LINE, f'NBP_VENV="${{NBP_VENV:-{venv}}}"  # the venv nbp-slurm-template ran in')
        write_text_atomic(target / name, text)
        if name.endswith((".sbatch", ".sh")):
            (target / name).chmod(0o755)
    print(f"wrote {', '.join(FILES)} to {target}; edit {target / 'env.sh'} for your cluster, then from "
          f"{target.parent}: sbatch slurm/train.sbatch data.train=... data.val=...")
    return 0


if __name__ == "__main__":
    sys.exit(main())
