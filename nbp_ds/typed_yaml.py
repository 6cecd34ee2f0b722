"""The generic typed YAML loader behind every configuration of the package (the NBP run config, nbp_ds.config; the
tokenizer trainer's, nbp_ds.tokenizer.config): a tree of dataclasses filled from a YAML file, named in a folder of
shipped configs or given by path, that may start from another with ``base: <name or path>``, then dotted
``key=value`` overrides. Unknown keys and wrong types are refused with a ``ConfigError`` naming the key; the
values' own rules are each schema's.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from nbp_ds.errors import ConfigError

T = TypeVar("T")


def shipped_configs(config_dir: Path) -> list[str]:
    """Names of the configs shipped in ``config_dir``."""
    return sorted(p.stem for p in config_dir.glob("*.yaml"))


def load_dataclass_tree(cls: type[T], name_or_path: str | Path | None, overrides: list[str] | None = None, *,
                        config_dir: Path, settings: dict[str, Any] | None = None) -> T:
    """A typed dataclass tree ``cls`` from a config named in ``config_dir`` or a YAML path (None: the dataclass
    defaults alone), with ``settings`` (dotted key -> value, e.g. from a program's flags) and then the
    ``key=value`` overrides applied. Unknown keys and wrong types are refused by name; the caller checks the
    values' own rules."""
    if name_or_path is None:
        data, source = {}, "defaults"
    else:
        data, source = _load_yaml_tree(str(name_or_path), seen=(), config_dir=config_dir)
    for key, value in [*(settings or {}).items(), *map(parse_override, overrides or [])]:
        _set_dotted(data, key, value)
    if overrides or settings:
        source = f"{source} + overrides"
    return _build(cls, data, prefix="", source=source)


def from_mapping(cls: type[T], data: dict[str, Any], source: str) -> T:
    """A typed dataclass tree ``cls`` from a mapping (a config recorded as JSON), checked as a file's is."""
    return _build(cls, data, prefix="", source=source)


def parse_override(item: str) -> tuple[str, Any]:
    """``"model.n_layer=2"`` -> ``("model.n_layer", 2)``; the value is parsed as YAML."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not of the form key=value (for example model.n_layer=2)")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {item!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {key}: cannot parse value {raw!r} as YAML ({exc})") from exc
    return key, value


def _resolve_path(name_or_path: str, config_dir: Path) -> Path:
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml", ".json") or path.exists():
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        return path
    named = config_dir / f"{name_or_path}.yaml"
    if not named.is_file():
        raise ConfigError(
            f"unknown config {name_or_path!r}: not a file, and not one of the shipped configs "
            f"({', '.join(shipped_configs(config_dir))})"
        )
    return named


def _load_yaml_tree(name_or_path: str, seen: tuple[Path, ...], config_dir: Path) -> tuple[dict[str, Any], str]:
    path = _resolve_path(name_or_path, config_dir).resolve()
    if path in seen:
        raise ConfigError(f"config {str(path)!r} includes itself through 'base'")
    try:
        data = yaml.safe_load(path.read_text()) or {}  # also the .json an export writes: JSON is YAML
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping at the top level")
    base = data.pop("base", None)
    data.setdefault("name", path.stem)
    if base is not None:
        base_ref = str(base)
        if not (config_dir / f"{base_ref}.yaml").is_file() and not Path(base_ref).is_absolute():
            base_ref = str(path.parent / base_ref)
        merged, _ = _load_yaml_tree(base_ref, seen + (path,), config_dir)
        _deep_update(merged, data)
        data = merged
    return data, str(path)


def _deep_update(dst: dict[str, Any], src: dict[str, Any]) -> None:
    for key, value in src.items():
        if isinstance(value, dict) and isinstance(dst.get(key), dict):
            _deep_update(dst[key], value)
        else:
            dst[key] = value


def _set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = data
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {key}: {part!r} is a value, not a section")
        node = child
    node[parts[-1]] = value


def _build(cls: type, data: Any, prefix: str, source: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {data!r} ({source})")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(
            f"unknown config key {prefix + unknown[0]!r} in {source}; "
            f"valid keys under {prefix.rstrip('.') or 'the top level'}: {', '.join(sorted(names))}"
        )
    kwargs = {}
    for name, value in data.items():
        hint = hints[name]
        key = prefix + name
        if dataclasses.is_dataclass(hint):
            kwargs[name] = _build(hint, value if value is not None else {}, key + ".", source)
        else:
            kwargs[name] = _coerce(value, hint, key)
    return cls(**kwargs)


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Check a YAML value against a field's type, allowing int -> float and None for optionals."""
    if hint is Any:
        return value
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0])
    if origin is list:
        (item_type,) = typing.get_args(hint)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key {key}: expected a list, got {value!r}")
        return [_coerce(v, item_type, f"{key}[{i}]") for i, v in enumerate(value)]
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str) and _YAML11_MISSED_FLOAT.fullmatch(value.strip()):
        return float(value)  # YAML 1.1 reads 3e-4 (no dot) as a string
    if hint is bool and not isinstance(value, bool):
        raise ConfigError(f"config key {key}: expected true or false, got {value!r}")
    if hint is int and isinstance(value, bool):
        raise ConfigError(f"config key {key}: expected an integer, got {value!r}")
    if not isinstance(value, hint):
        raise ConfigError(f"config key {key}: expected {hint.__name__}, got {value!r}")
    return value


_YAML11_MISSED_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def yaml_number(value: Any) -> Any:
    """A string YAML 1.1 did not read as the number it is (3e-4, 5e8: no dot) as a float; anything else as given.
    For values whose type the run config does not declare (deepspeed.set)."""
    if isinstance(value, str) and _YAML11_MISSED_FLOAT.fullmatch(value.strip()):
        return float(value)
    return value
