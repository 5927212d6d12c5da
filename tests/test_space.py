"""Golden tests of config names, the validity predicate and the search space (no GPU)."""

from __future__ import annotations

import dataclasses

import pytest

from autotune.problem import PRESETS, LatentMoEProblem
from autotune.space import (
    DEFAULT_ORDER,
    TILE_ORDERS,
    KernelConfig,
    Sm80Config,
    Sm100Config,
    TileOrder,
    _sm100_reason,
    config_from_dict,
    default_configs,
    gemv_configs,
    invalid_reason,
    is_gemv,
    multicast_variant,
    search_space,
    space_hash,
    tile_orders,
    valid,
)


@pytest.mark.parametrize("config,name", [
    (KernelConfig(128, 128, 64, 1, 2, "cooperative"), "sm90_bf16_128x128x64_c1x2_coop"),
    (KernelConfig(64, 256, 64, 1, 1, "pingpong"), "sm90_bf16_64x256x64_c1x1_pp"),
    (KernelConfig(128, 32, 128, 1, 1, "pingpong", True), "sm90_bf16_128x32x128_c1x1_pp_swapab"),
    (KernelConfig(256, 128, 64, 2, 1, "cooperative", dtype="fp16"),
     "sm90_fp16_256x128x64_c2x1_coop"),
])
def test_golden_names(config, name):
    assert config.name == name


def test_config_is_frozen_and_round_trips():
    c = KernelConfig(128, 128, 64)
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.tile_m = 64  # type: ignore[misc]
    assert KernelConfig.from_dict(c.to_dict()) == c


@pytest.mark.parametrize("config,fragment", [
    (KernelConfig(64, 128, 64, schedule="cooperative"), "cooperative needs tile M"),
    (KernelConfig(256, 128, 64, schedule="pingpong"), "pingpong needs tile M"),
    (KernelConfig(128, 8, 64), "tile N must be a multiple of 16"),
    (KernelConfig(128, 24, 64), "tile N must be a multiple of 16"),
    (KernelConfig(128, 272, 64), "tile N must be a multiple of 16"),
    (KernelConfig(128, 128, 48), "tile K"),
    (KernelConfig(128, 128, 64, 4, 4), "cluster size 16 exceeds"),
    (KernelConfig(128, 128, 64, 3, 1), "cluster M must be"),
    (KernelConfig(128, 16, 64, 4, 1), "tile N 16 does not split"),
    (KernelConfig(256, 256, 128), "shared memory"),
    (KernelConfig(128, 128, 64, schedule="split"), "schedule"),
    (KernelConfig(128, 128, 64, arch="sm75"), "not a known architecture"),
])
def test_predicate_rejects_with_reason(config, fragment):
    reason = invalid_reason(config)
    assert reason is not None and fragment in reason
    assert not valid(config)


@pytest.mark.parametrize("config", [
    KernelConfig(128, 256, 64), KernelConfig(256, 128, 64, 2, 1), KernelConfig(64, 16, 128,
                                                                               schedule="pingpong"),
    KernelConfig(128, 128, 64, 1, 2), KernelConfig(128, 64, 64, 2, 4),
])
def test_predicate_accepts(config):
    assert invalid_reason(config) is None


def test_problem_alignment_and_dtype():
    c = KernelConfig(128, 128, 64)
    odd = LatentMoEProblem(2880, 770, 1536, 96, 6)
    assert "multiple of 8" in invalid_reason(c, odd)
    fp16 = LatentMoEProblem(2880, 768, 1536, 96, 6, dtype="float16")
    assert "dtype" in invalid_reason(c, fp16)
    assert invalid_reason(c, PRESETS["nemotron-3-super"]) is None


def test_search_space_is_valid_unique_and_stable():
    space = search_space("sm90", PRESETS["nemotron-3-super"])
    names = [c.name for c in space]
    assert len(names) == len(set(names)) > 100
    assert all(valid(c) for c in space)
    assert space_hash(space) == space_hash(search_space("sm90", PRESETS["nemotron-3-super"]))
    assert {c.schedule for c in space} == {"cooperative", "pingpong", "gemv"}
    assert any(c.swap_ab for c in space)


