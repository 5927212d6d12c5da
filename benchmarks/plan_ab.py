"""The whole layer's time at one token count under the tuned plan and under variants of it.

Usage (on an sm90 GPU):
    python benchmarks/plan_ab.py --preset nemotron-3-super --tokens 2048 \\
        "up=sm90_bf16_128x128x64_c1x1_pp_swapab:m1,down=sm90_bf16_128x128x64_c1x1_pp_swapab:m1"

Each variant replaces some stages' configs and tile orders (``stage=NAME:ORDER``, stages
fc1/up/down/fc2, comma-separated; NAME an identity-epilogue name of the search space, as
``--candidates`` takes them, run with the stage's own epilogue). The plans are timed by CUDA-graph
replay over four inputs, alternating, three rounds; prints one line per plan and round.
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
from autotune.space import TileOrder, search_space  # noqa: E402
from autotune.workload import PLAN_INDEX  # noqa: E402


def variant(plan, spec: str, space: dict):
    """``plan`` with the stages of ``spec`` (``stage=NAME:ORDER,...``) replaced."""
    for part in spec.split(","):
        stage, _, rest = part.partition("=")
        name, _, order = rest.partition(":")
        if name not in space:
            raise SystemExit(f"{name!r}: not a valid identity-epilogue config of this problem's "
                             "search space (see `python -m autotune --render-only`)")
        current = plan.configs()[PLAN_INDEX[stage]]
        plan = plan.with_stage(stage, space[name].with_epilogue(current.epilogue),
                               TileOrder.from_tag(order))
    return plan


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="nemotron-3-super")
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("variants", nargs="*", help="stage=NAME:ORDER[,stage=NAME:ORDER...]")
    args = ap.parse_args(argv)
    p, t = preset(args.preset), args.tokens
    layer = fused(p, make_weights(p, 0))
    space = {c.name: c for c in search_space("sm90", p)}
    plans = [("tuned", tuned_plan(p, t))]
    plans += [(v, variant(plans[0][1], v, space)) for v in args.variants]
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
