"""The command line: ``python -m autotune [--arch sm90] ...`` and ``python -m autotune bench``.

Without a GPU of the chosen architecture it renders the search space, compiles the default subset
(or everything with ``--compile-all``) and says that timing needs that GPU.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time

from .arch import ARCHS, device_arch, get_arch, supported_archs
from .problem import DEFAULT_PRESET, PRESETS, LatentMoEProblem, from_hf_config, preset

_SIZE_FLAGS = ("hidden_size", "latent_size", "intermediate_size", "num_experts", "top_k")


_NONE = object()


def _size(text: str):
    """An int, or 'none' for an absent latent width."""
    if text.strip().lower() == "none":
        return _NONE
    return int(text)


def _tune_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m autotune",
        description="Generate, compile and tune CUTLASS kernels for the latent MoE layer. "
                    "`python -m autotune bench --help` for the benchmark.")
    p.add_argument("--arch", help=f"target architecture ({', '.join(supported_archs())}); "
                   "default: the visible GPU's, else sm90")
    g = p.add_argument_group("problem (default: the nemotron-3-super preset)")
    g.add_argument("--preset", choices=sorted(PRESETS), help="a named layer size")
    g.add_argument("--model-config", metavar="CONFIG_JSON",
                   help="a Hugging Face Nemotron-H config.json")
    for name in _SIZE_FLAGS:
        g.add_argument("--" + name.replace("_", "-"), type=_size if name == "latent_size" else int,
                       help="override one size" + (" ('none': no latent projections)"
                                                   if name == "latent_size" else ""))
    g.add_argument("--activation", choices=("relu2", "swiglu"))
    g.add_argument("--scoring", choices=("sigmoid", "softmax"))
    g.add_argument("--dtype", choices=("bfloat16", "float16"), default=None)
    t = p.add_argument_group("tuning")
    t.add_argument("--tokens", help="comma-separated token buckets (default: 1..8192 and "
                   "midpoints)")
    t.add_argument("--trials", type=int, default=None, help="trials per study")
    t.add_argument("--max-configs", type=int, default=None,
                   help="candidate configs per epilogue kind, compiled once (default 14)")
    t.add_argument("--time-budget", type=float, default=None, help="seconds for the whole run")
    t.add_argument("--jobs", type=int, default=None, help="parallel nvcc processes")
    t.add_argument("--storage", help="optuna storage URL shared by workers (default: a journal "
                   "file in the cache)")
    t.add_argument("--worker", action="store_true", help="only pull trials of existing studies")
    t.add_argument("--cache-dir", help="cache root (sets AUTOTUNE_CACHE_DIR)")
    t.add_argument("--candidates", metavar="NAME,...",
                   help="tune over these configs (identity names, as --configs) instead of the "
                   "capped default candidates; no multicast variants join")
    t.add_argument("--stages", metavar="STAGE,...",
                   help="tune only these stages (fc1, up, down, fc2); the table keeps the others")
    c = p.add_argument_group("compilation")
    c.add_argument("--compile-only", action="store_true", help="compile, do not time")
    c.add_argument("--compile-all", action="store_true",
                   help="compile the whole search space, not the default subset")
    c.add_argument("--configs", help="comma-separated config names to compile instead")
    c.add_argument("--render-only", action="store_true", help="render sources, compile nothing")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def problem_from_args(args: argparse.Namespace) -> LatentMoEProblem:
    """The problem the flags describe: a preset or config.json, then explicit overrides."""
    if args.preset and args.model_config:
        raise ValueError("give --preset or --model-config, not both")
    base = (from_hf_config(args.model_config) if args.model_config
            else preset(args.preset or DEFAULT_PRESET))
    changes = {k: getattr(args, k) for k in (*_SIZE_FLAGS, "activation", "scoring", "dtype")
               if getattr(args, k) is not None}
    if changes.get("latent_size") is _NONE:
        changes["latent_size"] = None
    return base.with_(**changes) if changes else base


def _resolve_arch(requested: str | None) -> tuple[str, str | None]:
    present = device_arch()
    name = requested or present or "sm90"
    get_arch(name)  # clear error for unknown or not-yet-supported architectures
    return name, present


def _named_configs(flag: str, names: str, space: list) -> list:
    """The configs of ``space`` that ``names`` (comma-separated) names; ``ValueError`` naming
    ``flag`` and every unknown name otherwise."""
    by_name = {c.name: c for c in space}
    unknown = [n for n in names.split(",") if n not in by_name]
    if unknown:
        raise ValueError(f"{flag}: unknown or invalid for this problem: {', '.join(unknown)} "
                         f"(identity-epilogue names, as --render-only writes them)")
    return [by_name[n] for n in names.split(",")]


def _check_config_flags(args, arch, problem) -> None:
    """``ValueError`` for a --configs or --candidates name outside ``arch``'s space for
    ``problem``, or for --candidates with a flag that compiles something else."""
    if args.candidates and (args.configs or args.compile_all or args.render_only):
        raise ValueError("--candidates names what to tune; it does not combine with --configs, "
                         "--compile-all or --render-only")
    if args.configs or args.candidates:
        from .space import search_space

        space = search_space(arch, problem)
        for flag, names in (("--configs", args.configs), ("--candidates", args.candidates)):
            if names:
                _named_configs(flag, names, space)


def _selected_configs(args, arch, problem):
    from .space import KernelConfig, default_configs, invalid_reason, search_space

    space = search_space(arch, problem)
    if args.configs:
        return space, _named_configs("--configs", args.configs, space)
    if args.compile_all:
        return space, space
    chosen: list[KernelConfig] = [c for c in default_configs(arch, space[0].dtype if space
                                                             else "bf16")
                                  if invalid_reason(c, problem) is None]
    return space, chosen


def _compile(args, arch, problem) -> int:
    from tqdm import tqdm

    from .build import build
    from .codegen import write_source
    from .space import RoutingConfig
    from .workload import config_dtype

    space, chosen = _selected_configs(args, arch, problem)
    if not space:
        print(f"no valid {arch} config for {problem.key} (alignment?)", file=sys.stderr)
        return 1
    for config in space:
        write_source(config)
    print(f"rendered {len(space)} {arch} configs into the generated sources folder")
    if args.render_only:
        return 0
    if not args.configs:
        # The fused forward's routing kernels: a prebuilt cache then serves the layer's first
        # forward without nvcc.
        chosen = [*chosen, RoutingConfig(config_dtype(problem), arch)]
    bar = tqdm(total=len(chosen), desc=f"compile {arch}", unit="kernel", file=sys.stderr)
    start = time.monotonic()
    results = build(chosen, jobs=args.jobs, on_done=lambda r: bar.update(1))
    bar.close()
    width = max(len(r.config.name) for r in results)
    print(f"\n{'config':<{width}}  status   seconds")
    for r in results:
        print(f"{r.config.name:<{width}}  {r.status:<7}  {r.seconds:7.1f}")
    failed = [r for r in results if not r.ok]
    for r in failed:
        print(f"\n--- {r.config.name} failed ---\n{r.log}", file=sys.stderr)
    print(f"\n{len(results) - len(failed)}/{len(results)} built or cached in "
          f"{time.monotonic() - start:.0f} s")
    return 1 if failed else 0


def _say_timing_needs_the_gpu(arch: str, present: str | None, done: str) -> None:
    found = f"found {present}" if present else "no CUDA GPU found"
    print(f"\nTiming needs an {arch} GPU ({ARCHS[arch].parts}); {found}. {done}; run the same "
          f"command on an {arch} GPU to tune.")


def tune_main(argv: list[str]) -> int:
    args = _tune_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else
                        os.environ.get("AUTOTUNE_LOG_LEVEL", "WARNING"))
    if args.cache_dir:
        os.environ["AUTOTUNE_CACHE_DIR"] = args.cache_dir
    try:
        arch, present = _resolve_arch(args.arch)
        problem = problem_from_args(args)
        _check_config_flags(args, arch, problem)
    except (ValueError, TypeError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"problem: {problem.key}\narch: {arch} ({ARCHS[arch].parts})")
    can_time = present == arch and not (args.compile_only or args.render_only)
    if args.candidates and not can_time:
        # Compile the candidates as the tuner would (each stage's epilogue kind), then stop.
        args.compile_only = True
        from .tune import main_from_args

        code = main_from_args(args, problem, arch)
        if present != arch:
            _say_timing_needs_the_gpu(arch, present, "The candidates were compiled")
        return code
    if not can_time or args.configs or args.compile_all:
        code = _compile(args, arch, problem)
        if present != arch:
            done = "generated (--render-only)" if args.render_only else "generated and compiled"
            _say_timing_needs_the_gpu(arch, present, f"Sources were {done}")
        return code
    from .tune import main_from_args

    return main_from_args(args, problem, arch)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:
        from . import benchmark

        p = argparse.ArgumentParser(prog="python -m autotune bench",
                                    description="Time LatentMoE beside its peers and the floor.")
        benchmark.add_arguments(p)
        return benchmark.run(p.parse_args(argv[1:]))
    return tune_main(argv)


if __name__ == "__main__":
    raise SystemExit(main())
