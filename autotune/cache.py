"""The tuned-config store: one JSON file per tuning key, looked up at runtime.

A *tuning key* names everything a timing result depends on: the GEMM dimensions of the problem
(hidden, latent, intermediate, experts, top-k, activation, dtype), the architecture, the device
(normalised name and SM count), the CUDA major version and the hash of the architecture's search
space. Its table holds, per stage and token bucket, the winner, the runner-up, the winner's
median and p20/p80, the default config's time and the ``torch._grouped_mm`` peer's time, plus the
versions that produced it.

Lookup order: ``AUTOTUNE_CONFIG_DIR`` -> ``<AUTOTUNE_CACHE_DIR>/tuned`` -> tables shipped in the
package (``autotune/tuned``). A table made by another package, nvcc or CUTLASS version still
applies, with one warning per process; an unreadable file is reported once and skipped. Files are
JSON, never pickle, and written atomically (temporary file, fsync, ``os.replace``).
"""

from __future__ import annotations

import contextlib
import functools
import glob
import importlib.metadata
import json
import logging
import os
import re
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ._version import __version__
from .env import cache_dir, config_dir
from .problem import PRESETS, LatentMoEProblem
from .space import (
    DEFAULT_ORDER,
    KernelConfig,
    Sm80Config,
    Sm100Config,
    TileOrder,
    config_from_dict,
    invalid_reason,
    search_space,
    space_hash,
    tile_orders,
)
from .workload import (
    Plan,
    bucket_for,
    check_stage,
    config_dtype,
    default_config,
    default_plan,
    stage_epilogue,
    stages_of,
)

log = logging.getLogger("autotune")

SCHEMA_VERSION = 1
TIMING_METHOD = "cuda-graph replay, rotated inputs, median of N"
_VERSION_FIELDS = ("package_version", "nvcc_version", "cutlass_version")
_WARNED: set[str] = set()
_TABLES: dict[str, TunedTable] = {}
_LOCK = threading.Lock()


class TableError(ValueError):
    """A tuned-table file that cannot be used (unreadable, not JSON, wrong schema or key)."""


def normalise_device_name(name: str) -> str:
    """Lowercase, runs of non-alphanumerics to '-': "NVIDIA H200" -> "nvidia-h200".

    Requirements
    ------------
    ``name`` is a non-empty str (``ValueError`` otherwise).
    """
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"device name must be a non-empty str, got {name!r}")
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


@dataclass(frozen=True)
class DeviceInfo:
    """The device part of a tuning key: product name, SM count, CUDA major version.

    ``cuda_major`` is the major version of the toolkit that builds the kernels (nvcc), which
    decides the generated code; torch's CUDA version stands in where no nvcc is found.
    """

    name: str
    sm_count: int
    cuda_major: int

    def __post_init__(self) -> None:
        normalise_device_name(self.name)
        for what, v in (("sm_count", self.sm_count), ("cuda_major", self.cuda_major)):
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"{what} must be a positive int, got {v!r}")

    @property
    def slug(self) -> str:
        return f"{normalise_device_name(self.name)}-{self.sm_count}sm"

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "sm_count": self.sm_count, "cuda_major": self.cuda_major}

    @classmethod
    def current(cls, index: int | None = None) -> DeviceInfo:
        """The visible CUDA device ``index`` (default: current).

        Requirements
        ------------
        A CUDA device is visible (else ``RuntimeError``).
        """
        import torch

        if not torch.cuda.is_available():
            raise RuntimeError("no CUDA device is visible; the device part of a tuning key "
                               "needs one (or pass DeviceInfo explicitly)")
        return _device_info(torch.cuda.current_device() if index is None else index)


@functools.cache
def _device_info(index: int) -> DeviceInfo:
    # Once per device and process: the runtime lookup must not query the driver or run nvcc
    # on every call.
    import torch

    props = torch.cuda.get_device_properties(index)
    return DeviceInfo(torch.cuda.get_device_name(index), int(props.multi_processor_count),
                      _cuda_major())


