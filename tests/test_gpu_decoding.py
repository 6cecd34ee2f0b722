"""Decoding on a CUDA GPU: CUDA-graph decoding gives the eager decoder's tokens in fp32 (greedy and seeded) and a
video the same tokens in any batch, its decode loop never synchronises with the host, graphs are captured once per
model and batch and again when the weights move, and the generation benchmark runs its graph path; long sampling
in CUDA graphs gives the static decoder's video, rolling and recomputed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from batch_invariance import SAMPLINGS as BATCH_SAMPLINGS
from batch_invariance import assert_drawn_by_video_index

from nbp_ds.config import load_config
from nbp_ds.generate import Sampling, StaticDecoder, generate, generate_long, release_decoders, video_keys
from nbp_ds.generate.decode import kept_decoder
from nbp_ds.model import build_model

pytestmark = pytest.mark.gpu
ROOT = Path(__file__).resolve().parents[1]

SMALL = ["model.n_layer=2", "model.d_model=256", "model.n_head=4", "model.vocab_size=1000", "model.attention=sdpa"]
LAYOUTS = {
    "hybrid-ucf-grid": ["layout.grid=[5,16,16]", "layout.block=[1,1,16]", "layout.hybrid=true",
                        "layout.num_classes=10"],
    "ntp": ["layout.grid=[3,8,8]", "layout.block=[1,1,1]", "layout.num_classes=10"],
    "frames": ["layout.grid=[5,16,16]", "layout.block=[1,1,16]", "layout.condition=frames",
               "layout.context_frames=2", "layout.num_classes=0"],
    "gpt2-hybrid": ["model.arch=gpt2", "layout.grid=[5,16,16]", "layout.block=[1,1,16]", "layout.hybrid=true",
                    "layout.num_classes=10"],
}


def cuda_model(overrides: list[str], dtype: torch.dtype = torch.float32):
    torch.manual_seed(0)
    model = build_model(load_config("tiny", [*SMALL, *overrides]), device="cuda").to(dtype).eval()
    with torch.no_grad():
        model.head.weight.mul_(8)  # spread the logits so that greedy choices are not near ties
    return model


def inputs(model, b: int) -> dict:
    lay = model.layout
    if lay.condition == "class":
        return {"label": torch.arange(b) % lay.num_classes}
    if lay.condition == "frames":
        g = torch.Generator().manual_seed(3)
        return {"context": torch.randint(0, 1000, (b, lay.context_frames, *lay.grid[1:]), generator=g).cuda()}
    return {}


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_graph_decoding_gives_the_eager_tokens_in_fp32(name):
    model = cuda_model(LAYOUTS[name])
    for sampling in ({"temperature": 0.0}, {"temperature": 1.0, "top_k": 50, "top_p": 0.9, "seed": 5}):
        kwargs = {**inputs(model, 3), **sampling}
        eager, _ = generate(model, 3, mode="eager", **kwargs)
        graph, stats = generate(model, 3, **kwargs)  # mode auto: graph on a GPU
        assert stats["mode"] == "graph"
        assert torch.equal(graph, eager), f"{name} {sampling}: {(graph != eager).sum()} tokens differ"
        again, _ = generate(model, 3, mode="graph", **kwargs)  # replayed, not captured again
        assert torch.equal(again, eager)
    release_decoders(model)


@pytest.mark.parametrize("sampling", list(BATCH_SAMPLINGS))
def test_a_video_is_the_same_in_any_batch_under_graphs(sampling):
    """The graph decoder (a captured decoder per batch size) draws a video by its index, never by its place in the
    batch (the CPU decoders: tests/test_static_decoding.py); 20,000 codes for the paper's top-k of 16,000."""
    vocab = 20000 if sampling == "paper" else 1000
    model = cuda_model([*LAYOUTS["hybrid-ucf-grid"], f"model.vocab_size={vocab}"])
    assert_drawn_by_video_index(model, "graph", BATCH_SAMPLINGS[sampling])
    release_decoders(model)


@pytest.mark.parametrize("graphs", [True, False], ids=["graph", "static"])
def test_the_decode_loop_never_synchronises_with_the_host(graphs):
    model = cuda_model(LAYOUTS["hybrid-ucf-grid"], torch.bfloat16)
    lay = model.layout
    sampling = Sampling(temperature=1.0, top_k=100, top_p=0.9, cfg_scale=2.0)
    decoder = StaticDecoder(model, 2, sampling, graphs=graphs)
    label = torch.tensor([1, 2, lay.null_class, lay.null_class], device="cuda")
    decoder.prepare(torch.zeros_like(decoder.tokens), lay.condition_ids(label),
                    video_keys(0, torch.arange(2, device="cuda")))
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        decoder.decode()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    expected, _ = generate(model, 2, label=torch.tensor([1, 2]), temperature=1.0, top_k=100, top_p=0.9,
                           cfg_scale=2.0, seed=0, mode="static")
    assert torch.equal(decoder.tokens.view(2, *lay.grid), expected)


def test_graphs_are_captured_once_and_again_when_the_weights_move():
    model = cuda_model(LAYOUTS["hybrid-ucf-grid"])
    sampling = Sampling(temperature=0.0)
    first = kept_decoder(model, 2, sampling)
    assert kept_decoder(model, 2, sampling) is first and kept_decoder(model, 1, sampling) is not first
    model.double().float()  # the same values in new tensors: the captured graphs would read the old ones
    assert kept_decoder(model, 2, sampling) is not first
    eager, _ = generate(model, 2, label=torch.tensor([0, 1]), temperature=0, mode="eager")
    graph, _ = generate(model, 2, label=torch.tensor([0, 1]), temperature=0, mode="graph")
    assert torch.equal(graph, eager)
    release_decoders(model)


def test_bench_generate_runs_its_graph_path():
    result = subprocess.run([sys.executable, "-m", "nbp_ds.cli.bench_generate", "--config", "tiny", "--device",
                             "cuda", "--batch-sizes", "1", "32", "--estimate-passes", "20", "--repeats", "1"],
                            cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "decoder graph;" in result.stdout and "estimated from 20 of 48 passes" in result.stdout


@pytest.mark.parametrize("long_mode", ["rolling", "recompute"])
def test_long_sampling_in_graphs_gives_the_static_decoders_video(long_mode):
    """8 latent frames past a 5-frame clip (29 frames for 17): the graphs replay the static passes, window slides
    and all."""
    model = cuda_model(LAYOUTS["hybrid-ucf-grid"])
    args = {"label": torch.tensor([0, 3]), "temperature": 1.0, "seed": 3, "long_mode": long_mode}
    static, _ = generate_long(model, 2, 8, mode="static", **args)
    graph, stats = generate_long(model, 2, 8, mode="graph", **args)
    assert stats["mode"] == "graph" and torch.equal(graph, static)