def test_gemv_configs_are_decode_points_of_the_sm90_space():
    gemv = gemv_configs()
    assert [c.name for c in gemv] == [
        "sm90_bf16_8x1x256_c1x1_gemv_swapab", "sm90_bf16_16x1x256_c1x1_gemv_swapab",
        "sm90_bf16_8x4x256_c1x1_gemv_swapab", "sm90_bf16_16x4x256_c1x1_gemv_swapab"]
    assert set(gemv) <= set(search_space("sm90")) and all(is_gemv(c) for c in gemv)
    c = gemv[0]
    replace = dataclasses.replace
    assert "swap_ab=True" in invalid_reason(replace(c, swap_ab=False))
    assert "clusters" in invalid_reason(replace(c, cluster_m=2))
    assert "tile M" in invalid_reason(replace(c, tile_m=64))
    assert "tile N" in invalid_reason(replace(c, tile_n=16))
    assert "tile K" in invalid_reason(replace(c, tile_k=128))
    assert invalid_reason(c.with_epilogue("f32"), PRESETS["nemotron-3-super"]) is None
    # A CUTLASS schedule keeps its own checks: tile M 8 is no wgmma tile.
    assert "tile M" in invalid_reason(replace(c, schedule="pingpong"))


def test_defaults_are_valid_and_in_space():
    space = set(search_space("sm90"))
    for c in default_configs("sm90"):
        assert valid(c) and c in space


def test_unknown_arch_is_a_clear_error():
    with pytest.raises(ValueError, match="supported: sm80, sm89, sm90, sm100"):
        search_space("sm70")


@pytest.mark.parametrize("config,name", [
    (Sm80Config(128, 128, 32, 64, 64, 3), "sm80_bf16_128x128x32_w64x64_s3"),
    (Sm80Config(64, 64, 64, 32, 32, 4, dtype="fp16", arch="sm89"), "sm89_fp16_64x64x64_w32x32_s4"),
])
def test_sm80_golden_names(config, name):
    assert config.name == name
    assert Sm80Config.from_dict(config.to_dict()) == config


@pytest.mark.parametrize("config,fragment", [
    (Sm80Config(128, 128, 16, 64, 64, 3), "threadblock K"),
    (Sm80Config(128, 128, 32, 48, 64, 3), "warp tile"),
    (Sm80Config(128, 128, 32, 64, 64, 2), "stages"),
    (Sm80Config(256, 256, 32, 32, 32, 3), "warps per threadblock"),
    (Sm80Config(128, 256, 64, 64, 64, 4, arch="sm89"), "over 101376 B on sm89"),
    (Sm80Config(128, 128, 32, 64, 64, 3, arch="sm90"), "not sm90"),
    (Sm80Config(128, 128, 32, 64, 64, 3, epilogue="gelu"), "epilogue 'gelu' not in"),
    (KernelConfig(128, 128, 64, arch="sm80"), "use Sm80Config for sm80"),
])
def test_sm80_predicate_rejects_with_reason(config, fragment):
    reason = invalid_reason(config)
    assert reason is not None and fragment in reason


def test_sm80_and_sm89_spaces_differ_by_shared_memory():
    sm80, sm89 = search_space("sm80"), search_space("sm89")
    assert len(sm80) > len(sm89) > 50
    assert {c.name.replace("sm89", "sm80") for c in sm89} < {c.name for c in sm80}
    for arch in ("sm80", "sm89"):
        assert all(valid(c) for c in default_configs(arch))


def test_tile_orders_round_trip_their_tags_and_abi():
    assert [o.tag for o in TILE_ORDERS] == ["m1", "m2", "m4", "m8", "n1", "n2", "n4", "n8"]
    for o in TILE_ORDERS:
        assert TileOrder.from_tag(o.tag) == o
    assert DEFAULT_ORDER.abi == (0, 1) and TileOrder("n", 8).abi == (1, 8)
    for bad in ("m3", "x1", "", "n", 4, "m1x"):
        with pytest.raises(ValueError, match="tile order"):
            TileOrder.from_tag(bad)
    assert (tile_orders(default_configs("sm90")[0]) == tile_orders(default_configs("sm100")[0])
            == TILE_ORDERS)
    # CUTLASS 2.x compiles its threadblock swizzle in, gemv has no tile grid: the default only.
    assert (tile_orders(default_configs("sm80")[0]) == tile_orders(default_configs("sm89")[0])
            == tile_orders(gemv_configs()[0]) == (DEFAULT_ORDER,))


