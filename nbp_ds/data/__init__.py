"""WebDataset token shards: the sample schema, a shard writer, and the training / validation loader."""

from nbp_ds.data.loader import TokenLoader, build_loader, expand_shards, iter_tar_samples, to_device
from nbp_ds.data.schema import SCHEMA_VERSION, SampleError, decode_sample, encode_sample
from nbp_ds.data.writer import TokenShardWriter

__all__ = [
    "SCHEMA_VERSION", "SampleError", "TokenLoader", "TokenShardWriter", "build_loader", "decode_sample",
    "encode_sample", "expand_shards", "iter_tar_samples", "to_device",
]
