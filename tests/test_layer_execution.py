"""How layers run a sequence: activation checkpointing (none / full / selective) and regional compilation.

Compiled and eager training agree to within fp32 reordering (losses rtol 1e-5, gradients and updated weights
rtol 1e-4 / atol 1e-6); the checkpointing modes recompute the same operations, so they agree exactly."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
import torch._dynamo
from torch.utils._python_dispatch import TorchDispatchMode

from nbp_ds.config import CHECKPOINTING_MODES, load_config
from nbp_ds.errors import ConfigError
from nbp_ds.model import ModelSpec, build, build_model
from nbp_ds.model.execution import RUNNERS, LayerExecution, compile_enabled

MODES = ("none", "full", "selective")


def make_model(*extra: str):
    torch.manual_seed(0)
    cfg = load_config("tiny", ["model.attention=sdpa", "model.class_dropout=0.0", "model.compile=false", *extra])
    return build_model(cfg).train(), cfg


def batch_for(cfg, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"tokens": torch.randint(0, cfg.model.vocab_size, (2, *cfg.layout.grid), generator=g),
            "label": torch.tensor([0, 3])}


def gradients(model, batch) -> dict[str, torch.Tensor]:
    model.zero_grad()
    model.loss(batch)[0].backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


class OpCounter(TorchDispatchMode):
    """Counts the aten operators that run (by name without overload), e.g. those recomputed in backward."""

    def __init__(self):
        super().__init__()
        self.counts: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def ops_in_backward(mode: str) -> Counter:
    model, cfg = make_model(f"train.activation_checkpointing={mode}")
    model.enable_activation_checkpointing(mode)
    loss, _ = model.loss(batch_for(cfg))
    with OpCounter() as counter:
        loss.backward()
    return counter.counts


def test_checkpointing_modes_give_the_same_gradients():
    model, cfg = make_model()
    batch = batch_for(cfg)
    reference = gradients(model, batch)
    for mode in ("full", "selective"):
        model.enable_activation_checkpointing(mode)
        assert model.layers[0].execution.checkpointing == mode
        for name, grad in gradients(model, batch).items():
            torch.testing.assert_close(grad, reference[name], rtol=0, atol=0, msg=f"{mode}: {name}")


def test_the_run_configs_checkpointing_modes_are_the_models():
    """The run config validates train.activation_checkpointing against its list; the model runs its own: one
    list in two layers, kept equal here (the model reads no run-config parser)."""
    assert set(RUNNERS) == set(CHECKPOINTING_MODES)
    assert [LayerExecution.from_settings(v).checkpointing for v in (True, False, "selective")] == [
        "full", "none", "selective"]
    with pytest.raises(ValueError, match="got 'some'"):
        LayerExecution.from_settings("some")


def test_the_model_is_built_from_its_own_settings():
    """build(ModelSpec) needs the model and layout settings only, and gives what build_model(run config) does."""
    cfg = load_config("tiny", ["model.n_layer=1"])
    torch.manual_seed(0)
    from_spec = build(ModelSpec(model=cfg.model, layout=cfg.layout))
    torch.manual_seed(0)
    from_run = build_model(cfg)
    assert from_spec.state_dict().keys() == from_run.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(from_spec.state_dict().values(), from_run.state_dict().values(),
                                                 strict=True))
    assert len(from_spec.layers) == 1 and from_spec.layout.grid == tuple(cfg.layout.grid)


def test_selective_checkpointing_keeps_matmuls_and_recomputes_elementwise_work():
    none, full, selective = (ops_in_backward(mode) for mode in MODES)
    layers = 2  # the tiny config: per layer the matmuls qkv, out, gate_up, down and one attention kernel
    attention = "_scaled_dot_product_flash_attention_for_cpu"
    # full recomputes each layer up to the last tensor backward needs: 3 matmuls (nothing needs the down
    # projection's output) and the attention kernel
    assert full["mm"] == none["mm"] + 3 * layers and full[attention] == layers
    assert selective["mm"] == none["mm"] and selective[attention] == 0  # selective keeps their outputs
    assert none["silu"] == 0 and none["rsqrt"] == 0  # backward without recomputation runs no forward op
    for counts in (full, selective):
        assert counts["silu"] == layers and counts["rsqrt"] == 2 * layers  # SwiGLU and both norms, recomputed


def test_checkpointing_setting_words_and_errors():
    assert LayerExecution.from_settings(True).checkpointing == "full"  # older configs said true / false
    assert LayerExecution.from_settings(False).checkpointing == "none"
    with pytest.raises(ConfigError, match="train.activation_checkpointing"):
        load_config("tiny", ["train.activation_checkpointing=partial"])
    with pytest.raises(ConfigError, match="model.compile"):
        load_config("tiny", ["model.compile=sometimes"])
    assert compile_enabled("auto", "cpu") is False and compile_enabled("auto", "cuda") is True
    assert compile_enabled(True, "cpu") is True and compile_enabled(False, "cuda") is False


@pytest.mark.parametrize("mode", MODES)
def test_a_layer_traces_to_one_graph_without_breaks(mode):
    """What a compiled layer runs, traced by dynamo: one graph, no break (so fullgraph=True compiles it)."""
    model, cfg = make_model()
    layout = model.layout
    x = torch.randn(2, layout.seq_len, cfg.model.d_model, requires_grad=True)
    model.backend.on(x.device)  # as the model's forward does before its layers
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(RUNNERS[mode])(model.layers[0], x, model.rope_cos, model.rope_sin)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


def train_steps(model, batch, steps: int) -> list[float]:
    # plain SGD: the weights then differ only as the gradients do (Adam's normalised update would turn a
    # rounding difference in a near-zero gradient into a full-size step)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    losses = []
    for _ in range(steps):
        loss, _ = model.loss(batch)
        loss.backward()
        losses.append(float(loss.detach()))
        opt.step()
        opt.zero_grad()
    return losses


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["none", "selective"])
def test_compiled_training_equals_eager_without_recompiling(mode):
    """Three SGD steps eagerly and with compiled layers + loss kernel (inductor on the CPU). The compiled run
    may compile once per kind of region (a layer, the loss kernel) and never again: a second layer or a second
    step that recompiled would raise here."""
    eager, cfg = make_model()
    eager.enable_activation_checkpointing(mode)
    batch = batch_for(cfg)
    compiled, _ = make_model()
    compiled.enable_activation_checkpointing(mode)
    compiled.compile_layers()
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    with torch._dynamo.config.patch(error_on_recompile=True):
        first_grads = gradients(compiled, batch)
        compiled_losses = train_steps(compiled, batch, 3)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 2  # one layer graph, one loss kernel
    for name, grad in gradients(eager, batch).items():
        torch.testing.assert_close(first_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
    eager_losses = train_steps(eager, batch, 3)
    torch.testing.assert_close(torch.tensor(compiled_losses), torch.tensor(eager_losses), rtol=1e-5, atol=1e-6)
    for (name, p), q in zip(compiled.named_parameters(), eager.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6, msg=name)