@pytest.mark.parametrize("config,name", [
    (Sm100Config(256, 256, 64, 2, 1, "2sm"), "sm100_bf16_256x256x64_c2x1_2sm"),
    (Sm100Config(128, 128, 64), "sm100_bf16_128x128x64_c1x1_1sm"),
    (Sm100Config(128, 32, 128, 1, 1, "1sm", True), "sm100_bf16_128x32x128_c1x1_1sm_swapab"),
    (Sm100Config(256, 128, 64, 2, 1, "2sm", epilogue="f32", dtype="fp16"),
     "sm100_fp16_256x128x64_c2x1_2sm_f32"),
    (Sm100Config(128, 16, 128, 1, 1, "1sm", True).with_epilogue("relu2"),
     "sm100_bf16_128x16x128_c1x1_1sm_swapab_relu2"),
])
def test_sm100_golden_names(config, name):
    assert config.name == name
    assert Sm100Config.from_dict(config.to_dict()) == config


@pytest.mark.parametrize("config,fragment", [
    (Sm100Config(256, 128, 64), "1SM MMA needs tile M of 64 or 128"),
    (Sm100Config(64, 128, 64, 2, 1, "2sm"), "2SM MMA needs tile M of 128 or 256"),
    (Sm100Config(256, 128, 64, 1, 1, "2sm"), "cluster M, which must be even"),
    (Sm100Config(256, 128, 64, 1, 2, "2sm"), "cluster M, which must be even"),
    (Sm100Config(128, 8, 64), "tile N must be a multiple of 16"),
    (Sm100Config(128, 24, 64), "tile N must be a multiple of 16"),
    (Sm100Config(128, 272, 64), "tile N must be a multiple of 16"),
    (Sm100Config(128, 128, 48), "tile K"),
    (Sm100Config(128, 128, 64, 4, 4), "cluster size 16 exceeds"),
    (Sm100Config(128, 128, 64, 3, 1), "cluster M must be"),
    (Sm100Config(128, 16, 64, 4, 1, "2sm"), "tile N 16 does not split"),
    (Sm100Config(128, 128, 64, schedule="cooperative"), "schedule"),
    (Sm100Config(128, 128, 64, epilogue="gelu"), "epilogue"),
    (Sm100Config(128, 128, 64, arch="sm90"), "Sm100Config is for sm100, not sm90"),
    (KernelConfig(128, 128, 64, arch="sm100"), "use Sm100Config for sm100"),
])
def test_sm100_predicate_rejects_with_reason(config, fragment):
    reason = invalid_reason(config)
    assert reason is not None and fragment in reason
    assert not valid(config)


@pytest.mark.parametrize("config", [
    Sm100Config(64, 16, 128, 1, 1, "1sm", True), Sm100Config(128, 256, 128),
    Sm100Config(128, 16, 128, 2, 1, "2sm", True), Sm100Config(256, 256, 128, 2, 1, "2sm"),
    Sm100Config(128, 32, 64, 4, 1, "2sm"), Sm100Config(128, 64, 64, 2, 2),
    Sm100Config(256, 16, 64, 2, 2, "2sm", True, "f32"),
])
def test_sm100_predicate_accepts(config):
    assert invalid_reason(config) is None


def test_sm100_shared_memory_counts_half_a_pair_per_cta():
    # 128x256x128 1SM stages 96 KiB per CTA, a 2SM 256x256x128 pair 64 KiB per CTA: both fit
    # B200's 227 KiB twice over with the epilogue, and a 170 KiB budget tells them apart.
    one, two = Sm100Config(128, 256, 128), Sm100Config(256, 256, 128, 2, 1, "2sm")
    assert valid(one) and valid(two)
    assert "230400 B of shared memory" in _sm100_reason(one, 170 * 1024)
    assert _sm100_reason(two, 170 * 1024) is None


def test_sm100_space_defaults_and_problem():
    space = search_space("sm100", PRESETS["nemotron-3-super"])
    names = [c.name for c in space]
    assert len(names) == len(set(names)) == 368
    assert all(isinstance(c, Sm100Config) and valid(c) for c in space)
    assert {c.schedule for c in space} == {"1sm", "2sm"} and any(c.swap_ab for c in space)
    assert all(c.cluster_m % 2 == 0 for c in space if c.schedule == "2sm")
    assert space_hash(space) == space_hash(search_space("sm100", PRESETS["nemotron-3-super"]))
    assert [c.name for c in default_configs("sm100")] == [
        "sm100_bf16_256x256x64_c2x1_2sm", "sm100_bf16_256x128x64_c2x1_2sm",
        "sm100_bf16_128x128x64_c1x1_1sm", "sm100_bf16_128x32x128_c1x1_1sm_swapab"]
    assert set(default_configs("sm100")) <= set(search_space("sm100"))
    c = Sm100Config(128, 128, 64)
    assert "multiple of 8" in invalid_reason(c, LatentMoEProblem(2880, 770, 1536, 96, 6))
    fp16 = LatentMoEProblem(2880, 768, 1536, 96, 6, dtype="float16")
    assert "dtype" in invalid_reason(c, fp16)
    assert invalid_reason(Sm100Config(128, 128, 64, dtype="fp16"), fp16) is None


