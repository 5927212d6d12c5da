"""``python -m autotune bench``: LatentMoE beside its peers and the roofline floor, on one GPU.

In one process on one GPU: measure the copy bandwidth and the bf16 matmul rate, build a
LatentMoE with random weights per preset, and for each token count check every implementation
against the fp32 oracle (one that disagrees is reported WRONG and not timed; for the layer the
note says how many tokens route differently from the oracle), then time it by
CUDA-graph replay over rotated inputs (see :mod:`autotune.bench`). Writes
``bench_<device>_<date>.{json,md,png}`` and prints the markdown table last.

Implementations: ``autotune`` (``LatentMoE(backend="cutlass")``; "n/a" with the reason where it
raises), ``grouped_mm``, ``triton`` and ``reference`` (see :mod:`autotune.peers`).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import re
import shlex
import statistics
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .problem import DEFAULT_PRESET, PRESETS, LatentMoEProblem, preset

IMPLS = ("autotune", "grouped_mm", "triton", "reference")
DEFAULT_TOKENS = (1, 8, 32, 128, 512, 2048, 8192)
DEFAULT_OUT_DIR = "benchmarks/results"


# ----------------------------------------------------------------------------- arguments

def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the benchmark's flags to ``parser`` (the ``bench`` subcommand)."""
    parser.add_argument("--preset", action="append", choices=sorted(PRESETS),
                        help=f"layer sizes; repeat for several (default {DEFAULT_PRESET})")
    parser.add_argument("--tokens", default=",".join(map(str, DEFAULT_TOKENS)),
                        help="comma-separated token counts (default %(default)s)")
    parser.add_argument("--impl", action="append",
                        help=f"implementations, comma-separated or repeated, among "
                             f"{', '.join(IMPLS)} (default all; unavailable ones show n/a)")
    parser.add_argument("--activation", action="append", choices=("relu2", "swiglu"),
                        help="variant of each preset; repeat for several (default the "
                             "preset's own). swiglu also switches to softmax scoring")
    parser.add_argument("--out-dir", default=DEFAULT_OUT_DIR,
                        help="where the JSON, markdown and PNG go (default %(default)s)")
    parser.add_argument("--rotate", type=int, default=4,
                        help="input sets rotated through the timed calls (default %(default)s)")
    parser.add_argument("--replays", type=int, default=20,
                        help="timed graph replays per measurement (default %(default)s)")
    parser.add_argument("--settle-ms", type=float, default=100.0,
                        help="untimed graph replays before each measurement, in ms, so every "
                             "implementation is timed at steady clocks (default %(default)s)")
    parser.add_argument("--reference-max-tokens", type=int, default=2048,
                        help="time the reference only up to this many tokens; above it the "
                             "oracle still runs once as the check (default %(default)s)")
    parser.add_argument("--tolerance", type=float, default=1e-2,
                        help="largest relative error against the oracle (default %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="weights and inputs seed")


def parse_tokens(text: str) -> list[int]:
    """``"1,8,32"`` -> ``[1, 8, 32]``.

    Requirements
    ------------
    Comma-separated positive ints; otherwise ``ValueError`` naming ``--tokens``.
    """
    try:
        tokens = [int(t) for t in str(text).split(",") if t.strip()]
    except ValueError:
        raise ValueError(f"--tokens: expected comma-separated ints, got {text!r}") from None
    if not tokens or any(t <= 0 for t in tokens):
        raise ValueError(f"--tokens: expected positive token counts, got {text!r}")
    return tokens


def parse_impls(values: Sequence[str] | None) -> list[str]:
    """The implementations named by repeated and/or comma-separated ``--impl`` values, in
    :data:`IMPLS` order; all of them for ``None``.

    Requirements
    ------------
    Every name is one of :data:`IMPLS`; otherwise ``ValueError`` naming ``--impl``.
    """
    if not values:
        return list(IMPLS)
    names = {n.strip() for v in values for n in v.split(",") if n.strip()}
    unknown = sorted(names - set(IMPLS))
    if unknown or not names:
        raise ValueError(f"--impl: unknown {', '.join(unknown) or 'empty list'}; expected "
                         f"among {', '.join(IMPLS)}")
    return [n for n in IMPLS if n in names]


def variant_problems(presets: Sequence[str] | None,
                     activations: Sequence[str] | None) -> list[tuple[str, LatentMoEProblem]]:
    """``(label, problem)`` per preset and activation variant.

    ``None`` activations keep each preset as it is. ``"swiglu"`` gives the same sizes with
    gated experts and softmax scoring (labelled ``<preset>+swiglu``); ``"relu2"`` the preset
    with relu2 experts (labelled as the preset when that is what it already uses).

    Requirements
    ------------
    Preset names from :data:`autotune.problem.PRESETS`; activations ``relu2``/``swiglu``
    (``ValueError`` otherwise).
    """
    out = []
    for name in dict.fromkeys(presets or [DEFAULT_PRESET]):
        base = preset(name)
        for act in dict.fromkeys(activations or [None]):
            if act is None or act == base.activation:
                out.append((name, base))
            elif act == "swiglu":
                out.append((f"{name}+swiglu", base.with_(activation="swiglu", scoring="softmax")))
            elif act == "relu2":
                out.append((f"{name}+relu2", base.with_(activation="relu2")))
            else:
                raise ValueError(f"--activation: expected relu2 or swiglu, got {act!r}")
    return out


def command_line(args: argparse.Namespace) -> str:
    """The command that reproduces this run, from the parsed flags."""
    parts = ["python", "-m", "autotune", "bench"]
    for name in args.preset or [DEFAULT_PRESET]:
        parts += ["--preset", name]
    for act in args.activation or []:
        parts += ["--activation", act]
    parts += ["--tokens", ",".join(map(str, parse_tokens(args.tokens))),
              "--impl", ",".join(parse_impls(args.impl)), "--rotate", str(args.rotate),
              "--replays", str(args.replays), "--settle-ms", f"{args.settle_ms:g}",
              "--reference-max-tokens",
              str(args.reference_max_tokens), "--tolerance", str(args.tolerance),
              "--seed", str(args.seed), "--out-dir", str(args.out_dir)]
    return shlex.join(parts)


# ----------------------------------------------------------------------------- measuring

@dataclass(frozen=True)
class Options:
    """Knobs of one benchmark run (from the flags)."""

    impls: tuple[str, ...]
    rotate: int = 4
    replays: int = 20
    settle_ms: float = 100.0
    reference_max_tokens: int = 2048
    tolerance: float = 1e-2
    seed: int = 0
    device: str = "cuda"  # other devices only for dry runs of the bookkeeping (tests)


def flip_note(out, ref, ids, ref_ids) -> str:
    """What a failed check owes to routing: how many tokens' top-k sets (``ids``, ``ref_ids``:
    [T, k] expert ids of the implementation and of the oracle) differ, and the relative error of
    ``out`` against ``ref`` over the other tokens.

    A router that is not bitwise the oracle's can swap two experts whose choice values are
    nearly tied, and one swapped expert moves its token's row a lot: at a few hundred tokens a
    single such token can exceed the tolerance (NOTES.md v17, ``benchmarks/near_ties.py``).
    """
    differ = (ids.sort(1).values != ref_ids.sort(1).values).any(1).to(out.device)
    n = int(differ.sum())
    if n == 0:
        return "every token routes as the fp32 oracle does"
    keep = ~differ
    if not bool(keep.any()):
        return f"all {n} tokens route differently from the fp32 oracle"
    return (f"{n} of {differ.numel()} tokens route differently from the fp32 oracle (near ties?"
            f" benchmarks/near_ties.py); rel err {_rel_err(out[keep], ref[keep]):.3g} over the "
            "others")


def _rel_err(out, ref) -> float:
    import torch

    if not isinstance(out, torch.Tensor) or out.shape != ref.shape:
        shape = list(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"output has shape {shape}, expected {list(ref.shape)}")
    denom = ref.double().norm().item()
    diff = (out.double() - ref.double()).norm().item()
    return diff / denom if denom else diff


def time_eager(fns: Sequence[Callable[[], object]], replays: int = 10):
    """Per-call CUDA-event times of plain (uncaptured) calls, for what cannot be captured.

    Requirements
    ------------
    A CUDA device; ``fns`` non-empty (``ValueError``).
    """
    import torch

    from .bench import Timing

    if not fns:
        raise ValueError("fns must hold at least one callable")
    fns[0]()
    torch.cuda.synchronize()
    samples = []
    for i in range(max(1, replays)):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fns[i % len(fns)]()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end))
    s = sorted(samples)
    return Timing(statistics.median(s), _quantile(s, 0.2), _quantile(s, 0.8), len(s))


