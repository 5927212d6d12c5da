"""The tuner's bookkeeping on the CPU, and the workload it times.

A deterministic stand-in evaluator replaces the GPU here: these tests check studies, storage,
resume, workers and selection, not kernels (tests/test_tune_gpu.py runs the real evaluator).
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import optuna
import pytest
import torch
from optuna.trial import FixedTrial, TrialState

from autotune import tune
from autotune.cache import DeviceInfo, read_table, tuning_key
from autotune.problem import LatentMoEProblem, preset
from autotune.runtime import group_arrays
from autotune.space import (
    DEFAULT_ORDER,
    TILE_ORDERS,
    KernelConfig,
    Sm80Config,
    Sm100Config,
    TileOrder,
    gemv_configs,
    invalid_reason,
    is_gemv,
    multicast_variant,
    valid,
)
from autotune.tune import (
    Failure,
    GpuEvaluator,
    Measurement,
    TuningReport,
    format_report,
    plot_report,
    run_tuning,
    select_candidates,
    stage_spaces,
    study_name,
)
from autotune.workload import (
    PLAN_FIELD,
    PLAN_INDEX,
    bucket_for,
    default_config,
    default_plan,
    make_inputs,
    parse_tokens,
    reference_output,
    rel_error,
    route_sizes,
    stage_shape,
    stages_of,
    token_buckets,
)

ROOT = Path(__file__).resolve().parent.parent
TESTS = Path(__file__).resolve().parent
PROBLEM = LatentMoEProblem(hidden_size=512, latent_size=256, intermediate_size=384,
                           num_experts=8, top_k=2)
DEVICE = DeviceInfo("NVIDIA Test GPU", 132, 13)


# --------------------------------------------------------------------------------------------
# The stand-in evaluator (module level: worker subprocesses import it)
# --------------------------------------------------------------------------------------------

def fake_ms(name: str, stage: str, tokens: int) -> float:
    """A deterministic, config-dependent time per call."""
    h = int.from_bytes(hashlib.sha256(f"{name}|{stage}|{tokens}".encode()).digest()[:4],
                       "little")
    return 0.01 + (h % 10000) / 1e5 * (1 + tokens / 64)


@dataclass
class StandIn:
    """Evaluator stand-in: fake compile errors, wrong kernels, crashes, interrupts and kills."""

    device: DeviceInfo = DEVICE
    compile_fail: frozenset = frozenset()
    wrong: frozenset = frozenset()
    crash: frozenset = frozenset()
    interrupt_after: int | None = None
    exit_after: int | None = None
    delay: float = 0.0
    log_path: str | None = None
    calls: list = field(default_factory=list)
    prepared: list = field(default_factory=list)
    orders: list = field(default_factory=list)  # (config, stage, tokens, order tag) calls
    order_gain: dict = field(default_factory=dict)  # order tag -> time factor
    order_drift: float = 1.0  # time factor of every tile-order study's evaluation
    multicast_gain: float = 1.0  # a multicast variant's time over its c1x1 tile's (1: a tie)
    fast: frozenset = frozenset()  # configs (and their variants) made 100 times faster
    layer_penalty: dict = field(default_factory=dict)  # config name -> ms it adds in the layer
    layer_calls: list = field(default_factory=list)  # (tokens, plans) of each layer check

    def prepare(self, configs, jobs=None, on_done=None):
        out = {}
        for c in configs:
            self.prepared.append(c.name)
            out[c.name] = f"nvcc: error in {c.name}" if c.name in self.compile_fail else None
            if on_done:
                on_done(c.name, out[c.name])
        return out

    def evaluate(self, config, stage, tokens, order=None):
        if self.interrupt_after is not None and len(self.calls) >= self.interrupt_after:
            raise KeyboardInterrupt
        if self.exit_after is not None and len(self.calls) >= self.exit_after:
            os._exit(3)  # a kill: no cleanup, the trial stays RUNNING in the storage
        assert valid(config, PROBLEM), f"invalid config reached the evaluator: {config.name}"
        self.calls.append((config.name, stage, tokens))
        if self.log_path:
            line = json.dumps({"pid": os.getpid(), "stage": stage, "tokens": tokens,
                               "config": config.name}) + "\n"
            with open(self.log_path, "a", encoding="utf-8") as f:
                f.write(line)
        if self.delay:
            time.sleep(self.delay)
        if config.name in self.crash:
            raise RuntimeError("launch failed: misaligned address")
        if config.name in self.wrong:
            return Failure("wrong", "relative error 0.7 > 0.01 against the fp32 reference")
        if order is not None:
            self.orders.append((config.name, stage, tokens, order.tag))
        t = self._ms(config, stage, tokens, order)
        return Measurement(t, 0.98 * t, 1.03 * t, 20, 1e-3)

    def _ms(self, config, stage, tokens, order=None):
        single = (replace(config, cluster_m=1, cluster_n=1)
                  if isinstance(config, KernelConfig) else None)
        variant = single is not None and multicast_variant(single) == config
        base = single.name if variant else config.name
        t = fake_ms(base, stage, tokens) * (self.multicast_gain if variant else 1.0)
        t *= 0.01 if base in self.fast else 1.0
        if order is not None:
            t *= self.order_gain.get(order.tag, 1.0) * self.order_drift
        return t

    def layer(self, plans, tokens):
        """The stages' times added up, plus ``layer_penalty`` for the configs it names."""
        self.layer_calls.append((tokens, tuple(plans)))
        out = []
        for plan in plans:
            t = 0.0
            for stage in stages_of(PROBLEM):
                config = getattr(plan, PLAN_FIELD[stage])
                order = plan.orders[PLAN_INDEX[stage]]
                t += (self._ms(config, stage, tokens, None if order == DEFAULT_ORDER else order)
                      + self.layer_penalty.get(config.name, 0.0))
            out.append(Measurement(t, 0.98 * t, 1.03 * t, 60))
        return out

    def peer(self, stage, tokens):
        return Measurement(0.5, 0.49, 0.52, 20)


def _worker_main(spec: dict) -> None:
    """Entry of a worker subprocess: wait for the others, then tune with the stand-in."""
    barrier = Path(spec["barrier"]) if spec.get("barrier") else None
    if barrier is not None:
        (barrier / f"ready-{os.getpid()}").touch()
        deadline = time.monotonic() + 60
        while len(list(barrier.glob("ready-*"))) < spec["workers"]:
            if time.monotonic() > deadline:
                raise SystemExit("barrier timeout")
            time.sleep(0.01)
    evaluator = StandIn(log_path=spec["log"], delay=spec.get("delay", 0.0),
                        exit_after=spec.get("exit_after"))
    run_tuning(PROBLEM, stages=spec["stages"], buckets=spec["buckets"], trials=spec["trials"],
               storage=spec["storage"], worker=spec["worker"], evaluator=evaluator,
               progress=False, max_configs=spec["max_configs"])


