"""The command line on a machine without an sm90 GPU."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from autotune.__main__ import main
from autotune.space import KernelConfig

TINY = ["--hidden-size", "256", "--latent-size", "128", "--intermediate-size", "192",
        "--num-experts", "8", "--top-k", "2"]


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("AUTOTUNE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("AUTOTUNE_GENERATED_DIR", str(tmp_path / "generated"))
    return tmp_path


def test_help_runs_as_a_module():
    out = subprocess.run([sys.executable, "-m", "autotune", "--help"], capture_output=True,
                         text=True, env=os.environ.copy(), check=True).stdout
    assert "--arch" in out and "--compile-all" in out and "--preset" in out


def test_unsupported_arch_is_a_clear_error(capsys):
    assert main(["--arch", "sm70"]) == 2
    assert "not a known architecture" in capsys.readouterr().err


def test_bad_problem_is_a_clear_error(capsys):
    assert main(["--arch", "sm90", "--top-k", "600"]) == 2
    assert "top_k (600) must be <= num_experts (512)" in capsys.readouterr().err


def test_render_only_writes_the_space(cache, capsys):
    assert main(["--arch", "sm90", "--render-only", *TINY]) == 0
    out = capsys.readouterr().out
    assert "h256_l128_i192_e8_k2" in out
    sources = list((cache / "generated").glob("sm90_*.cu"))
    assert len(sources) > 100


def test_render_only_sm100_writes_its_space(cache, capsys):
    assert main(["--arch", "sm100", "--render-only", *TINY]) == 0
    out = capsys.readouterr().out
    assert "arch: sm100 (B200, GB200)" in out
    assert "Sources were generated (--render-only)" in out and "compiled" not in out
    sources = list((cache / "generated").glob("sm100_*.cu"))
    assert len(sources) > 100
    assert not list((cache / "generated").glob("sm90_*.cu"))


@pytest.mark.slow
def test_compiles_a_config_and_says_timing_needs_the_gpu(cache, capsys):
    """A real nvcc compile through the command line (the GPU-less path of the main job)."""
    if __import__("autotune.arch", fromlist=["x"]).device_arch() == "sm90":
        pytest.skip("an sm90 GPU is present: the command tunes instead")
    name = KernelConfig(128, 64, 64, 1, 1, "cooperative").name
    assert main(["--arch", "sm90", "--configs", name, *TINY]) == 0
    out = capsys.readouterr().out
    assert f"{name}  built" in out
    assert "1/1 built or cached" in out
    assert "Timing needs an sm90 GPU" in out
    assert list((cache / "cache" / "kernels" / "sm90").glob(f"{name}-*.so"))


@pytest.mark.parametrize("arch", ["sm100", "sm89"])
def test_on_a_gpu_of_the_arch_the_command_tunes(cache, capsys, monkeypatch, arch):
    """With a device of ``arch`` present, `--arch <arch>` runs the tuner (a stand-in times)."""
    from test_tune import StandIn

    import autotune.__main__ as cli
    from autotune import tune

    monkeypatch.setattr(cli, "device_arch", lambda *a: arch)
    monkeypatch.setattr(tune, "GpuEvaluator", lambda *a, **k: StandIn())
    assert main(["--arch", arch, *TINY, "--tokens", "4,256", "--trials", "3",
                 "--max-configs", "6"]) == 0
    out = capsys.readouterr().out
    assert f"{arch}_bf16_" in out and "table:" in out
    (table,) = (cache / "cache" / "tuned").glob(f"*__{arch}__*.json")
    assert f'"arch": "{arch}"' in table.read_text()


def test_candidates_and_stages_tune_only_those(cache, capsys, monkeypatch):
    """`--candidates` tunes the named configs (with the stages' defaults), `--stages` only the
    named stages; the table then holds those stages."""
    import json

    from test_tune import StandIn

    import autotune.__main__ as cli
    from autotune import tune

    monkeypatch.setattr(cli, "device_arch", lambda *a: "sm90")
    monkeypatch.setattr(tune, "GpuEvaluator", lambda *a, **k: StandIn())
    names = [KernelConfig(128, 192, 64, 1, 1, "pingpong").name,
             KernelConfig(64, 256, 64, 1, 1, "pingpong").name]
    assert main(["--arch", "sm90", *TINY, "--tokens", "4,256", "--trials", "3",
                 "--candidates", ",".join(names), "--stages", "up,down"]) == 0
    out = capsys.readouterr().out
    assert "stage up" in out and "stage down" in out and "stage fc1" not in out
    (table,) = (cache / "cache" / "tuned").glob("*__sm90__*.json")
    assert set(json.loads(table.read_text())["stages"]) == {"up", "down"}


def test_candidates_errors_name_the_argument(capsys, monkeypatch):
    import autotune.__main__ as cli

    monkeypatch.setattr(cli, "device_arch", lambda *a: "sm90")
    name = KernelConfig(128, 64, 64, 1, 1, "cooperative").name
    assert main(["--arch", "sm90", *TINY, "--candidates", name, "--configs", name]) == 2
    assert "--candidates" in capsys.readouterr().err
    assert main(["--arch", "sm90", *TINY, "--candidates", "sm90_bf16_1x1x1_c1x1_coop"]) == 2
    err = capsys.readouterr().err
    assert "--candidates" in err and "sm90_bf16_1x1x1_c1x1_coop" in err
    assert main(["--arch", "sm90", *TINY, "--candidates", name, "--stages", "gate"]) == 2
    assert "stages" in capsys.readouterr().err
    # --configs shares the check (it raised a traceback before).
    assert main(["--arch", "sm90", *TINY, "--configs", "sm90_bf16_1x1x1_c1x1_coop"]) == 2
    err = capsys.readouterr().err
    assert "--configs" in err and "sm90_bf16_1x1x1_c1x1_coop" in err