def _quantile(ordered: Sequence[float], q: float) -> float:
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def _impl_fns(module, weights, routing) -> dict[str, Callable]:
    from . import peers

    def autotune_fn(x):
        return module(x)

    def peer(name):
        return lambda x: peers.PEERS[name](x, *weights, **routing)

    return {"autotune": autotune_fn, **{name: peer(name) for name in peers.PEERS}}


def _availability(impls: Sequence[str]) -> dict[str, str | None]:
    from . import peers

    avail = peers.available_peers()
    return {name: avail.get(name) for name in impls}


def _measure_impl(name, fn, xs, oracle, tokens, opts: Options,
                  explain: Callable[[Any], str] | None = None) -> dict[str, Any]:
    """Check one implementation against the oracle, then time it; a result cell.

    ``explain(out)``, when given, adds to a WRONG cell's note what the failure owes to (it runs
    only then)."""
    import torch

    from .bench import time_graph

    if name == "reference" and tokens > opts.reference_max_tokens:
        # The fp32 oracle already ran once on these inputs; a second, bf16 run adds nothing.
        return {"status": "untimed",
                "note": f"used as the oracle only, not timed above {opts.reference_max_tokens} "
                        "tokens"}
    try:
        out = fn(xs[0])
        err = _rel_err(out, oracle)
    except Exception as e:  # a backend that cannot run here is reported, not fatal
        return {"status": "n/a", "note": f"{type(e).__name__}: {e}".splitlines()[0][:300]}
    cell: dict[str, Any] = {"rel_err": err}
    if not err <= opts.tolerance:  # also catches NaN
        note = f"rel err {err:.3g} > {opts.tolerance:g}"
        if explain is not None:
            note += f"; {explain(out)}"
        return {**cell, "status": "WRONG", "note": note}
    fns = [lambda x=x: fn(x) for x in xs]
    if name == "reference":
        # The oracle reads expert counts on the host (.tolist()): not capturable by design.
        timing, method, note = time_eager(fns, opts.replays), "eager", None
    else:
        try:
            timing = time_graph(fns, replays=opts.replays, settle_ms=opts.settle_ms)
            method, note = "graph", None
        except Exception as e:
            torch.cuda.synchronize()
            note = f"graph capture failed ({type(e).__name__}: {e}); timed eagerly"
            timing, method = time_eager(fns, opts.replays), "eager"
    cell.update(status="ok", timing=method, ms=timing.median_ms, p20_ms=timing.p20_ms,
                p80_ms=timing.p80_ms)
    if note:
        cell["note"] = note.splitlines()[0][:300]
    return cell