def _cuda_major() -> int:
    from .build import BuildError, find_nvcc, nvcc_release

    try:
        return nvcc_release(find_nvcc())[0]
    except (BuildError, OSError, ValueError):
        import torch

        return int(str(torch.version.cuda or "0").split(".")[0]) or 1


def problem_id(problem: LatentMoEProblem) -> str:
    """The GEMM dimensions of ``problem`` as a key part.

    Routing choices (scoring, grouped top-k, scaling) change no GEMM, so they are left out: a
    table tuned for one applies to all, and the tune command can name every field that matters.
    """
    latent = "none" if problem.latent_size is None else str(problem.latent_size)
    return (f"h{problem.hidden_size}_l{latent}_i{problem.intermediate_size}"
            f"_e{problem.num_experts}_k{problem.top_k}_{problem.activation}_{problem.dtype}")


def arch_space_hash(arch: str, problem: LatentMoEProblem) -> str:
    """:func:`autotune.space.space_hash` of ``arch``'s search space in ``problem``'s dtype."""
    return space_hash(search_space(arch, None, config_dtype(problem)))


def tuning_key(problem: LatentMoEProblem, arch: str, device: DeviceInfo,
               space: str | None = None) -> str:
    """The tuning key: problem dimensions, arch, device slug + SM count, CUDA major, space hash.

    Requirements
    ------------
    ``problem`` is a :class:`LatentMoEProblem`, ``device`` a :class:`DeviceInfo`; ``space``
    defaults to :func:`arch_space_hash`.
    """
    if not isinstance(problem, LatentMoEProblem):
        raise TypeError(f"problem must be a LatentMoEProblem, got {type(problem).__name__}")
    if not isinstance(device, DeviceInfo):
        raise TypeError(f"device must be a DeviceInfo, got {type(device).__name__}")
    space = space or arch_space_hash(arch, problem)
    return f"{problem_id(problem)}__{arch}__{device.slug}__cuda{device.cuda_major}__s{space}"


def tune_command(problem: LatentMoEProblem, arch: str = "sm90") -> str:
    """The exact command line that tunes ``problem`` on ``arch``: ``--preset`` when its GEMM
    dimensions are a preset's, else every size.

    Requirements
    ------------
    ``problem`` is a :class:`LatentMoEProblem`.
    """
    base = f"python -m autotune --arch {arch}"
    for name, p in PRESETS.items():
        if problem_id(p.with_(dtype=problem.dtype)) == problem_id(problem):
            dtype = "" if problem.dtype == p.dtype else f" --dtype {problem.dtype}"
            return f"{base} --preset {name}{dtype}"
    latent = "none" if problem.latent_size is None else problem.latent_size
    return (f"{base} --hidden-size {problem.hidden_size} --latent-size {latent} "
            f"--intermediate-size {problem.intermediate_size} --num-experts "
            f"{problem.num_experts} --top-k {problem.top_k} --activation {problem.activation} "
            f"--dtype {problem.dtype}")


@functools.cache
def runtime_versions() -> dict[str, str | None]:
    """Versions of this process's package, nvcc (full ``--version`` text) and CUTLASS wheel."""
    from .build import BuildError, find_nvcc, nvcc_version

    try:
        nvcc = nvcc_version(find_nvcc())
    except (BuildError, OSError, ValueError):
        nvcc = None
    try:
        cutlass = importlib.metadata.version("nvidia-cutlass")
    except importlib.metadata.PackageNotFoundError:
        cutlass = None
    return {"package_version": __version__, "nvcc_version": nvcc, "cutlass_version": cutlass}


@dataclass(frozen=True)
class TunedConfig:
    """A config as stored: its procedural name and its fields."""

    name: str
    config: dict[str, Any]

    @classmethod
    def of(cls, config: KernelConfig) -> TunedConfig:
        return cls(config.name, config.to_dict())

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "config": dict(self.config)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TunedConfig:
        if not isinstance(d.get("name"), str) or not isinstance(d.get("config"), dict):
            raise TableError(f"a config entry needs 'name' (str) and 'config' (dict), got {d!r}")
        return cls(d["name"], dict(d["config"]))


