"""The fused sm90 CUTLASS forward against the fp32 oracle, on the GPU."""

from __future__ import annotations

import pytest
import torch

from autotune.problem import PRESETS, LatentMoEProblem

pytestmark = pytest.mark.gpu

SUPER, ULTRA = PRESETS["nemotron-3-super"], PRESETS["nemotron-3-ultra"]
ODD = LatentMoEProblem(2880, 768, 1536, 96, 6, routed_scaling_factor=2.5)
TOL = 1e-2


def make_weights(p: LatentMoEProblem, seed: int, skew: bool = False):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    dt = torch.bfloat16 if p.dtype == "bfloat16" else torch.float16

    def randn(*shape, std):
        return torch.randn(*shape, generator=gen, device="cuda") * std

    w = p.expert_width
    bias = randn(p.num_experts, std=0.05)
    if skew:  # every token picks the same top-k experts; most experts stay empty
        bias[: p.top_k] += 100.0
    return dict(
        gate_weight=randn(p.num_experts, p.hidden_size, std=p.hidden_size ** -0.5),
        e_score_correction_bias=bias if p.scoring == "sigmoid" else None,
        fc1=None if p.latent_size is None else randn(w, p.hidden_size,
                                                      std=p.hidden_size ** -0.5).to(dt),
        up_proj=randn(p.num_experts, p.up_rows, w, std=w ** -0.5).to(dt),
        down_proj=randn(p.num_experts, w, p.intermediate_size,
                        std=p.intermediate_size ** -0.5).to(dt),
        fc2=None if p.latent_size is None else randn(p.hidden_size, w, std=w ** -0.5).to(dt),
    )


def oracle(p, wts, x, hook=None):
    from autotune.reference import latent_moe_reference

    return latent_moe_reference(
        x, wts["gate_weight"], wts["e_score_correction_bias"], wts["up_proj"], wts["down_proj"],
        top_k=p.top_k, activation=p.activation, scoring=p.scoring, n_group=p.n_group,
        topk_group=p.topk_group, norm_topk_prob=p.norm_topk_prob,
        routed_scaling_factor=p.routed_scaling_factor, fc1_latent_proj=wts["fc1"],
        fc2_latent_proj=wts["fc2"], topk_ids_hook=hook)


def fused(p, wts, arch=None):
    from autotune.fused import FusedLatentMoE

    return FusedLatentMoE(p, wts["gate_weight"], wts["e_score_correction_bias"], wts["fc1"],
                          wts["up_proj"], wts["down_proj"], wts["fc2"], arch=arch)


