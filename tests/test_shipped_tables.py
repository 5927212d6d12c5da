"""The tuned tables shipped in the package are found and usable (no GPU needed)."""

from __future__ import annotations

import pytest

from autotune.cache import DeviceInfo, arch_space_hash, clear_cache, tuned_table
from autotune.problem import PRESETS
from autotune.space import valid
from autotune.workload import stages_of

H200 = DeviceInfo("NVIDIA H200", 132, 13)


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("AUTOTUNE_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("AUTOTUNE_CONFIG_DIR", raising=False)
    clear_cache()
    yield
    clear_cache()


@pytest.mark.parametrize("name", ["nemotron-3-super", "nemotron-3-ultra"])
def test_shipped_h200_table_covers_every_stage(name):
    problem = PRESETS[name]
    table = tuned_table(problem, "sm90", H200)
    assert table.tuned, "no shipped table found for the H200"
    for stage in stages_of(problem):
        assert table.buckets(stage)[0] == 1 and table.buckets(stage)[-1] >= 8192
        for tokens in (1, 5, 300, 8192, 20000):
            config = table.config_for(stage, tokens)
            assert valid(config, problem)


@pytest.mark.parametrize("name", ["nemotron-3-super", "nemotron-3-ultra"])
def test_shipped_table_is_of_the_current_search_space(name):
    # Shipped tables are re-tuned whenever the sm90 space changes (a user's own table from an
    # earlier space still applies, with a warning: tests/test_cache.py).
    problem = PRESETS[name]
    table = tuned_table(problem, "sm90", H200)
    assert table.space_hash == arch_space_hash("sm90", problem)