def test_sm90_space_is_unchanged_by_sm100():
    # The sm90 space hash is part of the shipped tuned tables' keys: 276 CUTLASS tiles, 4 gemv.
    assert len(search_space("sm90")) == 280
    assert space_hash(search_space("sm90")) == "6747fc16e043d354"


def test_sm100_stage_defaults_are_valid_tuning_candidates():
    from autotune.tune import DEFAULT_MAX_CONFIGS, select_candidates
    from autotune.workload import default_config, default_tier_configs, stages_of

    for problem in PRESETS.values():
        for stage in stages_of(problem):
            for c in default_tier_configs(problem, stage, "sm100"):
                assert isinstance(c, Sm100Config) and invalid_reason(c, problem) is None
    sup = PRESETS["nemotron-3-super"]
    # Cooperative sm90 tiers become 2SM pairs, ping-pong/swap-AB tiers 1SM MMAs of the same tile.
    assert default_config(sup, "up", 8192, "sm100").name == "sm100_bf16_256x256x64_c2x1_2sm_relu2"
    assert default_config(sup, "fc1", 1, "sm100").name == "sm100_bf16_64x16x128_c1x1_1sm_swapab_f32"
    cands = select_candidates(sup, "sm100")
    assert len(cands) == DEFAULT_MAX_CONFIGS
    assert all(valid(c, sup) and c.epilogue == "identity" for c in cands)


def test_config_from_dict_picks_the_class_by_arch():
    for config in (KernelConfig(128, 128, 64, epilogue="relu2"),
                   Sm100Config(256, 128, 64, 2, 1, "2sm", epilogue="f32"),
                   Sm80Config(128, 128, 32, 64, 64, 3),
                   Sm80Config(128, 128, 32, 64, 64, 3, arch="sm89")):
        assert config_from_dict(config.to_dict()) == config
    with pytest.raises(TypeError):
        config_from_dict({"arch": "sm100", "tile_m": 128})


def test_sm80_configs_take_every_epilogue():
    for epilogue, suffix in (("identity", ""), ("relu2", "_relu2"), ("f32", "_f32")):
        c = Sm80Config(128, 128, 32, 64, 64, 3, epilogue=epilogue)
        assert valid(c) and c.name == f"sm80_bf16_128x128x32_w64x64_s3{suffix}"


@pytest.mark.parametrize("config,variant", [
    # Tokens on M: two CTAs of neighbouring weight (N) tiles share the token tile.
    (KernelConfig(128, 192, 64, epilogue="relu2"), "sm90_bf16_128x192x64_c1x2_coop_relu2"),
    (KernelConfig(64, 128, 64, 1, 1, "pingpong"), "sm90_bf16_64x128x64_c1x2_pp"),
    # Swap-AB puts the tokens on N: the cluster pairs weight (M) tiles.
    (KernelConfig(256, 128, 64, 1, 1, "cooperative", True),
     "sm90_bf16_256x128x64_c2x1_coop_swapab"),
    (KernelConfig(128, 64, 128, 1, 1, "pingpong", True), "sm90_bf16_128x64x128_c2x1_pp_swapab"),
    # Decode tiles, narrow weight tiles, clusters already, other kernels: none.
    (KernelConfig(128, 16, 128, 1, 1, "pingpong", True), None),
    (KernelConfig(64, 128, 64, 1, 1, "pingpong", True), None),
    (KernelConfig(128, 64, 64), None),
    (KernelConfig(128, 128, 64, 2, 1), None),
    (gemv_configs()[0], None),
    (Sm80Config(128, 128, 32, 64, 64, 3), None),
    (Sm100Config(128, 128, 64), None),
])
def test_multicast_variant_shares_the_token_tile(config, variant):
    v = multicast_variant(config)
    assert (None if v is None else v.name) == variant
    if v is not None:
        assert valid(v) and v.epilogue == config.epilogue