def _spawn(spec: dict, cache: Path) -> subprocess.Popen:
    code = (f"import sys; sys.path[:0] = {[str(ROOT), str(TESTS)]!r}; import test_tune; "
            f"test_tune._worker_main({spec!r})")
    env = {**os.environ, "AUTOTUNE_CACHE_DIR": str(cache)}
    return subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _wait(procs, expect_rc=0) -> None:
    for p in procs:
        out, _ = p.communicate(timeout=180)
        assert p.returncode == expect_rc, out


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("AUTOTUNE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("AUTOTUNE_CONFIG_DIR", raising=False)
    from autotune import cache

    monkeypatch.setattr(cache, "runtime_versions", lambda: {
        "package_version": "test", "nvcc_version": None, "cutlass_version": None})
    cache.clear_cache()
    yield
    cache.clear_cache()


def _key() -> str:
    return tuning_key(PROBLEM, "sm90", DEVICE)


def _studies(storage, stage=None, kind=None):
    """(stage, bucket) -> study for every config study in ``storage`` (``kind`` "order" or
    "multicast": those refinement studies instead)."""
    out = {}
    for s in optuna.get_all_study_summaries(storage):
        _, st, bucket, *rest = s.study_name.split("|")
        if (rest[2:3] or [None])[0] != kind:
            continue
        if stage is None or st == stage:
            out[(st, int(bucket[1:]))] = optuna.load_study(study_name=s.study_name,
                                                           storage=storage)
    return out


def _evaluated(study):
    return [t for t in study.get_trials(deepcopy=False)
            if t.state.is_finished() and t.user_attrs.get("outcome") in tune._EVALUATED]


def _journal(tmp_path) -> str:
    return str(tmp_path / "cache" / "tuning" / f"{_key()}.journal")


def _storage(path: str):
    return tune.open_storage(path, _key())


# --------------------------------------------------------------------------------------------
# Buckets, stages, workload
# --------------------------------------------------------------------------------------------

def test_token_buckets_are_powers_of_two_and_midpoints():
    b = token_buckets()
    assert b[:14] == (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128)
    assert b[-4:] == (6144, 8192, 12288, 16384)
    assert len(b) == 28 and list(b) == sorted(set(b))
    assert token_buckets(8) == (1, 2, 3, 4, 6, 8)


@pytest.mark.parametrize("text,expect", [("1,8,64", (1, 8, 64)), ("64, 8,8", (8, 64)),
                                         (None, token_buckets()), ("all", token_buckets()),
                                         ([3, 1], (1, 3))])
def test_parse_tokens(text, expect):
    assert parse_tokens(text) == expect


@pytest.mark.parametrize("text", ["1,x", "0", "-4", ","])
def test_parse_tokens_rejects_bad_input(text):
    with pytest.raises(ValueError, match="--tokens"):
        parse_tokens(text)


@pytest.mark.parametrize("tokens,expect", [(0, 4), (1, 4), (4, 4), (5, 64), (64, 64),
                                           (65, 1024), (1024, 1024), (5000, 1024)])
def test_bucket_for_is_smallest_bucket_at_least_tokens_clamped(tokens, expect):
    assert bucket_for(tokens, (4, 64, 1024)) == expect


def test_bucket_for_rejects_bad_arguments():
    with pytest.raises(ValueError, match="tokens"):
        bucket_for(-1, (1, 2))
    with pytest.raises(ValueError, match="buckets"):
        bucket_for(3, ())


def test_stage_shapes_of_the_super_preset():
    p = preset("nemotron-3-super")
    assert stages_of(p) == ("fc1", "up", "down", "fc2")
    up, down = stage_shape(p, "up"), stage_shape(p, "down")
    assert (up.groups, up.n, up.k, up.epilogue, up.rows(10)) == (512, 2688, 1024, "relu2", 220)
    assert (down.n, down.k, down.epilogue) == (1024, 2688, "identity")
    fc1, fc2 = stage_shape(p, "fc1"), stage_shape(p, "fc2")
    # The router's fp32 gate weight rides along as bf16 hi + lo parts: N = latent + 2E.
    assert (fc1.grouped, fc1.n, fc1.k, fc1.epilogue, fc1.rows(10)) == (False, 2048, 4096,
                                                                        "f32", 10)
    assert (fc2.n, fc2.k, fc2.epilogue) == (4096, 1024, "identity")
    # The concatenated router weight is padded to 8 rows, as the pipeline does.
    assert stage_shape(PROBLEM.with_(num_experts=5), "fc1").n == 272  # 256 + 10 -> 272


def test_stages_without_latent_and_with_swiglu():
    plain = PROBLEM.with_(latent_size=None, activation="swiglu")
    assert stages_of(plain) == ("up", "down")
    assert stage_shape(plain, "up").n == 2 * 384 and stage_shape(plain, "up").k == 512
    assert stage_shape(plain, "up").epilogue == "identity"
    with pytest.raises(ValueError, match="stage 'fc1'"):
        stage_shape(plain, "fc1")


@pytest.mark.parametrize("routing", ["uniform", "skewed"])
@pytest.mark.parametrize("tokens", [1, 7, 300])
def test_route_sizes_sum_to_tokens_times_top_k(routing, tokens):
    p = PROBLEM.with_(num_experts=64, top_k=6)
    gen = torch.Generator().manual_seed(3)
    sizes = route_sizes(p, tokens, routing, generator=gen)
    assert sizes.shape == (64,) and sizes.dtype == torch.int64
    assert int(sizes.sum()) == tokens * 6 and int(sizes.max()) <= tokens
    again = route_sizes(p, tokens, routing, generator=torch.Generator().manual_seed(3))
    assert torch.equal(sizes, again)


def test_skewed_routing_concentrates_on_hot_experts():
    p = PROBLEM.with_(num_experts=128, top_k=8)
    uni = route_sizes(p, 4096, "uniform", generator=torch.Generator().manual_seed(0))
    skew = route_sizes(p, 4096, "skewed", generator=torch.Generator().manual_seed(0))
    top = lambda s: s.sort(descending=True).values[:8].sum() / s.sum()  # noqa: E731
    assert top(skew) > 2 * top(uni)
    with pytest.raises(ValueError, match="routing"):
        route_sizes(p, 4, "zipf", generator=torch.Generator())


@pytest.mark.parametrize("stage", ["fc1", "up", "down", "fc2"])
@pytest.mark.parametrize("tokens", [1, 13])
def test_inputs_and_reference(stage, tokens):
    gen = torch.Generator().manual_seed(11)
    inp = make_inputs(PROBLEM, stage, tokens, generator=gen)
    shape = stage_shape(PROBLEM, stage)
    assert inp.a.dtype == torch.bfloat16 and inp.a.shape == (shape.rows(tokens), shape.k)
    assert not (inp.a == 0).any() and not (inp.b == 0).any()
    ref = reference_output(inp)
    assert ref.dtype == torch.float32 and ref.shape == (shape.rows(tokens), shape.n)
    a, b = inp.a.float(), inp.b.float()
    if inp.offs is None:
        expect = a @ b.T
    else:
        assert int(inp.offs[-1]) == shape.rows(tokens)
        ends = [0] + inp.offs.tolist()
        expect = torch.cat([a[ends[g]:ends[g + 1]] @ b[g].T for g in range(shape.groups)])
    if shape.epilogue == "relu2":
        expect = torch.relu(expect) ** 2
    assert torch.allclose(ref, expect, rtol=1e-5, atol=1e-5)
    # Scaled so outputs are O(1) whatever K is (relu2 squares them).
    assert 0.1 < ref.abs().mean() < 10
    assert inp.empty_out(float("nan")).dtype == (torch.float32 if stage == "fc1"
                                                 else torch.bfloat16)


def test_rel_error_flags_nan_and_measures_error():
    x = torch.ones(4, 4)
    assert rel_error(x, x) == 0.0
    assert rel_error(x * 1.01, x) == pytest.approx(0.01)
    y = x.clone()
    y[0, 0] = float("nan")
    assert rel_error(y, x) == float("inf")


def test_default_configs_are_valid_for_every_stage_and_bucket():
    for p in (PROBLEM, preset("nemotron-3-super"), PROBLEM.with_(activation="swiglu")):
        for stage in stages_of(p):
            for t in (0, *token_buckets(), 100000):
                c = default_config(p, stage, t)
                assert invalid_reason(c, p) is None, (stage, t, c.name)


# --------------------------------------------------------------------------------------------
# Candidates, spaces, samplers, naming
# --------------------------------------------------------------------------------------------

def test_select_candidates_keeps_defaults_and_caps():
    cands = select_candidates(PROBLEM, "sm90", 12)
    names = {c.name for c in cands}
    # 12 tensor-core tiles, and the gemv decode kernels beyond the cap.
    assert len(cands) == 16 == len(names)
    assert [c for c in cands if is_gemv(c)] == gemv_configs()
    for stage in stages_of(PROBLEM):
        for t in token_buckets():
            assert default_config(PROBLEM, stage, t).with_epilogue("identity").name in names
    assert all(c.epilogue == "identity" and valid(c, PROBLEM) for c in cands)
    assert {c.swap_ab for c in cands} == {False, True}
    # The wide ping-pong tiles come right after the default configs, under any cap that leaves
    # room past them.
    names = {c.name for c in select_candidates(PROBLEM, "sm90")}
    assert {"sm90_bf16_128x192x64_c1x1_pp", "sm90_bf16_64x256x64_c1x1_pp"} <= names
    every = select_candidates(PROBLEM, "sm90", None)
    assert len(every) == len({c.name for c in every}) > 64


def test_select_candidates_explicit_configs():
    cands = select_candidates(PROBLEM, "sm90", configs=["sm90_bf16_128x128x64_c1x1_coop"])
    assert "sm90_bf16_128x128x64_c1x1_coop" in {c.name for c in cands}
    with pytest.raises(ValueError, match="sm90_bf16_64x64x64_c1x1_coop"):
        select_candidates(PROBLEM, "sm90", configs=["sm90_bf16_64x64x64_c1x1_coop"])
    with pytest.raises(ValueError, match="max_configs"):
        select_candidates(PROBLEM, "sm90", 0)


def test_small_space_is_brute_force_and_large_is_tpe():
    small = stage_spaces(PROBLEM, "sm90", ["up"], max_configs=16)["up"]
    large = stage_spaces(PROBLEM, "sm90", ["up"], max_configs=None)["up"]
    assert small.brute_force and len(small.configs) == 16 + len(gemv_configs())
    assert not large.brute_force and len(large.configs) > tune.BRUTE_FORCE_MAX
    assert isinstance(tune._sampler(small, "s", 8), optuna.samplers.BruteForceSampler)
    assert isinstance(tune._sampler(large, "s", 8), optuna.samplers.TPESampler)
    assert all(c.epilogue == "relu2" for c in small.configs)
    assert small.digest != large.digest


def test_decode_rejects_invalid_points_with_the_reason():
    space = stage_spaces(PROBLEM, "sm90", ["down"], max_configs=None)["down"]
    bad = {"tile_m": 64, "tile_n": 128, "tile_k": 64, "cluster": "1x1",
           "schedule": "cooperative", "swap_ab": False}
    point, runtime = space.decode(FixedTrial(bad))
    assert isinstance(point, str) and "cooperative needs tile M" in point and runtime == {}
    good = space.params_of(space.configs[3])
    point, _ = space.decode(FixedTrial(good))
    assert point == space.configs[3]
    assert space.name_of(good) == space.configs[3].name


def test_study_names_carry_key_stage_and_bucket():
    key = _key()
    a, b = study_name(key, "up", 8), study_name(key, "up", 16)
    c = study_name(key, "down", 8)
    assert len({a, b, c}) == 3
    assert a.startswith(key) and "|up|" in a and "|t8|" in a + "|"
    assert "sm90" in key and "nvidia-test-gpu-132sm" in key and "cuda13" in key
    assert study_name(key, "up", 8, "skewed") != a


# --------------------------------------------------------------------------------------------
# Runs with the stand-in evaluator
# --------------------------------------------------------------------------------------------

def test_run_records_winners_and_writes_the_table(tmp_path):
    ev = StandIn()
    report = run_tuning(PROBLEM, stages=["up", "fc2"], buckets=[4, 64], trials=6,
                        evaluator=ev, progress=False, max_configs=10)
    assert isinstance(report, TuningReport) and report.timed
    # Evaluations at a tile order are the refinements' (orders, multicast variant).
    refined = collections.Counter((s, t) for _, s, t, _ in ev.orders)
    assert len(report.results) == 4 and len(ev.calls) == 4 * 6 + sum(refined.values())
    # 10 tiles, their multicast variants and 4 gemv kernels x 2 epilogues, each once.
    spaces = stage_spaces(PROBLEM, "sm90", ["up", "fc2"], 10)
    built = {c.name for s in spaces.values() for c in (*s.configs, *s.variants)}
    assert len(built) == 28 + 2 * len(spaces["up"].variants)
    # With them, the plans the layer check times them against: every stage's defaults here.
    plans = {c.name for b in (4, 64) for c in default_plan(PROBLEM, b).configs()}
    assert set(ev.prepared) == built | plans and len(ev.prepared) == len(built | plans)
    for r in report.results:
        # The stand-in times a variant like its c1x1 tile: a tie, which the c1x1 tile keeps.
        timed = sorted({(fake_ms(n, s, t), n) for n, s, t in ev.calls
                        if (s, t) == (r.stage, r.bucket) and n in spaces[s].by_name})
        assert r.winner.name == timed[0][1]
        # Second: the next candidate, or the winner's multicast variant timed beside it.
        variant = multicast_variant(spaces[r.stage].by_name[r.winner.name])
        assert r.runner_up.name in {timed[1][1], variant and variant.name}
        assert r.default is not None and r.default.name == r.default_name
        assert r.peer_ms == 0.5 and r.evaluated == 6 + refined[(r.stage, r.bucket)]
    table = read_table(report.table_path)
    assert table.config_for("up", 3).name == report.result("up", 4).winner.name
    assert table.config_for("fc2", 1000).name == report.result("fc2", 64).winner.name
    text = format_report(report)
    assert report.result("up", 64).winner.name in text and "x dflt" in text
    png = plot_report(report, tmp_path / "plot" / "r.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _all_but(name: str, stage: str) -> dict:
    """A layer penalty for every candidate of ``stage`` but ``name``."""
    space = stage_spaces(PROBLEM, "sm90", [stage], 10)[stage]
    return {c.name: 1.0 for c in (*space.configs, *space.variants) if c.name != name}


def test_layer_check_keeps_the_tuned_plan_where_it_is_faster():
    ev = StandIn()
    report = run_tuning(PROBLEM, stages=["up"], buckets=[64], trials=6, evaluator=ev,
                        progress=False, max_configs=10)
    (check,) = report.layer_checks
    assert (check.bucket, check.kept, check.previous) == (64, "tuned", "default configs")
    assert check.tuned_ms < check.previous_ms
    (tokens, (old, new)), = ev.layer_calls
    assert tokens == 64 and old == default_plan(PROBLEM, 64)
    assert new.up.name == report.result("up", 64).winner.name and new.fc2 == old.fc2
    table = read_table(report.table_path)
    assert table.entries["up"][64].winner.name == new.up.name
    assert table.metadata["layer_check"]["64"]["kept"] == "tuned"
    assert "layer check" in format_report(report)


def test_layer_check_keeps_the_default_plan_where_the_winner_slows_the_layer():
    default = default_config(PROBLEM, "up", 64)
    ev = StandIn(layer_penalty=_all_but(default.name, "up"))
    report = run_tuning(PROBLEM, stages=["up"], buckets=[64], trials=6, evaluator=ev,
                        progress=False, max_configs=10)
    (check,) = report.layer_checks
    assert check.kept == "previous" and check.previous_ms < check.tuned_ms
    r = report.result("up", 64)
    # The default's own time in the study goes into the table with it.
    assert r.winner == r.default and r.winner.name == default.name
    entry = read_table(report.table_path).entries["up"][64]
    assert entry.winner.name == default.name and entry.median_ms == r.default.median_ms


def test_layer_check_keeps_the_previous_tables_entry(tmp_path):
    # A first run whose winner is made fast writes the table; a second run (a fresh journal)
    # finds another winner, which the layer finds slower than the first table's.
    first = run_tuning(PROBLEM, stages=["up"], buckets=[64], trials=6, progress=False,
                       evaluator=StandIn(), max_configs=10,
                       storage=str(tmp_path / "first.journal"))
    space = stage_spaces(PROBLEM, "sm90", ["up"], 10)["up"]
    other = next(c.name for c in space.configs if c.name != first.result("up", 64).winner.name
                 and c.name != first.result("up", 64).default_name)
    run_tuning(PROBLEM, stages=["up"], buckets=[64], trials=6, progress=False,
               evaluator=StandIn(fast=frozenset({other})), max_configs=10,
               storage=str(tmp_path / "fast.journal"))
    kept = read_table(first.table_path).entries["up"][64]
    assert kept.winner.name == other
    ev = StandIn(layer_penalty=_all_but(other, "up"))
    again = run_tuning(PROBLEM, stages=["up"], buckets=[64], trials=6, progress=False,
                       evaluator=ev, max_configs=10, storage=str(tmp_path / "again.journal"))
    (check,) = again.layer_checks
    assert check.kept == "previous" and check.previous.startswith("table ")
    assert again.result("up", 64).winner.name == other
    entry = read_table(again.table_path).entries["up"][64]
    # The winner's times are those of the run that timed it in its study.
    assert ((entry.winner, entry.order, entry.median_ms, entry.p20_ms, entry.p80_ms)
            == (kept.winner, kept.order, kept.median_ms, kept.p20_ms, kept.p80_ms))


def test_layer_check_needs_the_previous_plan_built():
    fc1 = default_plan(PROBLEM, 64).router.name  # not tuned in this run, but in both plans
    ev = StandIn(compile_fail=frozenset({fc1}))
    report = run_tuning(PROBLEM, stages=["up"], buckets=[64], trials=6, evaluator=ev,
                        progress=False, max_configs=10)
    (check,) = report.layer_checks
    assert check.kept == "tuned" and fc1 in check.note and ev.layer_calls == []
    assert fc1 in format_report(report)


def test_a_first_run_keeps_the_shipped_tables_other_buckets(tmp_path, monkeypatch):
    from autotune import cache

    shipped = run_tuning(PROBLEM, stages=["up"], buckets=[4, 64], trials=3, progress=False,
                         evaluator=StandIn(), max_configs=10, cache_dir=tmp_path / "ship")
    monkeypatch.setattr(cache, "_shipped_dir", lambda: shipped.table_path.parent)
    cache.clear_cache()
    report = run_tuning(PROBLEM, stages=["up"], buckets=[16], trials=3, progress=False,
                        evaluator=StandIn(), max_configs=10)
    assert report.table_path.parent != shipped.table_path.parent
    written = read_table(report.table_path)
    assert sorted(written.entries["up"]) == [4, 16, 64]
    old = read_table(shipped.table_path).entries["up"]
    assert written.entries["up"][4] == old[4] and written.entries["up"][64] == old[64]


def test_runs_that_write_no_table_do_no_layer_check(tmp_path):
    ev = StandIn()
    report = run_tuning(PROBLEM, stages=["up"], buckets=[64], trials=0, evaluator=ev,
                        progress=False, max_configs=10)
    assert report.layer_checks == () and ev.layer_calls == []


def test_gemv_is_skipped_where_it_would_stream_the_weights_again(tmp_path):
    ev = StandIn()
    run_tuning(PROBLEM, stages=["fc2"], buckets=[1, 64], trials=16, evaluator=ev,
               progress=False, max_configs=12)
    gemv = {c.name for c in gemv_configs()}
    timed = {(n, t) for n, _, t in ev.calls}
    assert all((n, 1) in timed for n in gemv)  # one row per pass: timed
    assert not any((n, 64) in timed for n in gemv)  # 16 to 64 passes: skipped
    study = _studies(_storage(_journal(tmp_path)))[("fc2", 64)]
    skipped = [t for t in study.trials if t.user_attrs.get("outcome") == "skipped"]
    assert {t.user_attrs["config"] for t in skipped} == gemv
    assert all("stream the weights" in t.user_attrs["skip_reason"] for t in skipped)
    assert sum(t.user_attrs.get("outcome") == "timed" for t in study.trials) == 12


def test_default_config_is_measured_first():
    ev = StandIn()
    run_tuning(PROBLEM, stages=["down"], buckets=[2, 2048], trials=1, evaluator=ev,
               progress=False, max_configs=8)
    for bucket in (2, 2048):
        first = next(c[0] for c in ev.calls if c[2] == bucket)
        assert first == default_config(PROBLEM, "down", bucket).name


def test_timing_is_one_attribute_and_older_flat_fields_still_read(tmp_path):
    ev = StandIn()
    report = run_tuning(PROBLEM, stages=["up"], buckets=[64], trials=3, evaluator=ev,
                        progress=False, max_configs=8)
    study = _studies(_storage(_journal(tmp_path)), "up")[("up", 64)]
    timed = [t for t in study.trials if t.user_attrs.get("outcome") == "timed"]
    assert timed and all(set(t.user_attrs["timing"]) >= {"median_ms", "p20_ms", "p80_ms"}
                         and "p20_ms" not in t.user_attrs for t in timed)
    winner = report.result("up", 64).winner
    best = min(timed, key=lambda t: t.value)
    assert winner.p20_ms == best.user_attrs["timing"]["p20_ms"]
    # A study written by an earlier version: the measurement's fields one attribute each.
    space = stage_spaces(PROBLEM, "sm90", ["up"], 8, None)["up"]
    old = optuna.create_study()
    name = space.configs[0].name
    old.add_trial(optuna.trial.create_trial(
        value=0.5, user_attrs={"config": name, "outcome": "timed", "median_ms": 0.5,
                               "p20_ms": 0.49, "p80_ms": 0.52}))
    ranked = tune.collect_result(old, "up", 64, name, space).winner
    assert (ranked.name, ranked.p20_ms, ranked.p80_ms) == (name, 0.49, 0.52)


def test_failures_are_recorded_and_never_selected(tmp_path):
    space = stage_spaces(PROBLEM, "sm90", ["down"], max_configs=10)["down"]
    times = sorted((fake_ms(c.name, "down", 16), c.name) for c in space.configs)
    fastest, second, third = (n for _, n in times[:3])
    ev = StandIn(compile_fail=frozenset({fastest}), wrong=frozenset({second}),
                 crash=frozenset({third}))
    report = run_tuning(PROBLEM, stages=["down"], buckets=[16], trials=len(space.configs),
                        evaluator=ev, progress=False, max_configs=10)
    r = report.result("down", 16)
    assert r.winner.name == times[3][1]
    kinds = {name: (kind, msg) for name, kind, msg in r.failures}
    assert kinds[fastest][0] == "compile" and "nvcc: error" in kinds[fastest][1]
    assert kinds[second][0] == "wrong" and "relative error" in kinds[second][1]
    assert kinds[third][0] == "error" and "misaligned" in kinds[third][1]
    assert fastest not in {c[0] for c in ev.calls}  # a failed compile is never evaluated
    assert not any(c.name == fastest for c in report.compiled if c.ok)
    study = _studies(_storage(_journal(tmp_path)))[("down", 16)]
    failed = [t for t in study.trials if t.state == TrialState.FAIL]
    assert {t.user_attrs["config"] for t in failed} == {fastest, second, third}
    assert all(t.user_attrs["error"] for t in failed)
    assert "3 candidate evaluations failed" in format_report(report)


def test_wrong_kernel_is_never_the_winner_even_when_fastest():
    space = stage_spaces(PROBLEM, "sm90", ["up"], max_configs=8)["up"]
    fastest = min(space.configs, key=lambda c: fake_ms(c.name, "up", 8)).name
    report = run_tuning(PROBLEM, stages=["up"], buckets=[8], trials=8,
                        evaluator=StandIn(wrong=frozenset({fastest})), progress=False,
                        max_configs=8)
    r = report.result("up", 8)
    assert r.winner.name != fastest and (r.runner_up is None or r.runner_up.name != fastest)
    assert (fastest, "wrong") in {(n, k) for n, k, _ in r.failures}


def test_invalid_points_never_reach_the_evaluator(tmp_path):
    ev = StandIn()
    run_tuning(PROBLEM, stages=["down"], buckets=[32], trials=14, evaluator=ev,
               progress=False, max_configs=None)
    space = stage_spaces(PROBLEM, "sm90", ["down"], max_configs=None)["down"]
    assert all(name in space.by_name for name, _, _ in ev.calls)
    study = _studies(_storage(_journal(tmp_path)))[("down", 32)]
    assert study.user_attrs["sampler"] == "tpe"
    skipped = 0
    for t in study.trials:
        if t.state == TrialState.PRUNED and t.user_attrs["outcome"] == "skipped":
            # A valid point that does not apply at this bucket (a gemv kernel that would stream
            # the weights too often): settled without the evaluator too. TPE, seeded per
            # process, reaches one in some runs and not in others.
            assert is_gemv(space.by_name[t.user_attrs["config"]]) and t.user_attrs["skip_reason"]
            skipped += 1
        elif t.state == TrialState.PRUNED:
            assert t.user_attrs["outcome"] == "invalid" and t.user_attrs["invalid_reason"]
            assert t.constraints == {"valid": 1.0}
            assert t.user_attrs.get("config") is None
    assert len(_evaluated(study)) + skipped == 14
    assert len(_evaluated(study)) == len(ev.calls) == len({c[0] for c in ev.calls})


def test_interrupted_run_resumes_keeping_finished_trials(tmp_path):
    # Buckets whose grids are one tile wide: no tile-order study adds evaluations here.
    kw = dict(stages=["up", "down"], buckets=[4, 64], trials=6, progress=False, max_configs=9)
    first = StandIn(interrupt_after=9)
    with pytest.raises(KeyboardInterrupt):
        run_tuning(PROBLEM, evaluator=first, **kw)
    storage = _storage(_journal(tmp_path))
    before = {k: [(t.number, t.value, t.user_attrs["config"]) for t in _evaluated(s)]
              for k, s in _studies(storage).items()}
    assert sum(map(len, before.values())) == 9
    second = StandIn()
    report = run_tuning(PROBLEM, evaluator=second, **kw)
    assert len(first.calls) + len(second.calls) == 4 * 6  # nothing re-run
    storage = _storage(_journal(tmp_path))
    for k, study in _studies(storage).items():
        done = _evaluated(study)
        assert len(done) == 6
        kept = [(t.number, t.value, t.user_attrs["config"]) for t in done]
        assert kept[:len(before.get(k, []))] == before.get(k, [])
        names = [t.user_attrs["config"] for t in done]
        assert len(names) == len(set(names))
        assert not study.get_trials(states=(TrialState.RUNNING,))
    assert all(r.evaluated == 6 for r in report.results)
    # A third run finds the budget spent and evaluates nothing.
    third = StandIn()
    run_tuning(PROBLEM, evaluator=third, **kw)
    assert third.calls == []


def test_killed_run_resumes_and_retries_the_lost_trial(tmp_path):
    log = tmp_path / "calls.jsonl"
    spec = dict(stages=["down"], buckets=[8], trials=7, storage=None, worker=False,
                max_configs=9, log=str(log), exit_after=3)
    proc = _spawn(spec, tmp_path / "cache")
    _wait([proc], expect_rc=3)
    study = _studies(_storage(_journal(tmp_path)))[("down", 8)]
    running = study.get_trials(states=(TrialState.RUNNING,))
    assert len(running) == 1 and len(_evaluated(study)) == 3
    lost = running[0]
    ev = StandIn()
    run_tuning(PROBLEM, stages=["down"], buckets=[8], trials=7, evaluator=ev, progress=False,
               max_configs=9)
    study = _studies(_storage(_journal(tmp_path)))[("down", 8)]
    assert study.trials[lost.number].state == TrialState.FAIL
    retries = [t for t in study.trials if t.user_attrs.get("retry_of") == lost.number]
    assert len(retries) == 1 and retries[0].state == TrialState.COMPLETE
    done = [t.user_attrs["config"] for t in _evaluated(study)]
    assert len(done) == 7 == len(set(done)) and len(ev.calls) == 4
    assert not study.get_trials(states=(TrialState.RUNNING,))


def _check_shared_studies(storage, log: Path, trials: int, workers: int) -> None:
    calls = collections.Counter()
    for line in log.read_text().splitlines():
        c = json.loads(line)
        calls[(c["pid"], c["stage"], c["tokens"], c["config"])] += 1
    recorded = collections.Counter()
    for (stage, bucket), study in _studies(storage).items():
        trials_ = study.get_trials(deepcopy=False)
        assert not [t for t in trials_ if t.state == TrialState.RUNNING], "a trial was lost"
        assert sorted(t.number for t in trials_) == list(range(len(trials_)))
        done = _evaluated(study)
        assert trials <= len(done) <= trials + workers - 1
        names = [t.user_attrs["config"] for t in done]
        assert len(names) == len(set(names)), "a config was evaluated twice"
        for t in done:
            recorded[(t.user_attrs["pid"], stage, bucket, t.user_attrs["config"])] += 1
    # Every evaluation is one stored trial and every stored evaluation happened once.
    assert calls == recorded
    assert len({pid for pid, *_ in calls}) == workers, "both workers should have pulled trials"


def _seed_then_two_workers(tmp_path, storage: str, trials: int, delay: float, **kw) -> Path:
    """A first run creates and seeds the studies (``trials=0``); two worker processes, started
    together behind a barrier, then only pull trials. Returns their evaluation log."""
    run_tuning(PROBLEM, trials=0, storage=storage, evaluator=StandIn(), progress=False, **kw)
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    log = tmp_path / "calls.jsonl"
    spec = dict(trials=trials, storage=storage, worker=True, log=str(log), delay=delay,
                barrier=str(barrier), workers=2, **kw)
    _wait([_spawn(spec, tmp_path / "cache") for _ in range(2)])
    return log


@pytest.mark.parametrize("kind", ["journal", "sqlite"])
def test_two_workers_share_one_storage(tmp_path, kind):
    storage = (_journal(tmp_path) if kind == "journal"
               else f"sqlite:///{tmp_path / 'studies.db'}")
    log = _seed_then_two_workers(tmp_path, storage, 10, 0.03, stages=["up"], buckets=[4, 64],
                                 max_configs=12)
    _check_shared_studies(tune.open_storage(storage, _key()), log, 10, 2)


def test_workers_also_time_tile_orders_and_peers(tmp_path):
    # fc1 at 1024 tokens spans tiles both ways, so its winner gets a tile-order study; at 4
    # tokens it does not. Two workers take both the configs and that order study, and time the
    # peers; the run that writes the table then has nothing left to evaluate.
    storage = _journal(tmp_path)
    kw = dict(stages=["fc1"], buckets=[4, 1024], max_configs=8)
    _seed_then_two_workers(tmp_path, storage, 5, 0.01, **kw)
    store = tune.open_storage(storage, _key())
    names = [s.study_name for s in optuna.get_all_study_summaries(store)]
    orders = [n for n in names if "|order|" in n]
    assert len(orders) == 1 and "|t1024|" in orders[0]
    order_study = optuna.load_study(study_name=orders[0], storage=store)
    assert not order_study.get_trials(states=(TrialState.RUNNING,))
    timed = [t for t in _evaluated(order_study) if t.user_attrs.get("order")]
    assert {t.user_attrs["order"] for t in timed} >= {o.tag for o in TILE_ORDERS}
    for study in _studies(store).values():
        assert "peer" in study.user_attrs
    ev = StandIn()
    report = run_tuning(PROBLEM, trials=5, storage=storage, evaluator=ev, progress=False, **kw)
    assert ev.calls == [] and ev.orders == []
    assert report.table_path is not None and report.result("fc1", 1024).winner is not None


def _postgres_user() -> tuple[int, int] | None:
    """(uid, gid) to run the server as when this process is root (initdb refuses root)."""
    if not (hasattr(os, "geteuid") and os.geteuid() == 0):
        return None
    import pwd

    try:
        entry = pwd.getpwnam("postgres")
    except KeyError:
        return None
    return entry.pw_uid, entry.pw_gid


def _postgres_unavailable() -> str | None:
    for tool in ("initdb", "pg_ctl"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (Debian: postgresql)"
    try:
        import psycopg2  # noqa: F401
    except ImportError:
        return "psycopg2 is not importable (pip install psycopg2-binary)"
    if hasattr(os, "geteuid") and os.geteuid() == 0 and (
            _postgres_user() is None or shutil.which("runuser") is None):
        return "running as root without a postgres user and runuser (initdb refuses root)"
    return None


def _pg(args: list[str], user: tuple[int, int] | None) -> None:
    cmd = ["runuser", "-u", "postgres", "--", *args] if user else args
    subprocess.run(cmd, check=True, capture_output=True)


@pytest.mark.skipif(_postgres_unavailable() is not None,
                    reason=f"PostgreSQL variant: {_postgres_unavailable()}")
def test_two_workers_share_a_postgres_storage(tmp_path):
    user = _postgres_user()
    # The server runs as the postgres user when we are root, so it gets a folder of its own
    # outside pytest's private tmp tree.
    root = Path(tempfile.mkdtemp(prefix="autotune-pg-"))
    if user:
        os.chown(root, *user)
    data, sock = root / "pg", root / "sock"
    _pg(["mkdir", str(sock)], user)
    _pg(["initdb", "-D", str(data), "-U", "tune", "--auth=trust"], user)
    _pg(["pg_ctl", "-D", str(data), "-w", "-l", str(root / "pg.log"), "-o",
         f"-k {sock} -c listen_addresses='' -p 54329", "start"], user)
    try:
        url = f"postgresql+psycopg2://tune@/postgres?host={sock}&port=54329"
        log = _seed_then_two_workers(tmp_path, url, 10, 0.03, stages=["up"], buckets=[4, 64],
                                     max_configs=12)
        _check_shared_studies(tune.open_storage(url, _key()), log, 10, 2)
    finally:
        subprocess.run((["runuser", "-u", "postgres", "--"] if user else [])
                       + ["pg_ctl", "-D", str(data), "-m", "immediate", "stop"],
                       capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


def test_worker_without_studies_does_nothing():
    ev = StandIn()
    report = run_tuning(PROBLEM, stages=["up"], buckets=[4], trials=5, worker=True,
                        evaluator=ev, progress=False, max_configs=8)
    assert ev.calls == [] and report.results == () and report.table_path is None
    assert any("no study" in n for n in report.notes)


def test_tile_orders_are_tuned_for_the_winner_without_recompiling(tmp_path):
    # fc1 at 1024 tokens spans several tiles both ways whatever the winner, so its winner is
    # timed under every sm90 tile order; "n4" is made 10% faster.
    ev = StandIn(order_gain={"n4": 0.9})
    kw = dict(stages=["fc1"], buckets=[4, 1024], trials=5, progress=False, max_configs=8)
    report = run_tuning(PROBLEM, evaluator=ev, **kw)
    big, small = report.result("fc1", 1024), report.result("fc1", 4)
    assert big.winner.order == "n4" and big.winner.label.endswith("@n4")
    store = _storage(_journal(tmp_path))
    timed = [(t.user_attrs["config"], t.user_attrs["order"])
             for t in _evaluated(_studies(store, kind="order")[("fc1", 1024)])]
    mine = sorted(o for c, o in timed if c == big.winner.name)
    assert mine == sorted(o.tag for o in TILE_ORDERS)
    # Beside them, the default config at the default order (unless it is the winner).
    others = [(c, o) for c, o in timed if c != big.winner.name]
    assert others in ([], [(big.default_name, "m1")])
    # Then the winner's multicast variant beside it at n4, and the default at m1 (a tie
    # here: the winner stays).
    multicast = _studies(store, kind="multicast").get(("fc1", 1024))
    paired = [] if multicast is None else _evaluated(multicast)
    if paired:
        variant = multicast_variant(KernelConfig.from_dict(big.winner.config))
        assert {(t.user_attrs["config"], t.user_attrs["order"]) for t in paired} == {
            (big.winner.name, "n4"), (variant.name, "n4"), (big.default_name, "m1")}
    assert big.evaluated == 5 + len(TILE_ORDERS) + len(others) + len(paired)
    assert small.winner.order == "m1" and small.evaluated == 5  # one tile wide: no order study
    assert sorted(ev.prepared) == sorted(set(ev.prepared))  # nothing compiled for the orders
    table = read_table(report.table_path)
    assert table.entries["fc1"][1024].order == "n4"
    assert table.order_for("fc1", 1000) == TileOrder("n", 4)
    assert table.order_for("fc1", 3) == DEFAULT_ORDER
    assert "@n4" in tune.format_report(report)
    # A rerun finds every trial, the order studies' too, already done.
    again = StandIn(order_gain={"n4": 0.9})
    run_tuning(PROBLEM, evaluator=again, **kw)
    assert again.calls == [] and again.orders == []


@pytest.mark.parametrize("gain", [0.8, 1.25])
def test_multicast_variant_is_timed_beside_a_wide_winner(tmp_path, gain):
    # fc1's 128x256 tile is made the fastest candidate; at 1024 tokens its token tile is full,
    # so after its tile orders it is timed beside its c1x2 variant, which wins when faster.
    wide = KernelConfig(128, 256, 64, epilogue="f32")
    ev = StandIn(fast=frozenset({wide.name}), multicast_gain=gain)
    space = stage_spaces(PROBLEM, "sm90", ["fc1"], 8)["fc1"]
    trials = len(space.configs)  # every candidate timed
    kw = dict(stages=["fc1"], buckets=[4, 1024], trials=trials, progress=False, max_configs=8)
    report = run_tuning(PROBLEM, evaluator=ev, **kw)
    variant = multicast_variant(wide)
    assert variant.name == "sm90_bf16_128x256x64_c1x2_coop_f32"
    assert variant in space.variants and variant.name not in space.by_name
    assert ev.prepared.count(variant.name) == 1  # built in the candidates' batch
    store = _storage(_journal(tmp_path))
    for study in _studies(store).values():  # the config studies never time a variant
        assert all(t.user_attrs["config"] in space.by_name for t in _evaluated(study))
    big, small = report.result("fc1", 1024), report.result("fc1", 4)
    order = _studies(store, kind="order")[("fc1", 1024)]
    best = min(_evaluated(order), key=lambda t: t.value).user_attrs["order"]
    side = _evaluated(_studies(store, kind="multicast")[("fc1", 1024)])
    paired = {(t.user_attrs["config"], t.user_attrs["order"]) for t in side}
    # The winner and its variant at the winner's order, the default beside them; the bucket
    # reports the default's time from this study, the one its winner comes from.
    assert paired == {(wide.name, best), (variant.name, best), (big.default_name, "m1")}
    assert big.evaluated == trials + len(_evaluated(order)) + 3
    assert big.default.median_ms == next(t.value for t in side
                                         if t.user_attrs["config"] == big.default_name)
    table = read_table(report.table_path)
    if gain < 1:
        assert big.winner.name == variant.name and big.runner_up.name == wide.name
        assert table.config_for("fc1", 1000) == variant and big.winner.order == best
    else:
        assert big.winner.name == wide.name and table.config_for("fc1", 1000) == wide
    # Four tokens fill 4 of the tile's 128 rows: nothing to share, no multicast study.
    assert ("fc1", 4) not in _studies(store, kind="multicast")
    assert small.winner.name == wide.name
    # A rerun finds the multicast study done as well.
    again = StandIn(fast=frozenset({wide.name}), multicast_gain=gain)
    run_tuning(PROBLEM, evaluator=again, **kw)
    assert again.calls == []


def test_explicit_configs_get_no_multicast_variants():
    wide = KernelConfig(128, 256, 64)
    space = stage_spaces(PROBLEM, "sm90", ["fc1"], configs=[wide.name])["fc1"]
    assert space.variants == ()
    assert stage_spaces(PROBLEM, "sm90", ["fc1"])["fc1"].variants


def test_order_study_times_the_default_beside_the_winner():
    # Timings drift between studies (here every order-study time is 8% slower): the winner and
    # the default reported for a bucket come from the same study, so the tuned bucket is never
    # reported slower than its default because of the drift.
    ev = StandIn(order_drift=1.08)
    report = run_tuning(PROBLEM, stages=["fc1", "up", "down", "fc2"], buckets=[1024], trials=6,
                        evaluator=ev, progress=False, max_configs=8)
    ordered = [r for r in report.results if r.winner.name in {c for c, *_ in ev.orders}]
    assert ordered, "no bucket got a tile-order study"
    for r in ordered:
        assert r.speedup_vs_default >= 1.0
        assert r.default.median_ms == pytest.approx(fake_ms(r.default.name, r.stage, 1024) * 1.08)


def test_order_study_needs_a_grid_two_tiles_wide():
    wide = KernelConfig(128, 128, 64)
    assert tune._tiles_both_ways(PROBLEM, "fc1", 1024, wide)
    assert not tune._tiles_both_ways(PROBLEM, "fc1", 64, wide)  # 64 rows: one tile along M
    swapped = KernelConfig(128, 16, 128, schedule="pingpong", swap_ab=True)
    # Swap-AB puts the tokens on N: 4 tokens per call stay one 16-wide tile.
    assert not tune._tiles_both_ways(PROBLEM, "fc1", 4, swapped)
    assert tune._tiles_both_ways(PROBLEM, "fc1", 64, swapped)


def test_time_budget_stops_the_run():
    ev = StandIn(delay=0.05)
    start = time.monotonic()
    report = run_tuning(PROBLEM, stages=["up", "down"], buckets=[1, 2, 4], trials=16,
                        time_budget=0.6, evaluator=ev, progress=False, max_configs=16)
    assert time.monotonic() - start < 8
    assert 0 < len(ev.calls) < 6 * 16
    assert sum(r.evaluated for r in report.results) == len(ev.calls)


class NoDevice:
    """A stand-in on a machine without the GPU: it can compile, but has no device."""

    def __init__(self):
        self.inner = StandIn()
        self.calls = self.inner.calls

    @property
    def device(self):
        raise RuntimeError("no GPU")

    def prepare(self, *args, **kwargs):
        return self.inner.prepare(*args, **kwargs)

    def evaluate(self, *args, **kwargs):
        return self.inner.evaluate(*args, **kwargs)


def test_compile_only_times_nothing_and_needs_no_device():
    ev = NoDevice()
    report = run_tuning(PROBLEM, buckets=[1], compile_only=True, evaluator=ev, progress=False,
                        max_configs=6)
    assert not report.timed and report.results == () and ev.calls == []
    # Every tile (the defaults always, past the cap of 6) and its multicast variant, if it has
    # one, x (f32, relu2, identity), once.
    tiles = select_candidates(PROBLEM, "sm90", 6)
    variants = [v for v in map(multicast_variant, tiles) if v is not None]
    assert len(tiles) >= 6 and variants
    assert len(report.compiled) == 3 * (len(tiles) + len(variants))
    assert all(r.ok for r in report.compiled)
    with pytest.raises(RuntimeError, match="no GPU"):
        run_tuning(PROBLEM, buckets=[1], evaluator=NoDevice(), progress=False)


def test_gpu_evaluator_says_timing_needs_the_gpu():
    ev = GpuEvaluator(PROBLEM)  # constructing touches nothing
    assert all(hasattr(GpuEvaluator, m) for m in ("device", "prepare", "evaluate", "peer"))
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    with pytest.raises(RuntimeError, match="timing needs an sm90 GPU"):
        _ = ev.device


@pytest.mark.parametrize("kwargs,match", [
    (dict(trials=-1), "--trials"), (dict(trials=1.5), "--trials"),
    (dict(time_budget=0), "--time-budget"), (dict(jobs=0), "--jobs"),
    (dict(stages=["gate"]), "stages"), (dict(buckets=[0]), "--tokens"),
    (dict(routing="zipf"), "routing"),
])
def test_run_tuning_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        run_tuning(PROBLEM, evaluator=StandIn(), progress=False, **kwargs)


def test_run_tuning_rejects_a_non_problem():
    with pytest.raises(TypeError, match="problem"):
        run_tuning({"hidden_size": 4}, evaluator=StandIn(), progress=False)


def test_main_from_args_prints_table_and_plot(tmp_path, capsys, monkeypatch):
    import argparse

    monkeypatch.setattr(tune, "GpuEvaluator", lambda *a, **k: StandIn())
    args = argparse.Namespace(tokens="2,32", trials=3, time_budget=None, jobs=None,
                              storage=None, worker=False, cache_dir=str(tmp_path / "c2"),
                              compile_only=False, candidates=None)
    assert tune.main_from_args(args, PROBLEM, "sm90") == 0
    out = capsys.readouterr().out
    assert "stage up" in out and "table:" in out and "plot:" in out
    assert list((tmp_path / "c2" / "reports").glob("*.png"))
    assert list((tmp_path / "c2" / "tuned").glob("*.json"))


def test_main_from_args_prepare_only_succeeds(tmp_path, monkeypatch):
    """--trials 0 prepares the studies for workers: no winner yet, and that is not a failure."""
    import argparse

    monkeypatch.setattr(tune, "GpuEvaluator", lambda *a, **k: StandIn())
    args = argparse.Namespace(tokens="2,32", trials=0, time_budget=None, jobs=None,
                              storage=None, worker=False, cache_dir=str(tmp_path / "c3"),
                              compile_only=False, candidates=None)
    assert tune.main_from_args(args, PROBLEM, "sm90") == 0


# --------------------------------------------------------------------------------------------
# The real evaluator's correctness gate and pointer arrays, with torch standing in for kernels
# --------------------------------------------------------------------------------------------

class TorchKernel:
    """Computes a stage like a kernel would, optionally wrong or leaving rows unwritten."""

    def __init__(self, config, mode="right", combine=False):
        self.config, self.mode, self.combine = config, mode, combine

    def combines(self, tokens, k, top_k):
        return self.combine

    def combine_dense(self, y, weights, row_of, b, out):
        from autotune.workload import CombineInputs

        a = CombineInputs(y, weights, row_of).combined()
        return self._write(a.to(y.dtype).float() @ b.float().T, out)

    def _write(self, acc, out):
        from autotune.workload import apply_epilogue

        y = apply_epilogue(acc, self.config.epilogue).to(out.dtype)
        if self.mode == "noisy":
            y = y + 0.1 * y.abs().mean()
        rows = out.shape[0] - 1 if self.mode == "skip_row" else out.shape[0]
        out[:rows] = y[:rows]
        return out

    def dense(self, a, b, out, order=None):
        return self._write(a.float() @ b.float().T, out)

    def grouped_mm(self, a, b, offs, out, order=None):
        ends = [0] + offs.tolist()
        acc = torch.cat([a[ends[g]:ends[g + 1]].float() @ b[g].float().T
                         for g in range(b.shape[0])])
        return self._write(acc, out)


@pytest.mark.parametrize("stage", ["fc1", "up", "down", "fc2"])
@pytest.mark.parametrize("mode,ok", [("right", True), ("noisy", False), ("skip_row", False)])
def test_gpu_evaluator_gate(stage, mode, ok):
    ev = GpuEvaluator(PROBLEM)
    config = default_config(PROBLEM, stage, 24)
    failure, err = ev._check(TorchKernel(config, mode), stage, 24, torch.device("cpu"))
    if ok:
        assert failure is None and err < 1e-2
    else:
        assert failure.kind == "wrong" and "relative error" in failure.message
        assert err > 1e-2


@pytest.mark.parametrize("mode,ok", [("right", True), ("noisy", False), ("skip_row", False)])
def test_gpu_evaluator_gate_for_the_combine_launch(mode, ok):
    # Where fc2 runs with the combine before it, the gate checks that launch against the fp32
    # combine and fc2; the other stages never take it.
    ev = GpuEvaluator(PROBLEM)
    config = default_config(PROBLEM, "fc2", 3)
    kernel = TorchKernel(config, mode, combine=True)
    failure, err = ev._check(kernel, "fc2", 3, torch.device("cpu"))
    assert (failure is None and err < 1e-2) if ok else (failure.kind == "wrong" and err > 1e-2)
    assert ev._combines(kernel, "fc2", 3) and not ev._combines(kernel, "down", 3)


def test_pointer_arrays_address_each_groups_rows():
    inp = make_inputs(PROBLEM, "down", 9, generator=torch.Generator().manual_seed(1))
    out = inp.empty_out()
    mnk, pa, pb, pd = group_arrays(inp.a, inp.b, inp.offs, out)
    ends = [0] + inp.offs.tolist()
    for g in range(PROBLEM.num_experts):
        assert mnk[g].tolist() == [ends[g + 1] - ends[g], out.shape[1], inp.a.shape[1]]
        assert int(pb[g]) == inp.b[g].data_ptr()
        if ends[g] < inp.a.shape[0]:
            assert int(pa[g]) == inp.a[ends[g]].data_ptr()
            assert int(pd[g]) == out[ends[g]].data_ptr()


def test_gpu_turn_excludes_other_processes(tmp_path, monkeypatch):
    """Workers that share one GPU take turns: while one holds the GPU's lock, another process
    cannot take it."""
    lock = tmp_path / "gpu.lock"
    monkeypatch.setattr(tune, "gpu_lock_path", lambda index: lock)
    probe = ("import sys, filelock\n"
             "try:\n"
             "    filelock.FileLock(sys.argv[1], timeout=0.2).acquire()\n"
             "except filelock.Timeout:\n"
             "    sys.exit(7)\n")
    with tune.gpu_turn(0):
        held = subprocess.run([sys.executable, "-c", probe, str(lock)], timeout=60)
    free = subprocess.run([sys.executable, "-c", probe, str(lock)], timeout=60)
    assert (held.returncode, free.returncode) == (7, 0)


def test_gpu_evaluator_builds_the_routing_library_beside_the_candidates(monkeypatch):
    """A tuned cache also holds the routing kernels, so the layer's first forward needs no
    nvcc; the tuner's accounting sees only its candidates."""
    import autotune.build as build_mod

    seen = []

    def fake_build(configs, jobs=None, on_done=None):
        seen.extend(c.name for c in configs)
        out = [build_mod.BuildResult(c, "cached", 0.0, None) for c in configs]
        for r in out:
            on_done and on_done(r)
        return out

    monkeypatch.setattr(build_mod, "build", fake_build)
    candidates = [KernelConfig(128, 128, 64), KernelConfig(64, 16, 128, schedule="pingpong",
                                                           swap_ab=True)]
    done = []
    errors = tune.GpuEvaluator(PROBLEM).prepare(candidates, on_done=lambda n, e: done.append(n))
    assert seen[-1] == "sm90_bf16_moe_routing" and seen[:-1] == [c.name for c in candidates]
    assert set(errors) == set(done) == {c.name for c in candidates}


def test_sm100_configs_are_tuned_and_looked_up_like_sm90():
    """The tuner takes sm100's Sm100Config (same axes as sm90's) through config and tile-order
    studies, and the table gives them back as Sm100Config."""
    ev = StandIn()
    report = run_tuning(PROBLEM, "sm100", stages=["up", "fc1"], buckets=[4, 1024], trials=6,
                        evaluator=ev, progress=False, max_configs=8)
    assert {c.split("_")[0] for c, *_ in ev.calls} == {"sm100"}
    assert all(r.winner.name.startswith("sm100_") for r in report.results)
    assert ev.orders, "no tile-order study ran on sm100"
    table = read_table(report.table_path)
    assert table.arch == "sm100"
    config = table.config_for("fc1", 1000)
    assert isinstance(config, Sm100Config) and config.epilogue == "f32"
    assert config.name == report.result("fc1", 1024).winner.name


def test_gpu_evaluator_on_sm100_builds_the_sm100_routing_library(monkeypatch):
    # The fused forward runs on sm100 kernels too (backend="cutlass"): its routing library
    # is built beside the tuned GEMMs, and only the GEMMs are reported.
    import autotune.build as build_mod

    seen = []

    def fake_build(configs, jobs=None, on_done=None):
        seen.extend(c.name for c in configs)
        return [build_mod.BuildResult(c, "cached", 0.0, None) for c in configs]

    monkeypatch.setattr(build_mod, "build", fake_build)
    config = Sm100Config(128, 128, 64)
    assert tune.GpuEvaluator(PROBLEM, "sm100").prepare([config]) == {config.name: None}
    assert seen == [config.name, "sm100_bf16_moe_routing"]


def test_sm80_configs_are_tuned_with_their_own_axes():
    """CUTLASS 2.x configs (threadblock/warp tiles, stages; no runtime tile order) go through
    the same studies, brute force and TPE alike, and come back from the table."""
    for max_configs in (8, 80):  # brute force, then TPE over the sm80 axes
        ev = StandIn()
        report = run_tuning(PROBLEM, "sm80", stages=["up", "fc1"], buckets=[4, 1024],
                            trials=6, evaluator=ev, progress=False, max_configs=max_configs)
        assert {c.split("_")[0] for c, *_ in ev.calls} == {"sm80"} and not ev.orders
        table = read_table(report.table_path)
        config = table.config_for("up", 1000)
        assert isinstance(config, Sm80Config) and config.epilogue == "relu2"
        assert config.name == report.result("up", 1024).winner.name
        assert isinstance(table.config_for("fc1", 3), Sm80Config)


def test_sm80_space_round_trips_its_axes():
    space = tune.stage_spaces(PROBLEM, "sm89", ["down"], max_configs=80)["down"]
    assert not space.brute_force and set(space.axes) == {"tb", "tb_k", "warp", "stages"}
    for config in space.configs[:10]:
        assert space.name_of(space.params_of(config)) == config.name


def test_tuning_an_unknown_arch_is_a_clear_error():
    with pytest.raises(ValueError, match="sm70"):
        run_tuning(PROBLEM, "sm70", evaluator=StandIn(), progress=False)
