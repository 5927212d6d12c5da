"""The nvcc driver: flags, build keys, a parallel pool, locking and atomic publish.

A built kernel library lives at ``<cache>/kernels/<arch>/<name>-<key>.so`` where ``key`` hashes
everything that can change the binary (rendered source, templates, CUTLASS header tree, the full
``nvcc --version``, the flags and the package version). Builds run in a temporary folder and are
published with ``os.replace`` under a file lock, so a killed build never leaves half a library
and two processes never build the same key twice. A failed compile is recorded with its log and
reported; it never stops the rest of the batch.
"""

from __future__ import annotations

import concurrent.futures as cf
import functools
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock

from ._version import __version__
from .arch import get_arch
from .codegen import render, templates_hash, write_source
from .env import cache_dir, template_dir
from .space import KernelConfig

log = logging.getLogger("autotune")

_DEFAULT_CUDA_HOME = "/usr/local/cuda"
# Measured: one sm90a CUTLASS grouped-GEMM translation unit peaks near 3.3 GB of host memory.
_BYTES_PER_JOB = int(3.5 * 2**30)


class BuildError(RuntimeError):
    """A toolchain problem that stops every build (no nvcc, no CUTLASS headers)."""


def find_nvcc() -> str:
    """Path of nvcc: ``AUTOTUNE_NVCC``, ``$CUDA_HOME/bin/nvcc``, ``PATH``, ``/usr/local/cuda``."""
    candidates = [os.environ.get("AUTOTUNE_NVCC")]
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            candidates.append(str(Path(os.environ[var]) / "bin" / "nvcc"))
    candidates += [shutil.which("nvcc"), str(Path(_DEFAULT_CUDA_HOME) / "bin" / "nvcc")]
    for c in candidates:
        if c and Path(c).is_file() and os.access(c, os.X_OK):
            return c
    raise BuildError(
        "nvcc not found. Install the CUDA toolkit (12.3 or newer for sm90a; "
        "https://developer.nvidia.com/cuda-downloads, or `pip install nvidia-cuda-nvcc`) and "
        "set CUDA_HOME or AUTOTUNE_NVCC to its location, or put nvcc on PATH.")


@functools.cache
def nvcc_version(nvcc: str) -> str:
    """The full ``nvcc --version`` text (part of the build key)."""
    out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, check=True)
    return out.stdout.strip()


def nvcc_release(nvcc: str) -> tuple[int, int]:
    """(major, minor) of an nvcc, parsed from ``release X.Y``."""
    text = nvcc_version(nvcc)
    for part in text.replace(",", " ").split():
        if part.count(".") == 1 and part.replace(".", "").isdigit() and "release" in text:
            major, minor = part.split(".")
            return int(major), int(minor)
    raise BuildError(f"cannot read the release of {nvcc} from: {text!r}")


def nvcc_target_reason(nvcc: str, arch: str) -> str | None:
    """Why ``nvcc`` cannot target ``arch`` (older than the arch's ``min_nvcc``), or None."""
    need, have = get_arch(arch).min_nvcc, nvcc_release(nvcc)
    if have >= need:
        return None
    return (f"{arch} kernels need nvcc {need[0]}.{need[1]} or newer "
            f"(-gencode={get_arch(arch).gencode}); {nvcc} is release {have[0]}.{have[1]}")


@functools.cache
def cutlass_include_dirs() -> tuple[Path, Path]:
    """CUTLASS/CuTe headers and CUTLASS's util headers, from the nvidia-cutlass wheel."""
    spec = importlib.util.find_spec("cutlass_library")
    if spec is None or not spec.submodule_search_locations:
        raise BuildError("CUTLASS headers not found: `pip install nvidia-cutlass==4.2.0.0` "
                         "(it carries them under cutlass_library/source/include)")
    root = Path(next(iter(spec.submodule_search_locations))) / "source"
    inc, util = root / "include", root / "tools" / "util" / "include"
    if not (inc / "cutlass" / "cutlass.h").is_file():
        raise BuildError(f"CUTLASS headers missing under {inc}; reinstall nvidia-cutlass")
    return inc, util


@functools.cache
def cutlass_tree_hash() -> str:
    """Content hash of the CUTLASS header trees (an upgrade changes every build key)."""
    h = hashlib.sha256()
    for root in cutlass_include_dirs():
        for p in sorted(root.rglob("*")):
            if p.is_file():
                h.update(str(p.relative_to(root)).encode())
                h.update(p.read_bytes())
    return h.hexdigest()


def nvcc_flags(arch: str) -> list[str]:
    """Every nvcc flag of a kernel library of ``arch``, in one place."""
    inc, util = cutlass_include_dirs()
    return [
        "-std=c++17", "-O3", "-DNDEBUG", *get_arch(arch).gencode_flags,
        "--expt-relaxed-constexpr", "--expt-extended-lambda",
        "-shared", "-Xcompiler=-fPIC", "-Xcompiler=-fvisibility=hidden",
        # Static cudart keeps the library independent of the CUDA runtime torch ships with.
        "-cudart=static",
        f"-I{template_dir()}", f"-I{inc}", f"-I{util}",
    ]


