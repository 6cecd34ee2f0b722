"""KV-cache decoding is exact (greedy output is a fixed point of model.logits' argmax), and what is sampled
follows the controls: temperature, top-k, top-p and classifier-free guidance, checked against hand-computed
distributions and against the full forward pass."""

from __future__ import annotations

import math

import pytest
import torch

from nbp_ds.config import load_config
from nbp_ds.generate import filter_logits, generate, guided_logits, inverse_cdf, sample_tokens
from nbp_ds.model import build_model

CASES = {
    "nbp-class": (["layout.block=[1,1,4]"], 12),
    "nbp-uncond-2d-blocks": (["layout.block=[1,2,4]", "layout.condition=none", "layout.num_classes=0"], 6),
    "ntp-class": (["layout.block=[1,1,1]"], 48),
    "hybrid-class": (["layout.block=[1,1,4]", "layout.hybrid=true"], 4 + 12 - 1),
    "hybrid-first-frame": (["layout.block=[1,1,4]", "layout.hybrid=true", "layout.hybrid_blocks=4"], 16 + 12 - 4),
    "hybrid-uncond": (["layout.block=[1,1,4]", "layout.hybrid=true", "layout.condition=none",
                       "layout.num_classes=0"], 15),
    "frames": (["layout.condition=frames", "layout.context_frames=1", "layout.num_classes=0"], 8),
    "frames-ntp": (["layout.block=[1,1,1]", "layout.condition=frames", "layout.context_frames=2",
                    "layout.num_classes=0"], 16),
}


def model_for(overrides, seed=0):
    torch.manual_seed(seed)
    cfg = load_config("tiny", overrides + ["model.attention=sdpa"])
    model = build_model(cfg).eval()
    # a larger init spreads the logits so that greedy choices are not near ties
    with torch.no_grad():
        model.head.weight.mul_(8)
    return model, cfg


@pytest.mark.parametrize("name", list(CASES))
def test_greedy_decoding_matches_full_forward(name):
    overrides, passes = CASES[name]
    model, cfg = model_for(overrides)
    lay = model.layout
    b = 3
    kwargs = {}
    if lay.condition == "class":
        kwargs["label"] = torch.tensor([0, 1, 3])
    if lay.condition == "frames":
        kwargs["context"] = torch.randint(0, 64, (b, lay.context_frames, *lay.grid[1:]))
    tokens, stats = generate(model, b, temperature=0, **kwargs)
    assert stats["forward_passes"] == passes
    assert tokens.shape == (b, *lay.grid) and tokens.dtype == torch.long
    batch = {"tokens": tokens, "label": kwargs.get("label", torch.zeros(b, dtype=torch.long))}
    with torch.no_grad():
        predicted = model.logits(batch).argmax(-1)
    predicted_mask = ~torch.as_tensor(lay.context_mask)
    assert torch.equal(predicted[:, predicted_mask], tokens.view(b, -1)[:, predicted_mask])
    if lay.condition == "frames":
        c = lay.context_frames
        assert torch.equal(tokens[:, :c], kwargs["context"])


def test_sampling_is_seeded_and_in_range():
    model, _ = model_for(CASES["nbp-class"][0])
    a, _ = generate(model, 2, label=1, temperature=1.0, top_k=10, top_p=0.9, seed=7)
    b, _ = generate(model, 2, label=1, temperature=1.0, top_k=10, top_p=0.9, seed=7)
    c, _ = generate(model, 2, label=1, temperature=1.0, seed=8)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert int(a.min()) >= 0 and int(a.max()) < 64


def test_cfg_runs_and_scale_one_equals_plain():
    model, _ = model_for(CASES["hybrid-class"][0])
    plain, _ = generate(model, 2, label=2, temperature=0)
    same, _ = generate(model, 2, label=2, temperature=0, cfg_scale=1.0)
    guided, stats = generate(model, 2, label=2, temperature=0, cfg_scale=3.0)
    assert torch.equal(plain, same)
    assert stats["forward_passes"] == 15 and guided.shape == plain.shape


def test_filters():
    logits = torch.tensor([[1.0, 4.0, 3.0, 2.0]])
    assert torch.isinf(filter_logits(logits, top_k=2)).tolist() == [[True, False, False, True]]
    probs = logits.softmax(-1)  # sorted mass: 0.64, 0.24, ... -> top_p=0.7 keeps two
    assert probs.max() < 0.7
    kept = ~torch.isinf(filter_logits(logits, top_p=0.7))
    assert kept.tolist() == [[False, True, True, False]]
    assert (~torch.isinf(filter_logits(logits, top_p=0.1))).sum() == 1


