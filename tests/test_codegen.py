"""Golden renders and write-if-different (no GPU, no compiler)."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from autotune.codegen import render, template_files, write_source
from autotune.space import KernelConfig, Sm80Config, Sm100Config

GOLDEN = Path(__file__).parent / "golden"


@pytest.mark.parametrize("config", [
    KernelConfig(128, 128, 64, 1, 2, "cooperative"),
    KernelConfig(128, 32, 128, 1, 1, "pingpong", True),
    Sm80Config(128, 128, 32, 64, 64, 3),
    Sm100Config(256, 128, 64, 2, 1, "2sm"),
    KernelConfig(16, 4, 256, 1, 1, "gemv", True, "relu2"),
], ids=lambda c: c.name)
def test_golden_render(config):
    assert render(config) == (GOLDEN / f"{config.name}.cu").read_text()


def test_render_carries_every_choice():
    text = render(KernelConfig(64, 16, 128, 2, 1, "pingpong", True, dtype="fp16"))
    assert "GroupedGemm<cutlass::half_t, 64, 16, 128,\n" in text
    assert "2, 1, false,\n" in text and "true, 0>;" in text
    assert "sm90_fp16_64x16x128_c2x1_pp_swapab_run(" in text


def test_sm80_render_carries_the_epilogue_kind():
    for epilogue, kind in (("identity", 0), ("relu2", 1), ("f32", 2)):
        text = render(Sm80Config(128, 128, 32, 64, 64, 3, epilogue=epilogue))
        assert f"64, 64, 3,\n{' ' * 43}{kind}>;" in text


def test_gemv_render_carries_rows_per_warp_rows_per_pass_epilogue_and_schedule():
    text = render(KernelConfig(8, 1, 256, 1, 1, "gemv", True, "f32", "fp16"))
    assert '#include "gemv.cuh"' in text
    assert "GroupedGemv<__half, 2, 1,\n" in text and "2, false, true>;" in text
    # Items of 16 rows and more stream through shared memory (the bulk schedule).
    assert "4, 1,\n" in (text := render(KernelConfig(16, 1, 256, 1, 1, "gemv", True)))
    assert "0, true, true>;" in text


def test_render_rejects_invalid_config():
    with pytest.raises(ValueError, match="cooperative needs tile M"):
        render(KernelConfig(64, 128, 64, schedule="cooperative"))


def test_write_if_different(tmp_path):
    c = KernelConfig(128, 128, 64)
    p = write_source(c, tmp_path)
    mtime = p.stat().st_mtime_ns
    assert write_source(c, tmp_path) == p and p.stat().st_mtime_ns == mtime
    p.write_text("stale")
    write_source(c, tmp_path)
    assert p.read_text() == render(c)
    assert sorted(x.name for x in tmp_path.iterdir()) == [p.name]


@pytest.mark.parametrize("arch,pdl", [("sm90", "true"), ("sm100", "true"), ("sm80", "false"),
                                      ("sm89", "false")])
def test_routing_launches_early_only_where_its_code_waits(arch, pdl):
    """sm80/sm89 libraries (their PTX runs on newer GPUs too) have no griddepcontrol: launched
    early, their kernels would read what the kernel before them has not written yet."""
    from autotune.space import RoutingConfig

    assert f"constexpr bool kPdl = {pdl};" in render(RoutingConfig("bf16", arch))


@pytest.mark.parametrize("entry", ["route_gather", "swiglu", "combine"])
def test_routing_exports_match_the_runtime_signatures(entry):
    """runtime.Routing's ctypes argument lists (the stream last) have as many arguments as the
    library's exports: a parameter added on one side only would shift every argument after it."""
    from autotune.runtime import Routing
    from autotune.space import RoutingConfig

    config = RoutingConfig("bf16", "sm90")
    text = render(config)
    params = re.search(rf"{config.name}_{entry}\((.*?)\) \{{", text, re.S).group(1)
    assert params.count(",") + 1 == len(Routing._SIGNATURES[entry])
    assert params.rstrip().endswith("cudaStream_t stream")


