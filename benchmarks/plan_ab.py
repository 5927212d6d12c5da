"""The whole layer's time at one token count under the tuned plan and under variants of it.

Usage (on an sm90 GPU):
    python benchmarks/plan_ab.py --preset nemotron-3-super --tokens 2048 \\
        "up=sm90_bf16_128x128x64_c1x1_pp_swapab_relu2:m1,down=sm90_bf16_128x128x64_c1x1_pp_swapab:m1"

Each variant replaces some stages' configs and tile orders (``stage=CONFIG_NAME:ORDER``, stages
fc1/up/down/fc2, comma-separated). The plans are timed by CUDA-graph replay over four inputs,
alternating, three rounds; prints one line per plan and round.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from test_fused_gpu import fused, make_weights  # noqa: E402

from autotune.bench import time_graph  # noqa: E402
from autotune.fused import tuned_plan  # noqa: E402
from autotune.problem import preset  # noqa: E402
from autotune.space import KernelConfig, TileOrder  # noqa: E402

_SCHEDULES = {"pp": "pingpong", "coop": "cooperative"}


def config_of(name: str) -> KernelConfig:
    """The sm90 tensor-core config named like ``sm90_bf16_128x128x64_c1x1_pp_swapab_relu2``."""
    parts = name.split("_")
    tm, tn, tk = map(int, parts[2].split("x"))
    cm, cn = map(int, parts[3][1:].split("x"))
    epilogue = "relu2" if "relu2" in parts else "f32" if "f32" in parts else "identity"
    return KernelConfig(tm, tn, tk, cm, cn, _SCHEDULES[parts[4]], "swapab" in parts, epilogue,
                        parts[1], parts[0])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="nemotron-3-super")
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("variants", nargs="*", help="stage=CONFIG:ORDER[,stage=CONFIG:ORDER...]")
    args = ap.parse_args(argv)
    p, t = preset(args.preset), args.tokens
    layer = fused(p, make_weights(p, 0))
    plans = [("tuned", tuned_plan(p, t))]
    for v in args.variants:
        plan = plans[0][1]
        for part in v.split(","):
            stage, spec = part.split("=")
            name, order = spec.split(":")
            plan = plan.with_stage(stage, config_of(name), TileOrder.from_tag(order))
        plans.append((v, plan))
    gen = torch.Generator(device="cuda").manual_seed(1)
    xs = [torch.randn(t, p.hidden_size, generator=gen, device="cuda").to(layer.dtype)
          for _ in range(4)]
    for _, plan in plans:  # load every plan's kernels before timing any
        layer.use_plan(t, plan)
        for x in xs:
            layer(x)
    for r in range(3):
        for name, plan in plans:
            layer.use_plan(t, plan)
            for x in xs:
                layer(x)
            ms = time_graph([lambda x=x: layer(x) for x in xs], replays=20, settle_ms=100)
            print(f"round {r} {args.preset} T={t} {name}: {ms.median_ms * 1e3:.1f} us", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
