"""What a grouped gemv pays for empty groups: the decode bucket's up/down kernels on the same
active experts, passed as all E groups (most empty, as the forward does) or only the active ones.

Usage (on an sm90 GPU):
    python benchmarks/gemv_groups.py --preset nemotron-3-super --tokens 1
"""

from __future__ import annotations

import argparse

import torch

from autotune.bench import time_graph
from autotune.fused import tuned_plan
from autotune.problem import preset
from autotune.runtime import load


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="nemotron-3-super")
    ap.add_argument("--tokens", type=int, default=1)
    args = ap.parse_args(argv)
    p = preset(args.preset)
    plan = tuned_plan(p, args.tokens)
    e, active = p.num_experts, p.top_k * args.tokens
    for stage, config in (("up", plan.up), ("down", plan.down)):
        kernel = load(config)
        n, k = (p.up_rows, p.expert_width) if stage == "up" else (p.expert_width,
                                                                  p.intermediate_size)
        w = torch.randn(e, n, k, device="cuda", dtype=torch.bfloat16)
        a = torch.randn(active, k, device="cuda", dtype=torch.bfloat16)
        d = torch.empty(active, n, device="cuda", dtype=torch.bfloat16)
        rows = torch.arange(active, device="cuda")
        for groups in (e, active):
            cases = []
            for _ in range(4):  # rotated expert sets: the weights stream from DRAM
                mnk = torch.zeros(groups, 3, dtype=torch.int32, device="cuda")
                mnk[:active] = torch.tensor([1, n, k], dtype=torch.int32, device="cuda")
                experts = torch.randperm(e, device="cuda")[:active]
                pa, pb, pd = (torch.zeros(groups, dtype=torch.int64, device="cuda")
                              for _ in range(3))
                pa[:active] = a.data_ptr() + rows * k * 2
                pb[:active] = w.data_ptr() + experts.long() * n * k * 2
                pd[:active] = d.data_ptr() + rows * n * 2
                cases.append((mnk, pa, pb, pd))
            t = time_graph([lambda c=c, g=kernel: g.run(*c) for c in cases], replays=50)
            print(f"{stage} {config.name} groups={groups}: {t.median_ms * 1e3:.2f} us "
                  f"({active * n * k * 2 / t.median_ms / 1e9:.2f} TB/s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
