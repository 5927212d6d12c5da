"""The fp32 oracle against an independent per-token implementation written out here."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import TOLERANCES, assert_close
from torch import nn

from autotune.reference import experts_forward, latent_moe_reference, route

pytestmark = pytest.mark.usefixtures("seed")

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (tokens, hidden, latent, intermediate, experts, top_k, n_group, topk_group); latent None is a
# plain MoE at hidden width.
SHAPES = [
    (0, 48, 24, 40, 8, 2, 1, 1),
    (1, 48, 24, 40, 8, 1, 1, 1),
    (3, 48, 24, 40, 12, 3, 1, 1),
    (77, 48, 24, 40, 12, 4, 4, 2),
    (77, 40, None, 24, 8, 2, 1, 1),
    (29, 64, 16, 8, 12, 4, 4, 2),
]


# ----------------------------------------------------------------------------- naive oracle

def naive_route(x, gate_weight, bias, *, top_k, scoring, n_group, topk_group, norm, scale):
    """Per-token grouped top-k with explicit loops; returns (weights as floats, ids) per token.

    The expert choice compares the same fp32 scores the layer compares (torch's sigmoid/softmax
    of the same fp32 logits, the bias added in fp32), so near ties cannot flip between the two
    implementations; the weights are recomputed in float64 from the logits.
    """
    logits = x.reshape(-1, gate_weight.shape[1]).float() @ gate_weight.float().T
    scores = logits.sigmoid() if scoring == "sigmoid" else logits.softmax(-1)
    choice = scores if bias is None else scores + bias.float()
    num_experts = gate_weight.shape[0]
    size = num_experts // n_group
    result = []
    for t in range(logits.shape[0]):
        c, row = choice[t].tolist(), logits[t].double().tolist()
        best = best_groups(c, scoring, n_group, topk_group)
        candidates = [e for e in range(num_experts) if e // size in best]
        ids = sorted(candidates, key=lambda e: -c[e])[:top_k]
        if scoring == "sigmoid":
            s = [1.0 / (1.0 + math.exp(-v)) for v in row]
        else:
            m = max(row)
            z = sum(math.exp(v - m) for v in row)
            s = [math.exp(v - m) / z for v in row]
        w = [s[e] for e in ids]
        if norm:
            total = sum(w)
            w = [v / (total + 1e-20) for v in w]
        result.append(([v * scale for v in w], ids))
    return result


def best_groups(choice, scoring, n_group, topk_group):
    """DeepSeek-V3 rule: groups ranked by their two best biased scores (max for softmax)."""
    size = len(choice) // n_group
    group_scores = []
    for g in range(n_group):
        vals = sorted(choice[g * size:(g + 1) * size], reverse=True)
        if scoring == "sigmoid" and size >= 2:
            group_scores.append(float(np.float32(vals[0] + vals[1])))  # one fp32 rounding
        else:
            group_scores.append(vals[0])
    return set(sorted(range(n_group), key=lambda g: -group_scores[g])[:topk_group])


def naive_experts(h, up_proj, down_proj, routes, activation):
    """Per token, per chosen expert: explicit float64 matrix-vector products."""
    inter = down_proj.shape[2]
    out = torch.zeros(h.shape[0], down_proj.shape[1], dtype=torch.float64)
    for t, (weights, ids) in enumerate(routes):
        for w, e in zip(weights, ids, strict=True):
            u = up_proj[e].double() @ h[t]
            if activation == "relu2":
                a = torch.clamp(u, min=0) ** 2
            else:
                g, up = u[:inter], u[inter:]
                a = g / (1 + torch.exp(-g)) * up
            out[t] += w * (down_proj[e].double() @ a)
    return out


def naive_layer(inp, *, fc1=None, fc2=None, **routing):
    x = inp["x"]
    hidden = inp["gate_weight"].shape[1]
    x2 = x.reshape(-1, hidden)
    routes = naive_route(x, inp["gate_weight"], inp["bias"], **routing)
    if fc1 is None:
        h = x2.double()
    elif isinstance(fc1, torch.Tensor):
        h = x2.double() @ fc1.double().T
    else:
        h = fc1(x2).double()
    y = naive_experts(h, inp["up_proj"], inp["down_proj"], routes, inp["activation"])
    if isinstance(fc2, torch.Tensor):
        y = y @ fc2.double().T
    elif fc2 is not None:
        y = fc2(y.to(x.dtype)).double()
    return y.reshape(*x.shape[:-1], y.shape[-1]), routes


# ----------------------------------------------------------------------------- inputs

def make_inputs(tokens, hidden, latent, inter, experts, *, activation, dtype, bias=True,
                lead=()):
    width = hidden if latent is None else latent
    rows = 2 * inter if activation == "swiglu" else inter
    inp = {
        "x": torch.randn(*lead, tokens, hidden).to(dtype),
        "gate_weight": torch.randn(experts, hidden) / hidden**0.5,
        # Large enough to change choices, so a biased weight would be caught.
        "bias": torch.randn(experts) * 0.3 if bias else None,
        "up_proj": (torch.randn(experts, rows, width) / width**0.5).to(dtype),
        "down_proj": (torch.randn(experts, width, inter) / inter**0.5).to(dtype),
        "activation": activation,
    }
    if latent is not None:
        inp["fc1"] = (torch.randn(latent, hidden) / hidden**0.5).to(dtype)
        inp["fc2"] = (torch.randn(hidden, latent) / latent**0.5).to(dtype)
    return inp


def run_reference(inp, fc1="default", fc2="default", hook=None, **routing):
    fc1 = inp.get("fc1") if isinstance(fc1, str) else fc1
    fc2 = inp.get("fc2") if isinstance(fc2, str) else fc2
    return latent_moe_reference(
        inp["x"], inp["gate_weight"], inp["bias"], inp["up_proj"], inp["down_proj"],
        top_k=routing["top_k"], activation=inp["activation"], scoring=routing["scoring"],
        n_group=routing["n_group"], topk_group=routing["topk_group"],
        norm_topk_prob=routing["norm"], routed_scaling_factor=routing["scale"],
        fc1_latent_proj=fc1, fc2_latent_proj=fc2, topk_ids_hook=hook)


def routing_of(shape, scoring, norm=True, scale=1.0):
    _, _, _, _, _, k, n_group, topk_group = shape
    return dict(top_k=k, scoring=scoring, n_group=n_group, topk_group=topk_group, norm=norm,
                scale=scale)


# ----------------------------------------------------------------------------- tests

@pytest.mark.parametrize("scoring", ["sigmoid", "softmax"])
@pytest.mark.parametrize("activation", ["relu2", "swiglu"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_layer_matches_naive(dtype, shape, activation, scoring):
    t, hidden, latent, inter, experts = shape[:5]
    inp = make_inputs(t, hidden, latent, inter, experts, activation=activation, dtype=dtype,
                      bias=scoring == "sigmoid")
    routing = routing_of(shape, scoring, scale=2.5)
    out = run_reference(inp, **routing)
    expected, _ = naive_layer(inp, fc1=inp.get("fc1"), fc2=inp.get("fc2"), **routing)
    assert out.dtype == dtype and out.shape == (t, hidden)
    assert_close(out, expected, dtype)


@pytest.mark.parametrize("scale", [1.0, 5.0])
@pytest.mark.parametrize("norm", [True, False])
@pytest.mark.parametrize("scoring", ["sigmoid", "softmax"])
def test_route_weights_norm_and_scale(scoring, norm, scale):
    shape = (77, 48, 24, 40, 12, 4, 4, 2)
    inp = make_inputs(*shape[:5], activation="relu2", dtype=torch.float32)
    routing = routing_of(shape, scoring, norm=norm, scale=scale)
    weights, ids = route(inp["x"], inp["gate_weight"], inp["bias"], top_k=4, scoring=scoring,
                         n_group=4, topk_group=2, norm_topk_prob=norm,
                         routed_scaling_factor=scale)
    assert weights.dtype == torch.float32 and ids.dtype == torch.int64
    for t, (w_naive, ids_naive) in enumerate(naive_route(inp["x"], inp["gate_weight"],
                                                         inp["bias"], **routing)):
        assert ids[t].tolist() == ids_naive
        torch.testing.assert_close(weights[t].double(), torch.tensor(w_naive).double(),
                                   rtol=TOLERANCES[torch.float32], atol=1e-6)
    if norm:
        torch.testing.assert_close(weights.sum(-1), torch.full((77,), scale))
    expected, _ = naive_layer(inp, fc1=inp["fc1"], fc2=inp["fc2"], **routing)
    assert_close(run_reference(inp, **routing), expected, torch.float32)


def test_weights_are_the_unbiased_scores():
    x = torch.randn(50, 32)
    gate = torch.randn(8, 32) / 32**0.5
    bias = torch.zeros(8)
    bias[[1, 6]] = 10.0  # forces experts 1 and 6 whatever their score
    weights, ids = route(x, gate, bias, top_k=2, norm_topk_prob=False)
    assert (ids.sort(-1).values == torch.tensor([1, 6])).all()
    torch.testing.assert_close(weights, torch.sigmoid(x @ gate.T).gather(1, ids))
    assert weights.max() < 1  # a biased weight would exceed 10


@pytest.mark.parametrize("scoring", ["sigmoid", "softmax"])
@pytest.mark.parametrize("experts,n_group,topk_group,k", [(16, 4, 2, 4), (12, 4, 2, 3),
                                                          (4, 4, 2, 2), (24, 8, 3, 6)])
def test_grouped_topk_stays_in_best_groups(experts, n_group, topk_group, k, scoring):
    x = torch.randn(77, 40)
    gate = torch.randn(experts, 40) / 40**0.5
    bias = torch.randn(experts) * 0.3 if scoring == "sigmoid" else None
    _, ids = route(x, gate, bias, top_k=k, scoring=scoring, n_group=n_group,
                   topk_group=topk_group)
    logits = x @ gate.T
    choice = logits.sigmoid() + bias if scoring == "sigmoid" else logits.softmax(-1)
    size = experts // n_group
    for t in range(77):
        allowed = best_groups(choice[t].tolist(), scoring, n_group, topk_group)
        assert {e // size for e in ids[t].tolist()} <= allowed
        # sorted=True order: best biased score first, deterministic
        c = choice[t][ids[t]]
        assert (c[:-1] >= c[1:]).all()


def test_grouping_changes_the_choice():
    """With n_group > 1 some token must pick differently than plain top-k (else untested)."""
    x, gate = torch.randn(200, 40), torch.randn(16, 40) / 40**0.5
    bias = torch.randn(16) * 0.3
    _, plain = route(x, gate, bias, top_k=4)
    _, grouped = route(x, gate, bias, top_k=4, n_group=4, topk_group=2)
    assert not torch.equal(plain.sort(-1).values, grouped.sort(-1).values)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_softmax_with_bias_and_leading_dims(dtype):
    inp = make_inputs(7, 48, 24, 40, 8, activation="swiglu", dtype=dtype, lead=(2, 3))
    routing = dict(top_k=3, scoring="softmax", n_group=1, topk_group=1, norm=False, scale=1.0)
    out = run_reference(inp, **routing)
    expected, _ = naive_layer(inp, fc1=inp["fc1"], fc2=inp["fc2"], **routing)
    assert out.shape == (2, 3, 7, 48)
    assert_close(out, expected, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("which", ["both", "fc1", "fc2"])
def test_callable_projections(which, dtype):
    """nn.Linear (with bias) and nn.Sequential callables are applied like tensor weights."""
    inp = make_inputs(33, 48, 24, 40, 12, activation="relu2", dtype=dtype)
    fc1 = nn.Linear(48, 24, dtype=dtype)
    fc2 = nn.Sequential(nn.Linear(24, 64, dtype=dtype), nn.Tanh(), nn.Linear(64, 48, dtype=dtype))
    fc1 = fc1 if which in ("both", "fc1") else inp["fc1"]
    fc2 = fc2 if which in ("both", "fc2") else inp["fc2"]
    routing = dict(top_k=3, scoring="sigmoid", n_group=1, topk_group=1, norm=True, scale=2.0)
    with torch.no_grad():
        out = run_reference(inp, fc1=fc1, fc2=fc2, **routing)
        expected, _ = naive_layer(inp, fc1=fc1, fc2=fc2, **routing)
    assert_close(out, expected, dtype)


@pytest.mark.parametrize("tokens", [0, 1, 77])
def test_hook_gets_the_chosen_ids(tokens):
    inp = make_inputs(tokens, 48, 24, 40, 12, activation="relu2", dtype=torch.bfloat16)
    routing = dict(top_k=4, scoring="sigmoid", n_group=4, topk_group=2, norm=True, scale=1.0)
    seen = []
    out = run_reference(inp, hook=seen.append, **routing)
    assert len(seen) == 1 and out.shape == (tokens, 48)
    ids = seen[0]
    assert ids.dtype == torch.int64 and ids.shape == (tokens, 4)
    routes = naive_route(inp["x"], inp["gate_weight"], inp["bias"], **routing)
    assert ids.tolist() == [r[1] for r in routes]


def test_experts_forward_matches_naive_on_given_routes():
    h = torch.randn(20, 24)
    up, down = torch.randn(6, 80, 24), torch.randn(6, 24, 40)
    ids = torch.randint(0, 6, (20, 3))
    weights = torch.rand(20, 3)
    out = experts_forward(h, up, down, weights, ids, "swiglu")
    routes = list(zip(weights.double().tolist(), ids.tolist(), strict=True))
    expected = naive_experts(h.double(), up, down, routes, "swiglu")
    assert_close(out, expected, torch.float32)


def test_inputs_are_not_modified():
    inp = make_inputs(9, 48, 24, 40, 8, activation="swiglu", dtype=torch.float32)
    before = {k: v.clone() for k, v in inp.items() if isinstance(v, torch.Tensor)}
    run_reference(inp, top_k=2, scoring="sigmoid", n_group=1, topk_group=1, norm=True,
                  scale=1.0)
    for k, v in before.items():
        assert torch.equal(inp[k], v), k


@pytest.mark.parametrize("change,match", [
    (dict(top_k=9), "top_k"),
    (dict(n_group=3), "n_group"),
    (dict(topk_group=2), "topk_group"),
    (dict(activation="gelu"), "activation"),
    (dict(scoring="tanh"), "scoring"),
])
def test_reference_rejects_bad_routing(change, match):
    inp = make_inputs(4, 48, 24, 40, 8, activation="relu2", dtype=torch.float32)
    args = dict(top_k=2, activation="relu2", scoring="sigmoid", n_group=1, topk_group=1)
    args.update(change)
    with pytest.raises(ValueError, match=match):
        latent_moe_reference(inp["x"], inp["gate_weight"], inp["bias"], inp["up_proj"],
                             inp["down_proj"], fc1_latent_proj=inp["fc1"],
                             fc2_latent_proj=inp["fc2"], **args)


def test_tolerance_table_covers_the_dtypes():
    assert set(TOLERANCES) == set(DTYPES)
