"""Where the fused forward's time goes: graph-replay total and per-kernel times, per token count.

Usage (on an sm90 GPU):
    python benchmarks/fused_profile.py --preset nemotron-3-super --tokens 1,128,2048,8192

Kernel times come from torch.profiler over eager calls (same kernels as the graph); the total is
the CUDA-graph replay median with rotated inputs.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from test_fused_gpu import fused, make_weights  # noqa: E402

from autotune.bench import time_graph  # noqa: E402
from autotune.problem import preset  # noqa: E402

_STAGES = ("route_gather_small_kernel", "zero_kernel", "route_kernel", "offsets_gather_kernel",
           "gather_kernel", "swiglu_kernel", "combine_split_kernel", "combine_kernel",
           "fill_group_arguments", "fill_dense_arguments")


def _stage(name: str, order: list[str]) -> str:
    for s in _STAGES:
        if s in name:
            return s.replace("_kernel", "")
    if "GemmUniversal" in name or "device_kernel" in name or "gemv" in name:
        return "gemm"
    if "memset" in name.lower() or "fill" in name.lower():
        return "memset"
    return "other"


def warm_inputs(layer, p, tokens: int, gen, replays: int = 20):
    """Four random inputs of ``tokens`` rows, each run once (kernels compiled and loaded), and
    the graph-replay timing of the layer rotating over them."""
    xs = [torch.randn(tokens, p.hidden_size, generator=gen, device="cuda").to(layer.dtype)
          for _ in range(4)]
    for x in xs:
        layer(x)
    return xs, time_graph([lambda x=x: layer(x) for x in xs], replays=replays)


def profile_tokens(layer, p, tokens: int, gen) -> dict:
    xs, total = warm_inputs(layer, p, tokens, gen)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for x in xs:
            layer(x)
        torch.cuda.synchronize()
    per: dict[str, float] = defaultdict(float)
    gemms: list[float] = []
    for evt in prof.events():
        if evt.device_type != torch.autograd.DeviceType.CUDA:
            continue
        stage = _stage(evt.name, [])
        ms = evt.device_time / 1e3 / len(xs)
        per[stage] += ms
        if stage == "gemm":
            gemms.append(evt.device_time / 1e3)
    # GEMM launches come in order router, up, down, fc2 within each call.
    names = ["router+fc1", "up", "down", "fc2"]
    for i, ms in enumerate(gemms):
        per[f"gemm:{names[i % 4]}"] += ms / len(xs)
    return {"tokens": tokens, "total_ms": total.median_ms, "p20_ms": total.p20_ms,
            "p80_ms": total.p80_ms, "kernels_ms": dict(per)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="nemotron-3-super")
    ap.add_argument("--activation", default=None)
    ap.add_argument("--tokens", default="1,8,32,128,512,2048,8192")
    ap.add_argument("--out", default="fused_profile.json")
    ap.add_argument("--unfused", default="router_fc1,relu2",
                    help="fusions to also time undone, one at a time (before/after), among "
                         "router_fc1, relu2 and combine_fc2")
    args = ap.parse_args(argv)
    p = preset(args.preset)
    if args.activation:
        p = p.with_(activation=args.activation)
    weights = make_weights(p, 0)
    layer = fused(p, weights)
    gen = torch.Generator(device="cuda").manual_seed(1)
    tokens = [int(t) for t in args.tokens.split(",")]
    rows = [profile_tokens(layer, p, t, gen) for t in tokens]
    variants = [v for v in args.unfused.split(",") if v]
    for v in variants:
        from autotune.fused import FusedLatentMoE

        other = FusedLatentMoE(p, weights["gate_weight"], weights["e_score_correction_bias"],
                               weights["fc1"], weights["up_proj"], weights["down_proj"],
                               weights["fc2"], unfused={v})
        for row, t in zip(rows, tokens, strict=True):
            row[f"unfused_{v}_ms"] = profile_tokens(other, p, t, gen)["total_ms"]
    if variants:
        print("\nbefore/after each fusion (graph replay medians, ms)")
        print("| T | fused | " + " | ".join(f"without {v}" for v in variants) + " |")
        for r in rows:
            print(f"| {r['tokens']} | {r['total_ms']:.4f} | "
                  + " | ".join(f"{r[f'unfused_{v}_ms']:.4f}" for v in variants) + " |")
    keys = sorted({k for r in rows for k in r["kernels_ms"] if k != "gemm"})
    print(f"\n{p.key} on {torch.cuda.get_device_name()}")
    print("| T | total ms | " + " | ".join(keys) + " |")
    for r in rows:
        cells = [f"{r['kernels_ms'].get(k, 0.0):.4f}" for k in keys]
        print(f"| {r['tokens']} | {r['total_ms']:.4f} | " + " | ".join(cells) + " |")
    Path(args.out).write_text(json.dumps({"problem": p.key, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