def bench_problem(label: str, problem: LatentMoEProblem, tokens: Sequence[int], opts: Options,
                  ceilings: dict[str, float]) -> list[dict[str, Any]]:
    """Rows for one problem: build the layer on the GPU, then check and time each T.

    Requirements
    ------------
    A CUDA device with room for the problem's weights and ``T * top_k`` intermediates.
    """
    import torch

    from .peers import module_inputs, roofline_bytes_flops, roofline_floor_ms
    from .reference import latent_moe_reference

    p = problem
    module, build_error = _build_module(p, opts.seed, opts.device)
    weights, routing = module_inputs(module)
    fns = _impl_fns(module, weights, routing)
    unavailable = {**_availability(opts.impls), "autotune": build_error}
    rows = []
    for t in tokens:
        xs = [torch.randn(t, p.hidden_size, device=opts.device, dtype=torch.bfloat16)
              for _ in range(max(1, opts.rotate))]
        gate, bias, fc1, up, down, fc2 = weights
        with torch.no_grad():
            # x.float() is exact, so the fp32 oracle sees the bf16 inputs and returns fp32.
            ref_ids: list = []
            oracle = latent_moe_reference(xs[0].float(), gate, bias, up, down,
                                          fc1_latent_proj=fc1, fc2_latent_proj=fc2,
                                          topk_ids_hook=ref_ids.append, **routing)
            cells, explain = {}, None
            for name in opts.impls:
                if unavailable.get(name):
                    cells[name] = {"status": "n/a", "note": unavailable[name]}
                else:
                    explain = (_routing_explainer(module, xs[0], oracle, ref_ids[0])
                               if name == "autotune" else None)
                    cells[name] = _measure_impl(name, fns[name], xs, oracle, t, opts, explain)
        nbytes, flops = roofline_bytes_flops(p, t)
        floor = roofline_floor_ms(p, t, floor_bandwidth(ceilings), ceilings["bf16_flops_per_s"])
        rows.append(make_row(label, p, t, floor, nbytes, flops, cells))
        print(f"[bench] {label} T={t}: " + ", ".join(
            f"{n} {_cell_text(c)}" for n, c in cells.items()), file=sys.stderr, flush=True)
        del xs, oracle, explain  # the explainer holds x and the oracle too
    del module, weights, fns
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return rows