@dataclass(frozen=True)
class BucketEntry:
    """Result of one (stage, token bucket): winner, runner-up and the times around them."""

    winner: TunedConfig
    median_ms: float
    p20_ms: float
    p80_ms: float
    runner_up: TunedConfig | None = None
    runner_up_ms: float | None = None
    default_name: str | None = None
    default_ms: float | None = None
    peer_ms: float | None = None
    trials: int = 0
    order: str = DEFAULT_ORDER.tag  # the winner's tile order (TileOrder.tag)

    def to_dict(self) -> dict[str, Any]:
        return {"winner": self.winner.to_dict(), "order": self.order,
                "median_ms": self.median_ms,
                "p20_ms": self.p20_ms, "p80_ms": self.p80_ms,
                "runner_up": None if self.runner_up is None else self.runner_up.to_dict(),
                "runner_up_ms": self.runner_up_ms, "default_name": self.default_name,
                "default_ms": self.default_ms, "peer_ms": self.peer_ms, "trials": self.trials}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BucketEntry:
        try:
            runner = d.get("runner_up")
            return cls(TunedConfig.from_dict(d["winner"]), float(d["median_ms"]),
                       float(d["p20_ms"]), float(d["p80_ms"]),
                       None if runner is None else TunedConfig.from_dict(runner),
                       _opt_float(d.get("runner_up_ms")), d.get("default_name"),
                       _opt_float(d.get("default_ms")), _opt_float(d.get("peer_ms")),
                       int(d.get("trials", 0)),
                       # Tables written before tile orders were tuned ran the default order.
                       TileOrder.from_tag(d.get("order", DEFAULT_ORDER.tag)).tag)
        except (KeyError, TypeError, ValueError) as e:
            raise TableError(f"bad bucket entry: {e!r}") from None


def _opt_float(v: Any) -> float | None:
    return None if v is None else float(v)


