"""The benchmark command: flags, result writers (JSON, markdown, PNG) and the check-before-time
logic on synthetic data; the timing itself needs CUDA (``gpu`` test)."""

from __future__ import annotations

import argparse
import json
import math

import pytest
import torch

from autotune import benchmark
from autotune.problem import PRESETS, LatentMoEProblem


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    benchmark.add_arguments(parser)
    return parser.parse_args(argv)


def synthetic_result() -> dict:
    rows = []
    for label in ("nemotron-3-super", "nemotron-3-super+swiglu"):
        for t in (1, 8, 8192):
            floor = 0.06 * max(1.0, t / 200)
            cells = {
                "autotune": {"status": "n/a", "note": "RuntimeError: no kernels yet"},
                "grouped_mm": {"status": "ok", "ms": 3 * floor, "p20_ms": 2.9 * floor,
                               "p80_ms": 3.1 * floor, "rel_err": 4e-3, "timing": "graph"},
                "triton": ({"status": "WRONG", "rel_err": 0.5, "note": "rel err 0.5 > 0.01"}
                           if t == 8 else
                           {"status": "ok", "ms": 2 * floor, "p20_ms": 1.9 * floor,
                            "p80_ms": 2.1 * floor, "rel_err": 5e-3, "timing": "graph"}),
                "reference": ({"status": "untimed",
                               "note": "oracle only, not timed above 2048 tokens"} if t > 2048 else
                              {"status": "ok", "ms": 50 * floor, "p20_ms": 49 * floor,
                               "p80_ms": 51 * floor, "rel_err": 1e-3, "timing": "eager"}),
            }
            rows.append(benchmark.make_row(label, PRESETS["nemotron-3-super"], t, floor,
                                           1e8, 1e12, cells))
    return {"device": "NVIDIA H200", "torch": "2.11.0+cu130", "triton": "3.6.0",
            "cuda": "13.0", "date": "2025-11-28T12:00:00+00:00",
            "command": "python -m autotune bench --activation relu2 --activation swiglu",
            "copy_bw_bytes_per_s": 4.2e12, "bf16_flops_per_s": 7.5e14,
            "impls": list(benchmark.IMPLS), "tolerance": 1e-2, "rows": rows}


# ----------------------------------------------------------------------------- flags

def test_defaults():
    args = parse([])
    assert benchmark.parse_tokens(args.tokens) == [1, 8, 32, 128, 512, 2048, 8192]
    assert benchmark.parse_impls(args.impl) == ["autotune", "grouped_mm", "triton", "reference"]
    assert args.out_dir == "benchmarks/results"
    assert benchmark.variant_problems(args.preset, args.activation) == [
        ("nemotron-3-super", PRESETS["nemotron-3-super"])]


def test_repeated_and_comma_separated_flags():
    args = parse(["--preset", "nemotron-3-super", "--preset", "nemotron-3-ultra",
                  "--impl", "triton,grouped_mm", "--impl", "reference", "--tokens", "4, 16",
                  "--activation", "relu2", "--activation", "swiglu"])
    assert benchmark.parse_impls(args.impl) == ["grouped_mm", "triton", "reference"]
    assert benchmark.parse_tokens(args.tokens) == [4, 16]
    labels = [label for label, _ in benchmark.variant_problems(args.preset, args.activation)]
    assert labels == ["nemotron-3-super", "nemotron-3-super+swiglu", "nemotron-3-ultra",
                      "nemotron-3-ultra+swiglu"]
    swiglu = dict(benchmark.variant_problems(args.preset, args.activation))[
        "nemotron-3-ultra+swiglu"]
    assert (swiglu.activation, swiglu.scoring, swiglu.hidden_size) == ("swiglu", "softmax", 8192)
    cmd = benchmark.command_line(args)
    assert cmd.startswith("python -m autotune bench --preset nemotron-3-super --preset "
                          "nemotron-3-ultra --activation relu2 --activation swiglu")
    assert "--impl grouped_mm,triton,reference" in cmd and "--tokens 4,16" in cmd
    assert "--settle-ms 100" in cmd


@pytest.mark.parametrize("text", ["", "1,x", "0,4", "-2"])
def test_bad_tokens(text):
    with pytest.raises(ValueError, match="--tokens"):
        benchmark.parse_tokens(text)


def test_bad_impl_and_preset():
    with pytest.raises(ValueError, match="--impl: unknown cublas"):
        benchmark.parse_impls(["triton,cublas"])
    with pytest.raises(SystemExit):
        parse(["--preset", "nemotron-9"])


def test_run_rejects_bad_flags(capsys):
    assert benchmark.run(parse(["--tokens", "0"])) == 2
    assert "--tokens" in capsys.readouterr().err
    assert benchmark.run(parse(["--replays", "0"])) == 2
    assert benchmark.run(parse(["--settle-ms", "-1"])) == 2
    assert "--settle-ms" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without a GPU")
def test_run_without_gpu_says_so(capsys, tmp_path):
    assert benchmark.run(parse(["--tokens", "1", "--out-dir", str(tmp_path)])) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_cli_wiring(capsys):
    from autotune.__main__ import main

    with pytest.raises(SystemExit) as exc:
        main(["bench", "--help"])
    assert exc.value.code == 0
    assert "--reference-max-tokens" in capsys.readouterr().out


