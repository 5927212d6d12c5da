"""Compile, in one parallel batch, every kernel the GPU tests and the benchmark will load.

Usage (before `pytest -m gpu` or `python -m autotune bench` on a fresh cache):
    python benchmarks/prebuild.py

Kernels otherwise compile on first use, one at a time; this batch uses every core at once.
"""

from __future__ import annotations

import sys
import time

from autotune.build import build
from autotune.cache import tuned_table
from autotune.problem import PRESETS
from autotune.space import KernelConfig, RoutingConfig, default_configs, gemv_configs
from autotune.workload import all_default_configs


def wanted(fp16: bool = True) -> list:
    configs: list = [RoutingConfig("bf16"), RoutingConfig("fp16"), *default_configs("sm90")]
    for p in PRESETS.values():
        for variant in (p, p.with_(activation="swiglu")) + ((p.with_(dtype="float16"),)
                                                            if fp16 else ()):
            configs += all_default_configs(variant)
        configs += tuned_table(p, "sm90").winners()
    # The GPU tests also run the sm80/sm89 kernels (their PTX) and every epilogue kind of one tile.
    for p in PRESETS.values():
        configs += [c for arch in ("sm80", "sm89") for c in all_default_configs(p, arch)]
    for c in (default_configs("sm90")[0], default_configs("sm80")[0]):
        configs += [c.with_epilogue(e) for e in ("relu2", "f32")]
    # ... and two more swap-AB mainloops (cooperative; the token tile multicast).
    configs += [KernelConfig(128, 64, 64, 1, 1, "cooperative", True),
                KernelConfig(128, 64, 64, 2, 1, "pingpong", True)]
    configs += [c.with_epilogue(e) for c in gemv_configs() for e in ("identity", "relu2", "f32")]
    return list({c.name: c for c in configs}.values())


if __name__ == "__main__":
    start = time.time()
    results = build(wanted(fp16="--no-fp16" not in sys.argv))
    failed = [r for r in results if not r.ok]
    print(f"built or cached {len(results) - len(failed)}/{len(results)} in "
          f"{time.time() - start:.0f} s")
    for r in failed:
        print(f"FAILED {r.config.name}:\n{r.log[-2000:]}")
    raise SystemExit(1 if failed else 0)
