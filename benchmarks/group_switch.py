"""What a group switch costs the sm90 grouped GEMM: the same weight bytes in fewer, larger groups.

Usage (on an sm90 GPU):
    python benchmarks/group_switch.py --tokens 2048 --out group_switch.json

At T=2048 the Super preset's expert GEMMs stream their weights at ~3.5 TB/s whatever the tile
(NOTES.md v9). One suspect is a fixed cost per tile that grows with the number of groups: the
persistent CTAs stride the tile index by the grid size, so nearly every next tile of a CTA lies
in another group, and the ptr-array kernel then rewrites its TMA descriptors. This program
keeps every byte the same and changes only how many groups they come in: the E experts'
weights ([E, N, K], contiguous) are viewed as G groups of E/G experts stacked along N
([G, E/G*N, K]), each group multiplying its own `rows` rows of A (the layer's rows per expert at
T tokens). Weight bytes, output bytes and tile count are the same for every G (up to the partial
tiles at group edges where a tile does not divide N); only the groups a CTA walks through change
(G = 1: none). If the time falls as G falls, group switches are the
cost; if it stays, the per-tile cost is the pipeline and the epilogue.

Each row is checked against torch._grouped_mm on the same operands (NaN-poisoned output first)
and timed by CUDA-graph replay, as in gemm_sweep.py.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

# benchmarks/, this script's folder, is first on sys.path.
from gemm_sweep import built_kernels, one_shape

from autotune.problem import preset
from autotune.space import KernelConfig

CONFIGS = [
    KernelConfig(128, 192, 64, 1, 1, "cooperative"),
    KernelConfig(128, 128, 64, 1, 1, "cooperative"),
    KernelConfig(128, 192, 64, 1, 1, "pingpong"),
    KernelConfig(256, 128, 64, 1, 1, "cooperative", True),
    KernelConfig(128, 64, 128, 1, 1, "pingpong", True),
]


def grouped_operands(w: torch.Tensor, groups: int, rows: int, gen: torch.Generator
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(a, b, offs) of one layout: the [E, N, K] weights ``w`` as ``groups`` groups of
    E/groups experts stacked along N, each group with ``rows`` fresh rows of A."""
    e, n, k = w.shape
    if e % groups:
        raise ValueError(f"groups must divide the {e} experts, got {groups}")
    b = w.view(groups, e // groups * n, k)  # contiguous: the same bytes, no copy
    a = torch.randn(groups * rows, k, device=w.device, generator=gen).to(w.dtype)
    offs = torch.arange(1, groups + 1, device=w.device, dtype=torch.int32) * rows
    return a, b, offs


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="nemotron-3-super")
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--groups", default="512,128,32,8,1",
                   help="comma-separated group counts, each dividing the expert count")
    p.add_argument("--out", default="group_switch.json")
    args = p.parse_args(argv)
    prob = preset(args.preset)
    e, top_k = prob.num_experts, prob.top_k
    rows = -(-args.tokens * top_k // e)  # uniform routing's rows per expert
    groups = [int(g) for g in args.groups.split(",")]
    bad = [g for g in groups if g < 1 or e % g]
    if bad:
        p.error(f"--groups: {bad} do not divide the {e} experts")
    kernels = built_kernels(CONFIGS)
    gen = torch.Generator(device="cuda").manual_seed(0)
    w, i, up = prob.expert_width, prob.intermediate_size, prob.up_rows
    weights = {
        "up": (torch.randn(e, up, w, device="cuda", generator=gen) / w**0.5).to(torch.bfloat16),
        "down": (torch.randn(e, w, i, device="cuda", generator=gen) / i**0.5).to(torch.bfloat16),
    }
    out_rows = []
    for gemm, wt in weights.items():
        nbytes = wt.numel() * wt.element_size()
        for g in groups:
            a, b, offs = grouped_operands(wt, g, rows, gen)
            row = one_shape(kernels, a, b, offs)
            row.update(gemm=gemm, groups=g, rows_per_group=rows, weight_bytes=nbytes)
            out_rows.append(row)
            cells = "  ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}"
                              for k, v in row.items() if k in kernels or k == "grouped_mm")
            print(f"{gemm} G={g} rows={rows}: {cells}", flush=True)
    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
            "preset": args.preset, "tokens": args.tokens, "configs": list(kernels),
            "command": " ".join(["python benchmarks/group_switch.py", *(argv or sys.argv[1:])])}
    with open(args.out, "w") as f:
        json.dump({"meta": meta, "rows": out_rows}, f, indent=1)
    names = ["grouped_mm", *kernels]
    print("\n| gemm | groups | " + " | ".join(names) + " |")
    for row in out_rows:
        cells = []
        for n in names:
            v = row.get(n)
            cells.append(f"{v:.4f} ({row['weight_bytes'] / v / 1e9:.2f} TB/s)"
                         if isinstance(v, float) else str(v))
        print(f"| {row['gemm']} | {row['groups']} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