# ----------------------------------------------------------------------------- measuring

def test_measure_impl_reports_na_and_wrong_without_timing():
    ref = torch.randn(4, 8)
    opts = benchmark.Options(impls=benchmark.IMPLS)
    xs = [torch.randn(4, 8)]

    def broken(x):
        raise RuntimeError("backend='cutlass': needs an sm90 GPU\nmore detail")

    cell = benchmark._measure_impl("autotune", broken, xs, ref, 4, opts)
    assert cell == {"status": "n/a", "note": "RuntimeError: backend='cutlass': needs an sm90 GPU"}
    cell = benchmark._measure_impl("triton", lambda x: ref + 0.1 * ref.norm(), xs, ref, 4, opts)
    assert cell["status"] == "WRONG" and cell["rel_err"] > 0.01 and "ms" not in cell
    cell = benchmark._measure_impl("triton", lambda x: torch.full_like(ref, math.nan), xs, ref,
                                   4, opts)
    assert cell["status"] == "WRONG"
    cell = benchmark._measure_impl("triton", lambda x: ref[:2], xs, ref, 4, opts)
    assert cell["status"] == "n/a" and "shape" in cell["note"]
    big = benchmark.Options(impls=benchmark.IMPLS, reference_max_tokens=2)
    cell = benchmark._measure_impl("reference", broken, xs, ref, 4, big)  # not even called
    assert cell["status"] == "untimed" and "rel_err" not in cell


def test_bench_problem_dry_run_on_cpu(monkeypatch):
    # The whole per-problem flow (layer, oracle, checks, rows) with the CUDA timers faked.
    from autotune import bench

    fake = bench.Timing(1.5, 1.4, 1.6, 3)
    monkeypatch.setattr(bench, "time_graph",
                        lambda fns, replays, settle_ms: [f() for f in fns] and fake)
    monkeypatch.setattr(benchmark, "time_eager", lambda fns, replays: fake)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    problem = LatentMoEProblem(hidden_size=64, latent_size=32, intermediate_size=48,
                               num_experts=8, top_k=3, routed_scaling_factor=2.5)
    opts = benchmark.Options(impls=benchmark.IMPLS, rotate=2, replays=2,
                             reference_max_tokens=4, device="cpu")
    rows = benchmark.bench_problem("tiny", problem, [3, 9], opts,
                                   {"copy_bw_bytes_per_s": 1e12, "bf16_flops_per_s": 1e14})
    assert [r["tokens"] for r in rows] == [3, 9]
    small, large = rows
    assert small["status"]["autotune"] == "n/a" and small["notes"]["autotune"]  # CPU tensors
    assert small["status"]["grouped_mm"] == "ok" and small["rel_err"]["grouped_mm"] < 1e-2
    assert small["ms"]["grouped_mm"] == 1.5 and small["timing"]["grouped_mm"] == "graph"
    assert small["status"]["triton"] == "n/a"  # CPU tensors without the interpreter
    assert small["status"]["reference"] == "ok" and small["timing"]["reference"] == "eager"
    assert large["status"]["reference"] == "untimed" and large["ms"]["reference"] is None
    assert small["floor_ms"] > 0 and small["problem"] == problem.key


def test_flip_note_counts_tokens_routed_differently():
    ref = torch.randn(4, 8)
    out = ref.clone()
    out[2] += 5.0  # the flipped token's row is the whole error
    ids = torch.tensor([[0, 1], [2, 3], [4, 5], [6, 7]])
    assert benchmark.flip_note(out, ref, ids, ids.flip(1)) == (
        "every token routes as the fp32 oracle does")  # sets compare, not order
    theirs = ids.clone()
    theirs[2] = torch.tensor([4, 6])
    note = benchmark.flip_note(out, ref, ids, theirs)
    assert note.startswith("1 of 4 tokens route differently") and note.endswith(
        "rel err 0 over the others")
    assert benchmark.flip_note(out, ref, ids, ids + 1) == (
        "all 4 tokens route differently from the fp32 oracle")


def test_measure_impl_explains_only_a_wrong_result():
    ref = torch.randn(4, 8)
    opts = benchmark.Options(impls=benchmark.IMPLS)
    xs = [torch.randn(4, 8)]
    cell = benchmark._measure_impl("autotune", lambda x: 2 * ref, xs, ref, 4, opts,
                                   explain=lambda out: f"out {tuple(out.shape)}")
    assert cell["status"] == "WRONG" and cell["note"] == "rel err 1 > 0.01; out (4, 8)"

    def broken(x):
        raise RuntimeError("no kernels")

    def never(out):
        raise AssertionError("explain ran without a wrong result")

    cell = benchmark._measure_impl("autotune", broken, xs, ref, 4, opts, explain=never)
    assert cell["status"] == "n/a"


