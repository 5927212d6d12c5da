"""The tuned-config store: keys, JSON round trip, atomic writes, lookup order, warnings."""

from __future__ import annotations

import dataclasses
import json
import logging
import os

import pytest

from autotune import cache
from autotune.cache import (
    BucketEntry,
    DeviceInfo,
    TableError,
    TunedConfig,
    TunedTable,
    find_table,
    normalise_device_name,
    read_table,
    table_path,
    tune_command,
    tuned_table,
    tuning_key,
    write_table,
)
from autotune.problem import LatentMoEProblem, preset
from autotune.space import DEFAULT_ORDER, KernelConfig, TileOrder
from autotune.workload import default_config

PROBLEM = LatentMoEProblem(hidden_size=512, latent_size=256, intermediate_size=384,
                           num_experts=8, top_k=2)
DEVICE = DeviceInfo("NVIDIA H200", 132, 13)
VERSIONS = {"package_version": "1.2.3", "nvcc_version": "Cuda compilation tools, release 13.0",
            "cutlass_version": "4.2.0.0"}
UP_A = KernelConfig(128, 64, 128, 1, 1, "pingpong", True, "relu2")
UP_B = KernelConfig(128, 128, 64, 1, 1, "cooperative", False, "relu2")
DOWN = KernelConfig(128, 256, 64, 1, 1, "cooperative")


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("AUTOTUNE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("AUTOTUNE_CONFIG_DIR", raising=False)
    monkeypatch.setattr(cache, "_shipped_dir", lambda: tmp_path / "shipped")
    monkeypatch.setattr(cache, "runtime_versions", lambda: dict(VERSIONS))
    cache.clear_cache()
    yield
    cache.clear_cache()


def _entry(config: KernelConfig, ms: float = 0.1) -> BucketEntry:
    return BucketEntry(TunedConfig.of(config), ms, 0.9 * ms, 1.1 * ms,
                       runner_up=TunedConfig.of(DOWN), runner_up_ms=1.2 * ms,
                       default_name="sm90_bf16_128x16x128_c1x1_pp_swapab", default_ms=2 * ms,
                       peer_ms=3 * ms, trials=12)


def _table(up=UP_A, metadata=None, problem=PROBLEM) -> TunedTable:
    key = tuning_key(problem, "sm90", DEVICE)
    meta = dict(VERSIONS, timing_method=cache.TIMING_METHOD) if metadata is None else metadata
    return TunedTable(key, problem, "sm90", DEVICE, "abc", meta,
                      {"up": {4: _entry(up), 64: _entry(UP_B), 1024: _entry(up)},
                       "down": {16: _entry(DOWN)}})


def _warnings(caplog, word):
    return [r for r in caplog.records if r.levelno == logging.WARNING and word in r.getMessage()]


# --------------------------------------------------------------------------------------------
# Keys
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,slug", [("NVIDIA H200", "nvidia-h200"),
                                       ("NVIDIA H100 80GB HBM3", "nvidia-h100-80gb-hbm3"),
                                       ("  GH200 (480GB) ", "gh200-480gb")])
def test_normalise_device_name(name, slug):
    assert normalise_device_name(name) == slug


def test_device_info_checks_fields():
    assert DeviceInfo("NVIDIA H200", 132, 13).slug == "nvidia-h200-132sm"
    with pytest.raises(ValueError, match="sm_count"):
        DeviceInfo("NVIDIA H200", 0, 13)
    with pytest.raises(ValueError, match="device name"):
        DeviceInfo("", 132, 13)


def test_tuning_key_holds_every_part():
    key = tuning_key(PROBLEM, "sm90", DEVICE)
    for part in ("h512", "l256", "i384", "e8", "k2", "relu2", "bfloat16", "sm90",
                 "nvidia-h200-132sm", "cuda13"):
        assert part in key
    others = [tuning_key(PROBLEM.with_(top_k=3), "sm90", DEVICE),
              tuning_key(PROBLEM.with_(activation="swiglu"), "sm90", DEVICE),
              tuning_key(PROBLEM.with_(dtype="float16"), "sm90", DEVICE),
              tuning_key(PROBLEM.with_(latent_size=None), "sm90", DEVICE),
              tuning_key(PROBLEM, "sm90", DeviceInfo("NVIDIA H100", 132, 13)),
              tuning_key(PROBLEM, "sm90", DeviceInfo("NVIDIA H200", 114, 13)),
              tuning_key(PROBLEM, "sm90", DeviceInfo("NVIDIA H200", 132, 12)),
              tuning_key(PROBLEM, "sm90", DEVICE, space="0123456789abcdef")]
    assert len({key, *others}) == len(others) + 1
    # Routing settings change no GEMM: one table serves them all.
    assert tuning_key(PROBLEM.with_(scoring="softmax", n_group=2, topk_group=2), "sm90",
                      DEVICE) == key
    with pytest.raises(TypeError, match="device"):
        tuning_key(PROBLEM, "sm90", "NVIDIA H200")


