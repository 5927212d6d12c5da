"""Sweep sm90 grouped-GEMM configs on the MoE expert GEMMs of a preset, beside torch._grouped_mm.

Usage (on an sm90 GPU):
    python benchmarks/gemm_sweep.py --preset nemotron-3-super --out sweep.json

For each token count T, tokens are routed uniformly at random (top-k of random scores), so each
expert's group size follows the multinomial a balanced router gives. GEMM 1 is the up projection
([T*k, width] x [E, up_rows, width]), GEMM 2 the down projection ([T*k, I] x [E, width, I]).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from autotune.bench import time_graph
from autotune.build import build
from autotune.problem import preset
from autotune.runtime import load
from autotune.space import KernelConfig, default_configs

EXTRA = [
    KernelConfig(128, 128, 64, 1, 1, "cooperative"),
    KernelConfig(256, 128, 64, 1, 1, "cooperative"),
    KernelConfig(128, 256, 64, 2, 1, "cooperative"),
    KernelConfig(128, 192, 64, 1, 1, "cooperative"),
    KernelConfig(64, 256, 64, 1, 1, "pingpong"),
    KernelConfig(128, 128, 64, 1, 1, "pingpong"),
    KernelConfig(64, 16, 128, 1, 1, "pingpong", True),
    KernelConfig(128, 16, 128, 1, 1, "pingpong", True),
    KernelConfig(128, 64, 128, 1, 1, "pingpong", True),
    KernelConfig(128, 64, 64, 1, 1, "cooperative", True),
    KernelConfig(128, 128, 64, 1, 1, "cooperative", True),
]


def route_sizes(tokens: int, experts: int, top_k: int, gen) -> torch.Tensor:
    scores = torch.rand(tokens, experts, generator=gen, device="cuda")
    ids = scores.topk(top_k, dim=1).indices.flatten()
    return torch.bincount(ids, minlength=experts)


def built_kernels(configs) -> dict:
    """Build ``configs`` in one parallel batch and load those that compiled, by name; the
    failures' logs go to stderr."""
    t0 = time.time()
    results = build(configs)
    print(f"built {sum(r.ok for r in results)}/{len(results)} in {time.time() - t0:.0f}s",
          flush=True)
    for r in results:
        if not r.ok:
            print(f"FAILED {r.config.name}:\n{r.log[-1500:]}", file=sys.stderr)
    return {r.config.name: load(r.config) for r in results if r.ok}


def one_shape(kernels, a, b, offs) -> dict:
    """Median ms of torch._grouped_mm and of each kernel on one grouped problem (a kernel
    off the reference by more than 1e-2, NaN-poisoned output first, reads "WRONG ...")."""
    ref = torch._grouped_mm(a, b.transpose(1, 2), offs=offs)
    row = {"grouped_mm": time_graph([lambda: torch._grouped_mm(a, b.transpose(1, 2), offs=offs)]
                                    ).median_ms}
    for name, kern in kernels.items():
        out = torch.full_like(ref, float("nan"))
        kern.grouped_mm(a, b, offs, out=out)
        err = ((out.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30)).item()
        if not err <= 1e-2:
            row[name] = f"WRONG {err:.2e}"
            continue
        row[name] = time_graph([lambda kern=kern, out=out: kern.grouped_mm(a, b, offs, out=out)]
                               ).median_ms
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="nemotron-3-super")
    p.add_argument("--tokens", default="1,8,32,128,512,2048,8192")
    p.add_argument("--out", default="gemm_sweep.json")
    args = p.parse_args(argv)
    prob = preset(args.preset)
    configs = default_configs() + EXTRA
    kernels = built_kernels(configs)
    gen = torch.Generator(device="cuda").manual_seed(0)
    e, w, i, up = prob.num_experts, prob.expert_width, prob.intermediate_size, prob.up_rows
    w_up = (torch.randn(e, up, w, device="cuda") / w**0.5).to(torch.bfloat16)
    w_down = (torch.randn(e, w, i, device="cuda") / i**0.5).to(torch.bfloat16)
    rows = []
    for t in [int(x) for x in args.tokens.split(",")]:
        sizes = route_sizes(t, e, prob.top_k, gen)
        offs = sizes.cumsum(0).to(torch.int32)
        m = t * prob.top_k
        a1 = torch.randn(m, w, device="cuda", generator=gen).to(torch.bfloat16)
        a2 = torch.randn(m, i, device="cuda", generator=gen).to(torch.bfloat16)
        for gemm, a, b in (("up", a1, w_up), ("down", a2, w_down)):
            row = one_shape(kernels, a, b, offs)
            row.update(tokens=t, gemm=gemm)
            rows.append(row)
            timed = {k: v for k, v in row.items() if isinstance(v, float)}
            best = min(timed, key=timed.get)
            print(f"T={t:5d} {gemm:4s} grouped_mm={row['grouped_mm']:.4f} ms  best={best} "
                  f"{timed[best]:.4f} ms", flush=True)
    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
            "preset": args.preset, "configs": [c.name for c in configs]}
    with open(args.out, "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    names = ["grouped_mm"] + list(kernels)
    print("\n| T | gemm | " + " | ".join(names) + " |")
    for row in rows:
        cells = [f"{row[n]:.4f}" if isinstance(row.get(n), float) else str(row.get(n))
                 for n in names]
        print(f"| {row['tokens']} | {row['gemm']} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
