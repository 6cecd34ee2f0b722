"""nbp_ds: distributed training of Next-Block Prediction video transformers."""

__version__ = "0.1.0"
