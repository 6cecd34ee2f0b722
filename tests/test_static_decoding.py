"""The static decoder (fixed-shape passes, device tables, on-device sampling) gives exactly the eager decoder's
tokens for every layout and both architectures, greedily and with a seed; in both CPU decoders a video is the same
in any batch; it reads nothing back to the host while it decodes; its plan has the passes the layout implies; and
the random stream it draws from is a well-mixed pure function of (seed, video, position)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from batch_invariance import SAMPLINGS as BATCH_SAMPLINGS
from batch_invariance import assert_drawn_by_video_index
from torch.utils._python_dispatch import TorchDispatchMode

from nbp_ds.config import load_config
from nbp_ds.generate import Sampling, StaticDecoder, generate, stream_uniforms, video_keys
from nbp_ds.generate.draw import mix32
from nbp_ds.generate.plan import DecodePlan, StepShape
from nbp_ds.layout import Layout
from nbp_ds.model import build_model

UNCOND = ["layout.condition=none", "layout.num_classes=0"]
CASES = {
    "nbp-class": ["layout.block=[1,1,4]"],
    "nbp-uncond-2d-blocks": ["layout.block=[1,2,4]", *UNCOND],
    "ntp-class": ["layout.block=[1,1,1]"],
    "hybrid-class": ["layout.block=[1,1,4]", "layout.hybrid=true"],
    "hybrid-first-frame": ["layout.block=[1,1,4]", "layout.hybrid=true", "layout.hybrid_blocks=4"],
    "frames": ["layout.condition=frames", "layout.context_frames=1", "layout.num_classes=0"],
    "frames-ntp": ["layout.block=[1,1,1]", "layout.condition=frames", "layout.context_frames=2",
                   "layout.num_classes=0"],
    "gpt2-hybrid-class": ["model.arch=gpt2", "layout.block=[1,1,4]", "layout.hybrid=true"],
    "gpt2-frames-no-bov": ["model.arch=gpt2", "layout.condition=frames", "layout.context_frames=1",
                           "layout.num_classes=0", "layout.bov=false"],
}


def model_for(overrides: list[str]):
    torch.manual_seed(0)
    model = build_model(load_config("tiny", [*overrides, "model.attention=sdpa"])).eval()
    with torch.no_grad():
        model.head.weight.mul_(8)  # spread the logits so that greedy choices are not near ties
    return model


def inputs_for(model, b: int = 3) -> dict:
    lay = model.layout
    if lay.condition == "class":
        return {"label": torch.tensor([0, 1, 3])[:b]}
    if lay.condition == "frames":
        return {"context": torch.randint(0, 64, (b, lay.context_frames, *lay.grid[1:]),
                                         generator=torch.Generator().manual_seed(5))}
    return {}


SAMPLINGS = {
    "greedy": {"temperature": 0},
    "seeded": {"temperature": 1.5, "seed": 11},
    "filtered": {"temperature": 1.0, "top_k": 12, "top_p": 0.8, "seed": 3},
}


# every layout greedily and seeded; the filters (top-k, top-p) on a few
PAIRS = [(name, s) for name in CASES for s in ("greedy", "seeded")] + [
    (name, "filtered") for name in ("hybrid-class", "frames-ntp", "gpt2-hybrid-class")]


@pytest.mark.parametrize(("name", "sampling"), PAIRS)
def test_static_decoding_gives_the_eager_tokens(name, sampling):
    model = model_for(CASES[name])
    kwargs = {**inputs_for(model), **SAMPLINGS[sampling]}
    eager, eager_stats = generate(model, 3, mode="eager", **kwargs)
    # buckets of 16 cache slots: the 49-position tiny sequence takes passes over 16, 32, 48 and 64 slots
    static, stats = generate(model, 3, mode="static", kv_bucket=16, **kwargs)
    assert stats["mode"] == "static" and eager_stats["mode"] == "eager"
    assert stats["forward_passes"] == eager_stats["forward_passes"] == len(model.layout.generation_steps)
    assert torch.equal(static, eager)
    if sampling != "greedy":  # so the equality above is about sampling, not a constant
        greedy, _ = generate(model, 3, mode="static", **{**kwargs, "temperature": 0})
        assert not torch.equal(static, greedy)


def test_static_guided_decoding_gives_the_eager_tokens():
    model = model_for(CASES["hybrid-class"])
    kwargs = {"label": torch.tensor([0, 2]), "cfg_scale": 3.0, "temperature": 1.0, "seed": 4}
    eager, _ = generate(model, 2, mode="eager", **kwargs)
    static, _ = generate(model, 2, mode="static", kv_bucket=32, **kwargs)
    assert torch.equal(static, eager)
    plain, _ = generate(model, 2, mode="static", **{**kwargs, "cfg_scale": None})
    assert not torch.equal(static, plain)


@pytest.mark.parametrize("sampling", list(BATCH_SAMPLINGS))
@pytest.mark.parametrize("mode", ["eager", "static"])
def test_a_video_is_the_same_in_any_batch(mode, sampling):
    """Video 6 of a run is the same video alone, in the middle of one batch and first in another, in every decoder
    that runs on the CPU (the GPU's graph decoder: tests/test_gpu_decoding.py). The paper's sampling needs more
    codes than its top-k of 16,000 to filter anything: 20,000, on a grid of 2x2x4 to keep the passes few."""
    paper = ["model.vocab_size=20000", "layout.grid=[2,2,4]"] if sampling == "paper" else []
    model = model_for([*CASES["hybrid-class"], *paper])
    assert_drawn_by_video_index(model, mode, BATCH_SAMPLINGS[sampling])


def test_auto_decodes_eagerly_on_the_cpu_and_graph_needs_cuda():
    """The default mode on a CPU is the eager decoder (on a GPU the graph one: tests/test_gpu_decoding.py)."""
    model = model_for(CASES["nbp-class"])
    _, stats = generate(model, 1, label=0, temperature=0)
    assert stats["mode"] == "eager"
    with pytest.raises(ValueError, match="mode='graph' needs a model on a CUDA device"):
        generate(model, 1, label=0, mode="graph")


def test_a_decoder_is_reused_across_batches():
    """One decoder decodes several batches: prepare() replaces everything a previous video left behind."""
    model = model_for(CASES["hybrid-class"])
    lay = model.layout
    decoder = StaticDecoder(model, 2, Sampling(temperature=1.0), kv_bucket=16)
    for seed, labels in ((1, [0, 1]), (2, [3, 2])):
        label = torch.tensor(labels)
        decoder.prepare(torch.zeros(2, lay.num_video_tokens, dtype=torch.long), lay.condition_ids(label),
                        video_keys(seed, torch.arange(2)))
        decoder.decode()
        expected, _ = generate(model, 2, label=label, temperature=1.0, seed=seed, mode="eager")
        assert torch.equal(decoder.tokens.view(2, *lay.grid), expected)


# ---------------------------------------------------------------------------------------- no host synchronisation

class HostSyncGuard(TorchDispatchMode):
    """Fails on every operation that reads a tensor's value on the host (``.item()``, ``bool(t)``, ``nonzero``,
    boolean-mask indexing: data-dependent shapes) or makes a tensor from host data (``torch.tensor(list)``): on a
    GPU each would stall the host until the device caught up, and none can be captured in a CUDA graph."""

    FORBIDDEN = {torch.ops.aten._local_scalar_dense, torch.ops.aten.nonzero, torch.ops.aten.masked_select,
                 torch.ops.aten.lift_fresh, torch.ops.aten.lift_fresh_copy, torch.ops.aten.is_nonzero,
                 torch.ops.aten.equal, torch.ops.aten.unique_consecutive, torch.ops.aten._unique2,
                 torch.ops.aten.repeat_interleave}
    MASK_INDEXED = {torch.ops.aten.index, torch.ops.aten.index_put, torch.ops.aten.index_put_}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in self.FORBIDDEN:
            raise AssertionError(f"host synchronisation: {func}")
        if func.overloadpacket in self.MASK_INDEXED:
            indices = args[1] if len(args) > 1 else []
            if any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices):
                raise AssertionError(f"boolean-mask indexing: {func}")
        return func(*args, **(kwargs or {}))


def test_the_guard_catches_host_reads():
    x = torch.arange(6.0)
    for bad in (lambda: x.sum().item(), lambda: x[x > 2], lambda: torch.tensor([1, 2]), lambda: bool(x.any()),
                lambda: x.nonzero()):
        with pytest.raises(AssertionError), HostSyncGuard():
            bad()
    with HostSyncGuard():
        x.index_select(0, torch.zeros(1, dtype=torch.long)).add_(1).argmax(-1)


@pytest.mark.parametrize("name", ["hybrid-class", "frames", "gpt2-hybrid-class"])
def test_static_decoding_reads_nothing_back_to_the_host(name):
    model = model_for(CASES[name])
    lay = model.layout
    sampling = Sampling(temperature=1.0, top_k=10, top_p=0.9, cfg_scale=2.0 if lay.has_null_class else None)
    decoder = StaticDecoder(model, 2, sampling, kv_bucket=16)
    tokens = torch.zeros(2, lay.num_video_tokens, dtype=torch.long)
    condition = None
    if lay.prefix_len:
        condition = lay.condition_ids(torch.tensor([1, 2, lay.null_class, lay.null_class]))
    decoder.prepare(tokens, condition, video_keys(0, torch.arange(2)))
    with HostSyncGuard():
        decoder.decode()


# ------------------------------------------------------------------------------------------------------ the plan

def ucf_layout(**changes) -> Layout:
    lay = load_config("ucf101-700m").layout
    return Layout(grid=tuple(lay.grid), block=tuple(lay.block), vocab_size=64000, hybrid=lay.hybrid,
                  condition=lay.condition, num_classes=lay.num_classes, **changes)


def test_the_papers_hybrid_layout_decodes_with_eight_pass_shapes():
    """UCF-101, hybrid 1x1x16: class + BOV token (read 1), 15 one-token passes, 79 row passes. The sequence has
    1 + 16 + 16 * 79 = 1281 positions, the cache 1296 slots (a multiple of 16); with buckets of 256 the row passes
    end at 17 + 16 i, so they attend over 256, 512, 768, 1024 or 1280 slots, and the last ones over all 1296."""
    plan = DecodePlan(ucf_layout(), torch.device("cpu"), kv_bucket=256)
    assert plan.layout.seq_len == 1281 and plan.cache_len == 1296 and len(plan) == 95
    counts = {g.shape: g.positions.shape[0] for g in plan.groups}
    ends = [17 + 16 * i for i in range(1, 80)]  # end of the row pass i (the first row pass ends at 33)
    expected = {StepShape(2, 1, 256): 1, StepShape(1, 1, 256): 15}
    for kv in (256, 512, 768, 1024, 1280):
        expected[StepShape(16, 16, kv)] = sum(kv - 256 < e <= kv for e in ends)
    expected[StepShape(16, 16, 1296)] = sum(e > 1280 for e in ends)
    assert counts == expected and sum(expected.values()) == 95


@pytest.mark.parametrize("name", ["hybrid-class", "frames", "nbp-uncond-2d-blocks", "gpt2-frames-no-bov"])
def test_plan_tables_and_masks_follow_the_layout(name):
    lay = model_for(CASES[name]).layout
    plan = DecodePlan(lay, torch.device("cpu"), kv_bucket=16)
    allowed = lay.allowed()
    tokens = torch.randint(0, 64, (2, lay.num_video_tokens))
    label = torch.tensor([1, 3])
    condition = lay.condition_ids(label) if lay.prefix_len else None
    for step, planned in zip(lay.generation_steps, plan.steps, strict=True):
        group = plan.groups[planned.group]
        positions = group.positions[planned.row]
        assert positions.tolist() == list(range(step.start, step.end))
        assert (positions[group.read_rows[planned.row]]).tolist() == list(step.read)
        assert group.targets[planned.row].tolist() == [int(lay.target_index[p]) for p in step.read]
        assert torch.equal(lay.input_ids_at(tokens, positions, condition),
                           lay.input_ids(tokens, label if lay.prefix_len else None, step.start, step.end))
        kv = group.shape.kv
        assert kv >= step.end and kv % 16 == 0
        mask = plan.attention_mask(positions, kv, torch.float32)
        n = min(kv, lay.seq_len)
        assert torch.equal(mask[:, :n] == 0, allowed[step.start:step.end, :n])
        assert bool(torch.isinf(mask[:, n:]).all())  # padding slots are never seen
        assert bool(torch.isinf(mask[:, step.end:]).all())  # nor slots no step has written yet


# ------------------------------------------------------------------------------------------- the random stream

def lowbias32(x: int) -> int:
    """Chris Wellons' lowbias32 in Python integers: the reference for the tensor version."""
    x ^= x >> 16
    x = (x * 0x7FEB352D) & 0xFFFFFFFF
    x ^= x >> 15
    x = (x * 0x846CA68B) & 0xFFFFFFFF
    return x ^ (x >> 16)