def test_tune_command_names_the_preset_or_every_size():
    assert tune_command(preset("nemotron-3-super")) == \
        "python -m autotune --arch sm90 --preset nemotron-3-super"
    assert tune_command(preset("nemotron-3-ultra").with_(dtype="float16")) == \
        "python -m autotune --arch sm90 --preset nemotron-3-ultra --dtype float16"
    assert tune_command(PROBLEM) == (
        "python -m autotune --arch sm90 --hidden-size 512 --latent-size 256 "
        "--intermediate-size 384 --num-experts 8 --top-k 2 --activation relu2 "
        "--dtype bfloat16")


# --------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------

def test_round_trip(tmp_path):
    table = _table()
    path = write_table(table, tmp_path / "out")
    assert path == tmp_path / "out" / f"{table.key}.json"
    back = read_table(path)
    assert back.to_json() == table.to_json()
    assert back.entries["up"][64].winner.name == UP_B.name
    assert back.entries["up"][4].runner_up.name == DOWN.name
    data = json.loads(path.read_text())
    assert data["schema"] == cache.SCHEMA_VERSION
    assert data["metadata"]["timing_method"].startswith("cuda-graph replay")
    assert set(data["stages"]["up"]) == {"4", "64", "1024"}
    assert data["stages"]["up"]["4"]["p20_ms"] < data["stages"]["up"]["4"]["median_ms"]
    assert oct(path.stat().st_mode & 0o777) != oct(0o600)  # readable by others, like any file