def test_bench_problem_explains_a_wrong_layer_on_cpu(monkeypatch):
    # The layer (here the reference backend, on CPU) made wrong by a factor: the note says its
    # routing is the oracle's, so the error is elsewhere.
    build = benchmark._build_module

    def reference_layer(p, seed, device):
        module = build(p, seed, device)[0]
        module.backend = "reference"
        return module, None

    monkeypatch.setattr(benchmark, "_build_module", reference_layer)
    impl_fns = benchmark._impl_fns

    def wrong_layer(module, weights, routing):
        fns = impl_fns(module, weights, routing)
        fns["autotune"] = lambda x: 1.5 * module(x)
        return fns

    monkeypatch.setattr(benchmark, "_impl_fns", wrong_layer)
    problem = LatentMoEProblem(hidden_size=64, latent_size=32, intermediate_size=48,
                               num_experts=8, top_k=3)
    opts = benchmark.Options(impls=("autotune",), device="cpu")
    (row,) = benchmark.bench_problem("tiny", problem, [5], opts,
                                     {"copy_bw_bytes_per_s": 1e12, "bf16_flops_per_s": 1e14})
    assert row["status"]["autotune"] == "WRONG"
    assert row["notes"]["autotune"].endswith("every token routes as the fp32 oracle does")


# ----------------------------------------------------------------------------- writers

def test_device_slug():
    assert benchmark.device_slug("NVIDIA H200") == "h200"
    assert benchmark.device_slug("NVIDIA H100 80GB HBM3") == "h100-80gb-hbm3"
    assert benchmark.device_slug("") == "gpu"


def test_markdown_table():
    md = benchmark.markdown_table(synthetic_result())
    lines = md.splitlines()
    header = next(line for line in lines if line.startswith("| preset"))
    assert header == ("| preset | T | floor ms | autotune ms | ×floor | grouped_mm ms | ×floor "
                      "| triton ms | ×floor | reference ms | ×floor |")
    body = [line for line in lines if line.startswith("| nemotron")]
    assert len(body) == 6
    first = body[0].split(" | ")
    assert first[:3] == ["| nemotron-3-super", "1", "0.06"]
    assert first[3:5] == ["n/a", ""]
    assert first[5:7] == ["0.18", "3.00×"]
    assert first[9] == "3*" and first[10] == "50.00× |"  # eager-timed reference
    assert "WRONG | err 0.5" in body[1]
    assert "| — |" in body[2]  # reference not timed at T=8192
    assert "- autotune: RuntimeError: no kernels yet (nemotron-3-super T=1" in md
    assert "TB/s" in md and "TFLOP/s" in md and "`python -m autotune bench" in md


def test_write_results(tmp_path):
    result = synthetic_result()
    paths = benchmark.write_results(result, tmp_path / "out")
    assert {p.name for p in paths.values()} == {
        "bench_h200_2025-11-28.json", "bench_h200_2025-11-28.md", "bench_h200_2025-11-28.png"}
    doc = json.loads(paths["json"].read_text())
    for key in ("device", "torch", "date", "copy_bw_bytes_per_s", "bf16_flops_per_s",
                "command", "rows"):
        assert key in doc
    row = doc["rows"][0]
    for key in ("preset", "tokens", "floor_ms", "ms", "p20_ms", "p80_ms", "rel_err"):
        assert key in row
    assert set(row["ms"]) == set(benchmark.IMPLS)
    assert row["ms"]["autotune"] is None and row["status"]["autotune"] == "n/a"
    assert row["ms"]["grouped_mm"] == pytest.approx(0.18)
    assert paths["md"].read_text() == benchmark.markdown_table(result)
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    again = benchmark.write_results(result, tmp_path / "out")  # same day: no overwrite
    assert again["json"].name == "bench_h200_2025-11-28_2.json"


def test_sanitize_drops_non_finite():
    result = synthetic_result()
    result["rows"][0]["rel_err"]["triton"] = math.nan
    result["rows"][0]["ms"]["triton"] = math.inf
    benchmark._sanitize(result)
    assert result["rows"][0]["rel_err"]["triton"] is None
    json.dumps(result, allow_nan=False)


# ----------------------------------------------------------------------------- GPU

@pytest.mark.gpu
def test_run_benchmark_small_problem_on_gpu(tmp_path):
    problem = LatentMoEProblem(hidden_size=256, latent_size=128, intermediate_size=192,
                               num_experts=16, top_k=4, routed_scaling_factor=2.5)
    opts = benchmark.Options(impls=benchmark.IMPLS, rotate=2, replays=3)
    result = benchmark.run_benchmark(
        [("small", problem), ("small+swiglu", problem.with_(activation="swiglu",
                                                            scoring="softmax"))],
        [1, 77], opts, command="test")
    assert result["copy_bw_bytes_per_s"] > 1e11 and result["bf16_flops_per_s"] > 1e12
    for row in result["rows"]:
        for name in ("grouped_mm", "triton", "reference"):
            assert row["status"][name] == "ok", (name, row)
            assert row["ms"][name] > 0 and row["rel_err"][name] <= 1e-2
        assert row["status"]["autotune"] in ("ok", "n/a")
    paths = benchmark.write_results(result, tmp_path)
    assert paths["png"].exists()
