"""The nvcc driver: keys, failure capture, publish; one real CUTLASS compile (slow)."""

from __future__ import annotations

import ctypes
import shutil

import pytest

from autotune import build as build_mod
from autotune.build import (
    BuildError,
    build,
    build_key,
    cached_library,
    find_nvcc,
    library_path,
    nvcc_flags,
)
from autotune.space import KernelConfig, Sm80Config, Sm100Config, gemv_configs

# The cheapest variant to compile: one small cooperative kernel without clusters.
CHEAP = KernelConfig(128, 64, 64, 1, 1, "cooperative")

needs_nvcc = pytest.mark.skipif(shutil.which("nvcc") is None and
                                not build_mod.Path("/usr/local/cuda/bin/nvcc").exists(),
                                reason="nvcc is not installed")


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("AUTOTUNE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("AUTOTUNE_GENERATED_DIR", str(tmp_path / "generated"))
    return tmp_path


def test_flags_target_sm90a_and_find_cutlass():
    flags = nvcc_flags("sm90")
    assert "-gencode=arch=compute_90a,code=sm_90a" in flags
    assert any(f.endswith("cutlass_library/source/include") for f in flags)
    assert any(f.endswith("tools/util/include") for f in flags)


def test_flags_target_sm100a():
    assert "-gencode=arch=compute_100a,code=sm_100a" in nvcc_flags("sm100")


def test_missing_nvcc_is_a_clear_error(monkeypatch, tmp_path):
    for var in ("AUTOTUNE_NVCC", "CUDA_HOME", "CUDA_PATH"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(build_mod.shutil, "which", lambda _: None)
    monkeypatch.setattr(build_mod, "_DEFAULT_CUDA_HOME", str(tmp_path / "none"))
    with pytest.raises(BuildError, match="nvcc not found.*CUDA_HOME"):
        find_nvcc()


@needs_nvcc
def test_build_key_tracks_source_flags_and_version(monkeypatch):
    nvcc = find_nvcc()
    key = build_key(CHEAP, nvcc)
    assert key == build_key(CHEAP, nvcc)
    assert key != build_key(KernelConfig(128, 128, 64), nvcc)
    monkeypatch.setattr(build_mod, "__version__", "999")
    assert build_key(CHEAP, nvcc) != key
    monkeypatch.undo()
    flags = nvcc_flags("sm90")
    monkeypatch.setattr(build_mod, "nvcc_flags", lambda arch: [*flags, "-lineinfo"])
    assert build_key(CHEAP, nvcc) != key


@needs_nvcc
def test_compile_error_is_captured_not_raised(cache, monkeypatch):
    flags = nvcc_flags("sm90")
    monkeypatch.setattr(build_mod, "nvcc_flags", lambda arch: [*flags, "--no-such-flag"])
    (result,) = build([CHEAP], jobs=1)
    assert result.status == "failed" and not result.ok
    assert "no-such-flag" in result.log
    assert result.path is None


@needs_nvcc
def test_too_old_nvcc_fails_the_arch_without_running(cache, monkeypatch):
    monkeypatch.setattr(build_mod, "nvcc_release", lambda nvcc: (12, 4))
    monkeypatch.setattr(build_mod, "_compile", lambda *a: pytest.fail("nvcc must not run"))
    (result,) = build([Sm100Config(128, 64, 64)], jobs=1)
    assert result.status == "failed" and "sm100 kernels need nvcc 12.8 or newer" in result.log


@needs_nvcc
@pytest.mark.slow
def test_real_compile_publishes_a_loadable_library(cache):
    """Really runs nvcc on the CUTLASS sm90a grouped GEMM, then loads the library."""
    (result,) = build([CHEAP], jobs=1)
    assert result.ok, result.log
    assert result.path == library_path(CHEAP, build_key(CHEAP, find_nvcc()))
    leftovers = [p.name for p in result.path.parent.iterdir()
                 if not p.name.endswith((".so", ".lock"))]
    assert leftovers == []
    lib = ctypes.CDLL(str(result.path))
    size = getattr(lib, f"{CHEAP.name}_workspace_size")
    size.restype, size.argtypes = ctypes.c_size_t, [ctypes.c_int, ctypes.c_int]
    assert size(512, 132) > size(1, 132) > 0
    (again,) = build([CHEAP], jobs=1)
    assert again.status == "cached" and again.path == result.path


@needs_nvcc
@pytest.mark.slow
@pytest.mark.parametrize("arch,epilogue", [("sm80", "identity"), ("sm89", "relu2"),
                                            ("sm80", "f32")])
def test_real_compile_of_the_cutlass2_grouped_gemm(cache, arch, epilogue):
    """One real nvcc compile per CUTLASS 2.x target and epilogue kind: the cheapest tile, with
    its PTX embedded."""
    config = Sm80Config(64, 64, 32, 32, 32, 3, epilogue, arch=arch)
    (result,) = build([config], jobs=1)
    assert result.ok, result.log
    lib = ctypes.CDLL(str(result.path))
    size = getattr(lib, f"{config.name}_workspace_size")
    size.restype, size.argtypes = ctypes.c_size_t, [ctypes.c_int, ctypes.c_int]
    assert size(8, 108) > 0
    assert f"-gencode=arch=compute_{arch[2:]},code=[sm_{arch[2:]},compute_{arch[2:]}]" in \
        nvcc_flags(arch)


def _workspace_size_of_a_full_abi(config):
    """Build ``config``, check its library exports the whole C ABI, return its workspace_size."""
    (result,) = build([config], jobs=1)
    assert result.ok, result.log
    lib = ctypes.CDLL(str(result.path))
    for entry in ("workspace_size", "run", "run_dense", "last_error"):
        assert hasattr(lib, f"{config.name}_{entry}")
    size = getattr(lib, f"{config.name}_workspace_size")
    size.restype, size.argtypes = ctypes.c_size_t, [ctypes.c_int, ctypes.c_int]
    return size


@needs_nvcc
@pytest.mark.slow
def test_real_compile_of_the_sm100_grouped_gemm(cache):
    """One real nvcc compile for sm100a (no Blackwell GPU here: compile-verified only)."""
    config = Sm100Config(128, 64, 64, 1, 1, "1sm")
    size = _workspace_size_of_a_full_abi(config)
    assert size(512, 148) > size(1, 148) > 0


@needs_nvcc
@pytest.mark.parametrize("epilogue", ["relu2", "f32"])
def test_real_compile_of_the_gemv_kernel(cache, epilogue):
    """The gemv decode kernel compiles in seconds: every epilogue's dense and grouped entry."""
    config = gemv_configs()[-1].with_epilogue(epilogue)
    size = _workspace_size_of_a_full_abi(config)
    assert size(512, 132) == 0  # reads the shapes and pointers where the caller put them
    lib = ctypes.CDLL(str(cached_library(config)))
    fits = getattr(lib, f"{config.name}_combine_fits")  # and the combine launch
    assert hasattr(lib, f"{config.name}_run_combine_dense")
    assert (fits(1, 1024, 22), fits(40, 1024, 22), fits(47, 8, 22)) == (1, 0, 0)