def _routing_explainer(module, x, oracle, ref_ids) -> Callable[[Any], str]:
    """``explain`` for the layer: runs it once more on ``x`` with its top-k ids recorded and
    compares them with the oracle's (:func:`flip_note`)."""
    def explain(out) -> str:
        ids: list = []
        module.topk_ids_hook = ids.append
        try:
            module(x)
        finally:
            module.topk_ids_hook = None
        return flip_note(out, oracle, ids[0], ref_ids) if ids else "no top-k ids recorded"
    return explain


def _build_module(p: LatentMoEProblem, seed: int, device: str):
    """The layer with random bf16 weights (fp32 router) on the GPU, on the cutlass backend;
    a constructor that refuses it gives a reference-backend layer and the reason."""
    import torch

    from .ops import LatentMoE

    def build(backend: str):
        torch.manual_seed(seed)  # the same weights whichever constructor succeeds
        return LatentMoE(p.hidden_size, p.latent_size, p.intermediate_size, p.num_experts,
                         p.top_k, activation=p.activation, scoring=p.scoring, n_group=p.n_group,
                         topk_group=p.topk_group, norm_topk_prob=p.norm_topk_prob,
                         routed_scaling_factor=p.routed_scaling_factor, dtype=torch.bfloat16,
                         device=device, backend=backend).requires_grad_(False)

    try:
        return build("cutlass"), None
    except (RuntimeError, ValueError, NotImplementedError) as e:
        error = f"LatentMoE(backend='cutlass'): {type(e).__name__}: {e}".splitlines()[0]
    return build("reference"), error


def make_row(label: str, problem: LatentMoEProblem, tokens: int, floor_ms: float,
             floor_bytes: float, floor_flops: float,
             cells: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """One JSON row from per-implementation cells (``status``, ``ms``, ``p20_ms``, ``p80_ms``,
    ``rel_err``, ``timing``, ``note``; missing numbers become ``null``)."""
    def pick(key: str) -> dict[str, Any]:
        return {n: c.get(key) for n, c in cells.items()}

    return {"preset": label, "problem": problem.key, "tokens": tokens, "floor_ms": floor_ms,
            "floor_bytes": floor_bytes, "floor_flops": floor_flops, "ms": pick("ms"),
            "p20_ms": pick("p20_ms"), "p80_ms": pick("p80_ms"), "rel_err": pick("rel_err"),
            "status": pick("status"), "timing": pick("timing"),
            "notes": {n: c["note"] for n, c in cells.items() if c.get("note")}}


def run_benchmark(problems: Sequence[tuple[str, LatentMoEProblem]], tokens: Sequence[int],
                  opts: Options, command: str = "") -> dict[str, Any]:
    """Measure the ceilings, then every problem and token count; the whole result document.

    Requirements
    ------------
    A CUDA device (``RuntimeError`` otherwise).
    """
    import torch

    from .bench import measure_ceilings

    if not torch.cuda.is_available():
        raise RuntimeError("the benchmark needs a CUDA GPU (none is visible)")
    ceilings = measure_ceilings()
    result = {
        "device": torch.cuda.get_device_name(), "torch": torch.__version__,
        "triton": _triton_version(), "cuda": torch.version.cuda,
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": command, **ceilings, "impls": list(opts.impls),
        "tolerance": opts.tolerance, "rows": [],
    }
    for label, problem in problems:
        result["rows"] += bench_problem(label, problem, tokens, opts, ceilings)
    return result


def _triton_version() -> str | None:
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__


# ----------------------------------------------------------------------------- writing

def device_slug(name: str) -> str:
    """``"NVIDIA H200"`` -> ``"h200"``: the device part of the result file names."""
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower().replace("nvidia", "")).strip("-")
    return slug or "gpu"


