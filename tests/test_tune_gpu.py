"""A tiny real tuning run on an sm90 GPU: real compiles, the real evaluator, a real table."""

from __future__ import annotations

import pytest
import torch

from autotune import cache
from autotune.bench import time_graph
from autotune.cache import read_table
from autotune.problem import LatentMoEProblem
from autotune.space import KernelConfig
from autotune.tune import GpuEvaluator, format_report, run_tuning
from autotune.workload import make_inputs, reference_output, rel_error

pytestmark = [pytest.mark.gpu, pytest.mark.slow]

# SwiGLU without latent projections: both grouped stages use the identity epilogue, so the four
# candidates below are four compiles (the three untuned defaults are shared with other tests).
PROBLEM = LatentMoEProblem(hidden_size=1024, latent_size=None, intermediate_size=512,
                           num_experts=16, top_k=4, activation="swiglu")
EXTRA = "sm90_bf16_128x128x64_c1x1_coop"
BUCKETS = (8, 512)


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    root = tmp_path_factory.mktemp("tune")
    report = run_tuning(PROBLEM, "sm90", stages=["up", "down"], buckets=BUCKETS, trials=4,
                        configs=[EXTRA], progress=False, cache_dir=root)
    print(format_report(report))
    return report, root


def _call(config: KernelConfig, inputs, out):
    from autotune.runtime import load

    kernel = load(config, compile_if_missing=False)
    return lambda: kernel.grouped_mm(inputs.a, inputs.b, inputs.offs, out=out)


def test_every_bucket_has_a_correct_winner(tuned):
    report, _ = tuned
    assert report.timed and all(r.ok for r in report.compiled), report.compiled
    assert len(report.results) == 4
    for r in report.results:
        assert r.winner is not None, r
        assert r.evaluated == 4 and not r.failures, r.failures
        assert r.peer_ms is not None and r.peer_ms > 0
        config = KernelConfig.from_dict(r.winner.config)
        gen = torch.Generator(device="cuda").manual_seed(1234 + r.bucket)
        inputs = make_inputs(PROBLEM, r.stage, r.bucket, generator=gen, device="cuda")
        out = inputs.empty_out(float("nan"))
        _call(config, inputs, out)()
        torch.cuda.synchronize()
        assert rel_error(out, reference_output(inputs)) <= 1e-2


def test_winner_is_no_slower_than_the_default(tuned):
    report, _ = tuned
    for r in report.results:
        assert r.default is not None and r.winner.median_ms <= r.default.median_ms
        if r.winner.name == r.default.name:
            continue
        # Re-measured now, on the same inputs: within noise of the tuning's verdict.
        gen = torch.Generator(device="cuda").manual_seed(99)
        inputs = make_inputs(PROBLEM, r.stage, r.bucket, generator=gen, device="cuda")
        times = {}
        for which in (r.winner, r.default):
            out = inputs.empty_out()
            fn = _call(KernelConfig.from_dict(which.config), inputs, out)
            fn()
            times[which.name] = time_graph([fn], replays=30).median_ms
        assert times[r.winner.name] <= 1.15 * times[r.default.name], (r.stage, r.bucket, times)


def test_table_is_written_and_used_by_the_runtime_lookup(tuned, monkeypatch):
    report, root = tuned
    assert report.table_path is not None and report.table_path.parent == root / "tuned"
    table = read_table(report.table_path)
    assert table.metadata["timing_method"] == cache.TIMING_METHOD
    assert table.metadata["torch_version"] == torch.__version__
    for r in report.results:
        entry = table.entries[r.stage][r.bucket]
        assert entry.winner.name == r.winner.name and entry.default_ms is not None
        assert entry.p20_ms <= entry.median_ms <= entry.p80_ms
    monkeypatch.setenv("AUTOTUNE_CONFIG_DIR", str(root / "tuned"))
    cache.clear_cache()
    looked_up = cache.tuned_table(PROBLEM, "sm90")
    assert looked_up.source == report.table_path
    assert looked_up.config_for("up", 5).name == report.result("up", 8).winner.name
    assert looked_up.config_for("down", 4096).name == report.result("down", 512).winner.name
    cache.clear_cache()


def test_layer_check_timed_each_bucket_in_the_whole_forward(tuned):
    report, root = tuned
    assert [c.bucket for c in report.layer_checks] == list(BUCKETS)
    table = read_table(report.table_path)
    for c in report.layer_checks:
        assert c.kept in ("tuned", "previous", "same") and not c.note, c
        if c.kept != "same":
            assert c.tuned_ms > 0 and c.previous_ms > 0
        # (Before the rerun below, which rewrites the table with its own checks.)
        assert table.metadata["layer_check"][str(c.bucket)]["kept"] == c.kept


def test_rerun_resumes_without_new_trials(tuned):
    report, root = tuned

    class Counting(GpuEvaluator):
        calls = 0

        def evaluate(self, *args, **kwargs):
            Counting.calls += 1
            return super().evaluate(*args, **kwargs)

    again = run_tuning(PROBLEM, "sm90", stages=["up", "down"], buckets=BUCKETS, trials=4,
                       configs=[EXTRA], progress=False, cache_dir=root,
                       evaluator=Counting(PROBLEM))
    assert Counting.calls == 0
    # Where the first run kept its winners, the rerun finds them in the table: the same plan,
    # nothing to time in the layer. (Where it kept the defaults, the rerun checks again.)
    kept = {c.bucket for c in report.layer_checks if c.kept != "previous"}
    assert all(c.kept == "same" for c in again.layer_checks if c.bucket in kept)
    assert ([r.winner.name for r in again.results if r.bucket in kept]
            == [r.winner.name for r in report.results if r.bucket in kept])
