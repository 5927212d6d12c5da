"""Timing on the GPU: CUDA-graph replay, rotated inputs, median and p20/p80.

Launch overhead is kept out of the numbers by capturing several calls into one CUDA graph and
timing its replays with CUDA events; rotating among input sets larger than the L2 keeps the cache
cold the way a real model's layers see it.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Timing:
    """Per-call milliseconds: median and the 20th/80th percentiles over timed replays."""

    median_ms: float
    p20_ms: float
    p80_ms: float
    samples: int

    def to_dict(self) -> dict:
        return {"median_ms": self.median_ms, "p20_ms": self.p20_ms, "p80_ms": self.p80_ms,
                "samples": self.samples}


def _quantile(xs: Sequence[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]


def time_graph(fns: Sequence[Callable[[], object]], replays: int = 20, warmup: int = 2,
               calls: int | None = None, settle_ms: float = 0.0) -> Timing:
    """Time a call by CUDA-graph replay.

    Parameters
    ----------
    fns : sequence of callables
        The same operation bound to different input sets (rotation for a cold L2). Each must be
        graph-capturable and must have been called once before (lazy allocations done).
    replays : int
        Timed replays; each gives one sample of the mean time per call.
    calls : int, optional
        Calls captured per graph (cycling through ``fns``); default ``max(len(fns), 4)``.
    settle_ms : float
        Keep replaying, untimed, for at least this long first. Right after heavy work (a large
        matmul, another implementation's long calls) the GPU runs slower for tens of
        milliseconds: on an H200 a 95 us call timed at 100.6 us straight after the benchmark's
        8192-cube matmuls and 2 GiB copies, and at 95.1 us a moment later. Settling times every
        call in the steady state that back-to-back decode steps see.

    Requirements
    ------------
    A CUDA device; ``fns`` non-empty.
    """
    if not fns:
        raise ValueError("fns must hold at least one callable")
    calls = calls or max(len(fns), 4)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for f in fns:  # warm up on the capture stream (allocator pools, lazy init)
            f()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(calls):
            fns[i % len(fns)]()
    for _ in range(warmup):
        graph.replay()
    start = time.perf_counter()
    while (time.perf_counter() - start) * 1e3 < settle_ms:
        for _ in range(8):
            graph.replay()
        torch.cuda.synchronize()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(replays)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(replays)]
    for s, e in zip(starts, ends, strict=True):
        s.record()
        graph.replay()
        e.record()
    torch.cuda.synchronize()
    per_call = [s.elapsed_time(e) / calls for s, e in zip(starts, ends, strict=True)]
    return Timing(statistics.median(per_call), _quantile(per_call, 0.2),
                  _quantile(per_call, 0.8), len(per_call))


def measure_ceilings(device: torch.device | None = None) -> dict[str, float]:
    """Copy bandwidth (bytes read + written per second), read bandwidth and bf16 matmul rate.

    The matmul runs first and both are warmed up: an idle GPU starts at low clocks, and a first
    measurement on it reads far under the ceiling.
    """
    device = device or torch.device("cuda")
    n = 8192
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    t_mm = time_graph([lambda: a @ b], replays=20, warmup=10, calls=4)
    src = torch.randn(1 << 30, device=device, dtype=torch.bfloat16)  # 2 GiB, far over the L2
    dst = torch.empty_like(src)
    t_copy = time_graph([lambda: dst.copy_(src)], replays=20, warmup=10, calls=4)
    total = torch.empty((), device=device, dtype=torch.float32)
    t_read = time_graph([lambda: torch.sum(src, 0, dtype=torch.float32, out=total)], replays=20,
                        warmup=10, calls=4)
    nbytes = src.numel() * src.element_size()
    return {"copy_bw_bytes_per_s": 2 * nbytes / (t_copy.median_ms * 1e-3),
            "read_bw_bytes_per_s": nbytes / (t_read.median_ms * 1e-3),
            "bf16_flops_per_s": 2 * n**3 / (t_mm.median_ms * 1e-3)}