def test_mix32_is_lowbias32_exactly():
    values = [0, 1, 2, 0x7FFFFFFF, 0x80000000, 0xDEADBEEF, 0xFFFFFFFF, *np.random.default_rng(0).integers(
        0, 2**32, 200).tolist()]
    assert mix32(torch.tensor(values, dtype=torch.long)).tolist() == [lowbias32(v) for v in values]


def test_stream_uniforms_are_uniform_and_independent():
    keys = video_keys(123, torch.arange(200))
    u = stream_uniforms(keys, torch.arange(1000)).double()  # 200 videos x 1000 positions
    assert u.min() >= 0 and u.max() < 1
    # chi-square over 100 equal bins, 99 degrees of freedom: above 180 has probability ~1e-6 for a uniform source
    counts = torch.bincount((u * 100).long().flatten(), minlength=100).double()
    expected = u.numel() / 100
    assert float(((counts - expected) ** 2 / expected).sum()) < 180
    # neighbouring positions and neighbouring videos are uncorrelated (5 standard errors of a correlation)
    limit = 5 / math.sqrt(u[:, 1:].numel())
    for a, b in ((u[:, 1:], u[:, :-1]), (u[1:], u[:-1])):
        r = np.corrcoef(a.flatten().numpy(), b.flatten().numpy())[0, 1]
        assert abs(r) < limit, r
    # the same (seed, video, position) gives the same draw, another seed another one
    assert torch.equal(stream_uniforms(video_keys(123, torch.tensor([7])), torch.tensor([3, 4])), u[7:8, 3:5].float())
    assert not torch.equal(stream_uniforms(video_keys(124, torch.arange(200)), torch.arange(1000)), u.float())