def test_generation_errors_name_the_problem():
    model, _ = model_for(CASES["nbp-class"][0])
    with pytest.raises(ValueError, match="label"):
        generate(model, 2)
    with pytest.raises(ValueError, match=r"labels must be in \[0, 4\)"):
        generate(model, 2, label=7)
    frames, _ = model_for(CASES["frames"][0])
    with pytest.raises(ValueError, match="context"):
        generate(frames, 2)
    with pytest.raises(ValueError, match="context must be"):
        generate(frames, 2, context=torch.zeros(2, 1, 3, 3, dtype=torch.long))


def test_sampler_follows_the_distribution():
    probs = torch.tensor([0.1, 0.0, 0.6, 0.3])
    logits = probs.log().expand(1, 20000, 4)
    draws = sample_tokens(logits, 1.0, None, None, torch.Generator().manual_seed(0))
    freq = torch.bincount(draws.flatten(), minlength=4).float() / draws.numel()
    assert freq[1] == 0
    torch.testing.assert_close(freq, probs, atol=0.015, rtol=0)


# ------------------------------------------------------------------------------------- sampling controls, by hand

def draws_from(logits: list[float], n: int, seed: int = 0, **controls) -> torch.Tensor:
    """n independent draws of sample_tokens from one row of logits (temperature 1 unless given)."""
    row = torch.tensor(logits).expand(1, n, len(logits))
    temperature = controls.pop("temperature", 1.0)
    return sample_tokens(row, temperature, controls.pop("top_k", None), controls.pop("top_p", None),
                         torch.Generator().manual_seed(seed)).flatten()


def assert_frequencies(draws: torch.Tensor, expected: list[float]) -> None:
    """Each token's sampled frequency is within 5 binomial standard errors, sqrt(p (1 - p) / n), of p: a
    correct sampler fails one token with probability ~6e-7; p = 0 must never be drawn at all."""
    n = draws.numel()
    freq = torch.bincount(draws, minlength=len(expected)).double() / n
    for token, p in enumerate(expected):
        tolerance = 5 * math.sqrt(p * (1 - p) / n)
        assert abs(float(freq[token]) - p) <= tolerance, (token, float(freq[token]), p, tolerance)


def test_temperature_divides_the_logits():
    logits = [0.0, 1.0, 2.0, -1.0]
    # at T = 0.5 the weights are exp(2 * logit): 1, e^2, e^4, e^-2
    weights = [math.exp(x / 0.5) for x in logits]
    expected = [w / sum(weights) for w in weights]  # ~ 0.016, 0.117, 0.865, 0.002
    assert_frequencies(draws_from(logits, 20000, temperature=0.5), expected)
    # and T = 2 flattens: exp(logit / 2)
    weights = [math.exp(x / 2) for x in logits]
    assert_frequencies(draws_from(logits, 20000, seed=1, temperature=2.0), [w / sum(weights) for w in weights])


def test_top_k_draws_only_the_k_largest():
    logits = [2.0, 1.5, 1.9, 0.5, 1.8]  # without the filter every token has >= 5% of the mass
    draws = draws_from(logits, 5000, top_k=2, temperature=2.0)
    assert set(draws.tolist()) == {0, 2}
    p0 = math.exp(2.0 / 2) / (math.exp(2.0 / 2) + math.exp(1.9 / 2))  # renormalised over the two kept
    assert_frequencies(draws, [p0, 0.0, 1 - p0, 0.0, 0.0])


def test_top_p_draws_exactly_the_nucleus():
    probs = [0.05, 0.4, 0.1, 0.3, 0.15]
    # sorted 0.4, 0.3, 0.15, 0.1, 0.05: 0.4 + 0.3 = 0.7 falls short of 0.8, adding 0.15 reaches 0.85, so the
    # nucleus of mass 0.8 is tokens {1, 3, 4}, drawn in proportion 0.4 : 0.3 : 0.15
    draws = draws_from([math.log(p) for p in probs], 8000, top_p=0.8)
    assert set(draws.tolist()) == {1, 3, 4}
    assert_frequencies(draws, [0.0, 0.4 / 0.85, 0.0, 0.3 / 0.85, 0.15 / 0.85])


