"""``python -m nbp_ds.train``: the trainer's command line (see nbp_ds.cli.train, also ``nbp-train``)."""

import sys

from nbp_ds.cli.train import main

sys.exit(main())