def _cell_text(cell: dict[str, Any]) -> str:
    status = cell.get("status")
    if status == "ok":
        return f"{cell['ms']:.4g} ms"
    return status if status != "WRONG" else f"WRONG ({cell.get('rel_err', float('nan')):.2g})"


def _fmt_ms(v: float) -> str:
    return f"{v:.4g}"


def _impl_cells(row: dict[str, Any], name: str) -> tuple[str, str]:
    status = row.get("status", {}).get(name)
    ms = row.get("ms", {}).get(name)
    if status == "WRONG":
        err = row.get("rel_err", {}).get(name)
        return "WRONG", "err nan" if err is None else f"err {err:.2g}"
    if status == "n/a":
        return "n/a", ""
    if ms is None:
        return "—", ""
    mark = "*" if row.get("timing", {}).get(name) == "eager" else ""
    return _fmt_ms(ms) + mark, f"{ms / row['floor_ms']:.2f}×"


def floor_bandwidth(ceilings: dict[str, float]) -> float:
    """Bandwidth of the floor: the larger of copy (read + write) and pure read bandwidth.

    The layer's traffic is almost all weight reads, which HBM streams faster than a copy's mixed
    reads and writes; a floor from the copy rate alone can sit above measured times.
    """
    return max(ceilings["copy_bw_bytes_per_s"], ceilings.get("read_bw_bytes_per_s", 0.0))


