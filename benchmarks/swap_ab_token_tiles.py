"""Swap-AB tiles whose token side fits the ~88 rows per expert at T=2048 (Super), beside the
shipped tiles: does less padding of the token tile (96 or 112 rows instead of 128) speed up
the expert GEMMs?

Usage (on an sm90 GPU):
    python benchmarks/swap_ab_token_tiles.py 2048

Routing: top-k of random scores (the multinomial group sizes of a balanced router). Each
config is checked against torch._grouped_mm (NaN-poisoned output first) and timed by CUDA-graph
replay (gemm_sweep.one_shape), at the default tile order.
"""
import sys

import torch

sys.path.insert(0, 'benchmarks')
from gemm_sweep import built_kernels, one_shape  # noqa: E402

from autotune.space import KernelConfig as K  # noqa: E402

C = [K(128, 192, 64, 1, 1, 'pingpong'), K(128, 192, 64, 1, 1, 'cooperative'),
     K(256, 128, 64, 1, 1, 'cooperative', True),
     K(256, 96, 64, 1, 1, 'cooperative', True), K(256, 112, 64, 1, 1, 'cooperative', True),
     K(128, 96, 64, 1, 1, 'cooperative', True), K(128, 112, 64, 1, 1, 'cooperative', True),
     K(128, 96, 64, 1, 1, 'pingpong', True), K(128, 112, 64, 1, 1, 'pingpong', True),
     K(256, 96, 128, 1, 1, 'cooperative', True), K(128, 112, 128, 1, 1, 'cooperative', True)]
kern = built_kernels(C)
T = int(sys.argv[1]) if len(sys.argv) > 1 else 2048
g = torch.Generator(device='cuda').manual_seed(0)
E, k = 512, 22
ids = torch.randn(T, E, device='cuda', generator=g).topk(k, dim=1).indices
counts = torch.bincount(ids.flatten(), minlength=E)
print('rows per expert: mean', counts.float().mean().item(), 'max', counts.max().item(),
      'min', counts.min().item())
offs = counts.cumsum(0).to(torch.int32)
rows = int(offs[-1])
for name, (n, kk) in {'up': (2688, 1024), 'down': (1024, 2688)}.items():
    w = (torch.randn(E, n, kk, device='cuda', generator=g) / kk**0.5).bfloat16()
    a = torch.randn(rows, kk, device='cuda', generator=g).bfloat16()
    r = one_shape(kern, a, w, offs)
    for c, v in r.items():
        print(f'{name} T={T} {c:45s} {v if isinstance(v, str) else f"{v:.4f} ms"}', flush=True)
