"""The benchmark's peers against the fp32 oracle, on the CPU.

``grouped_mm_pipeline`` runs on torch's CPU ``_grouped_mm``; the Triton peer runs under Triton's
interpreter (``TRITON_INTERPRET=1``) when Triton is installed, and is skipped otherwise.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import torch
from conftest import TOLERANCES, assert_close, rel_error

from autotune import peers
from autotune.problem import PRESETS, LatentMoEProblem
from autotune.reference import latent_moe_reference

# (hidden, latent, inter, experts, top_k, n_group, topk_group); latent None: a plain MoE.
SHAPES = {
    "small": (64, 32, 48, 8, 3, 1, 1),
    "awkward": (72, 40, 24, 12, 5, 1, 1),
    "grouped": (64, 32, 32, 16, 4, 4, 2),
    "no_latent": (48, None, 32, 6, 2, 1, 1),
}


def make_layer(shape: str, activation: str, dtype: torch.dtype):
    hidden, latent, inter, experts, top_k, n_group, topk_group = SHAPES[shape]
    width = hidden if latent is None else latent
    rows = 2 * inter if activation == "swiglu" else inter
    gate = torch.randn(experts, hidden) / math.sqrt(hidden)
    bias = torch.randn(experts) * 0.05
    fc1 = None if latent is None else (torch.randn(latent, hidden) / math.sqrt(hidden)).to(dtype)
    up = (torch.randn(experts, rows, width) / math.sqrt(width)).to(dtype)
    down = (torch.randn(experts, width, inter) / math.sqrt(inter)).to(dtype)
    fc2 = None if latent is None else (torch.randn(hidden, latent) / math.sqrt(latent)).to(dtype)
    routing = dict(top_k=top_k, activation=activation, n_group=n_group, topk_group=topk_group,
                   norm_topk_prob=True, routed_scaling_factor=2.5)
    return (gate, bias, fc1, up, down, fc2), routing


def oracle(x, weights, routing):
    gate, bias, fc1, up, down, fc2 = weights
    return latent_moe_reference(x.float(), gate, bias, up, down, fc1_latent_proj=fc1,
                                fc2_latent_proj=fc2, **routing)


@pytest.mark.parametrize("tokens", [1, 7, 33])
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("scoring", ["sigmoid", "softmax"])
@pytest.mark.parametrize("activation", ["relu2", "swiglu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_mm_pipeline_matches_oracle(seed, dtype, activation, scoring, shape, tokens):
    weights, routing = make_layer(shape, activation, dtype)
    routing["scoring"] = scoring
    x = torch.randn(tokens, SHAPES[shape][0]).to(dtype)
    out = peers.grouped_mm_pipeline(x, *weights, **routing)
    assert out.dtype == dtype
    assert_close(out.float(), oracle(x, weights, routing), dtype)


def test_grouped_mm_pipeline_keeps_leading_dims_and_empty(seed):
    weights, routing = make_layer("small", "relu2", torch.float32)
    x = torch.randn(2, 3, 64)
    out = peers.grouped_mm_pipeline(x, *weights, scoring="sigmoid", **routing)
    assert out.shape == (2, 3, 64)
    assert_close(out, oracle(x, weights, {**routing, "scoring": "sigmoid"}), torch.float32)
    empty = peers.grouped_mm_pipeline(x[:0], *weights, **routing)
    assert empty.shape == (0, 3, 64)


def test_skewed_routing_all_tokens_to_same_experts(seed):
    # A huge bias sends every token to the same top-k experts: most groups are empty.
    weights, routing = make_layer("small", "relu2", torch.float32)
    bias = torch.zeros(8)
    bias[[1, 4, 6]] = 100.0
    weights = (weights[0], bias, *weights[2:])
    x = torch.randn(19, 64)
    for name in ("grouped_mm", "reference"):
        out = peers.PEERS[name](x, *weights, **routing)
        assert_close(out, oracle(x, weights, routing), torch.float32)


def test_peers_reject_bad_arguments(seed):
    weights, routing = make_layer("small", "relu2", torch.float32)
    x = torch.randn(4, 64)
    with pytest.raises(ValueError, match="x"):
        peers.grouped_mm_pipeline(torch.randn(4, 63), *weights, **routing)
    with pytest.raises(TypeError, match="fc1_latent_proj"):
        peers.grouped_mm_pipeline(x, weights[0], weights[1], torch.nn.Linear(64, 32),
                                  *weights[3:], **routing)
    with pytest.raises(ValueError, match="activation"):
        peers.grouped_mm_pipeline(x, *weights, **{**routing, "activation": "gelu"})


def test_reference_module_is_the_oracle(seed):
    weights, routing = make_layer("grouped", "swiglu", torch.float32)
    x = torch.randn(5, 64)
    out = peers.reference_module(x, *weights, scoring="sigmoid", **routing)
    assert torch.equal(out, oracle(x, weights, {**routing, "scoring": "sigmoid"}))


def test_available_peers_and_registry():
    avail = peers.available_peers()
    assert set(avail) == set(peers.PEERS) == {"grouped_mm", "triton", "reference"}
    assert avail["reference"] is None
    assert (avail["triton"] is None) == peers.triton_available()


def test_peers_have_no_data_dependent_host_work(monkeypatch):
    # Fake tensors carry no data: any .item()/.tolist()/nonzero or data-dependent shape raises,
    # which is what would break CUDA-graph capture on the GPU.
    from torch._subclasses.fake_tensor import DataDependentOutputException, FakeTensorMode

    weights, routing = make_layer("grouped", "swiglu", torch.bfloat16)
    monkeypatch.setattr(peers, "_check_triton_inputs", lambda *a: None)
    monkeypatch.setattr(peers, "_launch_moe_gemm", lambda *a, **k: None)  # kernels need data
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        x = mode.from_tensor(torch.randn(5, 64).to(torch.bfloat16))
        fake = tuple(None if t is None else mode.from_tensor(t) for t in weights)
        for name in ("grouped_mm", "triton"):
            out = peers.PEERS[name](x, *fake, scoring="sigmoid", **routing)
            assert out.shape == (5, 64) and out.dtype == torch.bfloat16
        with pytest.raises(DataDependentOutputException):  # the oracle syncs, by design
            peers.reference_module(x, *fake, scoring="sigmoid", **routing)


# ----------------------------------------------------------------------------- triton

def test_triton_config_table_is_monotone():
    cfgs = [peers.triton_config(t, 22, 512) for t in (1, 8, 32, 128, 512, 2048, 8192)]
    blocks = [c.block_m for c in cfgs]
    assert blocks == sorted(blocks) and blocks[0] == 16 and blocks[-1] == 128
    with pytest.raises(ValueError, match="tokens"):
        peers.triton_config(-1, 22, 512)


@pytest.mark.parametrize("tokens,experts,top_k,block_m", [(1, 8, 3, 16), (37, 12, 5, 16),
                                                         (64, 4, 2, 32), (5, 64, 4, 16)])
def test_align_block_size_is_a_padded_permutation(seed, tokens, experts, top_k, block_m):
    ids = torch.rand(tokens, experts).topk(top_k, dim=1).indices
    sorted_ids, expert_ids, total = peers._align_block_size(ids, experts, block_m)
    n = tokens * top_k
    used = int(total)
    assert used % block_m == 0 and sorted_ids.numel() % block_m == 0
    real = sorted_ids[sorted_ids < n]
    assert sorted(real.tolist()) == list(range(n))  # every token copy exactly once
    assert (sorted_ids[used:] == n).all()
    flat = ids.reshape(-1)
    for b in range(used // block_m):
        block = sorted_ids[b * block_m:(b + 1) * block_m]
        members = block[block < n].long()
        assert members.numel() > 0
        assert (flat[members] == expert_ids[b]).all()
    assert (expert_ids[used // block_m:] == experts).all()


# Triton picks interpreter or compiler when it is imported, so the interpreter cases run in one
# subprocess that imports it with TRITON_INTERPRET=1 (this process may already hold Triton).
# The interpreter rounds fp32 -> bf16 by truncation (compiled Triton rounds to nearest), so its
# bf16 error is about twice the GPU's.
INTERPRETER_TOL = {"float32": 1e-5, "bfloat16": 2 * TOLERANCES[torch.bfloat16]}
ODD_CONFIG = (32, 16, 32, 2, 4, 2)  # block_m, block_n, block_k, group_m, warps, stages
TRITON_CASES = [
    *[(dtype, act, shape, tokens, None) for dtype in ("float32", "bfloat16")
      for act in ("relu2", "swiglu") for shape in SHAPES for tokens in (1, 9)],
    ("float32", "relu2", "awkward", 20, ODD_CONFIG),
    ("bfloat16", "swiglu", "grouped", 40, ODD_CONFIG),
]


def _case_id(case) -> str:
    dtype, act, shape, tokens, config = case
    return f"{dtype}-{act}-{shape}-T{tokens}" + ("-cfg" if config else "")


def _interpreter_errors() -> dict[str, float]:
    errors = {}
    for case in TRITON_CASES:
        dtype_name, activation, shape, tokens, config = case
        torch.manual_seed(zlib.crc32(_case_id(case).encode()))
        dtype = getattr(torch, dtype_name)
        weights, routing = make_layer(shape, activation, dtype)
        routing["scoring"] = "softmax" if shape == "awkward" else "sigmoid"
        x = torch.randn(tokens, SHAPES[shape][0]).to(dtype)
        cfg = None if config is None else peers.TritonConfig(*config)
        out = peers.triton_sorted_moe(x, *weights, config=cfg, **routing)
        assert out.dtype == dtype and out.shape == (tokens, SHAPES[shape][0])
        errors[_case_id(case)] = rel_error(out.float(), oracle(x, weights, routing))
    return errors


@pytest.fixture(scope="module")
def interpreter_errors() -> dict[str, float]:
    pytest.importorskip("triton", reason="triton is not installed")
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "TRITON_INTERPRET": "1",
           "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, __file__, "--interpreter-errors"], cwd=root, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("case", TRITON_CASES, ids=_case_id)
def test_triton_sorted_moe_interpreter(interpreter_errors, case):
    err = interpreter_errors[_case_id(case)]
    assert err <= INTERPRETER_TOL[case[0]], f"relative error {err:.3g}"


def test_triton_sorted_moe_rejects_bad_config(seed):
    pytest.importorskip("triton", reason="triton is not installed")
    weights, routing = make_layer("small", "relu2", torch.float32)
    with pytest.raises(TypeError, match="config"):
        peers.triton_sorted_moe(torch.randn(2, 64), *weights, config=(16, 16), **routing)


def test_triton_sorted_moe_needs_cuda_without_interpreter(monkeypatch):
    pytest.importorskip("triton", reason="triton is not installed")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    weights, routing = make_layer("small", "relu2", torch.float32)
    with pytest.raises(ValueError, match="x: triton_sorted_moe needs CUDA"):
        peers.triton_sorted_moe(torch.randn(2, 64), *weights, **routing)


# ----------------------------------------------------------------------------- roofline

def test_expected_experts_touched():
    assert peers.expected_experts_touched(512, 0, 22) == 0.0
    assert peers.expected_experts_touched(512, 1, 22) == pytest.approx(
        512 * (1 - (511 / 512) ** 22))
    assert 21 < peers.expected_experts_touched(512, 1, 22) < 22
    assert peers.expected_experts_touched(512, 8192, 22) == pytest.approx(512)


def test_roofline_super_by_hand():
    p = PRESETS["nemotron-3-super"]
    nbytes, flops = peers.roofline_bytes_flops(p, 1)
    touched = 512 * (1 - (511 / 512) ** 22)
    want = (2 * 4096 * 2 + 512 * 4096 * 4 + 2 * 1024 * 4096 * 2
            + touched * (2688 + 2688) * 1024 * 2)
    assert nbytes == pytest.approx(want)
    assert flops == pytest.approx(2 * 4096 * 512 + 2 * 2 * 4096 * 1024
                                  + 2 * 22 * 2 * 2688 * 1024)
    # Memory bound at T=1 on an H200-like device (4.2 TB/s copy, 800 TFLOP/s).
    ms = peers.roofline_floor_ms(p, 1, 4.2e12, 8e14)
    assert ms == pytest.approx(1e3 * want / 4.2e12)
    assert 0.05 < ms < 0.07
    # Compute bound at T=8192.
    nbytes, flops = peers.roofline_bytes_flops(p, 8192)
    assert peers.roofline_floor_ms(p, 8192, 4.2e12, 8e14) == pytest.approx(1e3 * flops / 8e14)


def test_roofline_swiglu_and_no_latent():
    p = PRESETS["nemotron-3-super"].with_(activation="swiglu", scoring="softmax")
    _, flops = peers.roofline_bytes_flops(p, 4)
    assert flops == pytest.approx(2 * 4 * 4096 * 512 + 4 * 4 * 4096 * 1024
                                  + 2 * 4 * 22 * 3 * 2688 * 1024)
    plain = LatentMoEProblem(hidden_size=64, latent_size=None, intermediate_size=32,
                             num_experts=4, top_k=1)
    nbytes, flops = peers.roofline_bytes_flops(plain, 1)
    assert flops == 2 * 64 * 4 + 2 * 64 * 64
    assert nbytes == pytest.approx(2 * 64 * 2 + 4 * 64 * 4 + 1.0 * 64 * 64 * 2)


def test_roofline_rejects_bad_input():
    p = PRESETS["nemotron-3-super"]
    with pytest.raises(ValueError, match="copy_bw"):
        peers.roofline_floor_ms(p, 1, 0.0, 1e15)
    with pytest.raises(ValueError, match="tokens"):
        peers.roofline_floor_ms(p, -1, 1e12, 1e15)
    with pytest.raises(TypeError, match="problem"):
        peers.roofline_bytes_flops("nemotron-3-super", 1)



# ----------------------------------------------------------------------------- GPU

def _gpu_layer(activation: str, skewed: bool):
    # Sizes keep every row 16-byte aligned, which torch._grouped_mm needs on CUDA.
    torch.manual_seed(7)
    hidden, latent, inter, experts, top_k = 256, 128, 96, 16, 4
    rows = 2 * inter if activation == "swiglu" else inter
    bias = torch.zeros(experts)
    if skewed:
        bias[[0, 5, 9, 12]] = 100.0  # every token to the same experts; the rest empty
    weights = (torch.randn(experts, hidden) / 16, bias,
               torch.randn(latent, hidden) / 16, torch.randn(experts, rows, latent) / 11.3,
               torch.randn(experts, latent, inter) / 9.8, torch.randn(hidden, latent) / 11.3)
    weights = tuple(t.cuda() if i < 2 else t.cuda().to(torch.bfloat16)
                    for i, t in enumerate(weights))
    routing = dict(top_k=top_k, activation=activation,
                   scoring="softmax" if activation == "swiglu" else "sigmoid",
                   routed_scaling_factor=2.5)
    return weights, routing


@pytest.mark.gpu
@pytest.mark.parametrize("skewed", [False, True])
@pytest.mark.parametrize("activation", ["relu2", "swiglu"])
@pytest.mark.parametrize("tokens", [1, 77, 1000])
@pytest.mark.parametrize("name", ["grouped_mm", "triton"])
def test_peers_on_gpu_match_oracle_and_replay(name, tokens, activation, skewed):
    if name == "triton":
        pytest.importorskip("triton", reason="triton is not installed")
    weights, routing = _gpu_layer(activation, skewed)
    fn = peers.PEERS[name]
    x = torch.randn(tokens, 256, device="cuda").to(torch.bfloat16)
    out = fn(x, *weights, **routing)
    assert_close(out.float(), oracle(x, weights, routing), torch.bfloat16)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = fn(x, *weights, **routing)
    x.copy_(torch.randn_like(x))
    captured.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    assert_close(captured.float(), fn(x, *weights, **routing).float(), torch.bfloat16)

if __name__ == "__main__" and sys.argv[1:] == ["--interpreter-errors"]:
    print(json.dumps(_interpreter_errors()))
