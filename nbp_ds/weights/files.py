"""The files of an export, in either of its two forms, written and read in one place.

- **One file**: ``OUT.safetensors`` (the run config in its metadata, key ``nbp_ds_config``) and ``OUT.json`` (the
  run config).
- **Sharded** (``nbp-export --shard-size 5GB``), the Hugging Face layout: a folder holding
  ``model-00001-of-0000N.safetensors`` ..., ``model.safetensors.index.json`` (``{"metadata": {"total_size": bytes,
  "nbp_ds_config": ...}, "weight_map": {tensor name: shard file}}``) and ``config.json`` (the run config). The shards
  are planned by ``huggingface_hub.split_torch_state_dict_into_shards`` (the planner DeepSpeed's ``zero_to_fp32.py``
  and the Hugging Face libraries use): tensors fill shards in order, none larger than the size asked for; a tensor
  larger than that alone gets a shard of its own, placed before the one being filled. One shard is named
  ``model-00001-of-00001.safetensors`` all the same (huggingface_hub would call it ``model.safetensors``).

:func:`open_export` reads both (the file, the folder or its index), one tensor at a time, so a caller that copies
weights into a partitioned model never holds the whole export.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from nbp_ds.errors import UsageError
from nbp_ds.files import atomic_output, write_text_atomic

CONFIG_KEY = "nbp_ds_config"  # the run config (JSON) in a file's metadata or the index's
INDEX_NAME = "model.safetensors.index.json"
CONFIG_NAME = "config.json"
_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?", re.IGNORECASE)
_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30,
          "tib": 2**40}


def parse_size(text: str) -> int:
    """``"5GB"`` -> 5,000,000,000 bytes (KB/MB/GB/TB are powers of 10, KiB/MiB/GiB/TiB of 2; a bare number is
    bytes)."""
    match = _SIZE.fullmatch(text.strip())
    if match is None or float(match[1]) <= 0:
        raise ValueError(f"{text!r} is not a size such as 5GB, 500MB or 2GiB")
    return int(float(match[1]) * _UNITS[(match[2] or "B").lower()])


def output_shard_bytes(out: str, shard_size: str | None) -> int | None:
    """What a program writing weights to ``out`` makes of its ``--shard-size``: bytes per shard, or None for one
    file, whose name must then end in .safetensors. A bad value is a UsageError naming the flag or the file."""
    try:
        shard_bytes = parse_size(shard_size) if shard_size else None
    except ValueError as exc:
        raise UsageError(f"--shard-size: {exc}") from exc
    if shard_bytes is None and not out.endswith(".safetensors"):
        raise UsageError(f"OUT {out} must end in .safetensors (or pass --shard-size to write a folder of shards)")
    return shard_bytes


def plan_shards(state: dict[str, torch.Tensor], max_bytes: int) -> dict[str, list[str]]:
    """Shard file name -> the names of its tensors, shards of at most ``max_bytes`` each (a larger tensor alone),
    as huggingface_hub plans them (see the module docstring)."""
    from huggingface_hub import split_torch_state_dict_into_shards

    # planned on meta copies: a consolidated checkpoint's tensors are views of one flat buffer, which the planner
    # would take for one tensor of the buffer's size (it groups tensors by storage); a meta tensor counts its own
    # bytes and shares nothing
    shapes = {name: torch.empty_like(tensor, device="meta") for name, tensor in state.items()}
    split = split_torch_state_dict_into_shards(shapes, filename_pattern="model{suffix}.safetensors",
                                               max_shard_size=max_bytes)
    if not split.is_sharded:
        return {shard_name(1, 1): list(shapes)}
    return split.filename_to_tensors


def shard_name(index: int, count: int) -> str:
    return f"model-{index:05d}-of-{count:05d}.safetensors"


def write_single(state: dict[str, torch.Tensor], config: dict[str, Any], out: Path, dtype: str) -> Path:
    """The one-file form: ``out`` (.safetensors) and ``out`` with .json."""
    with atomic_output(out) as tmp:
        save_file(state, str(tmp), metadata={CONFIG_KEY: json.dumps(config), "dtype": dtype, "format": "pt"})
    write_text_atomic(out.with_suffix(".json"), json.dumps(config, indent=1))
    return out


def write_sharded(state: dict[str, torch.Tensor], config: dict[str, Any], folder: Path, dtype: str,
                  max_bytes: int) -> Path:
    """The sharded form in ``folder``; returns the index's path. The index is written last: a folder without it
    is an interrupted export, which no reader takes for a complete one."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / INDEX_NAME).unlink(missing_ok=True)
    for stale in folder.glob("model-*-of-*.safetensors"):  # an earlier export's shards (maybe another count)
        stale.unlink()
    sizes = {name: tensor.numel() * tensor.element_size() for name, tensor in state.items()}
    shard_of = {}
    for name, names in plan_shards(state, max_bytes).items():
        with atomic_output(folder / name) as tmp:
            save_file({k: state[k] for k in names}, str(tmp), metadata={"format": "pt", "dtype": dtype})
        shard_of.update(dict.fromkeys(names, name))
    weight_map = {k: shard_of[k] for k in state}  # the state's order, whatever order the shards hold them in
    write_text_atomic(folder / CONFIG_NAME, json.dumps(config, indent=1))
    index = {"metadata": {"total_size": sum(sizes.values()), "dtype": dtype, CONFIG_KEY: json.dumps(config)},
             "weight_map": weight_map}
    write_text_atomic(folder / INDEX_NAME, json.dumps(index, indent=1))
    return folder / INDEX_NAME


