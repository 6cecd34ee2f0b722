"""Generating at a grid other than the one in the model's layout: a model trained on packed rows
(``data.pack_tokens``) learnt every clip under its own layout, with positions from zero, so it can generate any grid
the block shape tiles whose sequence fits a row. A one-grid model only ever saw ``layout.grid``."""

from __future__ import annotations

import dataclasses

from nbp_ds.config import RunConfig
from nbp_ds.errors import ConfigError, UsageError
from nbp_ds.layout import Layout
from nbp_ds.model import NBPModel, build_model
from nbp_ds.packing import clip_length


def unseen_grid(cfg: RunConfig, grid: tuple[int, int, int]) -> str | None:
    """Why the model of ``cfg`` never trained on clips of ``grid`` (None: within what it trained on)."""
    layout = Layout.from_config(cfg.layout, cfg.model.vocab_size)
    if tuple(grid) == layout.grid:
        return None
    if not cfg.data.pack_tokens:
        return (f"the model was trained on layout.grid={list(layout.grid)} only (data.pack_tokens=0); only a model "
                f"trained on packed rows generates other grids")
    try:
        need = clip_length(layout, tuple(grid))
    except ConfigError as exc:
        return str(exc)
    if need > cfg.data.pack_tokens:
        return (f"a clip of grid {list(grid)} takes {need} positions; the model trained on rows of "
                f"data.pack_tokens={cfg.data.pack_tokens} and never saw one that long")
    return None


def model_for_grid(model: NBPModel, cfg: RunConfig, grid: tuple[int, int, int], device) -> NBPModel:
    """``model``'s weights in a model whose layout generates ``grid`` (the model itself for its own grid); a grid it
    never trained on is refused, naming why."""
    if tuple(grid) == model.layout.grid:
        return model
    problem = unseen_grid(cfg, grid)
    if problem is not None:
        raise UsageError(f"--grid {','.join(map(str, grid))}: {problem}")
    other = build_model(dataclasses.replace(cfg, layout=dataclasses.replace(cfg.layout, grid=list(grid))), device)
    other.load_state_dict(model.state_dict())
    return other.eval()