@dataclass(frozen=True)
class TunedTable:
    """The tuned configs of one tuning key, and the runtime lookup over them.

    ``entries`` maps stage -> token bucket -> :class:`BucketEntry`. An empty table is the
    untuned case: :meth:`config_for` returns the default configs.
    """

    key: str
    problem: LatentMoEProblem
    arch: str
    device: DeviceInfo | None = None
    space_hash: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    entries: dict[str, dict[int, BucketEntry]] = field(default_factory=dict)
    source: Path | None = None
    _resolved: dict[tuple[str, int], tuple[KernelConfig, TileOrder]] = field(
        default_factory=dict, init=False, compare=False, repr=False)

    @property
    def tuned(self) -> bool:
        return any(self.entries.values())

    def buckets(self, stage: str) -> tuple[int, ...]:
        """Tuned token buckets of ``stage``, ascending (empty when untuned)."""
        return tuple(sorted(self.entries.get(stage, {})))

    def winners(self) -> list[KernelConfig | Sm80Config | Sm100Config]:
        """The stored winners' configs, once each (what to build ahead of time)."""
        configs = (config_from_dict(e.winner.config) for per in self.entries.values()
                   for e in per.values())
        return list({c.name: c for c in configs}.values())

    def config_for(self, stage: str, tokens: int) -> KernelConfig:
        """The config to run ``stage`` with at ``tokens`` tokens.

        The bucket is the smallest tuned bucket >= ``tokens`` (clamped to the largest); its
        winner is used if :func:`autotune.space.valid` accepts it for the problem and it has the
        stage's epilogue, else the default config. Untuned stages get the default and ONE warning
        per process naming the tune command. Results are memoised per (stage, tokens): after the
        first call no file is read and nothing is validated again.

        Requirements
        ------------
        ``stage`` is a stage of the problem; ``tokens`` is an int >= 0.
        """
        return self._lookup(stage, tokens)[0]

    def plan_for(self, tokens: int) -> Plan:
        """The configs and tile orders of a forward at ``tokens`` tokens: :meth:`config_for`
        and :meth:`order_for` of every stage of the problem (memoised with them)."""
        plan = default_plan(self.problem, tokens, self.arch)
        for stage in stages_of(self.problem):
            plan = plan.with_stage(stage, *self._lookup(stage, tokens))
        return plan

    def entry_for(self, stage: str, tokens: int) -> BucketEntry | None:
        """The stored entry :meth:`config_for` looks up at ``tokens`` (None where the stage is
        untuned); its winner runs unless the lookup falls back to the default."""
        buckets = self.buckets(stage)
        return self.entries[stage][bucket_for(tokens, buckets)] if buckets else None

    def order_for(self, stage: str, tokens: int) -> TileOrder:
        """The tile order to launch :meth:`config_for`'s config with: the bucket winner's when
        that config is the winner and ``arch`` takes the order, else the default order.

        Requirements
        ------------
        As :meth:`config_for` (and memoised with it).
        """
        return self._lookup(stage, tokens)[1]

    def _lookup(self, stage: str, tokens: int) -> tuple[KernelConfig, TileOrder]:
        key = (stage, tokens)
        hit = self._resolved.get(key)
        if hit is not None:
            return hit
        check_stage(self.problem, stage)
        if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 0:
            raise ValueError(f"tokens must be an int >= 0, got {tokens!r}")
        resolved = self._resolve(stage, tokens)
        with _LOCK:
            self._resolved[key] = resolved
        return resolved

    def _resolve(self, stage: str, tokens: int) -> tuple[KernelConfig, TileOrder]:
        default = default_config(self.problem, stage, tokens, self.arch)
        entry = self.entry_for(stage, tokens)
        if entry is None:
            warn_once(f"untuned:{self.key}",
                      "no tuned kernels for %s on %s (key %s); using default configs. Tune with: "
                      "%s", self.problem.key, self.arch, self.key,
                      tune_command(self.problem, self.arch))
            return default, DEFAULT_ORDER
        try:
            config = config_from_dict(entry.winner.config)
            reason = invalid_reason(config, self.problem)
        except (TypeError, ValueError) as e:
            reason = f"unreadable config: {e}"
        if reason is None and config.epilogue != stage_epilogue(self.problem, stage):
            reason = f"epilogue {config.epilogue} is not the {stage} stage's"
        if reason is None and config.arch != self.arch:
            reason = f"arch {config.arch} is not {self.arch}"
        if reason is not None:
            warn_once(f"invalid:{self.key}:{entry.winner.name}",
                      "tuned config %s in %s is not usable (%s); using the default %s",
                      entry.winner.name, self.source, reason, default.name)
            return default, DEFAULT_ORDER
        order = TileOrder.from_tag(entry.order)
        if order not in tile_orders(config):
            warn_once(f"order:{self.key}:{entry.order}", "tile order %s in %s is not one %s "
                      "takes; using the default", entry.order, self.source, config.name)
            order = DEFAULT_ORDER
        return config, order

    def to_json(self) -> dict[str, Any]:
        """The file contents (a JSON-serialisable dict)."""
        return {
            "schema": SCHEMA_VERSION, "key": self.key, "problem": self.problem.to_dict(),
            "arch": self.arch, "device": None if self.device is None else self.device.to_dict(),
            "space_hash": self.space_hash, "metadata": dict(self.metadata),
            "stages": {stage: {str(b): e.to_dict() for b, e in sorted(per.items())}
                       for stage, per in self.entries.items()},
        }

    @classmethod
    def from_json(cls, data: Any, source: Path | None = None) -> TunedTable:
        """Parse file contents; :class:`TableError` on anything that is not a valid table."""
        if not isinstance(data, dict):
            raise TableError(f"expected a JSON object, got {type(data).__name__}")
        if data.get("schema") != SCHEMA_VERSION:
            raise TableError(f"schema {data.get('schema')!r} is not the supported "
                             f"{SCHEMA_VERSION}")
        try:
            problem = LatentMoEProblem(**data["problem"])
            device = None if data.get("device") is None else DeviceInfo(**data["device"])
            entries = {str(stage): {int(b): BucketEntry.from_dict(e) for b, e in per.items()}
                       for stage, per in data["stages"].items()}
            return cls(str(data["key"]), problem, str(data["arch"]), device,
                       data.get("space_hash"), dict(data.get("metadata") or {}), entries,
                       source)
        except TableError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise TableError(f"malformed table: {e!r}") from None

    def merged(self, newer: TunedTable) -> TunedTable:
        """This table's buckets updated by ``newer``'s (same key), with ``newer``'s metadata."""
        if newer.key != self.key:
            raise ValueError(f"cannot merge tables of different keys: {self.key} and {newer.key}")
        entries = {stage: dict(per) for stage, per in self.entries.items()}
        for stage, per in newer.entries.items():
            entries.setdefault(stage, {}).update(per)
        return TunedTable(newer.key, newer.problem, newer.arch, newer.device, newer.space_hash,
                          dict(newer.metadata), entries, newer.source)


