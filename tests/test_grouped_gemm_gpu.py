"""The compiled grouped GEMMs against torch, on the GPU (uneven and empty groups).

The sm80 (CUTLASS 2.x) libraries carry PTX, which the Hopper driver JIT-compiles: the same code
that runs on an A100 runs here. sm89 differs from sm80 only in its target, so sm80 stands for
both.
"""

from __future__ import annotations

import pytest
import torch

from autotune.space import KernelConfig, default_configs, gemv_configs

pytestmark = pytest.mark.gpu

SM90 = default_configs("sm90")
# Swap-AB kernels load through their own mainloop (the weights evict-first,
# templates/sm90_weights_first_out.cuh): beside the default tier's ping-pong one, a cooperative
# one and one whose cluster multicasts the token tile.
SWAP_AB = [KernelConfig(128, 64, 64, 1, 1, "cooperative", True),
           KernelConfig(128, 64, 64, 2, 1, "pingpong", True)]
GEMV = gemv_configs()  # the CUDA-core decode kernels of the sm90 space
CONFIGS = SM90 + SWAP_AB + GEMV + default_configs("sm80")


def _groups(sizes, n, k, device, gen):
    offs = torch.tensor(sizes, dtype=torch.int64).cumsum(0).to(torch.int32).to(device)
    total = int(sum(sizes))
    a = torch.randn(total, k, generator=gen, device=device).to(torch.bfloat16)
    b = (torch.randn(len(sizes), n, k, generator=gen, device=device) / k**0.5).to(torch.bfloat16)
    return a, b, offs


def _reference(a, b, sizes):
    outs, start = [], 0
    for g, m in enumerate(sizes):
        outs.append(a[start:start + m].float() @ b[g].float().T)
        start += m
    return torch.cat(outs)


@pytest.fixture(scope="module")
def kernels():
    from autotune.build import build
    from autotune.runtime import load

    results = build(CONFIGS)
    failed = [r for r in results if not r.ok]
    assert not failed, "\n".join(f"{r.config.name}:\n{r.log}" for r in failed)
    return {c.name: load(c) for c in CONFIGS}


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.name)
@pytest.mark.parametrize("sizes,n,k", [
    ([5, 0, 130, 1, 0, 64, 257], 256, 128),     # uneven, with empty groups
    ([0, 0, 3, 0], 136, 200),                   # mostly empty; N, K not tile multiples
    ([1000, 1, 77, 512], 1024, 2688),           # Super's down projection widths
])
def test_grouped_mm_matches_torch(kernels, config, sizes, n, k):
    _check_grouped_mm(kernels[config.name], sizes, n, k)


def _check_grouped_mm(kernel, sizes, n, k):
    """The kernel's grouped_mm on fresh random groups, into a NaN-poisoned output, against
    the fp32 product."""
    gen = torch.Generator(device="cuda").manual_seed(sum(sizes) + len(sizes) + n + k)
    a, b, offs = _groups(sizes, n, k, "cuda", gen)
    out = torch.full((a.shape[0], n), float("nan"), dtype=torch.bfloat16, device="cuda")
    kernel.grouped_mm(a, b, offs, out=out)
    torch.cuda.synchronize()
    ref = _reference(a, b, sizes)
    assert not out.isnan().any(), "some output rows were not written"
    err = ((out.float() - ref).norm() / ref.norm()).item()
    print(f"{kernel.config.name} groups={len(sizes)} n={n} k={k}: rel err {err:.2e}")
    assert err <= 1e-2, f"rel err {err:.2e}"