def test_inverse_cdf_never_draws_a_zero_probability_token():
    """Token i owns the uniforms in [cdf(i-1), cdf(i)); a token of probability 0 owns none, at either end."""
    probs = torch.tensor([[0.0, 0.5, 0.0, 0.5, 0.0]])
    below_one = torch.nextafter(torch.tensor(1.0, dtype=torch.float64), torch.tensor(0.0, dtype=torch.float64))
    cases = {0.0: 1, 0.25: 1, 0.4999: 1, 0.5: 3, 0.75: 3, float(below_one): 3}
    for u, token in cases.items():
        assert inverse_cdf(probs, torch.tensor([u], dtype=torch.float64)).tolist() == [token], u
        if u < 1 - 2 ** -24:  # below one in float32 too
            assert inverse_cdf(probs, torch.tensor([u])).tolist() == [token], u
    # a whole batch of rows at u = 0, each with its own leading zeros (the mass after top-k / top-p filtering)
    rows = torch.tensor([[0.0, 0.0, 0.2, 0.8], [0.0, 1.0, 0.0, 0.0], [0.3, 0.7, 0.0, 0.0]])
    assert inverse_cdf(rows, torch.zeros(3)).tolist() == [2, 1, 0]


# ---------------------------------------------------------------------------- the controls, through generate()

def full_forward_logits(model, tokens: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """[B, N, V] logits of the whole generated video in one pass (label may be the null class)."""
    lay = model.layout
    with torch.no_grad():
        return lay.to_raster(model.head(model(lay.input_ids(tokens, label))))


def test_generate_applies_top_k_top_p_and_temperature():
    """Teacher forcing shows the logits each token was drawn from: a sampled token must lie in that
    position's top-k / nucleus, and a near-zero temperature must give the greedy video."""
    model, _ = model_for(CASES["nbp-class"][0])
    label = torch.tensor([0, 1, 2, 3])
    tokens, _ = generate(model, 4, label=label, temperature=3.0, top_k=2, seed=0)
    logits = full_forward_logits(model, tokens, label)
    top2 = logits.topk(2, dim=-1).indices
    assert bool((top2 == tokens.view(4, -1, 1)).any(-1).all()), "a token outside the top 2 was drawn"
    unfiltered, _ = generate(model, 4, label=label, temperature=3.0, seed=0)
    outside = ~(full_forward_logits(model, unfiltered, label).topk(2, dim=-1).indices
                == unfiltered.view(4, -1, 1)).any(-1)
    assert int(outside.sum()) > 10  # so the check above has teeth at this temperature

    tokens, _ = generate(model, 4, label=label, temperature=3.0, top_p=0.5, seed=0)
    probs = (full_forward_logits(model, tokens, label) / 3.0).softmax(-1)
    sorted_probs, order = probs.sort(-1, descending=True)
    in_nucleus_sorted = (sorted_probs.cumsum(-1) - sorted_probs) < 0.5  # the mass before it falls short of p
    in_nucleus = torch.zeros_like(in_nucleus_sorted).scatter(-1, order, in_nucleus_sorted)
    assert bool(in_nucleus.gather(-1, tokens.view(4, -1, 1)).all()), "a token outside the nucleus was drawn"

    greedy, _ = generate(model, 4, label=label, temperature=0)
    cold, _ = generate(model, 4, label=label, temperature=1e-3, seed=0)
    assert torch.equal(cold, greedy)


def test_cfg_guides_by_the_unconditional_base():
    cond = torch.tensor([[1.0, 2.0, 3.0]])
    uncond = torch.tensor([[0.5, 3.0, 1.0]])
    # uncond + 3 * (cond - uncond) = [0.5 + 1.5, 3 - 3, 1 + 6]
    assert guided_logits(cond, uncond, 3.0).tolist() == [[2.0, 0.0, 7.0]]
    assert torch.equal(guided_logits(cond, uncond, 1.0), cond)
    assert torch.equal(guided_logits(cond, uncond, 0.0), uncond)


def test_guided_greedy_is_the_argmax_of_guided_full_forward_logits():
    model, _ = model_for(CASES["hybrid-class"][0])
    lay = model.layout
    label = torch.tensor([0, 1, 3])
    scale = 3.0
    guided, _ = generate(model, 3, label=label, temperature=0, cfg_scale=scale)
    plain, _ = generate(model, 3, label=label, temperature=0)
    assert not torch.equal(guided, plain)
    cond = full_forward_logits(model, guided, label)
    uncond = full_forward_logits(model, guided, torch.full_like(label, lay.null_class))
    expected = (uncond + scale * (cond - uncond)).argmax(-1)  # the formula, written out here
    assert torch.equal(expected, guided.view(3, -1))