def warn_once(tag: str, message: str, *args: Any) -> bool:
    """``logging.warning`` of the "autotune" logger, once per process per ``tag``."""
    with _LOCK:
        if tag in _WARNED:
            return False
        _WARNED.add(tag)
    log.warning(message, *args)
    return True


def _shipped_dir() -> Path:
    return Path(__file__).resolve().parent / "tuned"


def search_dirs() -> list[Path]:
    """Folders searched for tables, in order: config dir, user cache, shipped tables."""
    dirs = [config_dir(), cache_dir() / "tuned", _shipped_dir()]
    return [d for d in dirs if d is not None]


def table_path(key: str, directory: Path | None = None) -> Path:
    """Where the table of ``key`` is written (default ``<cache>/tuned``)."""
    return Path(directory if directory is not None else cache_dir() / "tuned") / f"{key}.json"


def read_table(path: Path) -> TunedTable:
    """Read and parse one table file.

    Requirements
    ------------
    ``path`` names a JSON table of this schema whose key is its file name; anything else
    raises :class:`TableError` (a ``ValueError``) saying why.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TableError(f"cannot read {path}: {e}") from None
    table = TunedTable.from_json(data, source=path)
    if table.key != path.stem:
        raise TableError(f"{path} holds key {table.key!r}, not its file name's")
    return table


def _short(value: Any) -> str:
    # nvcc's --version is several lines; its "release X.Y, VX.Y.Z" line is what a reader needs.
    text = str(value)
    lines = [ln for ln in text.splitlines() if "release" in ln] or text.splitlines() or [text]
    return lines[0].strip()


def _check_stale(table: TunedTable) -> None:
    running = runtime_versions()
    changed = [f"{f}: {_short(table.metadata.get(f))} -> {_short(running[f])}"
               for f in _VERSION_FIELDS if table.metadata.get(f) != running[f]]
    if changed:
        # Stale timings are still far better than none; they only may no longer be optimal.
        warn_once(f"stale:{table.source}",
                  "tuned table %s was made with other versions (%s); it still applies; re-tune "
                  "to refresh it: %s", table.source, "; ".join(changed),
                  tune_command(table.problem, table.arch))


def _earlier_space_paths(key: str, directory: Path) -> list[Path]:
    """Tables of ``key`` but for its search-space hash (the last part), newest first."""
    prefix = key.rsplit("__s", 1)[0]
    try:
        paths = [p for p in directory.glob(f"{glob.escape(prefix)}__s*.json") if p.stem != key]
        return sorted(paths, key=lambda p: p.stat().st_mtime, reverse=True)
    except OSError:
        return []


def _read_usable(path: Path) -> TunedTable | None:
    try:
        if not path.is_file():
            return None
        return read_table(path)
    except OSError:
        return None
    except TableError as e:
        warn_once(f"corrupt:{path}", "ignoring unusable tuned table: %s", e)
        return None


def find_table(key: str) -> TunedTable | None:
    """The first usable table of ``key`` in :func:`search_dirs` order, or None.

    Unreadable files are reported once (``logging.warning``) and skipped; a stale table (other
    package, nvcc or CUTLASS version) warns once and is returned. Without a table of ``key``
    anywhere, a table that differs only in the search-space hash (tuned before the space
    changed, e.g. by a package upgrade) warns once and is returned: its winners are still run
    where the validity predicate accepts them, and beat the untuned defaults.
    """
    for directory in search_dirs():
        table = _read_usable(table_path(key, directory))
        if table is not None:
            _check_stale(table)
            return table
    for directory in search_dirs():
        for path in _earlier_space_paths(key, directory):
            table = _read_usable(path)
            if table is None:
                continue
            warn_once(f"space:{path}", "tuned table %s was tuned over another search space "
                      "(s%s; this version's is s%s); its winners still apply; re-tune to try the "
                      "new candidates: %s", path, table.space_hash, key.rsplit("__s", 1)[1],
                      tune_command(table.problem, table.arch))
            _check_stale(table)
            return table
    return None


def tuned_table(problem: LatentMoEProblem, arch: str = "sm90",
                device: DeviceInfo | None = None) -> TunedTable:
    """The table of ``problem`` on ``arch`` and ``device`` (looked up once per process).

    Returns an empty (untuned) table when no file applies; its :meth:`TunedTable.config_for`
    gives the default configs.

    Requirements
    ------------
    ``device`` is given, or a CUDA device is visible (:meth:`DeviceInfo.current`).
    """
    device = device if device is not None else DeviceInfo.current()
    key = tuning_key(problem, arch, device)
    with _LOCK:
        hit = _TABLES.get(key)
    if hit is not None:
        return hit
    table = find_table(key)
    if table is None:
        table = TunedTable(key, problem, arch, device, arch_space_hash(arch, problem))
    elif table.problem != problem:
        # Same GEMM dimensions, other routing settings: the kernels apply unchanged.
        table = TunedTable(table.key, problem, table.arch, table.device, table.space_hash,
                           table.metadata, table.entries, table.source)
    with _LOCK:
        return _TABLES.setdefault(key, table)


def clear_cache() -> None:
    """Forget loaded tables and issued warnings (after writing a table, and in tests)."""
    with _LOCK:
        _TABLES.clear()
        _WARNED.clear()


def write_table(table: TunedTable, directory: Path | None = None, merge: bool = True) -> Path:
    """Write ``table`` atomically as ``<directory>/<key>.json`` (default ``<cache>/tuned``).

    With ``merge``, buckets of an existing readable file of the same key that ``table`` does not
    cover are kept (a run over some ``--tokens`` refines, never forgets).

    Requirements
    ------------
    ``table`` is a :class:`TunedTable`. The write goes through a temporary file in the same
    folder, fsync and ``os.replace``: readers see the old file or the new one, never half.
    """
    if not isinstance(table, TunedTable):
        raise TypeError(f"table must be a TunedTable, got {type(table).__name__}")
    path = table_path(table.key, directory)
    path.parent.mkdir(parents=True, exist_ok=True)
    if merge and path.is_file():
        try:
            table = read_table(path).merged(table)
        except TableError as e:
            log.warning("replacing unusable tuned table: %s", e)
    text = json.dumps(table.to_json(), indent=1, sort_keys=True) + "\n"
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".tmp")
    try:
        # mkstemp creates 0600; a table is meant to be shared like any other file.
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)
    with _LOCK:
        _TABLES.pop(table.key, None)
    return path


def _umask() -> int:
    # Read, not set-and-restore: os.umask() changes it for every thread of the process.
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return 0o022


def _fsync_dir(directory: Path) -> None:
    # The rename is durable only once the folder entry is on disk (POSIX); best effort elsewhere.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