@pytest.mark.parametrize("config", SM90[:1] + SM90[-1:] + GEMV[-1:], ids=lambda c: c.name)
def test_grouped_mm_graph_replay_with_fresh_inputs(kernels, config):
    kernel = kernels[config.name]
    gen = torch.Generator(device="cuda").manual_seed(7)
    sizes = [40, 0, 300, 9]
    a, b, offs = _groups(sizes, 512, 256, "cuda", gen)
    out = torch.empty(a.shape[0], 512, dtype=torch.bfloat16, device="cuda")
    kernel.grouped_mm(a, b, offs, out=out)  # warm up outside capture (workspace allocation)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        kernel.grouped_mm(a, b, offs, out=out)
    for seed in range(3):
        new_sizes = [[10, 5, 200, 134], [0, 349, 0, 0], [100, 100, 100, 49]][seed]
        a2, b2, offs2 = _groups(new_sizes, 512, 256, "cuda", gen)
        a.copy_(a2), b.copy_(b2), offs.copy_(offs2)
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        ref = _reference(a, b, new_sizes)
        err = ((out.float() - ref).norm() / ref.norm()).item()
        assert err <= 1e-2, f"replay {seed}: rel err {err:.2e}"


@pytest.mark.parametrize("config", SM90[:2] + SM90[-1:], ids=lambda c: c.name)
def test_every_tile_order_gives_the_same_result(kernels, config):
    from autotune.space import TILE_ORDERS

    # A tile order only changes which CTA computes which tile when: each tile's arithmetic is
    # the same, so every order must agree bit for bit with the default, and with torch.
    gen = torch.Generator(device="cuda").manual_seed(11)
    sizes = [700, 0, 33, 1200, 5]
    a, b, offs = _groups(sizes, 1024, 512, "cuda", gen)
    ref = _reference(a, b, sizes)
    outs = {}
    for order in TILE_ORDERS:
        out = torch.full((a.shape[0], 1024), float("nan"), dtype=torch.bfloat16, device="cuda")
        kernels[config.name].grouped_mm(a, b, offs, out=out, order=order)
        outs[order.tag] = out
    torch.cuda.synchronize()
    err = ((outs["m1"].float() - ref).norm() / ref.norm()).item()
    assert err <= 1e-2, f"rel err {err:.2e}"
    for tag, out in outs.items():
        assert torch.equal(out, outs["m1"]), f"order {tag} differs from the default"


@pytest.mark.parametrize("config", default_configs("sm80")[:1] + GEMV[:1],
                         ids=lambda c: c.name)
def test_kernels_without_tile_orders_refuse_one(kernels, config):
    from autotune.runtime import KernelError
    from autotune.space import TileOrder

    gen = torch.Generator(device="cuda").manual_seed(3)
    a, b, offs = _groups([8, 8], 64, 64, "cuda", gen)
    with pytest.raises(KernelError, match="raster 0 and swizzle 1"):
        kernels[config.name].grouped_mm(a, b, offs, order=TileOrder("n", 2))


@pytest.mark.parametrize("config", GEMV, ids=lambda c: c.name)
@pytest.mark.parametrize("sizes,n,k", [
    ([3, 0, 1], 40, 16392),                    # rows longer than a bulk stage (32 KB)
    ([0] * 300 + [2] + [0] * 298 + [1], 64, 256),  # more groups than a CTA has threads
])
def test_gemv_edge_shapes_match_torch(kernels, config, sizes, n, k):
    _check_grouped_mm(kernels[config.name], sizes, n, k)


# Each epilogue kind on one sm90 tile, one gemv kernel and one sm80 tile (through its PTX).
EPILOGUE_CONFIGS = [c.with_epilogue(e) for c in (SM90[0], GEMV[-1], default_configs("sm80")[0])
                    for e in ("relu2", "f32")]


@pytest.mark.parametrize("config", EPILOGUE_CONFIGS, ids=lambda c: c.name)
def test_epilogues_match_torch(config):
    from autotune.runtime import load

    kernel = load(config)  # compiled into the cache on first use
    gen = torch.Generator(device="cuda").manual_seed(5)
    sizes, n, k = [5, 0, 130, 1, 64, 257], 256, 192
    a, b, offs = _groups(sizes, n, k, "cuda", gen)
    out = torch.full((a.shape[0], n), float("nan"), dtype=kernel.out_dtype, device="cuda")
    kernel.grouped_mm(a, b, offs, out=out)
    torch.cuda.synchronize()
    ref = _reference(a, b, sizes)
    if config.epilogue == "relu2":
        ref = torch.relu(ref).square()
    assert out.dtype == (torch.float32 if config.epilogue == "f32" else torch.bfloat16)
    assert not out.isnan().any(), "some output rows were not written"
    err = ((out.float() - ref).norm() / ref.norm()).item()
    print(f"{config.name}: rel err {err:.2e}")
    assert err <= (1e-4 if config.epilogue == "f32" else 1e-2), f"rel err {err:.2e}"


