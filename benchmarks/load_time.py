"""How long loading cached kernels takes in a fresh process (target: <= 1 s per kernel).

    python benchmarks/load_time.py [--out result.json]

First builds whatever is missing (the shipped Super winners, the default configs and the
routing library; cached ones are skipped), then times in a fresh process: ``runtime.load`` of
each (dlopen of the cached library and symbol lookup) and the first ``LatentMoE`` forward at
T=1 (plan lookup + loads + workspace allocation + first launches) against the second. The first
forward also pays torch's own one-time imports on the first custom-op call. Needs the GPU for
the forward part.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

from autotune import LatentMoE
from autotune.build import build
from autotune.cache import tuned_table
from autotune.problem import preset
from autotune.runtime import load, load_routing
from autotune.space import KernelConfig, RoutingConfig
from autotune.workload import all_default_configs


def _configs() -> dict[str, KernelConfig]:
    """The Super preset's default configs and its tuned table's winners, by name."""
    problem = preset("nemotron-3-super")
    configs = [*all_default_configs(problem), *tuned_table(problem, "sm90").winners()]
    return {c.name: c for c in configs}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=None)
    p.add_argument("--measure", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    configs = _configs()
    if not args.measure:
        # Build first (not timed), then time the loads in a process that has loaded nothing.
        failed = [r for r in build([*configs.values(), RoutingConfig("bf16")]) if not r.ok]
        if failed:
            print(f"building {failed[0].config.name} failed:\n{failed[0].log}", file=sys.stderr)
            return 1
        return subprocess.run([sys.executable, __file__, "--measure", *sys.argv[1:]]).returncode
    problem = preset("nemotron-3-super")
    loads = {}
    for name, config in configs.items():
        start = time.perf_counter()
        load(config, compile_if_missing=False)
        loads[name] = (time.perf_counter() - start) * 1e3
    start = time.perf_counter()
    load_routing(RoutingConfig("bf16"), compile_if_missing=False)
    routing_ms = (time.perf_counter() - start) * 1e3
    result = {"kernels": len(loads), "max_load_ms": max(loads.values()),
              "median_load_ms": sorted(loads.values())[len(loads) // 2],
              "routing_load_ms": routing_ms, "loads_ms": loads}
    if torch.cuda.is_available():
        torch.manual_seed(0)
        p = problem
        layer = LatentMoE(p.hidden_size, p.latent_size, p.intermediate_size, p.num_experts,
                          p.top_k, p.activation, p.scoring, p.n_group, p.topk_group,
                          p.norm_topk_prob, p.routed_scaling_factor, device="cuda",
                          backend="cutlass")
        x = torch.randn(1, p.hidden_size, device="cuda", dtype=torch.bfloat16)
        times = []
        for _ in range(2):
            torch.cuda.synchronize()
            start = time.perf_counter()
            layer(x)
            torch.cuda.synchronize()
            times.append((time.perf_counter() - start) * 1e3)
        result["first_forward_ms"], result["second_forward_ms"] = times
    print(json.dumps({k: v for k, v in result.items() if k != "loads_ms"}, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    return 0 if result["max_load_ms"] <= 1000 else 1


if __name__ == "__main__":
    sys.exit(main())
