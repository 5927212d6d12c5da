"""The sm80/sm89 (CUTLASS 2.x) grouped GEMMs against torch; Hopper runs sm80 code too."""

from __future__ import annotations

import pytest
import torch

from autotune.runtime import load
from autotune.space import default_configs

pytestmark = pytest.mark.gpu

# The sm80 libraries carry PTX, which the Hopper driver JIT-compiles: the same CUTLASS 2.x code
# that runs on an A100 runs here. sm89 differs only in its target, so sm80 stands for both.
CONFIGS = default_configs("sm80")


@pytest.fixture(scope="module")
def kernels():
    from autotune.build import build

    results = build(CONFIGS)
    failed = [r for r in results if not r.ok]
    assert not failed, "\n".join(f"{r.config.name}:\n{r.log}" for r in failed)
    return {c.name: load(c) for c in CONFIGS}


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.name)
@pytest.mark.parametrize("sizes,n,k", [
    ([5, 0, 130, 1, 0, 64, 257], 256, 128),
    ([0, 0, 3, 0], 136, 200),
    ([1000, 1, 77, 512], 1024, 2688),
])
def test_sm80_grouped_mm_matches_torch(kernels, config, sizes, n, k):
    gen = torch.Generator(device="cuda").manual_seed(sum(sizes) + n + k)
    offs = torch.tensor(sizes).cumsum(0).to(torch.int32).cuda()
    a = torch.randn(sum(sizes), k, generator=gen, device="cuda").to(torch.bfloat16)
    b = (torch.randn(len(sizes), n, k, generator=gen, device="cuda") / k**0.5).to(torch.bfloat16)
    out = torch.full((a.shape[0], n), float("nan"), dtype=torch.bfloat16, device="cuda")
    kernels[config.name].grouped_mm(a, b, offs, out=out)
    ref = torch.cat([a[s - m:s].float() @ b[g].float().T
                     for g, (m, s) in enumerate(zip(sizes, offs.tolist(), strict=True))])
    torch.cuda.synchronize()
    assert not out.isnan().any(), "some output rows were not written"
    err = ((out.float() - ref).norm() / ref.norm()).item()
    print(f"{config.name} sizes={sizes} n={n} k={k}: rel err {err:.2e}")
    assert err <= 1e-2