def test_atomic_write_leaves_no_temporary_files(tmp_path, monkeypatch):
    out = tmp_path / "out"
    path = write_table(_table(), out)
    write_table(_table(up=UP_B), out)
    assert sorted(p.name for p in out.iterdir()) == [path.name]

    def fail(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        write_table(_table(up=UP_A), out)
    assert sorted(p.name for p in out.iterdir()) == [path.name]
    assert read_table(path).entries["up"][4].winner.name == UP_B.name  # old file intact


def test_write_merges_buckets_of_the_same_key(tmp_path):
    first = _table()
    write_table(first, tmp_path)
    second = TunedTable(first.key, PROBLEM, "sm90", DEVICE, "abc", dict(VERSIONS),
                        {"up": {4: _entry(UP_B)}, "fc2": {8: _entry(DOWN)}})
    merged = read_table(write_table(second, tmp_path))
    assert merged.entries["up"][4].winner.name == UP_B.name  # newer wins
    assert set(merged.entries["up"]) == {4, 64, 1024}  # older buckets kept
    assert set(merged.entries) == {"up", "down", "fc2"}


@pytest.mark.parametrize("text", ["{not json", "[]", '{"schema": 99}', "",
                                  '{"schema": 1, "key": "x"}'])
def test_unusable_file_raises_table_error(tmp_path, text):
    p = tmp_path / "x.json"
    p.write_text(text)
    with pytest.raises(TableError):
        read_table(p)


def test_file_whose_key_differs_from_its_name_is_rejected(tmp_path):
    path = write_table(_table(), tmp_path)
    moved = tmp_path / "other.json"
    path.rename(moved)
    with pytest.raises(TableError, match="not its file name"):
        read_table(moved)


# --------------------------------------------------------------------------------------------
# Lookup
# --------------------------------------------------------------------------------------------

def test_lookup_order_config_dir_then_user_cache_then_shipped(tmp_path, monkeypatch):
    monkeypatch.setenv("AUTOTUNE_CONFIG_DIR", str(tmp_path / "override"))
    key = _table().key
    write_table(_table(up=UP_A), tmp_path / "shipped")
    write_table(_table(up=UP_B), tmp_path / "cache" / "tuned")
    assert find_table(key).entries["up"][4].winner.name == UP_B.name
    over = write_table(TunedTable(key, PROBLEM, "sm90", DEVICE, "abc", dict(VERSIONS),
                                  {"up": {4: _entry(UP_B.with_epilogue("identity"))}}),
                       tmp_path / "override")
    assert find_table(key).source == over
    os.unlink(over)
    os.unlink(table_path(key, tmp_path / "cache" / "tuned"))
    assert find_table(key).source == table_path(key, tmp_path / "shipped")
    os.unlink(table_path(key, tmp_path / "shipped"))
    assert find_table(key) is None


def test_winners_lists_each_stored_config_once():
    assert [c.name for c in _table().winners()] == [UP_A.name, UP_B.name, DOWN.name]


def test_config_for_picks_smallest_bucket_at_least_tokens_and_clamps(tmp_path):
    write_table(_table(), tmp_path / "cache" / "tuned")
    t = tuned_table(PROBLEM, "sm90", DEVICE)
    assert t.tuned and t.buckets("up") == (4, 64, 1024)
    assert t.config_for("up", 0) == UP_A
    assert t.config_for("up", 4) == UP_A
    assert t.config_for("up", 5) == UP_B
    assert t.config_for("up", 64) == UP_B
    assert t.config_for("up", 65) == UP_A
    assert t.config_for("up", 100000) == UP_A  # clamped to the largest bucket
    assert t.config_for("down", 1) == DOWN
    with pytest.raises(ValueError, match="stage 'gate'"):
        t.config_for("gate", 4)
    with pytest.raises(ValueError, match="tokens"):
        t.config_for("up", -1)


def test_resolved_once_per_shape_without_file_reads(tmp_path, monkeypatch):
    write_table(_table(), tmp_path / "cache" / "tuned")
    t = tuned_table(PROBLEM, "sm90", DEVICE)
    first = t.config_for("up", 7)

    def no_reads(*a, **k):
        raise AssertionError("a file was read after the table was loaded")

    monkeypatch.setattr(cache, "read_table", no_reads)
    monkeypatch.setattr(cache, "invalid_reason", no_reads)  # nothing validated again either
    assert tuned_table(PROBLEM, "sm90", DEVICE) is t
    assert t.config_for("up", 7) is first


def test_invalid_stored_config_falls_back_to_default(tmp_path, caplog):
    bad = KernelConfig(64, 128, 64, 1, 1, "cooperative", False, "relu2")  # coop needs M >= 128
    write_table(_table(up=bad), tmp_path / "cache" / "tuned")
    t = tuned_table(PROBLEM, "sm90", DEVICE)
    with caplog.at_level(logging.WARNING, logger="autotune"):
        assert t.config_for("up", 2) == default_config(PROBLEM, "up", 2)
        assert t.config_for("up", 3) == default_config(PROBLEM, "up", 3)
    assert len(_warnings(caplog, "not usable")) == 1
    assert t.config_for("up", 50) == UP_B  # other buckets unaffected


def test_tile_order_is_stored_and_applies_only_with_its_winner(tmp_path):
    from dataclasses import replace

    table = _table(up=KernelConfig(128, 128, 64, 1, 1, "cooperative", False, "relu2", "bf16",
                                   "sm90"))
    table.entries["up"][64] = replace(table.entries["up"][64], order="n4")
    path = write_table(table, tmp_path / "cache" / "tuned")
    data = json.loads(path.read_text())
    assert data["stages"]["up"]["64"]["order"] == "n4"
    assert data["stages"]["up"]["4"]["order"] == "m1"
    t = tuned_table(PROBLEM, "sm90", DEVICE)
    assert t.order_for("up", 50) == TileOrder("n", 4) and t.config_for("up", 50) == UP_B
    assert t.order_for("up", 4) == DEFAULT_ORDER


def test_tables_without_orders_read_as_the_default_order_and_bad_orders_are_rejected(
        tmp_path):
    path = write_table(_table(), tmp_path / "out")
    data = json.loads(path.read_text())
    for per in data["stages"].values():
        for entry in per.values():
            del entry["order"]  # a table written before orders were tuned
    path.write_text(json.dumps(data))
    assert read_table(path).entries["up"][64].order == "m1"
    data["stages"]["up"]["64"]["order"] = "x3"
    path.write_text(json.dumps(data))
    with pytest.raises(TableError, match="tile order"):
        read_table(path)


def test_order_of_an_unusable_winner_is_not_applied(tmp_path, caplog):
    from dataclasses import replace

    bad = KernelConfig(64, 128, 64, 1, 1, "cooperative", False, "relu2")  # coop needs M >= 128
    table = _table(up=bad)
    table.entries["up"][4] = replace(table.entries["up"][4], order="n2")
    write_table(table, tmp_path / "cache" / "tuned")
    with caplog.at_level(logging.WARNING, logger="autotune"):
        assert tuned_table(PROBLEM, "sm90", DEVICE).order_for("up", 4) == DEFAULT_ORDER


def test_wrong_epilogue_falls_back_to_default(tmp_path, caplog):
    write_table(_table(up=UP_A.with_epilogue("identity")), tmp_path / "cache" / "tuned")
    with caplog.at_level(logging.WARNING, logger="autotune"):
        c = tuned_table(PROBLEM, "sm90", DEVICE).config_for("up", 4)
    assert c == default_config(PROBLEM, "up", 4) and _warnings(caplog, "epilogue")


def test_stale_table_warns_once_and_still_applies(tmp_path, caplog):
    old = dict(VERSIONS, package_version="0.0.1",
               nvcc_version="nvcc: NVIDIA (R) Cuda compiler\nCuda compilation tools, "
                            "release 12.8, V12.8.93")
    write_table(_table(metadata=old), tmp_path / "cache" / "tuned")
    with caplog.at_level(logging.WARNING, logger="autotune"):
        t = tuned_table(PROBLEM, "sm90", DEVICE)
        assert t.config_for("up", 4) == UP_A
        cache._TABLES.clear()  # a second lookup in the same process
        assert tuned_table(PROBLEM, "sm90", DEVICE).config_for("up", 4) == UP_A
    stale = _warnings(caplog, "other versions")
    assert len(stale) == 1
    msg = stale[0].getMessage()
    assert "0.0.1" in msg and "release 12.8" in msg and "python -m autotune" in msg


def _earlier_space(table: TunedTable, space: str = "0123456789abcdef") -> TunedTable:
    return dataclasses.replace(table, key=table.key.rsplit("__s", 1)[0] + f"__s{space}",
                               space_hash=space)


def test_table_of_an_earlier_search_space_warns_once_and_still_applies(tmp_path, caplog):
    write_table(_earlier_space(_table()), tmp_path / "shipped")
    with caplog.at_level(logging.WARNING, logger="autotune"):
        assert tuned_table(PROBLEM, "sm90", DEVICE).config_for("up", 4) == UP_A
        cache._TABLES.clear()
        assert tuned_table(PROBLEM, "sm90", DEVICE).config_for("up", 64) == UP_B
    (warning,) = _warnings(caplog, "another search space")
    msg = warning.getMessage()
    assert "s0123456789abcdef" in msg and "python -m autotune" in msg


def test_table_of_the_current_space_beats_an_earlier_one_anywhere(tmp_path):
    write_table(_earlier_space(_table(up=UP_B)), tmp_path / "cache" / "tuned")
    write_table(_table(up=UP_A), tmp_path / "shipped")
    assert tuned_table(PROBLEM, "sm90", DEVICE).config_for("up", 4) == UP_A
    assert find_table(_table().key).source.parent == tmp_path / "shipped"


def test_corrupted_file_is_reported_once_and_skipped(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("AUTOTUNE_CONFIG_DIR", str(tmp_path / "override"))
    key = _table().key
    (tmp_path / "override").mkdir()
    (tmp_path / "override" / f"{key}.json").write_text('{"schema": 1, "key": ')
    write_table(_table(up=UP_B), tmp_path / "cache" / "tuned")
    with caplog.at_level(logging.WARNING, logger="autotune"):
        assert find_table(key).entries["up"][4].winner.name == UP_B.name
        assert find_table(key) is not None
    assert len(_warnings(caplog, "unusable")) == 1


def test_corrupted_only_file_gives_the_untuned_defaults(tmp_path, caplog):
    key = _table().key
    (tmp_path / "cache" / "tuned").mkdir(parents=True)
    (tmp_path / "cache" / "tuned" / f"{key}.json").write_bytes(b"\xff\xfe\x00garbage")
    with caplog.at_level(logging.WARNING, logger="autotune"):
        t = tuned_table(PROBLEM, "sm90", DEVICE)
        assert not t.tuned
        assert t.config_for("down", 8) == default_config(PROBLEM, "down", 8)
    assert _warnings(caplog, "unusable") and _warnings(caplog, "no tuned kernels")


def test_untuned_warns_once_naming_the_exact_command(caplog):
    sup = preset("nemotron-3-super")
    with caplog.at_level(logging.WARNING, logger="autotune"):
        t = tuned_table(sup, "sm90", DEVICE)
        for stage in ("fc1", "up", "down", "fc2"):
            for tokens in (1, 8, 100, 5000):
                c = t.config_for(stage, tokens)
                assert c == default_config(sup, stage, tokens)
        tuned_table(PROBLEM, "sm90", DEVICE).config_for("up", 1)  # another problem: its own
    untuned = _warnings(caplog, "no tuned kernels")
    assert len(untuned) == 2
    assert untuned[0].getMessage().endswith(
        "Tune with: python -m autotune --arch sm90 --preset nemotron-3-super")
    assert "--hidden-size 512 --latent-size 256" in untuned[1].getMessage()


def test_problem_with_other_routing_reuses_the_table(tmp_path):
    write_table(_table(), tmp_path / "cache" / "tuned")
    softmax = PROBLEM.with_(scoring="softmax")
    t = tuned_table(softmax, "sm90", DEVICE)
    assert t.problem == softmax and t.config_for("up", 4) == UP_A


def test_tuned_table_needs_a_device_or_cuda():
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    with pytest.raises(RuntimeError, match="no CUDA device"):
        tuned_table(PROBLEM, "sm90")