def build_key(config: KernelConfig, nvcc: str) -> str:
    """Hash of everything that determines the binary of ``config``."""
    # Include folders are hashed by content (templates, CUTLASS tree), not by path, so a cache
    # stays valid when the package or its virtual environment moves.
    flags = [f for f in nvcc_flags(config.arch) if not f.startswith("-I")]
    parts = {
        "source": render(config), "templates": templates_hash(config),
        "cutlass": cutlass_tree_hash(), "nvcc": nvcc_version(nvcc), "flags": flags,
        "package": __version__,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:20]


def library_path(config: KernelConfig, key: str) -> Path:
    return cache_dir() / "kernels" / config.arch / f"{config.name}-{key}.so"


@dataclass(frozen=True)
class BuildResult:
    """Outcome of one config's build: status is "built", "cached" or "failed"."""

    config: KernelConfig
    status: str
    seconds: float
    path: Path | None
    log: str = ""

    @property
    def ok(self) -> bool:
        return self.status in ("built", "cached")


def _compile(config: KernelConfig, nvcc: str, key: str, source: Path) -> BuildResult:
    target = library_path(config, key)
    target.parent.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    with FileLock(str(target) + ".lock"):
        if target.is_file():
            return BuildResult(config, "cached", 0.0, target)
        with tempfile.TemporaryDirectory(dir=target.parent, prefix=".build-") as tmp:
            out = Path(tmp) / target.name
            cmd = [nvcc, *nvcc_flags(config.arch), "-o", str(out), str(source)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            seconds = time.monotonic() - start
            if proc.returncode != 0 or not out.is_file():
                text = f"$ {' '.join(cmd)}\n{proc.stdout}\n{proc.stderr}"
                Path(str(target) + ".log").write_text(text, encoding="utf-8")
                return BuildResult(config, "failed", seconds, None, text[-4000:])
            os.replace(out, target)
    return BuildResult(config, "built", seconds, target)


def default_jobs() -> int:
    """Parallel nvcc processes: ``AUTOTUNE_JOBS``, else min(cores, available memory / 3.5 GB)."""
    if os.environ.get("AUTOTUNE_JOBS"):
        return max(1, int(os.environ["AUTOTUNE_JOBS"]))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    avail = None
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
    except OSError:
        pass
    by_mem = cores if avail is None else max(1, avail // _BYTES_PER_JOB)
    return max(1, min(cores or 1, by_mem))


def cached_library(config: KernelConfig) -> Path | None:
    """The built library of ``config`` if it is in the cache under the current build key."""
    path = library_path(config, build_key(config, find_nvcc()))
    return path if path.is_file() else None


def build(configs: list[KernelConfig], jobs: int | None = None,
          on_done=None) -> list[BuildResult]:
    """Compile ``configs`` (skipping cached ones) with ``jobs`` nvcc processes at once.

    Parameters
    ----------
    configs : list of KernelConfig
        Valid configs (render raises ``ValueError`` on an invalid one).
    jobs : int, optional
        Parallel nvcc processes; default :func:`default_jobs`.
    on_done : callable, optional
        Called with each :class:`BuildResult` as it finishes (progress bars).

    Returns
    -------
    list of BuildResult, in the order of ``configs``.

    Requirements
    ------------
    nvcc and the CUTLASS headers are present (else :class:`BuildError`, before any compile). A
    config whose architecture needs a newer nvcc fails without running it.
    """
    nvcc = find_nvcc()
    cutlass_include_dirs()
    jobs = jobs or default_jobs()
    too_old = {arch: nvcc_target_reason(nvcc, arch) for arch in {c.arch for c in configs}}
    results: dict[int, BuildResult] = {}
    with cf.ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = {}
        for i, config in enumerate(configs):
            if too_old[config.arch]:
                results[i] = BuildResult(config, "failed", 0.0, None, too_old[config.arch])
                if on_done:
                    on_done(results[i])
                continue
            key = build_key(config, nvcc)
            if library_path(config, key).is_file():
                results[i] = BuildResult(config, "cached", 0.0, library_path(config, key))
                if on_done:
                    on_done(results[i])
                continue
            futures[pool.submit(_compile, config, nvcc, key, write_source(config))] = i
        for fut in cf.as_completed(futures):
            i = futures[fut]
            try:
                results[i] = fut.result()
            except Exception as e:  # noqa: BLE001 - one config's failure never stops the batch
                results[i] = BuildResult(configs[i], "failed", 0.0, None, repr(e))
            if results[i].status == "failed":
                log.warning("build of %s failed; log: %s", configs[i].name,
                            results[i].log.strip().splitlines()[-1:] or "")
            if on_done:
                on_done(results[i])
    return [results[i] for i in range(len(configs))]
