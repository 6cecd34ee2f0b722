"""One clip per WebDataset sample: ``__key__``, ``tokens.npy`` (uint16 when every code fits, else int32;
shape (T, H, W)), ``cls`` (class index, when labelled) and ``json`` (source video, clip start, fps,
tokenizer name and version, schema version)."""

from __future__ import annotations

import io
import json

import numpy as np

SCHEMA_VERSION = 1


class SampleError(ValueError):
    """A shard member that cannot be used; the message names the key and what is wrong."""


class WrongShape(SampleError):
    """A readable sample whose token grid is not the run's layout.grid (another tokenizer or clip size)."""


def encode_sample(key: str, tokens: np.ndarray, label: int | None, meta: dict) -> dict:
    """Build the WebDataset dict of one clip (bytes values, ready for a TarWriter)."""
    tokens = np.asarray(tokens)
    if tokens.ndim != 3:
        raise SampleError(f"sample {key!r}: tokens must be (T, H, W), got shape {tokens.shape}")
    if tokens.size and (tokens.min() < 0 or tokens.max() > np.iinfo(np.int32).max):
        raise SampleError(f"sample {key!r}: token values out of range [{tokens.min()}, {tokens.max()}]")
    dtype = np.uint16 if tokens.size == 0 or tokens.max() < 2**16 else np.int32
    buf = io.BytesIO()
    np.save(buf, tokens.astype(dtype), allow_pickle=False)
    sample = {"__key__": key, "tokens.npy": buf.getvalue(),
              "json": json.dumps({**meta, "schema": SCHEMA_VERSION}, sort_keys=True).encode()}
    if label is not None:
        sample["cls"] = str(int(label)).encode()
    return sample


def decode_sample(sample: dict, grid: tuple[int, int, int] | None = None) -> tuple[np.ndarray, int, dict]:
    """WebDataset dict -> (tokens int64 (T, H, W), label or -1, meta); SampleError when unusable."""
    key = sample.get("__key__", "?")
    raw = sample.get("tokens.npy")
    if raw is None:
        raise SampleError(f"sample {key!r}: no tokens.npy member (has {sorted(k for k in sample if k[0] != '_')})")
    try:
        tokens = np.load(io.BytesIO(raw), allow_pickle=False)
    except Exception as exc:  # numpy raises several types for damaged bytes
        raise SampleError(f"sample {key!r}: tokens.npy is not a valid .npy array ({exc})") from exc
    if tokens.dtype not in (np.uint16, np.int32, np.int64, np.uint8):
        raise SampleError(f"sample {key!r}: tokens.npy has dtype {tokens.dtype}, expected uint16 or int32")
    if grid is not None and tuple(tokens.shape) != tuple(grid):
        raise WrongShape(f"sample {key!r}: tokens shape {tuple(tokens.shape)} != layout.grid {tuple(grid)}")
    label = -1
    if "cls" in sample:
        try:
            label = int(sample["cls"].decode().strip())
        except (ValueError, UnicodeDecodeError) as exc:
            raise SampleError(f"sample {key!r}: cls {sample['cls'][:20]!r} is not an integer") from exc
    meta = {}
    if "json" in sample:
        try:
            meta = json.loads(sample["json"])
        except (ValueError, UnicodeDecodeError) as exc:
            raise SampleError(f"sample {key!r}: json member is not valid JSON ({exc})") from exc
    return tokens.astype(np.int64), label, meta
