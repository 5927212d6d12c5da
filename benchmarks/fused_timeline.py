"""Per-kernel durations and the gaps between them inside CUDA-graph replays of the fused forward.

Usage (on an sm90 GPU):
    python benchmarks/fused_timeline.py --preset nemotron-3-super --tokens 1,2 --out timeline.json

Unlike fused_profile.py (eager calls), this profiles the captured graph itself, so launch gaps
are the ones a served decode step sees. Durations and gaps are medians over 20 replays, in us.
A kernel launched early (templates/pdl.cuh) starts before the one ahead of it ends: its gap is
negative and its duration includes its wait. "exposed" is what it adds to the replay: from the
later of its start and the previous kernel's end to its own end (the gaps and exposed times of a
replay sum to its span).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from fused_profile import warm_inputs  # noqa: E402
from test_fused_gpu import fused, make_weights  # noqa: E402

from autotune.problem import preset  # noqa: E402

_SHORT = ("route_gather_small_kernel", "route_kernel", "offsets_gather_kernel", "gather_kernel",
          "combine_split_kernel", "combine_kernel", "swiglu_kernel", "gemv::grouped_items_kernel",
          "gemv::grouped_bulk_kernel", "gemv::dense_kernel", "gemv::dense_split_kernel",
          "gemv::combine_dense_kernel", "zero_kernel", "Memset", "fill_group_arguments",
          "fill_dense_arguments", "device_kernel")
_REPLAYS = 20


def _short(name: str) -> str:
    return next((s for s in _SHORT if s in name), name[:40])


def timeline(layer, p, tokens: int, gen) -> dict:
    xs, total = warm_inputs(layer, p, tokens, gen, replays=50)
    graph, side = torch.cuda.CUDAGraph(), torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        layer(xs[0])
    torch.cuda.current_stream().wait_stream(side)
    with torch.cuda.graph(graph):
        layer(xs[0])
    for _ in range(5):
        graph.replay()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(_REPLAYS):
            graph.replay()
        torch.cuda.synchronize()
    events = sorted((e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA),
                    key=lambda e: e.time_range.start)
    per_replay = len(events) // _REPLAYS
    events = events[:per_replay * _REPLAYS]
    kernels = []
    for k in range(per_replay):
        mine = events[k::per_replay]
        durs = [e.time_range.end - e.time_range.start for e in mine]
        before = [None] * len(mine) if k == 0 else events[k - 1::per_replay]
        gaps = [0.0 if b is None else e.time_range.start - b.time_range.end
                for e, b in zip(mine, before, strict=True)]
        exposed = [e.time_range.end - (e.time_range.start if b is None
                                       else max(e.time_range.start, b.time_range.end))
                   for e, b in zip(mine, before, strict=True)]
        kernels.append({"kernel": _short(mine[0].name), "us": statistics.median(durs),
                        "gap_before_us": statistics.median(gaps),
                        "exposed_us": statistics.median(exposed)})
    return {"tokens": tokens, "graph_us": total.median_ms * 1e3, "kernels": kernels}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="nemotron-3-super")
    ap.add_argument("--tokens", default="1,2")
    ap.add_argument("--out", default="fused_timeline.json")
    args = ap.parse_args(argv)
    p = preset(args.preset)
    layer = fused(p, make_weights(p, 0))
    gen = torch.Generator(device="cuda").manual_seed(1)
    rows = [timeline(layer, p, int(t), gen) for t in args.tokens.split(",")]
    for r in rows:
        print(f"T={r['tokens']}: graph {r['graph_us']:.1f} us")
        for k in r["kernels"]:
            print(f"  {k['kernel']:<28} {k['us']:7.2f} us  gap before {k['gap_before_us']:6.2f}"
                  f"  exposed {k['exposed_us']:6.2f}")
    Path(args.out).write_text(json.dumps({"problem": p.key, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