def markdown_table(result: dict[str, Any]) -> str:
    """The result as markdown: a header, one table row per (preset, T), then the notes."""
    impls = result.get("impls") or sorted({n for r in result["rows"] for n in r["ms"]})
    lines = [f"# LatentMoE benchmark: {result['device']}", "",
             f"- date: {result['date']}; torch {result['torch']}"
             + (f"; triton {result['triton']}" if result.get("triton") else ""),
             f"- copy bandwidth {result['copy_bw_bytes_per_s'] / 1e12:.2f} TB/s (read + write), "
             + (f"read bandwidth {result['read_bw_bytes_per_s'] / 1e12:.2f} TB/s, "
                if result.get("read_bw_bytes_per_s") else "")
             + f"bf16 matmul {result['bf16_flops_per_s'] / 1e12:.0f} TFLOP/s (measured in this "
             "run); the floor uses the larger bandwidth",
             f"- command: `{result.get('command', '')}`",
             "- ms: CUDA-graph replay median per call; ×: times the roofline floor; "
             "* timed eagerly (not capturable); —: not timed (see notes)", ""]
    head = ["preset", "T", "floor ms"] + [h for n in impls for h in (f"{n} ms", "×floor")]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in result["rows"]:
        cells = [row["preset"], str(row["tokens"]), _fmt_ms(row["floor_ms"])]
        cells += [c for n in impls for c in _impl_cells(row, n)]
        lines.append("| " + " | ".join(cells) + " |")
    notes = {}
    for row in result["rows"]:
        for name, note in row.get("notes", {}).items():
            notes.setdefault((name, note), []).append(f"{row['preset']} T={row['tokens']}")
    if notes:
        lines += ["", "Notes:"]
        lines += [f"- {name}: {note} ({', '.join(where)})"
                  for (name, note), where in notes.items()]
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], path: Path) -> None:
    """Log-log time against tokens, one line per implementation, the floor dashed, one panel
    per preset; written as a PNG to ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(dict.fromkeys(r["preset"] for r in result["rows"]))
    impls = result.get("impls") or sorted({n for r in result["rows"] for n in r["ms"]})
    fig, axes = plt.subplots(1, max(1, len(labels)), figsize=(6 * max(1, len(labels)), 4.5),
                             squeeze=False)
    for ax, label in zip(axes[0], labels, strict=False):
        rows = sorted((r for r in result["rows"] if r["preset"] == label),
                      key=lambda r: r["tokens"])
        ax.plot([r["tokens"] for r in rows], [r["floor_ms"] for r in rows], "k--",
                label="roofline floor")
        for i, name in enumerate(impls):
            pts = [(r["tokens"], r["ms"].get(name)) for r in rows]
            pts = [(t, m) for t, m in pts if isinstance(m, (int, float)) and math.isfinite(m)]
            if pts:  # one colour per implementation in every panel
                ax.plot(*zip(*pts, strict=True), marker="o", color=f"C{i}", label=name)
        ax.set(xscale="log", yscale="log", xlabel="tokens T", ylabel="ms per forward",
               title=label)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize="small")
    fig.suptitle(f"LatentMoE forward, {result['device']} ({result['date'][:10]})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def result_paths(result: dict[str, Any], out_dir: Path) -> dict[str, Path]:
    """``bench_<device>_<date>.{json,md,png}`` in ``out_dir``; a run on a day that already has
    results gets a ``_2``, ``_3``... suffix instead of overwriting them."""
    stem = f"bench_{device_slug(result['device'])}_{result['date'][:10]}"
    n, name = 1, stem
    while any((out_dir / f"{name}.{ext}").exists() for ext in ("json", "md", "png")):
        n += 1
        name = f"{stem}_{n}"
    return {ext: out_dir / f"{name}.{ext}" for ext in ("json", "md", "png")}


def write_results(result: dict[str, Any], out_dir: str | Path) -> dict[str, Path]:
    """Write the JSON, the markdown table and the plot; return their paths by extension.

    Requirements
    ------------
    ``result`` as :func:`run_benchmark` returns it; ``out_dir`` writable (created if missing).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = result_paths(result, out)
    paths["json"].write_text(json.dumps(result, indent=1, allow_nan=False) + "\n",
                             encoding="utf-8")
    paths["md"].write_text(markdown_table(result), encoding="utf-8")
    plot(result, paths["png"])
    return paths


# ----------------------------------------------------------------------------- entry

def run(args: argparse.Namespace) -> int:
    """Run the benchmark the flags describe; 0 if all checked implementations were correct,
    1 if any was WRONG, 2 for bad flags or no GPU."""
    try:
        tokens = parse_tokens(args.tokens)
        opts = Options(impls=tuple(parse_impls(args.impl)), rotate=args.rotate,
                       replays=args.replays, settle_ms=args.settle_ms,
                       reference_max_tokens=args.reference_max_tokens,
                       tolerance=args.tolerance, seed=args.seed)
        problems = variant_problems(args.preset, args.activation)
        if opts.rotate < 1 or opts.replays < 1:
            raise ValueError(f"--rotate/--replays: expected >= 1, got {opts.rotate}, "
                             f"{opts.replays}")
        if not opts.settle_ms >= 0:
            raise ValueError(f"--settle-ms: expected >= 0, got {opts.settle_ms}")
        command = command_line(args)
    except (ValueError, TypeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        result = run_benchmark(problems, tokens, opts, command)
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    _sanitize(result)
    paths = write_results(result, args.out_dir)
    print(f"wrote {', '.join(str(p) for p in paths.values())}", file=sys.stderr)
    print(markdown_table(result))
    wrong = [r for r in result["rows"] if "WRONG" in r["status"].values()]
    return 1 if wrong else 0


def _sanitize(result: dict[str, Any]) -> None:
    # JSON has no NaN/inf: a non-finite error or time becomes null (its status says why).
    for row in result["rows"]:
        for key in ("ms", "p20_ms", "p80_ms", "rel_err"):
            row[key] = {n: (v if v is None or math.isfinite(v) else None)
                        for n, v in row[key].items()}
