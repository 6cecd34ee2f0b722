"""Which attention kernel ``model.attention=auto`` picks for a layout and device, and the flex kernel options
(the layout's facts under the configured tile settings, validated by name)."""

from __future__ import annotations

import pytest
import torch

from nbp_ds.config import load_config
from nbp_ds.errors import ConfigError
from nbp_ds.layout import Layout
from nbp_ds.model import attention
from nbp_ds.model.attention import FLEX_LAYOUT_OPTIONS, make_attention, resolve_backend_name


def layout(*overrides: str) -> Layout:
    cfg = load_config("tiny", list(overrides))
    return Layout.from_config(cfg.layout, cfg.model.vocab_size)


def test_auto_is_sdpa_on_the_cpu_and_for_plain_causal_layouts_on_a_gpu(monkeypatch):
    monkeypatch.setattr(attention, "flash4_available", lambda device: pytest.fail("not needed for causal"))
    assert resolve_backend_name("auto", "cpu", layout()) == "sdpa"
    causal = layout("layout.block=[1,1,1]")
    assert causal.is_causal and resolve_backend_name("auto", "cuda", causal) == "sdpa"
    assert resolve_backend_name("flex", "cpu", causal) == "flex"  # a named backend is taken as named


def test_auto_on_a_gpu_takes_flash4_only_where_it_is_installed_and_passes_its_check(monkeypatch):
    block_causal = layout("layout.hybrid=true")
    assert not block_causal.is_causal
    monkeypatch.setattr(attention, "flash4_available", lambda device: False)
    assert resolve_backend_name("auto", "cuda", block_causal, head_dim=16) == "flex"
    monkeypatch.setattr(attention, "flash4_available", lambda device: True)
    monkeypatch.setattr(attention, "_flash_matches_sdpa", lambda lay, device, head_dim: False)
    assert resolve_backend_name("auto", "cuda", block_causal, head_dim=16) == "flex"
    monkeypatch.setattr(attention, "_flash_matches_sdpa", lambda lay, device, head_dim: True)
    assert resolve_backend_name("auto", "cuda", block_causal, head_dim=16) == "flash"


def test_flex_takes_the_layouts_facts_under_the_configured_options():
    backend = make_attention("flex", layout(), "cpu", {"BLOCK_M": 64, "ROWS_GUARANTEED_SAFE": False})
    assert backend.kernel_options == {**FLEX_LAYOUT_OPTIONS, "BLOCK_M": 64, "ROWS_GUARANTEED_SAFE": False}


def contiguous(indices: torch.Tensor) -> bool:
    values = indices.tolist()
    return values == list(range(values[0], values[0] + len(values))) if values else True


def test_the_layouts_facts_hold_for_every_layout():
    """ROWS_GUARANTEED_SAFE: every query sees a key. BLOCKS_ARE_CONTIGUOUS: for every query tile, the fully
    visible key tiles and the partly visible ones each form one run of consecutive tiles, and so do the query
    tiles that see a key tile (the backward pass walks those). Checked on the dense rule at tile size 4 and 8,
    so that tiles straddle block boundaries."""
    for overrides in ([], ["layout.hybrid=true"], ["layout.block=[1,1,1]"], ["layout.block=[1,2,4]"],
                      ["layout.grid=[4,4,4]", "layout.block=[2,2,2]"]):
        lay = layout(*overrides)
        allowed = lay.allowed()
        assert bool(allowed.any(dim=1).all()), overrides
        for tile in (4, 8):
            n = -(-lay.seq_len // tile) * tile
            padded = torch.zeros(n, n, dtype=torch.bool)
            padded[:lay.seq_len, :lay.seq_len] = allowed
            padded[lay.seq_len:, :] = True  # padding rows see everything (flex masks them out itself)
            tiles = padded.view(n // tile, tile, n // tile, tile).permute(0, 2, 1, 3).reshape(n // tile, n // tile, -1)
            full, partial = tiles.all(-1), tiles.any(-1) & ~tiles.all(-1)
            for kind in (full, partial):
                for row in kind:
                    assert contiguous(row.nonzero().flatten()), (overrides, tile)
                for column in kind.t():
                    assert contiguous(column.nonzero().flatten()), (overrides, tile)


@pytest.mark.parametrize("value, fragment", [
    ("{BLOK_M: 64}", "unknown option 'BLOK_M'"),
    ("{fwd_BLOCK_M: 48}", "fwd_BLOCK_M must be a power of two"),
    ("{num_warps: true}", "num_warps must be int"),
    ("[64, 64]", "must be a mapping"),
])
def test_bad_flex_kernel_options_are_refused_by_name(value, fragment):
    with pytest.raises(ConfigError, match=fragment):
        load_config("tiny", [f"model.flex_kernel_options={value}"])


def test_good_flex_kernel_options_are_taken():
    cfg = load_config("tiny", ["model.flex_kernel_options={fwd_BLOCK_M: 128, bwd_num_warps: 8, PRESCALE_QK: true}"])
    assert cfg.model.flex_kernel_options == {"fwd_BLOCK_M": 128, "bwd_num_warps": 8, "PRESCALE_QK": True}
