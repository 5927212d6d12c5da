"""Host time of one eager forward (no CUDA graph): how long the call takes to enqueue its kernels.

Usage (on an sm90 GPU):
    python benchmarks/host_time.py --preset nemotron-3-super --tokens 1,32,2048

The GPU is kept busy (a spin kernel) while the calls are made, so the time is the host's alone:
Python, the ctypes calls, the libraries' launch work and the allocator, not the kernels. Medians
of five rounds of 40 calls, in us per call.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from test_fused_gpu import fused, make_weights  # noqa: E402

from autotune.problem import preset  # noqa: E402

_CALLS, _ROUNDS = 40, 5


def host_us(layer, x) -> float:
    layer(x)  # kernels loaded, plan resolved
    torch.cuda.synchronize()
    rounds = []
    for _ in range(_ROUNDS):
        torch.cuda._sleep(1 << 30)  # about half a second of GPU work ahead of the calls
        start = time.perf_counter()
        for _ in range(_CALLS):
            layer(x)
        rounds.append((time.perf_counter() - start) / _CALLS * 1e6)
        torch.cuda.synchronize()
    return statistics.median(rounds)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="nemotron-3-super")
    ap.add_argument("--tokens", default="1,32,2048")
    args = ap.parse_args()
    p = preset(args.preset)
    layer = fused(p, make_weights(p, 0))
    gen = torch.Generator(device="cuda").manual_seed(1)
    for t in (int(s) for s in args.tokens.split(",")):
        x = torch.randn(t, p.hidden_size, generator=gen, device="cuda").to(layer.dtype)
        print(f"{args.preset} T={t}: {host_us(layer, x):.1f} us of host time per eager call",
              flush=True)


if __name__ == "__main__":
    main()
