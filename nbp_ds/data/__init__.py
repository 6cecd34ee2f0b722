"""WebDataset token shards: the sample schema, a shard writer, where shards live and how they are read,
and the training / validation loader."""

from nbp_ds.data.loader import TokenLoader, build_loader, to_device
from nbp_ds.data.report import DataReport
from nbp_ds.data.schema import SCHEMA_VERSION, SampleError, decode_sample, encode_sample
from nbp_ds.data.shards import RetryPolicy, expand_shards, read_shard
from nbp_ds.data.sources import Source, parse_sources
from nbp_ds.data.writer import TokenShardWriter

__all__ = [
    "SCHEMA_VERSION", "DataReport", "RetryPolicy", "SampleError", "Source", "TokenLoader", "TokenShardWriter",
    "build_loader", "decode_sample", "encode_sample", "expand_shards", "parse_sources", "read_shard", "to_device",
]