def test_early_launched_kernels_wait_before_their_inputs():
    """Every kernel of the routing and gemv libraries waits on the kernel before it (pdl.cuh's
    contract) and every launch goes through pdl::launch, not <<<>>>."""
    root = template_files()[0].parent
    for name in ("gemv.cuh", "moe_routing.cuh"):
        text = (root / name).read_text()
        bodies = re.findall(r"\n__global__ .*?\) \{\n(.*?)\n\}\n", text, re.S)
        assert bodies and len(bodies) == text.count("\n__global__ "), name
        for body in bodies:
            assert "pdl::enter();" in body or "pdl::wait();" in body, body[:200]
    for name in ("gemv.cuh", "gemv.cu.j2", "moe_routing.cuh", "moe_routing.cu.j2"):
        assert "<<<" not in (root / name).read_text(), name


def test_templates_found():
    names = {p.name for p in template_files()}
    assert {"sm90_grouped_gemm.cu.j2", "sm90_grouped_gemm.cuh", "sm80_grouped_gemm.cu.j2",
            "sm80_grouped_gemm.cuh", "sm100_grouped_gemm.cu.j2", "sm100_grouped_gemm.cuh"} <= names


def test_sm89_renders_the_sm80_template():
    text = render(Sm80Config(64, 64, 32, 32, 32, 3, arch="sm89"))
    assert "GroupedGemm<cutlass::bfloat16_t, 64, 64, 32,\n" in text
    assert "sm89_bf16_64x64x32_w32x32_s3_run(" in text


def test_sm100_render_carries_every_choice():
    text = render(Sm100Config(128, 16, 128, 2, 1, "2sm", True, "relu2", "fp16"))
    assert '#include "sm100_grouped_gemm.cuh"' in text
    assert "autotune::sm100::GroupedGemm<cutlass::half_t, 128, 16, 128,\n" in text
    assert "2, 1, true,\n" in text and "true, 1>;" in text
    assert "sm100_fp16_128x16x128_c2x1_2sm_swapab_relu2_run(" in text
    text = render(Sm100Config(64, 16, 128, 1, 1, "1sm", False, "f32"))
    assert "1, 1, false,\n" in text and "false, 2>;" in text
    with pytest.raises(ValueError, match="2SM MMA pairs CTAs"):
        render(Sm100Config(256, 128, 64, 1, 1, "2sm"))


def test_sm100_exports_the_sm90_abi():
    # Same extern "C" entry points and argument lists: runtime.py loads either library.
    def entry_points(config):
        text = render(config).replace(config.name, "NAME")
        return text[text.index("AUTOTUNE_EXPORT"):].replace("sm100", "ARCH").replace("sm90", "ARCH")

    assert entry_points(Sm100Config(128, 64, 64)) == entry_points(KernelConfig(128, 64, 64))


def test_templates_hash_covers_what_a_config_includes(tmp_path, monkeypatch):
    """A routing change keeps the GEMM libraries' build keys (they do not include it); a shared
    header's change reaches every config that includes it, transitively."""
    from autotune import codegen
    from autotune.space import RoutingConfig

    root = tmp_path / "templates"
    shutil.copytree(codegen.template_dir(), root)
    monkeypatch.setattr(codegen, "template_dir", lambda: root)
    gemm, routing = KernelConfig(128, 64, 64), RoutingConfig("bf16", "sm90")
    sm100 = Sm100Config(256, 128, 64, 2, 1, "2sm")
    before = {c: codegen.templates_hash(c) for c in (gemm, sm100, routing)}
    assert [p.name for p in codegen.template_closure("moe_routing.cu.j2")] == [
        "device_facts.cuh", "moe_routing.cu.j2", "moe_routing.cuh", "pdl.cuh"]

    with (root / "moe_routing.cuh").open("a") as f:
        f.write("// changed\n")
    assert codegen.templates_hash(gemm) == before[gemm]
    assert codegen.templates_hash(routing) != before[routing]
    with (root / "epilogues.cuh").open("a") as f:  # sm100 reaches it through sm90's header
        f.write("// changed\n")
    assert codegen.templates_hash(gemm) != before[gemm]
    assert codegen.templates_hash(sm100) != before[sm100]