@pytest.mark.parametrize("config", SM90[-1:] + GEMV, ids=lambda c: c.name)
@pytest.mark.parametrize("m", [1, 3, 9])
@pytest.mark.parametrize("k", [200, 2056, 4104])
def test_dense_matches_torch(kernels, config, m, k):
    # One group through run_dense (the latent projections); 9 rows take several gemv passes.
    # The gemv splits K over 2 warps from 1025 columns and over 4 from 3073 (4104: the last
    # part is empty).
    gen = torch.Generator(device="cuda").manual_seed(m * k)
    n = 136
    a = torch.randn(m, k, generator=gen, device="cuda").to(torch.bfloat16)
    b = (torch.randn(n, k, generator=gen, device="cuda") / k**0.5).to(torch.bfloat16)
    out = torch.full((m, n), float("nan"), dtype=torch.bfloat16, device="cuda")
    kernels[config.name].dense(a, b, out)
    torch.cuda.synchronize()
    ref = a.float() @ b.float().T
    assert not out.isnan().any(), "some outputs were not written"
    err = ((out.float() - ref).norm() / ref.norm()).item()
    assert err <= 1e-2, f"rel err {err:.2e}"


@pytest.mark.parametrize("config", GEMV, ids=lambda c: c.name)
@pytest.mark.parametrize("tokens,top_k,n,k", [
    (1, 22, 4096, 1024),   # the Super preset's decode fc2
    (3, 22, 136, 200),     # N, K not multiples of a block; three pairs per split
    (9, 6, 264, 2048),     # more tokens than rows of A per pass; one split
])
def test_combine_dense_matches_torch(kernels, config, tokens, top_k, n, k):
    # fc2 with the combine before it: the weighted sum of each token's rows of y, then b @ it.
    from autotune.workload import CombineInputs

    kernel = kernels[config.name]
    assert kernel.combines(tokens, k, top_k)
    gen = torch.Generator(device="cuda").manual_seed(tokens * n + k)
    pairs = tokens * top_k
    y = torch.randn(pairs + 5, k, generator=gen, device="cuda").to(torch.bfloat16)
    weights = torch.rand(tokens, top_k, generator=gen, device="cuda") / top_k
    row_of = torch.randperm(pairs + 5, generator=gen, device="cuda")[:pairs].to(torch.int32)
    b = (torch.randn(n, k, generator=gen, device="cuda") / k**0.5).to(torch.bfloat16)
    out = torch.full((tokens, n), float("nan"), dtype=torch.bfloat16, device="cuda")
    kernel.combine_dense(y, weights, row_of, b, out)
    torch.cuda.synchronize()
    ref = CombineInputs(y, weights, row_of).combined() @ b.float().T
    assert not out.isnan().any(), "some outputs were not written"
    err = ((out.float() - ref).norm() / ref.norm()).item()
    assert err <= 1e-2, f"rel err {err:.2e}"


def test_combine_dense_refuses_what_does_not_fit(kernels):
    from autotune.runtime import KernelError

    kernel = kernels[GEMV[0].name]
    assert not kernel.combines(40, 1024, 22)  # 80 KB of A in shared memory
    assert not kernel.combines(47, 8, 22)     # 1034 pairs
    assert not kernels[SM90[0].name].combines(1, 1024, 22)  # CUTLASS libraries have no such launch
    y = torch.zeros(880, 1024, dtype=torch.bfloat16, device="cuda")
    weights = torch.zeros(40, 22, device="cuda")
    row_of = torch.zeros(880, dtype=torch.int32, device="cuda")
    b = torch.zeros(64, 1024, dtype=torch.bfloat16, device="cuda")
    with pytest.raises(KernelError, match="64 KB of shared memory"):
        kernel.combine_dense(y, weights, row_of, b, torch.empty(40, 64, dtype=torch.bfloat16,
                                                                device="cuda"))