class ExportFiles:
    """An export opened for reading: its run config (as recorded) and its tensors, one at a time."""

    def __init__(self, where: Path, config: dict[str, Any], weight_map: dict[str, Path]):
        self.where, self.config, self.weight_map = where, config, weight_map
        self._open: dict[Path, Any] = {}

    def _file(self, name: str):
        path = self.weight_map[name]
        if path not in self._open:
            self._open[path] = safe_open(str(path), framework="pt")
        return self._open[path]

    def keys(self) -> list[str]:
        return list(self.weight_map)

    def shape(self, name: str) -> list[int]:
        return list(self._file(name).get_slice(name).get_shape())

    def tensor(self, name: str, device: str | torch.device = "cpu") -> torch.Tensor:
        return self._file(name).get_tensor(name).to(device)

    def tensors(self, device: str | torch.device = "cpu") -> Iterator[tuple[str, torch.Tensor]]:
        for name in self.weight_map:
            yield name, self.tensor(name, device)


def is_export(path: str | Path) -> bool:
    """Whether ``path`` is an export in either form (a .safetensors file, a sharded folder or its index)."""
    path = Path(path)
    return path.is_file() or (path / INDEX_NAME).is_file()


def open_export(path: str | Path) -> ExportFiles:
    """An export in either form: a .safetensors file, a sharded export's folder, or its index file. Raises
    ValueError naming the path when it holds no nbp_ds run config, FileNotFoundError when it is neither."""
    path = Path(path)
    index = path / INDEX_NAME if path.is_dir() else path if path.name.endswith(".index.json") else None
    if index is not None:
        if not index.is_file():
            raise FileNotFoundError(f"{path}: no {INDEX_NAME} here (not a sharded export, or an interrupted one)")
        data = json.loads(index.read_text())
        config = (data.get("metadata") or {}).get(CONFIG_KEY)
        if config is None:
            raise ValueError(f"{index}: not an nbp_ds export (no {CONFIG_KEY} in its metadata); use nbp-export")
        weight_map = {name: index.parent / file for name, file in data["weight_map"].items()}
        missing = sorted({str(f) for f in weight_map.values() if not f.is_file()})
        if missing:
            raise FileNotFoundError(f"{index} names shards that are not there: {', '.join(missing[:3])}")
        return ExportFiles(index, json.loads(config), weight_map)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such export (a .safetensors file, or a folder with {INDEX_NAME})")
    with safe_open(str(path), framework="pt") as f:
        meta, names = f.metadata() or {}, list(f.keys())
    if CONFIG_KEY not in meta:
        raise ValueError(f"{path}: not an nbp_ds export (no {CONFIG_KEY} metadata); use nbp-export")
    return ExportFiles(path, json.loads(meta[CONFIG_KEY]), dict.fromkeys(names, path))