def poison_allocator(nbytes: int = 1 << 31) -> None:
    """Fill freed caching-allocator memory with NaN so unwritten outputs cannot pass."""
    junk = torch.empty(nbytes // 2, dtype=torch.bfloat16, device="cuda").fill_(float("nan"))
    del junk


def rel_err(out, ref) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


def check(p, tokens, seed=0, skew=False, arch=None):
    wts = make_weights(p, seed, skew)
    layer = fused(p, wts, arch)
    gen = torch.Generator(device="cuda").manual_seed(seed + 1)
    x = torch.randn(tokens, p.hidden_size, generator=gen, device="cuda").to(layer.dtype)
    poison_allocator()
    ids_seen = []
    out = layer(x, topk_ids_hook=ids_seen.append)
    ref_ids = []
    ref = oracle(p, wts, x, hook=ref_ids.append)
    torch.cuda.synchronize()
    assert out.shape == ref.shape and out.dtype == x.dtype
    assert not out.isnan().any(), "unwritten or NaN output"
    err = rel_err(out, ref)
    same = (ids_seen[0].sort(1).values == ref_ids[0].sort(1).values).all(1).float().mean().item()
    print(f"{p.key} T={tokens} {layer.arch}: rel err {err:.2e}, top-k sets equal to the fp32 "
          f"router on {same:.4%} of tokens")
    assert err <= TOL, f"rel err {err:.2e}"
    assert same >= 0.99


@pytest.mark.parametrize("tokens", [1, 3, 8, 77, 128, 1000, 4096])
def test_super_matches_oracle(tokens):
    check(SUPER, tokens)


@pytest.mark.parametrize("tokens", [1, 77, 1000])
@pytest.mark.parametrize("preset", [SUPER, ODD], ids=lambda p: p.key[:5])
@pytest.mark.parametrize("arch", ["sm80", "sm89"])
def test_cutlass2_kernels_match_oracle(arch, preset, tokens):
    """The same pipeline on the CUTLASS 2.x kernels built for an A100 (sm80) or an L40S (sm89),
    run here through the PTX they embed, which the driver JIT-compiles for this GPU."""
    check(preset, tokens, arch=arch)


@pytest.mark.parametrize("tokens", [1, 77, 1000])
def test_ultra_matches_oracle(tokens):
    check(ULTRA, tokens)


@pytest.mark.parametrize("tokens", [3, 128, 1000])
def test_swiglu_softmax_matches_oracle(tokens):
    check(SUPER.with_(activation="swiglu", scoring="softmax", intermediate_size=1344), tokens)


@pytest.mark.parametrize("scoring", ["sigmoid", "softmax"])
@pytest.mark.parametrize("tokens", [8, 1000])
def test_grouped_topk_matches_oracle(scoring, tokens):
    check(SUPER.with_(n_group=8, topk_group=4, top_k=8, scoring=scoring), tokens)


@pytest.mark.parametrize("activation", ["relu2", "swiglu"])
@pytest.mark.parametrize("tokens", [1, 77, 4096])
def test_awkward_sizes_match_oracle(activation, tokens):
    check(ODD.with_(activation=activation), tokens)


@pytest.mark.parametrize("tokens", [8, 128, 4096])
def test_skewed_routing_matches_oracle(tokens):
    check(SUPER, tokens, skew=True)


@pytest.mark.parametrize("tokens", [16, 17])
def test_routing_launch_boundary(tokens):
    """Up to 16 tokens the routing, offsets and gather are one single-block kernel; beyond,
    three launches (zero, route, offsets with the gather)."""
    check(SUPER, tokens)


@pytest.mark.parametrize("tokens", [1, 8])
def test_grouped_topk_in_single_block_routing(tokens):
    # 256 experts keep the grouped top-k's per-warp scratch within the single block's shared
    # memory (Super's 512 take the multi-launch path, test_grouped_topk_matches_oracle).
    check(SUPER.with_(num_experts=256, n_group=8, topk_group=4, top_k=8), tokens)


def test_plain_moe_without_projections():
    check(LatentMoEProblem(2048, None, 1024, 64, 4), 77)


def test_float16():
    check(ODD.with_(dtype="float16"), 77)


def gemv_plan(monkeypatch):
    """Run every GEMM stage of the forward on one gemv decode kernel, whatever the table says."""
    import autotune.fused
    from autotune.space import gemv_configs
    from autotune.workload import Plan

    g = gemv_configs()[-1]
    plan = Plan(router=g.with_epilogue("f32"), up=g.with_epilogue("relu2"), down=g, fc2=g)
    monkeypatch.setattr(autotune.fused, "tuned_plan", lambda *args, **kwargs: plan)


@pytest.mark.parametrize("tokens", [1, 3, 8])
def test_gemv_kernels_match_oracle(monkeypatch, tokens):
    gemv_plan(monkeypatch)
    check(SUPER, tokens)


@pytest.mark.parametrize("problem", [
    SUPER.with_(scoring="softmax"),
    SUPER.with_(num_experts=256, n_group=8, topk_group=4, top_k=8, scoring="softmax"),
    SUPER.with_(num_experts=256, n_group=8, topk_group=4, top_k=8, norm_topk_prob=False),
], ids=["softmax", "grouped-softmax", "grouped-unnormalised"])
def test_one_token_routing(monkeypatch, problem):
    """One token is routed by the whole block (route_one_token_block): the scorings, grouped
    top-k and renormalisation it implements beside the per-warp top-k (gemv stages: the cheap
    compile; the routing is the same whatever the GEMMs)."""
    gemv_plan(monkeypatch)
    check(problem, 1)


@pytest.mark.parametrize("tokens,gemv", [(1, False), (128, False), (2, True)])
def test_graph_replay_with_fresh_inputs_equals_eager(monkeypatch, tokens, gemv):
    if gemv:
        gemv_plan(monkeypatch)
    p = SUPER
    wts = make_weights(p, 3)
    layer = fused(p, wts)
    gen = torch.Generator(device="cuda").manual_seed(5)
    x = torch.randn(tokens, p.hidden_size, generator=gen, device="cuda").to(layer.dtype)
    layer(x)  # load kernels and warm the allocator outside capture
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        layer(x)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = layer(x)
    for _ in range(3):
        x.copy_(torch.randn(x.shape, generator=gen, device="cuda"))
        out.fill_(float("nan"))
        graph.replay()
        eager = layer(x.clone())
        torch.cuda.synchronize()
        assert torch.equal(out, eager), "graph replay differs from eager"
        assert rel_err(out, oracle(p, wts, x)) <= TOL


@pytest.mark.parametrize("tokens,gemv", [(1, True), (3, True), (24, True), (300, False)])
def test_back_to_back_forwards_match_the_oracle(monkeypatch, tokens, gemv):
    """Forwards queued one after another, nothing synchronising between them: each routing and
    gemv kernel may start before the one ahead of it ends (pdl.cuh), a forward's freed buffers
    are the next one's, and the inputs change between calls. Every output still matches the
    oracle (no hook between the kernels: the chain runs as in serving)."""
    if gemv:
        gemv_plan(monkeypatch)
    p = SUPER
    wts = make_weights(p, 4)
    layer = fused(p, wts)
    gen = torch.Generator(device="cuda").manual_seed(6)
    xs = [torch.randn(tokens, p.hidden_size, generator=gen, device="cuda").to(layer.dtype)
          for _ in range(6)]
    layer(xs[0])  # load the kernels first
    poison_allocator()
    outs = [layer(x) for x in xs]
    for x, out in zip(xs, outs, strict=True):
        assert rel_err(out, oracle(p, wts, x)) <= TOL


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
@pytest.mark.parametrize("tokens", [1, 300])
def test_one_process_two_gpus(tokens):
    """A layer on each of two GPUs in one process, both called while GPU 0 is current: every
    library opts in to its shared memory on each device (T=1: the shared-memory gemv and the
    combine launch; T=300: CUTLASS) and launches on its weights' device."""
    p = SUPER
    layers = []
    for index in (1, 0):  # GPU 1's layer is made and called first
        with torch.cuda.device(index):
            wts = make_weights(p, 7 + index)
            layers.append((index, wts, fused(p, wts)))
    for index, wts, layer in layers:
        gen = torch.Generator(device=f"cuda:{index}").manual_seed(index)
        x = torch.randn(tokens, p.hidden_size, generator=gen, device=f"cuda:{index}")
        x = x.to(layer.dtype)
        with torch.cuda.device(index):
            poison_allocator()
        assert torch.cuda.current_device() == 0
        out = layer(x)
        assert out.device == x.device
        assert rel_err(out, oracle(p, wts, x)) <= TOL


def test_input_on_another_device_is_refused():
    wts = make_weights(ODD, 0)
    layer = fused(ODD, wts)
    x = torch.randn(3, ODD.hidden_size).to(layer.dtype)
    with pytest.raises(ValueError, match="move x to cuda:0"):
        layer(x)


@pytest.mark.parametrize("experts,top_k", [(7, 2), (33, 5)])
def test_odd_expert_counts(experts, top_k):
    check(LatentMoEProblem(1024, 256, 512, experts, top_k), 50)
