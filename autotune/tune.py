"""The autotuner: one optuna study per (problem, arch, stage, token bucket), compile first.

Flow of :func:`run_tuning`:

1. **Candidates.** Per stage, a :class:`StageSpace`: the valid configs of
   :func:`autotune.space.search_space` (a diverse subset of ``max_configs``, always holding the
   default configs) with the stage's epilogue, and the multicast variants of its wide tiles.
   Invalid points never get here.
2. **Compile first.** Every candidate (and variant) of every stage is compiled ONCE, in the
   build pool, before any timing (:meth:`Evaluator.prepare`); buckets and stages share the
   libraries. A failed compile becomes a failed trial with its log, never a stop.
3. **Studies.** Per stage and bucket, a study named :func:`study_name`; ``BruteForceSampler``
   over the config names when a stage space has at most :data:`BRUTE_FORCE_MAX` points, else
   ``TPESampler`` over the axes (tile, cluster, schedule, swap-AB), seeded by
   ``enqueue_trial`` with the default configs and the neighbouring buckets' winners. A suggested
   point that :func:`autotune.space.invalid_reason` rejects is pruned, with the reason in its
   user attributes and an infeasible constraint for TPE.
4. **Gate, then time.** :meth:`Evaluator.evaluate` checks each candidate against the fp32
   reference on fresh inputs (NaN-poisoned output) and only then times it by CUDA-graph replay
   over rotated inputs; a wrong kernel is a failed trial and is never selected.
5. **Refine.** Each bucket's winner is timed under every tile order (a launch argument), then
   beside its multicast variant at that order, the default beside both each time; the fastest
   point wins. Neither compiles.
6. **Check in the layer.** The run that writes the table times the whole forward at each
   bucket under its winners and under the plan they replace (the table the layer used, else
   the defaults), and keeps the faster (:func:`_check_in_layer`): a stage timed alone can
   mispredict the layer by a few percent.
7. **Store.** Per bucket the winner, runner-up, times and the default's and peer's times go to
   the tuned store (:mod:`autotune.cache`), over the buckets of the table the layer used.

Storage defaults to a journal file in the cache, so a killed run resumes: trials that finished
are kept and only the rest of the budget runs. Any optuna storage URL works for several workers;
``worker=True`` only pulls trials of studies that already exist.
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime
import hashlib
import logging
import math
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import optuna
from filelock import FileLock
from optuna.storages import BaseStorage, JournalStorage, RDBStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import FrozenTrial, TrialState

from . import env
from .arch import get_arch
from .cache import (
    TIMING_METHOD,
    BucketEntry,
    DeviceInfo,
    TableError,
    TunedConfig,
    TunedTable,
    arch_space_hash,
    read_table,
    runtime_versions,
    table_path,
    tune_command,
    tuned_table,
    tuning_key,
    write_table,
)
from .problem import LatentMoEProblem
from .space import (
    DEFAULT_ORDER,
    KernelConfig,
    RoutingConfig,
    Sm80Config,
    TileOrder,
    config_from_dict,
    default_configs,
    invalid_reason,
    is_gemv,
    multicast_variant,
    search_space,
    tile_orders,
)
from .workload import (
    PLAN_FIELD,
    PLAN_INDEX,
    ROUTINGS,
    Plan,
    bucket_for,
    config_dtype,
    default_config,
    default_plan,
    default_tier_configs,
    parse_tokens,
    stage_epilogue,
    stage_shape,
    stages_of,
    token_buckets,
)

__all__ = [
    "BRUTE_FORCE_MAX", "DEFAULT_MAX_CONFIGS", "DEFAULT_TRIALS", "TOLERANCE", "BucketResult",
    "CompileRecord", "ConfigTime", "Evaluator", "Failure", "GpuEvaluator", "LayerCheck",
    "Measurement", "StageSpace", "TuningReport", "bucket_for", "format_report", "main_from_args",
    "open_storage", "parse_tokens", "plot_report", "run_tuning", "select_candidates",
    "stage_spaces", "study_name", "token_buckets",
]

log = logging.getLogger("autotune")

# Sized for the 10-minute cold run on one H200 host: 14 tensor-core candidates per epilogue kind
# (42 sm90a compiles; 36 took about 130 s on 16 cores; the gemv kernels take seconds; the
# multicast variants of 7 of them add 21) and trials enough for a brute-force study to time
# every candidate, the four gemv kernels (beyond the cap) included. With 12 candidates and 16
# trials the Super preset's 28 buckets took about 260 s of trials on the H200, the refinements
# (tile orders, multicast) included.
DEFAULT_MAX_CONFIGS = 14
DEFAULT_TRIALS = 18
# Wide ping-pong tiles, candidates ahead of the diverse order (whose families sort cooperative
# first, so a cap of 12 never reached them): a consumer warpgroup's epilogue overlaps the
# other's mainloop, which the up projection needs at prefill (relu2 and 2688-wide output rows
# against K = 1024): 13-20% faster than 128x256 cooperative at T = 3072..16384 on an H200
# (benchmarks/NOTES.md v11).
_PREFILL_PINGPONG = ((128, 192, 64), (64, 256, 64))
# Up to this many points an exhaustive search costs no more than TPE's start-up phase.
BRUTE_FORCE_MAX = 64
TOLERANCE = 1e-2
_HOST = socket.gethostname()
# Outcomes of a trial (user attribute "outcome") that evaluated its point.
_EVALUATED = ("timed", "compile", "load", "launch", "wrong", "error")
_FAILURE_KINDS = _EVALUATED[1:]
# What settles a point for its study: an evaluation, or "skipped" (it does not apply at the
# study's token count, see _skip_reason). Settled points use up the budget and are never retried.
_SETTLED = (*_EVALUATED, "skipped")
# A gemv pass streams every weight of its work items once; past this many passes (rows per group
# over the config's rows per pass) the tensor-core tiles, which read the weights once, win.
_GEMV_MAX_PASSES = 4
_AXES = ("tile_m", "tile_n", "tile_k", "cluster", "schedule", "swap_ab")  # sm90, sm100
_SM80_AXES = ("tb", "tb_k", "warp", "stages")  # sm80, sm89 (CUTLASS 2.x)
_MAX_MESSAGE = 2000


# --------------------------------------------------------------------------------------------
# What one evaluation returns, and who evaluates
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Measurement:
    """A timed, correct candidate: per-call milliseconds and its error against the oracle."""

    median_ms: float
    p20_ms: float
    p80_ms: float
    samples: int = 0
    rel_err: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"median_ms": self.median_ms, "p20_ms": self.p20_ms, "p80_ms": self.p80_ms,
                "samples": self.samples, "rel_err": self.rel_err}


@dataclass(frozen=True)
class Failure:
    """A candidate that cannot be used: ``kind`` is one of "compile", "load", "launch",
    "wrong" (failed the correctness gate) or "error"; ``message`` says why."""

    kind: str
    message: str

    def __post_init__(self) -> None:
        if self.kind not in _FAILURE_KINDS:
            raise ValueError(f"Failure.kind must be one of {', '.join(_FAILURE_KINDS)}, got "
                             f"{self.kind!r}")


@runtime_checkable
class Evaluator(Protocol):
    """What the tuner needs from the hardware side; :class:`GpuEvaluator` is the real one.

    ``prepare`` compiles (or otherwise readies) every candidate ahead of timing and returns
    name -> None (ready) or the failure message; ``on_done(name, error)`` reports progress.
    ``evaluate`` checks one config on one stage at one token count and times it; it is called
    with ``order=`` (a :class:`~autotune.space.TileOrder`) only by tile-order studies. ``peer``
    times the torch peer of a stage (None when there is none). ``layer`` times the whole forward
    at one token count under each of some plans (one result per plan, in order), for the check
    that a bucket's winners, together, beat the plan they replace. ``device`` names the device
    for the tuning key.
    """

    @property
    def device(self) -> DeviceInfo: ...

    def prepare(self, configs: Sequence[KernelConfig], jobs: int | None = None,
                on_done: Callable[[str, str | None], None] | None = None
                ) -> dict[str, str | None]: ...

    def evaluate(self, config: KernelConfig, stage: str, tokens: int,
                 order: TileOrder = DEFAULT_ORDER) -> Measurement | Failure: ...

    def peer(self, stage: str, tokens: int) -> Measurement | Failure | None: ...

    def layer(self, plans: Sequence[Plan], tokens: int) -> list[Measurement | Failure]: ...


# --------------------------------------------------------------------------------------------
# Search space per stage
# --------------------------------------------------------------------------------------------

def _axes_of(config: KernelConfig | Sm80Config) -> tuple[str, ...]:
    return _SM80_AXES if isinstance(config, Sm80Config) else _AXES


def _axis_value(config: KernelConfig | Sm80Config, axis: str) -> Any:
    # Paired extents are one categorical each ("128x64"): their legal pairs are not a product.
    pairs = {"cluster": ("cluster_m", "cluster_n"), "tb": ("tb_m", "tb_n"),
             "warp": ("warp_m", "warp_n")}
    if axis in pairs:
        return "x".join(str(getattr(config, f)) for f in pairs[axis])
    return getattr(config, axis)


@dataclass(frozen=True)
class StageSpace:
    """The candidates of one stage, and how a trial suggests one of them.

    ``configs`` are valid for the problem and carry the stage's epilogue. Small spaces
    (<= :data:`BRUTE_FORCE_MAX`) are searched exhaustively over one categorical "config" (the
    names); larger ones by TPE over the axes, where a combination outside ``configs`` is
    rejected with its :func:`~autotune.space.invalid_reason`.

    ``orders`` are launch arguments that need no recompile (:class:`~autotune.space.TileOrder`:
    raster order and swizzle). Empty for a config study; a tile-order study has one config and
    the architecture's orders, each (config, order) a point of its own: the trial suggests one
    more categorical, "order", and :meth:`decode` returns ``{"order": TileOrder}``, which the
    tuner passes to ``Evaluator.evaluate``.

    ``variants`` are the candidates' multicast variants
    (:func:`~autotune.space.multicast_variant`): compiled with them, but not points of the
    config study; one is timed only beside the winner it varies (and the default), after that
    winner's tile orders (so they add three evaluations per bucket, not one per variant).
    """

    problem: LatentMoEProblem
    stage: str
    epilogue: str
    configs: tuple[KernelConfig, ...]
    orders: tuple[TileOrder, ...] = ()
    variants: tuple[KernelConfig, ...] = ()

    @property
    def by_name(self) -> dict[str, KernelConfig]:
        return {c.name: c for c in self.configs}

    @property
    def brute_force(self) -> bool:
        return len(self.configs) <= BRUTE_FORCE_MAX

    @property
    def axes(self) -> dict[str, tuple[Any, ...]]:
        """Per axis, the sorted values the candidates take (the categorical choices)."""
        return {a: tuple(sorted({_axis_value(c, a) for c in self.configs}, key=str))
                for a in _axes_of(self.configs[0])}

    @property
    def digest(self) -> str:
        """Short hash of the candidates and the parameterisation (part of study names, since
        optuna refuses to change a categorical's choices inside one study)."""
        blob = "|".join([str(self.brute_force), repr(tuple(o.tag for o in self.orders)),
                         *sorted(c.name for c in self.configs)])
        return hashlib.sha256(blob.encode()).hexdigest()[:8]

    @property
    def points(self) -> frozenset[str]:
        """Names of every point of the space (see :meth:`point_name`)."""
        if not self.orders:
            return frozenset(self.by_name)
        return frozenset(f"{c.name}@{o.tag}" for c in self.configs for o in self.orders)

    def point_name(self, config: KernelConfig, runtime: Mapping[str, Any]) -> str:
        """A point's identity: the config name, plus "@<order tag>" in a tile-order study."""
        order = runtime.get("order")
        return config.name if order is None else f"{config.name}@{order.tag}"

    def params_of(self, config: KernelConfig, order: TileOrder | None = None) -> dict[str, Any]:
        """The trial parameters that select ``config`` (and ``order``) for ``enqueue_trial``."""
        params = ({"config": config.name} if self.brute_force
                  else {a: _axis_value(config, a) for a in _axes_of(config)})
        return params if order is None else {**params, "order": order.tag}

    def name_of(self, params: Mapping[str, Any]) -> str | None:
        """The point name a trial's parameters select (None if incomplete)."""
        if "config" in params:
            name = str(params["config"])
        elif all(a in params for a in _axes_of(self.configs[0])):
            name = self._from_axes(params).name
        else:
            return None
        if self.orders:
            return f"{name}@{params['order']}" if "order" in params else None
        return name

    def _from_axes(self, params: Mapping[str, Any]) -> KernelConfig | Sm80Config:
        first = self.configs[0]
        if isinstance(first, Sm80Config):
            (bm, bn), (wm, wn) = ((int(v) for v in str(params[a]).split("x"))
                                  for a in ("tb", "warp"))
            return Sm80Config(bm, bn, int(params["tb_k"]), wm, wn, int(params["stages"]),
                              self.epilogue, first.dtype, first.arch)
        # The candidates' own class: sm100's Sm100Config has the same fields as KernelConfig.
        cm, cn = (int(v) for v in str(params["cluster"]).split("x"))
        return type(first)(int(params["tile_m"]), int(params["tile_n"]), int(params["tile_k"]),
                           cm, cn, str(params["schedule"]), bool(params["swap_ab"]),
                           self.epilogue, first.dtype, first.arch)

    def decode(self, trial: optuna.trial.BaseTrial) -> tuple[KernelConfig | str, dict]:
        """Suggest a point; returns (config, runtime args) or (reason it is rejected, {})."""
        if self.brute_force:
            config = self.by_name[trial.suggest_categorical("config", list(self.by_name))]
        else:
            params = {a: trial.suggest_categorical(a, list(choices))
                      for a, choices in self.axes.items()}
            config = self._from_axes(params)
            if config.name not in self.by_name:
                reason = invalid_reason(config, self.problem)
                return (reason or f"{config.name} is valid but not among the "
                        f"{len(self.configs)} compiled candidates (raise max_configs)"), {}
        runtime = {}
        if self.orders:
            tag = trial.suggest_categorical("order", [o.tag for o in self.orders])
            runtime["order"] = TileOrder.from_tag(tag)
        return config, runtime


def _family(c: KernelConfig | Sm80Config) -> tuple[tuple, tuple]:
    """(family, rank inside it) of a candidate, for :func:`_diverse_order`."""
    if isinstance(c, Sm80Config):
        # Threadblock tiles span the regimes; fewer stages and warps are the simpler variants.
        return ((c.tb_m, c.tb_n), (c.stages, c.tb_k, -c.warp_m * c.warp_n, c.name))
    return ((c.swap_ab, c.schedule, c.tile_n),
            (c.cluster_m * c.cluster_n, c.cluster_m, c.tile_k, abs(c.tile_m - 128), c.name))


def _diverse_order(configs: Sequence[KernelConfig]) -> list[KernelConfig]:
    # Round-robin over (swap-AB, schedule, tile N) families (threadblock tiles on sm80) so that
    # a small budget still spans the decode (swap-AB, narrow N) and prefill (wide tiles)
    # regimes; inside a family the simpler variants (no cluster, short K tile) come first.
    families: dict[tuple, list[KernelConfig]] = {}
    for c in configs:
        families.setdefault(_family(c)[0], []).append(c)
    queues = [sorted(v, key=lambda c: _family(c)[1])
              for _, v in sorted(families.items(), key=lambda kv: str(kv[0]))]
    out = []
    while any(queues):
        for q in queues:
            if q:
                out.append(q.pop(0))
    return out


def _base(config: KernelConfig) -> KernelConfig:
    return config.with_epilogue("identity")


def select_candidates(problem: LatentMoEProblem, arch: str = "sm90",
                      max_configs: int | None = DEFAULT_MAX_CONFIGS,
                      configs: Sequence[KernelConfig | str] | None = None,
                      stages: Sequence[str] | None = None) -> list[KernelConfig]:
    """The identity-epilogue configs to tune: the stages' defaults first, then the others.

    Parameters
    ----------
    max_configs : int or None
        Cap on the tensor-core candidates (the stages' default configs always count in, even
        past the cap); None takes the whole valid space. The space's gemv kernels (decode, a
        handful of points) always join, beyond the cap, so that the cap keeps choosing the same
        tiles.
    configs : sequence of KernelConfig or names, optional
        Explicit candidates (e.g. ``--configs``) instead of a subset of the space; the cap does
        not apply, and no multicast variants join (see :func:`stage_spaces`).
    stages : sequence of str, optional
        Stages whose default configs must be candidates (default: all of the problem's).

    Requirements
    ------------
    Every explicit config is valid for ``problem`` (``ValueError`` naming it otherwise);
    ``max_configs`` is None or a positive int.
    """
    if max_configs is not None and (isinstance(max_configs, bool)
                                    or not isinstance(max_configs, int) or max_configs < 1):
        raise ValueError(f"max_configs must be None or a positive int, got {max_configs!r}")
    dtype = config_dtype(problem)
    space = search_space(arch, problem, dtype)
    # The per-bucket defaults must be timed (they are the baseline of every speedup).
    musts = [_base(c) for stage in (stages or stages_of(problem))
             for c in default_tier_configs(problem, stage, arch)]
    if configs is not None:
        by_name = {c.name: c for c in space}
        pool = []
        for c in configs:
            name = c if isinstance(c, str) else _base(c).name
            if name not in by_name:
                raise ValueError(f"configs: {name} is unknown or invalid for {problem.key} on "
                                 f"{arch}")
            pool.append(by_name[name])
        limit = None
    else:
        pool = [c for c in default_configs(arch, dtype) if invalid_reason(c, problem) is None]
        if arch == "sm90":
            pool += [c for c in (KernelConfig(m, n, k, 1, 1, "pingpong", False, "identity",
                                              dtype, arch) for m, n, k in _PREFILL_PINGPONG)
                     if invalid_reason(c, problem) is None]
        pool += _diverse_order([c for c in space if not is_gemv(c)])
        limit = max_configs
    out: dict[str, KernelConfig] = {c.name: c for c in musts}
    for c in pool:
        if limit is not None and len(out) >= limit:
            break
        out.setdefault(c.name, c)
    if configs is None:
        out.update((c.name, c) for c in space if is_gemv(c))
    return list(out.values())


def stage_spaces(problem: LatentMoEProblem, arch: str, stages: Sequence[str],
                 max_configs: int | None = DEFAULT_MAX_CONFIGS,
                 configs: Sequence[KernelConfig | str] | None = None) -> dict[str, StageSpace]:
    """The :class:`StageSpace` of each stage; every stage shares one set of tile choices.

    Unless ``configs`` names the candidates explicitly, each space also carries the multicast
    variants of its wide candidates (:attr:`StageSpace.variants`).

    Requirements
    ------------
    As :func:`select_candidates`; each stage is one of ``stages_of(problem)``.
    """
    base = select_candidates(problem, arch, max_configs, configs, stages)
    spaces = {}
    for stage in stages:
        epilogue = stage_epilogue(problem, stage)
        cands = tuple(c.with_epilogue(epilogue) for c in base
                      if invalid_reason(c.with_epilogue(epilogue), problem) is None)
        if not cands:
            raise ValueError(f"no valid {arch} config for stage {stage} of {problem.key}")
        variants = () if configs is not None else tuple(
            v for v in map(multicast_variant, cands)
            if v is not None and invalid_reason(v, problem) is None)
        spaces[stage] = StageSpace(problem, stage, epilogue, cands, variants=variants)
    return spaces


# --------------------------------------------------------------------------------------------
# Studies and storage
# --------------------------------------------------------------------------------------------

def study_name(key: str, stage: str, bucket: int, routing: str = "uniform",
               space_digest: str = "") -> str:
    """The study of one (tuning key, stage, bucket) under one routing distribution."""
    suffix = f"|c{space_digest}" if space_digest else ""
    return f"{key}|{stage}|t{bucket}|{routing}{suffix}"


def open_storage(storage: str | os.PathLike | BaseStorage | None, key: str,
                 root: Path | None = None) -> BaseStorage:
    """The optuna storage of a run.

    None gives a journal file ``<cache>/tuning/<key>.journal``; a path gives a journal file
    there; a URL with ``://`` (``sqlite:///...``, ``postgresql://...``) an RDB storage with
    heartbeats, so trials of a dead worker are failed and retried.

    Requirements
    ------------
    ``storage`` is None, a path, a URL string or an optuna ``BaseStorage``.
    """
    if isinstance(storage, BaseStorage):
        return storage
    if storage is None:
        path = Path(root if root is not None else env.cache_dir()) / "tuning" / f"{key}.journal"
    elif isinstance(storage, (str, os.PathLike)) and "://" not in str(storage):
        path = Path(storage).expanduser()
    elif isinstance(storage, str):
        sqlite = storage.startswith("sqlite")
        # SQLite serialises writers; wait for the lock instead of failing a concurrent worker.
        kwargs = {"connect_args": {"timeout": 120}} if sqlite else None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            rdb = RDBStorage(storage, engine_kwargs=kwargs, heartbeat_interval=30,
                             grace_period=120)
        if sqlite:
            _immediate_transactions(rdb)
        return rdb
    else:
        raise TypeError(f"storage must be None, a path, a URL or an optuna storage, got "
                        f"{type(storage).__name__}")
    path.parent.mkdir(parents=True, exist_ok=True)
    return JournalStorage(JournalFileBackend(str(path)))


def _immediate_transactions(storage: RDBStorage) -> None:
    """Make every SQLite transaction take the write lock at BEGIN.

    optuna claims a queued trial with SELECT ... FOR UPDATE, which SQLite ignores: under its
    default deferred transactions two workers can both read WAITING and both run the trial.
    BEGIN IMMEDIATE (the SQLAlchemy recipe for pysqlite) makes the read and the write atomic.
    """
    from sqlalchemy import event

    engine = storage.engine

    @event.listens_for(engine, "connect")
    def _no_implicit_begin(dbapi_connection, _record) -> None:
        dbapi_connection.isolation_level = None

    @event.listens_for(engine, "begin")
    def _begin_immediate(connection) -> None:
        connection.exec_driver_sql("BEGIN IMMEDIATE")

    engine.dispose()  # pooled connections predate the hooks


def _stable_seed(*parts: Any) -> int:
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:4], "little")


def _sampler(space: StageSpace, name: str, trials: int) -> optuna.samplers.BaseSampler:
    if space.brute_force:
        # Unseeded: with several workers a shared seed would make them walk the same order.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.samplers.BruteForceSampler()
    return optuna.samplers.TPESampler(
        multivariate=True, constant_liar=True, seed=_stable_seed(name, os.getpid()),
        n_startup_trials=max(4, min(10, trials // 3)))


@contextlib.contextmanager
def _quiet_optuna() -> Iterator[None]:
    # Failed and pruned trials are expected here and recorded in user attributes; optuna's
    # per-trial log lines (with tracebacks) would drown the progress bars.
    level = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            yield
    finally:
        optuna.logging.set_verbosity(level)


def _outcome(t: FrozenTrial) -> str | None:
    return t.user_attrs.get("outcome")


def _evaluated_count(trials: Sequence[FrozenTrial]) -> int:
    return sum(1 for t in trials if t.state.is_finished() and _outcome(t) in _SETTLED)


def _pid_alive(pid: Any) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return True  # unknown: assume alive rather than steal a live worker's trial
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _recover(study: optuna.Study, space: StageSpace) -> int:
    """Fail RUNNING trials of dead processes on this host, and enqueue one retry of every
    interrupted trial whose config was never evaluated. Returns the retries enqueued."""
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if t.user_attrs.get("host") == _HOST and not _pid_alive(t.user_attrs.get("pid")):
            # The sampler may call study.stop() from tell(), which raises outside optimize();
            # the state is already stored by then.
            with contextlib.suppress(RuntimeError):
                study.tell(t.number, state=TrialState.FAIL, skip_if_finished=True)
    trials = study.get_trials(deepcopy=False)
    retried = {t.user_attrs.get("retry_of") for t in trials}
    done = {_name_of(space, t) for t in trials if _outcome(t) in _SETTLED}
    count = 0
    for t in trials:
        # No outcome on a FAIL trial: its process died, or a heartbeat declared it stale.
        interrupted = t.state == TrialState.FAIL and _outcome(t) in (None, "interrupted")
        name = _name_of(space, t)
        if interrupted and t.number not in retried and name in space.points and name not in done:
            study.enqueue_trial(_params_of(t), user_attrs={"retry_of": t.number})
            count += 1
    return count


class _TrialFailed(Exception):
    """A recorded failure (compile, wrong result, ...): the trial is FAIL, the run goes on."""


class _Objective:
    """The objective of one study: decode, dedupe, gate on compile, evaluate, record."""

    def __init__(self, space: StageSpace, stage: str, bucket: int, evaluator: Evaluator,
                 compile_errors: Mapping[str, str | None]):
        self.space, self.stage, self.bucket = space, stage, bucket
        self.evaluator, self.compile_errors = evaluator, compile_errors

    def __call__(self, trial: optuna.Trial) -> float:
        # Suggest before anything else: a concurrent worker sees a trial's config only once
        # its parameters are stored, so the sooner the narrower the window for a twin.
        point, runtime = self.space.decode(trial)
        trial.set_user_attr("host", _HOST)
        trial.set_user_attr("pid", os.getpid())
        if isinstance(point, str):
            trial.set_user_attr("outcome", "invalid")
            trial.set_user_attr("invalid_reason", point)
            trial.set_constraint("valid", 1.0)
            raise optuna.TrialPruned(point)
        config = point
        trial.set_user_attr("config", config.name)
        if "order" in runtime:
            trial.set_user_attr("order", runtime["order"].tag)
        name = self.space.point_name(config, runtime)
        dup = self._duplicate_of(trial, name)
        if dup is not None:
            trial.set_user_attr("outcome", "duplicate")
            trial.set_user_attr("duplicate_of", dup)
            raise _TrialFailed(f"{name} is already evaluated in trial {dup}")
        skip = _skip_reason(self.space.problem, self.stage, self.bucket, config)
        if skip:
            trial.set_user_attr("outcome", "skipped")
            trial.set_user_attr("skip_reason", skip)
            raise optuna.TrialPruned(skip)
        error = self.compile_errors.get(config.name)
        if error:
            return self._fail(trial, Failure("compile", error))
        try:
            result = self.evaluator.evaluate(config, self.stage, self.bucket, **runtime)
        except KeyboardInterrupt:
            trial.set_user_attr("outcome", "interrupted")
            raise
        except DeviceError as e:
            # Recorded against this config, then the run stops: the CUDA context is gone.
            trial.set_user_attr("outcome", "launch")
            trial.set_user_attr("error", str(e)[-_MAX_MESSAGE:])
            raise
        except Exception as e:  # noqa: BLE001 - one candidate's crash never stops the tuning
            result = Failure("error", f"{type(e).__name__}: {e}")
        if isinstance(result, Measurement):
            result = _checked(result)
        if isinstance(result, Failure):
            return self._fail(trial, result)
        trial.set_user_attr("outcome", "timed")
        # One attribute, not one per field: each is a write (a transaction on a database
        # storage, an fsync on a journal file).
        trial.set_user_attr("timing", result.to_dict())
        return result.median_ms

    def _duplicate_of(self, trial: optuna.Trial, name: str) -> int | None:
        # Evaluating a config twice in one study wastes device time. A finished evaluation or
        # a RUNNING twin with a lower number wins. Queued trials carry their config from the
        # start and sampled ones store it first thing, so two workers rarely both miss each
        # other; when they do, the config is timed twice, which costs time, not correctness.
        for t in trial.study.get_trials(deepcopy=False):
            if t.number == trial.number or _name_of(self.space, t) != name:
                continue
            if (t.state.is_finished() and _outcome(t) in _SETTLED) or (
                    t.state == TrialState.RUNNING and t.number < trial.number):
                return t.number
        return None

    def _fail(self, trial: optuna.Trial, failure: Failure) -> float:
        log.info("%s t=%d trial %d: %s failed (%s): %s", self.stage, self.bucket, trial.number,
                 trial.user_attrs.get("config"), failure.kind,
                 (failure.message.strip().splitlines() or [""])[-1][:300])
        trial.set_user_attr("outcome", failure.kind)
        trial.set_user_attr("error", failure.message[-_MAX_MESSAGE:])
        raise _TrialFailed(f"{failure.kind}: {failure.message[:200]}")


def _checked(m: Measurement) -> Measurement | Failure:
    values = (m.median_ms, m.p20_ms, m.p80_ms)
    if not all(isinstance(v, (int, float)) and math.isfinite(v) and v > 0 for v in values):
        return Failure("error", f"evaluator returned unusable times {values}")
    if m.rel_err is not None and not m.rel_err <= TOLERANCE:
        return Failure("wrong", f"relative error {m.rel_err:.3g} > {TOLERANCE}")
    return m


class _StopWhenDone:
    """Stops a study once ``target`` candidates are evaluated or being evaluated (counted over
    all workers: another worker's RUNNING trial counts, so N workers do not each start one more
    trial at the end) or this process has made ``max_attempts`` trials; advances the progress
    bar. A RUNNING trial that then fails leaves the study one short; the next run without
    ``--worker`` tops it up."""

    def __init__(self, target: int, max_attempts: int, bar: Any):
        self.target, self.max_attempts, self.bar = target, max_attempts, bar
        self.attempts = 0

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        self.attempts += 1
        if trial.state.is_finished() and _outcome(trial) in _SETTLED:
            self.bar.update(1)
        trials = study.get_trials(deepcopy=False)
        # The trial this callback reports is finished: every RUNNING one is another worker's.
        in_flight = sum(t.state == TrialState.RUNNING for t in trials)
        if (self.attempts >= self.max_attempts
                or _evaluated_count(trials) + in_flight >= self.target):
            study.stop()


# --------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ConfigTime:
    """A config, the tile order it was launched with, and its measured time."""

    name: str
    config: dict[str, Any]
    median_ms: float
    p20_ms: float
    p80_ms: float
    order: str = DEFAULT_ORDER.tag

    @property
    def label(self) -> str:
        """The config name, with "@<order>" when the order is not the default."""
        return self.name if self.order == DEFAULT_ORDER.tag else f"{self.name}@{self.order}"


@dataclass(frozen=True)
class BucketResult:
    """Outcome of one study: winner, runner-up, default and peer times, trial accounting.

    ``failures`` holds (config name, kind, message) of every candidate that failed to compile,
    load, launch or pass the correctness gate.
    """

    stage: str
    bucket: int
    default_name: str
    winner: ConfigTime | None = None
    runner_up: ConfigTime | None = None
    default: ConfigTime | None = None
    peer_ms: float | None = None
    evaluated: int = 0
    pruned: int = 0
    failures: tuple[tuple[str, str, str], ...] = ()

    @property
    def speedup_vs_default(self) -> float | None:
        if self.winner is None or self.default is None:
            return None
        return self.default.median_ms / self.winner.median_ms

    @property
    def speedup_vs_peer(self) -> float | None:
        if self.winner is None or self.peer_ms is None:
            return None
        return self.peer_ms / self.winner.median_ms


@dataclass(frozen=True)
class LayerCheck:
    """One bucket's check in the whole forward: the plan of this run's winners against the
    plan it replaces (``previous``: the table the layer ran before, or its default configs).

    ``kept`` is "tuned", "previous" (faster in the layer, so its entries stay) or "same" (the
    winners are the previous plan: nothing to time); ``note`` says why a check could not
    decide (a failure, or stage times of the previous plan that no table or study holds)."""

    bucket: int
    previous: str
    kept: str
    tuned_ms: float | None = None
    previous_ms: float | None = None
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"previous": self.previous, "kept": self.kept, "tuned_ms": self.tuned_ms,
                "previous_ms": self.previous_ms, **({"note": self.note} if self.note else {})}


@dataclass(frozen=True)
class CompileRecord:
    """One candidate's build outcome (``error`` None when it is ready)."""

    name: str
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass(frozen=True)
class TuningReport:
    """What :func:`run_tuning` did: compiles, and per (stage, bucket) results."""

    problem: LatentMoEProblem
    arch: str
    stages: tuple[str, ...]
    buckets: tuple[int, ...]
    compiled: tuple[CompileRecord, ...] = ()
    results: tuple[BucketResult, ...] = ()
    key: str | None = None
    device: DeviceInfo | None = None
    table_path: Path | None = None
    timed: bool = False
    elapsed_s: float = 0.0
    notes: tuple[str, ...] = ()
    layer_checks: tuple[LayerCheck, ...] = ()

    def result(self, stage: str, bucket: int) -> BucketResult | None:
        return next((r for r in self.results if r.stage == stage and r.bucket == bucket), None)


def collect_result(study: optuna.Study, stage: str, bucket: int, default_name: str,
                   space: StageSpace) -> BucketResult:
    """The :class:`BucketResult` of a study (winner = fastest timed, never a failed trial)."""
    trials = study.get_trials(deepcopy=False)
    timed = sorted((t for t in trials if t.state == TrialState.COMPLETE
                    and _outcome(t) == "timed" and t.user_attrs.get("config") in space.by_name),
                   key=lambda t: t.value)
    best: dict[str, ConfigTime] = {}
    for t in timed:
        name, attrs = t.user_attrs["config"], t.user_attrs
        order = str(attrs.get("order", DEFAULT_ORDER.tag))
        point = name if not space.orders else f"{name}@{order}"
        timing = attrs.get("timing", attrs)  # earlier versions stored one attribute per field
        best.setdefault(point, ConfigTime(name, space.by_name[name].to_dict(), float(t.value),
                                          float(timing.get("p20_ms", t.value)),
                                          float(timing.get("p80_ms", t.value)), order))
    ranked = list(best.values())
    failures = tuple((t.user_attrs.get("config", "?"), _outcome(t), t.user_attrs.get("error", ""))
                     for t in trials if t.state == TrialState.FAIL
                     and _outcome(t) in _FAILURE_KINDS)
    peer = study.user_attrs.get("peer") or {}
    return BucketResult(
        stage, bucket, default_name, ranked[0] if ranked else None,
        ranked[1] if len(ranked) > 1 else None,
        best.get(default_name) or best.get(f"{default_name}@{DEFAULT_ORDER.tag}"),
        peer.get("median_ms"), _evaluated_count(trials),
        sum(1 for t in trials if t.state == TrialState.PRUNED), failures)


def _driver_version() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10, check=True)
        return out.stdout.strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        pass
    try:
        version = ctypes.c_int()
        if ctypes.CDLL("libcuda.so.1").cuDriverGetVersion(ctypes.byref(version)) == 0:
            return f"CUDA driver API {version.value // 1000}.{version.value % 1000 // 10}"
    except (OSError, AttributeError):
        pass
    return None


def _metadata(problem: LatentMoEProblem, arch: str, routing: str, trials: int,
              evaluator: Evaluator) -> dict[str, Any]:
    import torch

    return {**runtime_versions(), "driver": _driver_version(), "torch_version": torch.__version__,
            "timing_method": TIMING_METHOD, "timing_replays": getattr(evaluator, "replays", None),
            "routing": routing, "trials_per_study": trials,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": tune_command(problem, arch)}


def _table(report: TuningReport, metadata: dict[str, Any]) -> TunedTable | None:
    entries: dict[str, dict[int, BucketEntry]] = {}
    for r in report.results:
        if r.winner is None:
            continue
        runner = r.runner_up
        entries.setdefault(r.stage, {})[r.bucket] = BucketEntry(
            TunedConfig(r.winner.name, r.winner.config), r.winner.median_ms, r.winner.p20_ms,
            r.winner.p80_ms, None if runner is None else TunedConfig(runner.name, runner.config),
            None if runner is None else runner.median_ms, r.default_name,
            None if r.default is None else r.default.median_ms, r.peer_ms, r.evaluated,
            r.winner.order)
    if not entries or report.key is None or report.device is None:
        return None
    return TunedTable(report.key, report.problem, report.arch, report.device,
                      arch_space_hash(report.arch, report.problem), metadata, entries)


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------

def _check_args(problem: Any, stages: Any, buckets: Any, trials: Any, time_budget: Any,
                jobs: Any, routing: Any) -> tuple[tuple[str, ...], tuple[int, ...]]:
    if not isinstance(problem, LatentMoEProblem):
        raise TypeError(f"problem must be a LatentMoEProblem, got {type(problem).__name__}")
    config_dtype(problem)
    all_stages = stages_of(problem)
    stages = all_stages if stages is None else tuple(stages)
    bad = [s for s in stages if s not in all_stages]
    if bad or not stages:
        raise ValueError(f"stages: {bad or 'none given'}; expected some of "
                         f"{', '.join(all_stages)}")
    buckets = token_buckets() if buckets is None else parse_tokens(list(buckets))
    if isinstance(trials, bool) or not isinstance(trials, int) or trials < 0:
        raise ValueError(f"--trials must be an int >= 0, got {trials!r}")
    if time_budget is not None and (not isinstance(time_budget, (int, float))
                                    or not time_budget > 0):
        raise ValueError(f"--time-budget must be a positive number of seconds, got "
                         f"{time_budget!r}")
    if jobs is not None and (isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1):
        raise ValueError(f"--jobs must be a positive int, got {jobs!r}")
    if routing not in ROUTINGS:
        raise ValueError(f"routing must be one of {', '.join(ROUTINGS)}, got {routing!r}")
    return stages, buckets


def _bar(total: int, desc: str, unit: str, progress: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, disable=not progress, file=sys.stderr,
                dynamic_ncols=True)


def _prepare(evaluator: Evaluator, spaces: Mapping[str, StageSpace], jobs: int | None,
             progress: bool, extra: Sequence[KernelConfig] = ()) -> dict[str, str | None]:
    unique: dict[str, KernelConfig] = {}
    for space in spaces.values():
        for c in (*space.configs, *space.variants):
            unique.setdefault(c.name, c)
    for c in extra:
        unique.setdefault(c.name, c)
    with _bar(len(unique), "compile", "kernel", progress) as bar:
        errors = evaluator.prepare(list(unique.values()), jobs,
                                   lambda name, error: bar.update(1))
    missing = [n for n in unique if n not in errors]
    if missing:
        raise RuntimeError(f"evaluator.prepare did not report {', '.join(missing[:5])}")
    return {n: errors[n] for n in unique}


def _open_study(store: BaseStorage, name: str, space: StageSpace, trials: int,
                worker: bool) -> optuna.Study | None:
    sampler = _sampler(space, name, trials)
    if worker:
        try:
            return optuna.load_study(study_name=name, storage=store, sampler=sampler)
        except KeyError:
            return None
    study = optuna.create_study(storage=store, study_name=name, sampler=sampler,
                                direction="minimize", load_if_exists=True)
    if "stage" not in study.user_attrs:
        for k, v in (("stage", space.stage), ("problem", space.problem.key),
                     ("candidates", len(space.configs)),
                     ("sampler", "brute-force" if space.brute_force else "tpe")):
            study.set_user_attr(k, v)
    return study


def _stored_winner(store: BaseStorage, name: str, space: StageSpace) -> str | None:
    try:
        study = optuna.load_study(study_name=name, storage=store)
    except KeyError:
        return None
    timed = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
             if _outcome(t) == "timed" and t.user_attrs.get("config") in space.by_name]
    return min(timed, key=lambda t: t.value).user_attrs["config"] if timed else None


@dataclass(frozen=True)
class _Run:
    """Everything one run's studies share."""

    problem: LatentMoEProblem
    arch: str
    key: str
    routing: str
    trials: int
    buckets: tuple[int, ...]
    spaces: Mapping[str, StageSpace]
    store: BaseStorage
    evaluator: Evaluator
    compile_errors: Mapping[str, str | None]
    worker: bool
    winners: dict[tuple[str, int], str] = field(default_factory=dict)

    def name(self, stage: str, bucket: int) -> str:
        return study_name(self.key, stage, bucket, self.routing, self.spaces[stage].digest)

    def target(self, stage: str) -> int:
        return min(self.trials, len(self.spaces[stage].configs))


def _seed(run: _Run, study: optuna.Study, stage: str, bucket: int, reserve: int = 0) -> None:
    """Queue the default configs and the neighbouring buckets' winners first; in a brute-force
    study then further candidates, so that workers claim distinct configs by popping the queue
    (atomic in the storage) instead of sampling the same unexplored point at once.

    The queue holds at most the budget's worth of configs (every candidate when the budget is
    0, i.e. when studies are prepared for workers) less ``reserve``: room kept for winners of
    neighbouring buckets that this run has yet to find, and for retries after a crash.
    """
    space = run.spaces[stage]
    seeds = [(default_config(run.problem, stage, bucket, run.arch), "default")]
    seeds += [(c.with_epilogue(space.epilogue), "default")
              for c in default_configs(run.arch, config_dtype(run.problem))]
    i = run.buckets.index(bucket)
    for nb in run.buckets[max(0, i - 1):i] + run.buckets[i + 1:i + 2]:
        name = run.winners.get((stage, nb)) or _stored_winner(run.store, run.name(stage, nb),
                                                               space)
        if name in space.by_name:
            seeds.append((space.by_name[name], f"winner of t={nb}"))
    if space.brute_force:
        seeds += [(c, "candidate") for c in space.configs]
    cap = (run.target(stage) if run.trials else len(space.configs)) - reserve
    queued = {_name_of(space, t) for t in study.get_trials(deepcopy=False)}
    queued.discard(None)
    for config, why in seeds:
        if len(queued) >= cap:
            break
        if config.name in space.by_name and config.name not in queued:
            study.enqueue_trial(space.params_of(config), user_attrs={"seed": why})
            queued.add(config.name)


def _params_of(t: FrozenTrial) -> dict[str, Any]:
    # A queued trial's config is known from its fixed parameters before it is popped (and
    # stays known if its process died before suggesting them).
    return {**t.system_attrs.get("fixed_params", {}), **t.params}


def _name_of(space: StageSpace, t: FrozenTrial) -> str | None:
    return space.name_of(_params_of(t))


def _measure_peer(run: _Run, study: optuna.Study, stage: str, bucket: int) -> None:
    peer = getattr(run.evaluator, "peer", None)
    if peer is None or "peer" in study.user_attrs:
        return
    try:
        result = peer(stage, bucket)
    except DeviceError:
        raise
    except Exception as e:  # noqa: BLE001 - the peer is context, never a reason to stop
        result = Failure("error", f"{type(e).__name__}: {e}")
    if isinstance(result, Measurement):
        study.set_user_attr("peer", result.to_dict())
    elif isinstance(result, Failure):
        study.set_user_attr("peer", {"failure": result.kind, "error": result.message[:500]})


def _run_study(run: _Run, study: optuna.Study, space: StageSpace, target: int, bucket: int,
               timeout: float | None, bar: Any) -> None:
    done = _evaluated_count(study.get_trials(deepcopy=False))
    bar.update(min(done, target))
    if done >= target:
        return
    remaining = target - done
    stopper = _StopWhenDone(target, 4 * remaining + 32, bar)
    objective = _Objective(space, space.stage, bucket, run.evaluator, run.compile_errors)
    study.optimize(objective, timeout=timeout, catch=(_TrialFailed,), callbacks=[stopper])


def _rows_per_group(problem: LatentMoEProblem, stage: str, tokens: int) -> int:
    shape = stage_shape(problem, stage)
    return -(-shape.rows(tokens) // shape.groups)  # uniform routing's rows per expert


def _skip_reason(problem: LatentMoEProblem, stage: str, tokens: int,
                 config: KernelConfig) -> str | None:
    """Why ``config`` is not worth timing for ``stage`` at ``tokens`` tokens (a gemv kernel that
    would stream the weights more than :data:`_GEMV_MAX_PASSES` times), or None."""
    if not is_gemv(config):
        return None
    rows = _rows_per_group(problem, stage, tokens)
    passes = -(-rows // config.tile_n)
    if passes <= _GEMV_MAX_PASSES:
        return None
    return (f"gemv would stream the weights {passes} times ({rows} rows per group at "
            f"t={tokens}, {config.tile_n} per pass)")


def _tiles_both_ways(problem: LatentMoEProblem, stage: str, tokens: int,
                     config: KernelConfig) -> bool:
    """Whether a typical group of ``stage`` at ``tokens`` tokens spans at least two output
    tiles along both M and N of the GEMM ``config`` runs (after a swap-AB): only then does the
    order in which CTAs walk the tiles change which operand tiles they share in L2."""
    shape = stage_shape(problem, stage)
    rows = _rows_per_group(problem, stage, tokens)
    m, n = (shape.n, rows) if config.swap_ab else (rows, shape.n)
    return -(-m // config.tile_m) >= 2 and -(-n // config.tile_n) >= 2


def _shares_token_tile(problem: LatentMoEProblem, stage: str, tokens: int,
                       config: KernelConfig) -> bool:
    """Whether a typical group of ``stage`` at ``tokens`` tokens fills at least half of
    ``config``'s token tile: below that the tile is a small share of the bytes a CTA loads,
    and fetching it once for a cluster of two saves little."""
    token_tile = config.tile_n if config.swap_ab else config.tile_m
    return 2 * _rows_per_group(problem, stage, tokens) >= token_tile


def _side_by_side(run: _Run, stage: str, bucket: int, result: BucketResult, kind: str,
                  label: str, points: Sequence[tuple[KernelConfig, TileOrder]],
                  timeout: float | None, bar: Any) -> BucketResult:
    """Time ``points`` ((config, tile order) pairs) of a bucket in one study of their own,
    named ``<config study>|<kind>|<label>`` (a later run whose winner changed gets another),
    every point queued; the study's result, its default from among the points.

    Side by side because times taken minutes apart in different studies drift by a few
    percent (clocks, L2 and routing draws), enough to report a tuned bucket slower than its
    default: a refinement judges its points only against each other."""
    configs = tuple(dict.fromkeys(c for c, _ in points))
    orders = tuple(dict.fromkeys(o for _, o in points))
    space = StageSpace(run.problem, stage, configs[0].epilogue, configs, orders)
    study = _open_study(run.store, f"{run.name(stage, bucket)}|{kind}|{label}", space,
                        len(points), worker=False)
    _recover(study, space)
    queued = {_name_of(space, t) for t in study.get_trials(deepcopy=False)}
    for c, order in points:
        if space.point_name(c, {"order": order}) not in queued:
            study.enqueue_trial(space.params_of(c, order), user_attrs={"seed": kind})
    bar.total += len(points)
    bar.refresh()
    _run_study(run, study, space, len(points), bucket, timeout, bar)
    return collect_result(study, stage, bucket, result.default_name, space)


def _counted(result: BucketResult, side: BucketResult, **winners: Any) -> BucketResult:
    """``result`` with ``side``'s evaluations, prunes and failures added (and ``winners``:
    fields taken from it)."""
    return replace(result, evaluated=result.evaluated + side.evaluated,
                   pruned=result.pruned + side.pruned, failures=result.failures + side.failures,
                   **winners)


def _tune_order(run: _Run, stage: str, bucket: int, result: BucketResult,
                timeout: float | None, bar: Any) -> BucketResult:
    """Time the bucket winner under every tile order (no recompile), and the default config
    at the default order beside them, and keep the fastest; ``result`` is returned unchanged
    when orders cannot matter (the winner's kernel takes one order, or its grid is one tile
    wide). The returned winner and default both come from this one study."""
    by_name = run.spaces[stage].by_name
    config = by_name.get(result.winner.name)
    if config is None:
        return result
    orders = tile_orders(config)
    if len(orders) < 2 or not _tiles_both_ways(run.problem, stage, bucket, config):
        return result
    points = [(config, order) for order in orders]
    default = by_name.get(result.default_name)
    if default not in (None, config):
        points.append((default, DEFAULT_ORDER))
    side = _side_by_side(run, stage, bucket, result, "order", config.name, points, timeout,
                         bar)
    if side.winner is None:
        return _counted(result, side)
    return _counted(result, side, winner=side.winner, default=side.default or result.default)


def _tune_multicast(run: _Run, stage: str, bucket: int, result: BucketResult,
                    timeout: float | None, bar: Any) -> BucketResult:
    """Time the bucket winner's multicast variant beside the winner, both at the winner's
    tile order, and the default config at the default order beside them; ``result`` is
    returned unchanged when the winner has no variant among the compiled ones or its groups
    at this bucket hold too few tokens to share. Otherwise the winner, runner-up and default
    come from this one study, so the variant is only judged against points timed with it."""
    space = run.spaces[stage]
    config = space.by_name.get(result.winner.name) if result.winner else None
    variant = multicast_variant(config)
    if (variant is None or variant not in space.variants or run.compile_errors.get(variant.name)
            or not _shares_token_tile(run.problem, stage, bucket, config)):
        return result
    order = TileOrder.from_tag(result.winner.order)
    points = [(config, order), (variant, order)]
    default = space.by_name.get(result.default_name)
    if default is not None and (default, DEFAULT_ORDER) != (config, order):
        points.append((default, DEFAULT_ORDER))
    side = _side_by_side(run, stage, bucket, result, "multicast", result.winner.label, points,
                         timeout, bar)
    if side.winner is None:
        return _counted(result, side)
    return _counted(result, side, winner=side.winner, runner_up=side.runner_up,
                    default=side.default or result.default)


def _refine(run: _Run, stage: str, bucket: int, result: BucketResult, timeout: float | None,
            bar: Any) -> BucketResult:
    """A config study's winner after its tile orders, then its multicast variant: both need
    no compile beyond the candidates' batch."""
    result = _tune_order(run, stage, bucket, result, timeout, bar)
    return _tune_multicast(run, stage, bucket, result, timeout, bar)


def _prepare_studies(run: _Run, plan: Sequence[tuple[int, str]], notes: list[str]
                     ) -> dict[tuple[int, str], optuna.Study]:
    """Open (or, unless a worker, create and seed) every study before any runs, so that workers
    started beside this run find all of them queued."""
    studies = {}
    for bucket, stage in plan:
        study = _open_study(run.store, run.name(stage, bucket), run.spaces[stage], run.trials,
                            run.worker)
        if study is None:
            notes.append(f"worker: no study for {stage} t={bucket} yet (start the first run "
                         "without --worker)")
            continue
        _recover(study, run.spaces[stage])
        if not run.worker:
            _seed(run, study, stage, bucket, reserve=2 if run.spaces[stage].brute_force else 0)
        studies[(bucket, stage)] = study
    return studies


def _settled(study: optuna.Study, target: int) -> bool:
    """Whether a config study's winner is final: ``target`` candidates evaluated and none in
    flight in any process."""
    trials = study.get_trials(deepcopy=False)
    return (_evaluated_count(trials) >= target
            and not any(t.state == TrialState.RUNNING for t in trials))


def _tune_all(run: _Run, deadline: float | None, progress: bool
              ) -> tuple[list[BucketResult], list[str]]:
    plan = [(b, s) for b in run.buckets for s in run.spaces]
    results: dict[tuple[int, str], BucketResult] = {}
    notes: list[str] = []
    studies = _prepare_studies(run, plan, notes)
    total = sum(run.target(s) for b, s in plan if (b, s) in studies)

    def left() -> float | None:
        return None if deadline is None else deadline - time.monotonic()

    with _bar(total, "tune", "trial", progress) as bar:
        for i, (bucket, stage) in enumerate(plan):
            study = studies.get((bucket, stage))
            if study is None:
                continue
            if (remaining := left()) is not None and remaining <= 0:
                notes.append(f"time budget spent before {stage} t={bucket}")
            else:
                if not run.worker and run.trials:
                    _seed(run, study, stage, bucket)  # now with this run's neighbour winners
                    _measure_peer(run, study, stage, bucket)
                timeout = None if remaining is None else remaining / (len(plan) - i)
                _run_study(run, study, run.spaces[stage], run.target(stage), bucket, timeout,
                           bar)
            default = default_config(run.problem, stage, bucket, run.arch).name
            result = collect_result(study, stage, bucket, default, run.spaces[stage])
            if result.winner is not None:
                # The config study's winner seeds the neighbouring buckets (a multicast
                # variant that beats it in the refinement is not a point of their studies).
                run.winners[(stage, bucket)] = result.winner.name
            remaining = left()
            # A worker leaves this bucket's refinement (tile orders, multicast) to its second
            # pass below: another process may still be timing a config here, and the
            # refinement is the winner's.
            if (result.winner is not None and not run.worker and run.trials
                    and (remaining is None or remaining > 0)):
                timeout = None if remaining is None else remaining / (len(plan) - i)
                result = _refine(run, stage, bucket, result, timeout, bar)
            results[(bucket, stage)] = result
        if run.worker and run.trials:
            # Second pass: every study whose configs are all timed gets its refinement
            # (tile orders, multicast variant) and its peer here too, so that no GPU work is
            # left to the one process that writes the table. A study another worker is still
            # timing is that worker's to finish (it passes here after its own first pass); a
            # run without ``worker`` tops up whatever none finished.
            for i, (bucket, stage) in enumerate(plan):
                study = studies.get((bucket, stage))
                remaining = left()
                if (study is None or (remaining is not None and remaining <= 0)
                        or not _settled(study, run.target(stage))):
                    continue
                default = results[(bucket, stage)].default_name
                result = collect_result(study, stage, bucket, default, run.spaces[stage])
                if result.winner is not None:
                    run.winners[(stage, bucket)] = result.winner.name
                    timeout = None if remaining is None else remaining / (len(plan) - i)
                    result = _refine(run, stage, bucket, result, timeout, bar)
                _measure_peer(run, study, stage, bucket)
                results[(bucket, stage)] = result
    return list(results.values()), notes


# --------------------------------------------------------------------------------------------
# The layer check: a bucket's winners together, in the whole forward, against what they replace
# --------------------------------------------------------------------------------------------

def _previous_table(problem: LatentMoEProblem, arch: str, device: DeviceInfo,
                    root: Path | None) -> TunedTable | None:
    """The table this run replaces for the layer: the file it merges into, else the one the
    runtime finds for the key (a config folder's, the cache's or a shipped one); None where the
    layer runs its default configs."""
    key = tuning_key(problem, arch, device)
    target = table_path(key, None if root is None else root / "tuned")
    if target.is_file():
        try:
            return read_table(target)
        except TableError:
            pass  # write_table replaces an unusable file; the lookup below decides
    table = tuned_table(problem, arch, device)
    return table if table.tuned else None


def _previous_time(previous: TunedTable | None, result: BucketResult, config: KernelConfig,
                   order: TileOrder) -> ConfigTime | None:
    """The stage time of the previous plan's (config, order) at the result's bucket: its entry
    in the previous table, else this run's time of the default, if that is what it runs."""
    entry = None if previous is None else previous.entry_for(result.stage, result.bucket)
    if entry is not None and (entry.winner.name, entry.order) == (config.name, order.tag):
        return ConfigTime(entry.winner.name, dict(entry.winner.config), entry.median_ms,
                          entry.p20_ms, entry.p80_ms, entry.order)
    if (result.default is not None and result.default.name == config.name
            and result.default.order == order.tag):
        return result.default
    return None


def _check_in_layer(run: _Run, results: list[BucketResult], previous: TunedTable | None,
                    plans: Mapping[int, Plan], deadline: float | None, notes: list[str]
                    ) -> tuple[list[BucketResult], list[LayerCheck]]:
    """Per bucket, time the whole forward under the plan of this run's winners and under the
    previous plan, and keep the faster: each stage is timed alone in its study, and a
    faster kernel there can still make the layer slower (on an H200 the default run's table,
    unchecked, ran the Super layer 3% slower at 1 and at 2048 tokens than the shipped table it
    replaced; benchmarks/NOTES.md v13). Where the previous plan wins, its stages' entries
    replace the winners in the results (and so in the table)."""
    label = ("default configs" if previous is None
             else f"table {previous.source.name if previous.source else previous.key}")
    by_key = {(r.bucket, r.stage): r for r in results}
    checks: list[LayerCheck] = []
    for bucket in run.buckets:
        mine = {s: by_key[(bucket, s)] for s in run.spaces if (bucket, s) in by_key}
        if not mine or any(r.winner is None for r in mine.values()):
            continue
        if deadline is not None and time.monotonic() > deadline:
            notes.append(f"time budget spent before the layer check at t={bucket}")
            break
        old = plans[bucket]
        new = old
        for stage, r in mine.items():
            new = new.with_stage(stage, config_from_dict(r.winner.config),
                                 TileOrder.from_tag(r.winner.order))
        if new == old:
            checks.append(LayerCheck(bucket, label, "same"))
            continue
        unbuilt = [c.name for c in old.configs() if run.compile_errors.get(c.name)]
        if unbuilt:
            checks.append(LayerCheck(bucket, label, "tuned", note="the previous plan's "
                                     f"{', '.join(unbuilt)} did not build"))
            continue
        kept_times = {s: _previous_time(previous, r, getattr(old, PLAN_FIELD[s]),
                                        old.orders[PLAN_INDEX[s]]) for s, r in mine.items()}
        old_m, new_m = run.evaluator.layer([old, new], bucket)
        times = [m.median_ms if isinstance(m, Measurement) else None for m in (new_m, old_m)]
        note = "; ".join(f"{which} plan: {m.kind}: {m.message}"[:300]
                         for which, m in (("tuned", new_m), ("previous", old_m))
                         if isinstance(m, Failure))
        previous_wins = times[1] is not None and (times[0] is None or times[1] < times[0])
        unknown = [s for s, t in kept_times.items()
                   if t is None and getattr(old, PLAN_FIELD[s]) != getattr(new, PLAN_FIELD[s])]
        if previous_wins and unknown:
            note = (note + "; " if note else "") + (
                f"the previous plan was faster but its {', '.join(unknown)} stage times are in "
                "no table or study here; the tuned plan is kept")
            previous_wins = False
        checks.append(LayerCheck(bucket, label, "previous" if previous_wins else "tuned",
                                 *times, note))
        if previous_wins:
            for stage, r in mine.items():
                t = kept_times[stage]
                if t is not None and (t.name, t.order) != (r.winner.name, r.winner.order):
                    by_key[(bucket, stage)] = replace(r, winner=t)
    return list(by_key.values()), checks


def run_tuning(problem: LatentMoEProblem, arch: str = "sm90",
               stages: Sequence[str] | None = None, buckets: Sequence[int] | None = None,
               trials: int = DEFAULT_TRIALS, time_budget: float | None = None,
               jobs: int | None = None, storage: str | os.PathLike | BaseStorage | None = None,
               worker: bool = False, compile_only: bool = False,
               evaluator: Evaluator | None = None, progress: bool = True, *,
               max_configs: int | None = DEFAULT_MAX_CONFIGS,
               configs: Sequence[KernelConfig | str] | None = None, routing: str = "uniform",
               cache_dir: str | os.PathLike | None = None) -> TuningReport:
    """Tune ``problem`` on ``arch``: compile the candidates, run the studies, store the winners.

    Parameters
    ----------
    problem : LatentMoEProblem
        The layer (``--preset``, ``--model-config`` or explicit sizes).
    arch : str
        Target architecture (``--arch``).
    stages : sequence of str, optional
        GEMM stages to tune; default every stage of the problem (:func:`stages_of`).
    buckets : sequence of int, optional
        Token buckets (``--tokens``); default :func:`token_buckets`.
    trials : int
        Candidates evaluated per study (``--trials``), counted over all workers and runs; a
        rerun only runs what is missing. 0 creates and seeds the studies only (with every
        candidate queued), ready for workers.
    time_budget : float, optional
        Seconds for the whole run (``--time-budget``), shared among the studies still to run.
    jobs : int, optional
        Parallel compiles (``--jobs``).
    storage : str, path or optuna storage, optional
        ``--storage``: default a journal file in the cache (see :func:`open_storage`).
    worker : bool
        ``--worker``: only pull trials of studies that exist and seed none. Start workers once
        a first run (e.g. with ``trials=0``) has created the studies; every run opens and
        queues all its studies before it times anything. Once its configs are done a worker
        also refines the winner (tile orders, multicast variant) and times the peer of every
        study whose configs are all timed, so that the run that writes the table (one without
        ``worker``) finds the GPU work done.
    compile_only : bool
        ``--compile-only``: build the candidates and stop (no GPU needed).
    evaluator : Evaluator, optional
        Compiles and measures; default :class:`GpuEvaluator` (needs a GPU of ``arch``).
    progress : bool
        tqdm bars for compile and tune on stderr.
    max_configs, configs
        Candidate selection, see :func:`select_candidates`.
    routing : {"uniform", "skewed"}
        Routing distribution of the grouped stages' group sizes.
    cache_dir : path, optional
        ``--cache-dir``: where the journal and the table go (default :func:`env.cache_dir`).

    Returns
    -------
    TuningReport
        Compile outcomes, per (stage, bucket) results (after the layer check), the layer
        checks and the table written (if any winner).

    Requirements
    ------------
    Arguments as above (``ValueError``/``TypeError`` naming the flag otherwise). Without
    ``compile_only`` the evaluator must be able to time (the default one raises
    ``RuntimeError`` without a GPU of ``arch``). ``KeyboardInterrupt`` propagates; every
    finished trial is already stored, so the same call resumes.
    """
    start = time.monotonic()
    stages, buckets = _check_args(problem, stages, buckets, trials, time_budget, jobs, routing)
    get_arch(arch)  # a clear error for an unknown architecture
    spaces = stage_spaces(problem, arch, stages, max_configs, configs)
    evaluator = evaluator if evaluator is not None else GpuEvaluator(problem, arch,
                                                                     routing=routing)
    # Ask for the device before minutes of compiling, so a missing GPU fails at once.
    device = None if compile_only else evaluator.device
    root = Path(cache_dir).expanduser() if cache_dir is not None else None
    key = None if device is None else tuning_key(problem, arch, device)
    # The run that writes the table checks it in the whole layer against the plans it replaces
    # (workers and --trials 0 write none), whose kernels are then built with the candidates.
    check = not (compile_only or worker or not trials)
    previous = _previous_table(problem, arch, device, root) if check else None
    plans = {b: previous.plan_for(b) if previous is not None else default_plan(problem, b, arch)
             for b in (buckets if check else ())}
    errors = _prepare(evaluator, spaces, jobs, progress,
                      [c for plan in plans.values() for c in plan.configs()])
    compiled = tuple(CompileRecord(n, e) for n, e in errors.items())
    base = TuningReport(problem, arch, stages, buckets, compiled)
    if compile_only:
        return replace(base, elapsed_s=time.monotonic() - start,
                        notes=("compile only: nothing was timed",))
    run = _Run(problem, arch, key, routing, trials, buckets, spaces,
               open_storage(storage, key, root), evaluator, errors, worker)
    deadline = None if time_budget is None else start + time_budget
    with _quiet_optuna():
        results, notes = _tune_all(run, deadline, progress)
    checks: list[LayerCheck] = []
    if check:
        results, checks = _check_in_layer(run, results, previous, plans, deadline, notes)
    report = replace(base, results=tuple(results), key=key, device=device, timed=True,
                      notes=tuple(notes), layer_checks=tuple(checks))
    metadata = _metadata(problem, arch, routing, trials, evaluator)
    if checks:
        metadata["layer_check"] = {str(c.bucket): c.to_dict() for c in checks}
    table = _table(report, metadata)
    if table is not None and previous is not None:
        # The cache's table shadows a shipped one for every token count: a first run into an
        # empty cache (say --tokens 2048) carries the buckets it did not tune along. (A table
        # of an earlier search space has another key; its entries are still what the layer ran.)
        table = replace(previous, key=table.key).merged(table)
    path = None
    if table is not None:
        path = write_table(table, None if root is None else root / "tuned")
    return replace(report, table_path=path, elapsed_s=time.monotonic() - start)


# --------------------------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------------------------

def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.4f}"


def _x(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}x"


def format_report(report: TuningReport) -> str:
    """A text table per stage: per bucket the winner, its time (p20-p80), and its speedups over
    the default config and the torch peer; then compile failures and notes.

    Requirements
    ------------
    ``report`` is a :class:`TuningReport`.
    """
    if not isinstance(report, TuningReport):
        raise TypeError(f"report must be a TuningReport, got {type(report).__name__}")
    lines = [f"problem {report.problem.key} on {report.arch}"
             + (f" ({report.device.slug})" if report.device else "")]
    ok = sum(r.ok for r in report.compiled)
    lines.append(f"candidates ready: {ok}/{len(report.compiled)}")
    lines += [f"  build failed: {r.name}: {(r.error or '').strip().splitlines()[-1:] or ''}"
              for r in report.compiled if not r.ok]
    for stage in report.stages:
        rows = [r for r in report.results if r.stage == stage]
        if not rows:
            continue
        width = max([len("winner")] + [len(r.winner.label) for r in rows if r.winner])
        lines += ["", f"stage {stage}",
                  f"{'tokens':>6}  {'winner':<{width}}  {'ms':>8} {'(p20-p80)':<19}  "
                  f"{'default':>8} {'x dflt':>7}  {'peer':>8} {'x peer':>7}  {'trials':>6}"]
        for r in rows:
            w = r.winner
            spread = "" if w is None else f"({w.p20_ms:.4f}-{w.p80_ms:.4f})"
            lines.append(
                f"{r.bucket:>6}  {(w.label if w else 'none'):<{width}}  "
                f"{_ms(w.median_ms if w else None):>8} {spread:<19}  "
                f"{_ms(r.default.median_ms if r.default else None):>8} "
                f"{_x(r.speedup_vs_default):>7}  {_ms(r.peer_ms):>8} {_x(r.speedup_vs_peer):>7}"
                f"  {r.evaluated:>6}")
        failed = sum(len(r.failures) for r in rows)
        if failed:
            lines.append(f"  {failed} candidate evaluations failed (compile, launch or "
                         "correctness); see the trials' user attributes")
    if report.layer_checks:
        lines += ["", "layer check: the whole forward (graph replay) under this run's winners "
                  f"and under the plan they replace ({report.layer_checks[0].previous}); the "
                  "faster is kept",
                  f"{'tokens':>6}  {'tuned ms':>9}  {'previous ms':>11}  kept"]
        lines += [f"{c.bucket:>6}  {_ms(c.tuned_ms):>9}  {_ms(c.previous_ms):>11}  {c.kept}"
                  + (f"  ({c.note})" if c.note else "") for c in report.layer_checks]
    if report.table_path is not None:
        lines += ["", f"table: {report.table_path}"]
    lines += [f"note: {n}" for n in report.notes]
    lines.append(f"elapsed: {report.elapsed_s:.0f} s")
    return "\n".join(lines)


def plot_report(report: TuningReport, path: str | os.PathLike) -> Path:
    """A PNG of time vs tokens per stage: tuned winner (with p20-p80 band), default, peer.

    Requirements
    ------------
    ``report`` holds timed results; ``path``'s folder is created if needed. Uses matplotlib's
    Agg canvas directly, so no display and no global backend switch.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not isinstance(report, TuningReport):
        raise TypeError(f"report must be a TuningReport, got {type(report).__name__}")
    stages = [s for s in report.stages if any(r.stage == s for r in report.results)]
    if not stages:
        raise ValueError("report has no timed results to plot")
    fig = Figure(figsize=(4.5 * len(stages), 3.8), layout="constrained")
    FigureCanvasAgg(fig)
    for ax, stage in zip(fig.subplots(1, len(stages), squeeze=False)[0], stages, strict=True):
        rows = sorted((r for r in report.results if r.stage == stage), key=lambda r: r.bucket)
        tuned = [(r.bucket, r.winner) for r in rows if r.winner]
        if tuned:
            xs = [b for b, _ in tuned]
            ax.plot(xs, [w.median_ms for _, w in tuned], "o-", label="tuned")
            ax.fill_between(xs, [w.p20_ms for _, w in tuned], [w.p80_ms for _, w in tuned],
                            alpha=0.25)
        for label, pick, style in (("default config", lambda r: r.default and
                                    r.default.median_ms, "s--"),
                                   ("torch peer", lambda r: r.peer_ms, "^:")):
            pts = [(r.bucket, pick(r)) for r in rows if pick(r)]
            if pts:
                ax.plot(*zip(*pts, strict=True), style, label=label)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(f"{stage}")
        ax.set_xlabel("tokens")
        ax.set_ylabel("ms per call")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize="small")
    fig.suptitle(f"{report.problem.key} on {report.arch}", fontsize="small")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path


def main_from_args(args: Any, problem: LatentMoEProblem, arch: str) -> int:
    """Run the tuning the parsed command line asks for; print the table, save the plot.

    Reads ``tokens``, ``trials``, ``time_budget``, ``jobs``, ``storage``, ``worker``,
    ``cache_dir``, ``compile_only`` and (optional) ``candidates`` and ``stages``, both
    comma-separated, from ``args``. Returns the exit status: 0, 1 when no bucket found a working
    kernel (trials were asked for), 2 on bad arguments, 130 when interrupted (the run resumes
    when repeated).
    """
    root = Path(args.cache_dir).expanduser() if getattr(args, "cache_dir", None) else None
    names = getattr(args, "candidates", None)
    stages = getattr(args, "stages", None)
    try:
        report = run_tuning(
            problem, arch, stages.split(",") if stages else None, parse_tokens(args.tokens),
            DEFAULT_TRIALS if args.trials is None else args.trials, args.time_budget,
            args.jobs, args.storage, bool(args.worker), bool(args.compile_only),
            configs=names.split(",") if names else None, cache_dir=root,
            max_configs=getattr(args, "max_configs", None) or DEFAULT_MAX_CONFIGS)
    except KeyboardInterrupt:
        print("\ninterrupted: finished trials are stored; run the same command again to resume",
              file=sys.stderr)
        return 130
    except (ValueError, TypeError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_report(report))
    if report.timed and any(r.winner for r in report.results):
        png = (root or env.cache_dir()) / "reports" / f"{report.key}.png"
        print(f"plot: {plot_report(report, png)}")
    # --trials 0 only prepares the studies (for workers): no winner is the expected outcome.
    if (report.timed and report.results and args.trials != 0
            and not any(r.winner for r in report.results)):
        return 1
    return 0


# --------------------------------------------------------------------------------------------
# The real evaluator: compile with build, gate against the fp32 oracle, time by graph replay
# --------------------------------------------------------------------------------------------

def gpu_lock_path(index: int) -> Path:
    """The lock file that serialises GPU work of every tuning process on device ``index`` of
    this host, named by the device's UUID (the same GPU under any ``CUDA_VISIBLE_DEVICES``)."""
    import torch

    props = torch.cuda.get_device_properties(index)
    ident = str(getattr(props, "uuid", "") or f"{props.name}-{props.pci_bus_id}")
    safe = "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in ident)
    return Path(tempfile.gettempdir()) / f"autotune-gpu-{safe}.lock"


@contextlib.contextmanager
def gpu_turn(index: int) -> Iterator[None]:
    """Hold this process's turn on GPU ``index``: workers that share one GPU check and time one
    at a time. Two kernels timed at once on one GPU share its SMs and bandwidth, and each
    measures the pair (both read up to 2x slow, and the winner becomes whoever ran alone)."""
    with FileLock(str(gpu_lock_path(index))):
        yield


class DeviceError(RuntimeError):
    """A CUDA error that poisons the context (illegal address, ...): later timings in this
    process would be meaningless, so the run stops; rerunning resumes after the bad trial."""


@dataclass(frozen=True)
class _TimingSet:
    inputs: Any
    out: Any
    arrays: tuple | None
    combine: Any = None  # CombineInputs of the fc2 stage (its timings include the combine)


# Untimed replays before a plan's timing in the layer check: right after the other plan's
# graph the GPU runs slower for tens of milliseconds (autotune.bench.time_graph).
_LAYER_SETTLE_MS = 50.0
_STICKY = ("CUDA error", "illegal", "misaligned", "unspecified launch failure")


def _is_device_error(e: BaseException, dev) -> bool:
    """Whether ``e`` left the CUDA context unusable (sticky errors poison every later call)."""
    import torch

    if type(e).__name__ == "AcceleratorError" or any(w in str(e) for w in _STICKY):
        return True
    if dev.type != "cuda":
        return False
    try:
        torch.cuda.synchronize(dev)
        torch.ones(1, device=dev).add_(1).item()
    except Exception:  # noqa: BLE001 - any failure here means the context is gone
        return True
    return False


class GpuEvaluator:
    """Compiles candidates with :func:`autotune.build.build` and measures them on the GPU.

    :meth:`evaluate` loads the built library, runs it once on fresh seeded inputs into a
    NaN-poisoned output and compares with :func:`autotune.workload.reference_output`
    (relative Frobenius error <= ``tolerance``); only then does it time the launch by CUDA-graph
    replay over several rotated input sets (more than the L2 holds), which every candidate of a
    (stage, bucket) shares. :meth:`peer` times ``torch._grouped_mm`` (grouped stages) or
    ``torch.mm`` (dense ones) on the same sets, with the stage's epilogue in torch.

    Parameters
    ----------
    problem : LatentMoEProblem
    arch : str
    routing : {"uniform", "skewed"}
    device_index : int, optional
        CUDA device (default: current).
    replays : int
        Timed graph replays per measurement.
    seed : int
        Base seed of every input set.
    tolerance : float
        Correctness gate.

    Requirements
    ------------
    Nothing is touched at construction: :meth:`prepare` needs nvcc and CUTLASS only, the rest a
    visible GPU of ``arch`` (``RuntimeError`` otherwise).
    """

    def __init__(self, problem: LatentMoEProblem, arch: str = "sm90", *,
                 routing: str = "uniform", device_index: int | None = None, replays: int = 20,
                 seed: int = 0, tolerance: float = TOLERANCE):
        if not isinstance(problem, LatentMoEProblem):
            raise TypeError(f"problem must be a LatentMoEProblem, got {type(problem).__name__}")
        if routing not in ROUTINGS:
            raise ValueError(f"routing must be one of {', '.join(ROUTINGS)}, got {routing!r}")
        if isinstance(replays, bool) or not isinstance(replays, int) or replays < 3:
            raise ValueError(f"replays must be an int >= 3, got {replays!r}")
        self.problem, self.arch, self.routing = problem, arch, routing
        self.device_index, self.replays, self.seed = device_index, replays, seed
        self.tolerance = tolerance
        self._device: DeviceInfo | None = None
        self._sets_key: tuple[str, int] | None = None
        self._sets: list[_TimingSet] = []
        self._fused = None  # the layer of the layer check (its weights made on first use)

    def _torch_device(self):
        import torch

        from .arch import arch_of_capability

        if not torch.cuda.is_available():
            raise RuntimeError(f"timing needs an {self.arch} GPU and no CUDA device is visible; "
                               "compile only (--compile-only) or run on the GPU machine")
        index = torch.cuda.current_device() if self.device_index is None else self.device_index
        found = arch_of_capability(torch.cuda.get_device_capability(index))
        if found != self.arch:
            raise RuntimeError(f"timing {self.arch} kernels needs an {self.arch} GPU; device "
                               f"{index} is {found or 'unknown'}")
        return torch.device("cuda", index)

    @property
    def device(self) -> DeviceInfo:
        if self._device is None:
            self._device = DeviceInfo.current(self._torch_device().index)
        return self._device

    def prepare(self, configs: Sequence[KernelConfig], jobs: int | None = None,
                on_done: Callable[[str, str | None], None] | None = None
                ) -> dict[str, str | None]:
        """Build every config (cached ones are reused); name -> None or the compile log.

        The routing library of the problem's dtype and arch is built in the same pool: the
        layer needs it beside the tuned GEMMs, so a tuned cache serves the first forward without
        nvcc."""
        from .build import build

        names = {c.name for c in configs}

        def report(r) -> None:
            if on_done is not None and r.config.name in names:
                on_done(r.config.name, None if r.ok else (r.log or r.status))

        routing = RoutingConfig(config_dtype(self.problem), self.arch)
        results = build([*configs, routing], jobs=jobs, on_done=report)
        if not results[-1].ok:
            log.warning("building %s failed; the layer will retry on first use:\n%s",
                        routing.name, results[-1].log or results[-1].status)
        return {r.config.name: None if r.ok else (r.log or "build failed")
                for r in results if r.config.name in names}

    def evaluate(self, config: KernelConfig, stage: str, tokens: int,
                 order: TileOrder = DEFAULT_ORDER) -> Measurement | Failure:
        """Gate ``config`` launched with ``order`` on ``stage`` at ``tokens`` tokens against
        the oracle, then time it."""
        from .bench import time_graph
        from .runtime import load

        dev = self._torch_device()
        try:
            kernel = load(config, compile_if_missing=False)
        except Exception as e:  # noqa: BLE001 - a library that will not load is one failure
            return Failure("load", f"{type(e).__name__}: {e}")
        with gpu_turn(dev.index):
            failure, err = self._check(kernel, stage, tokens, dev, order)
            if failure is not None:
                return failure
            sets = self._timing_sets(stage, tokens, dev)
            if sets[0].arrays is not None:
                fns = [lambda s=s: kernel.run(*s.arrays, order=order) for s in sets]
            elif stage == "fc2":  # the combine before it, as the forward runs them
                sets = self._with_combine(sets, stage, tokens, dev)
                if self._combines(kernel, stage, tokens):
                    fns = [lambda s=s: kernel.combine_dense(s.combine.y, s.combine.weights,
                                                            s.combine.row_of, s.inputs.b, s.out)
                           for s in sets]
                else:
                    combine = self._combine_kernel(tokens)
                    fns = [lambda s=s: (combine(s), kernel.dense(s.inputs.a, s.inputs.b, s.out,
                                                                 order)) for s in sets]
            else:
                fns = [lambda s=s: kernel.dense(s.inputs.a, s.inputs.b, s.out, order)
                       for s in sets]
            try:
                t = time_graph(fns, replays=self.replays)
            except Exception as e:  # noqa: BLE001 - classified below
                if _is_device_error(e, dev):
                    raise DeviceError(f"{config.name}: {e}") from e
                return Failure("launch", f"timing: {type(e).__name__}: {e}")
        return Measurement(t.median_ms, t.p20_ms, t.p80_ms, t.samples, err)

    def _check(self, kernel, stage: str, tokens: int, dev,
               order: TileOrder = DEFAULT_ORDER) -> tuple[Failure | None, float]:
        import torch

        from .workload import make_combine_inputs, make_inputs, reference_output, rel_error

        gen = torch.Generator(device=dev)
        gen.manual_seed(_stable_seed(self.seed, "check", kernel.config.name, stage, tokens))
        inputs = make_inputs(self.problem, stage, tokens, routing=self.routing, generator=gen,
                             device=dev)
        out = inputs.empty_out(fill=float("nan"))
        combine = (make_combine_inputs(self.problem, tokens, generator=gen, device=dev)
                   if self._combines(kernel, stage, tokens) else None)
        try:
            if combine is not None:
                kernel.combine_dense(combine.y, combine.weights, combine.row_of, inputs.b, out)
                inputs = replace(inputs, a=combine.combined())  # the reference's A
            elif inputs.offs is None:
                kernel.dense(inputs.a, inputs.b, out, order)
            else:
                kernel.grouped_mm(inputs.a, inputs.b, inputs.offs, out=out, order=order)
            if dev.type == "cuda":  # surface asynchronous launch errors here, per config
                torch.cuda.synchronize(dev)
        except Exception as e:  # noqa: BLE001 - classified below
            if _is_device_error(e, dev):
                raise DeviceError(f"{kernel.config.name}: {e}") from e
            return Failure("launch", f"{type(e).__name__}: {e}"), math.inf
        err = rel_error(out, reference_output(inputs))
        if not err <= self.tolerance:
            return Failure("wrong", f"relative error {err:.3g} > {self.tolerance} against the "
                           f"fp32 reference ({stage}, T={tokens}, {self.routing} routing; NaN "
                           "means rows left unwritten)"), err
        return None, err

    def _combine_kernel(self, tokens: int):
        """The routing library's combine of a timing set's pairs into its A (the forward's
        step before fc2 where fc2 does not take the combine itself)."""
        from .runtime import load_routing

        routing = load_routing(RoutingConfig(config_dtype(self.problem), self.arch))
        p = self.problem
        return lambda s: routing("combine", s.combine.y, s.combine.weights, s.combine.row_of,
                                 tokens, p.top_k, p.expert_width, s.inputs.a)

    def _combines(self, kernel, stage: str, tokens: int) -> bool:
        # As the forward runs fc2 (FusedLatentMoE.kernels): with the combine where it fits.
        return (stage == "fc2"
                and kernel.combines(tokens, self.problem.expert_width, self.problem.top_k))

    def _with_combine(self, sets: list[_TimingSet], stage: str, tokens: int,
                      dev) -> list[_TimingSet]:
        """The timing sets with their combine inputs (made once per stage and token count)."""
        import torch

        from .workload import make_combine_inputs

        if sets[0].combine is None:
            gen = torch.Generator(device=dev)
            gen.manual_seed(_stable_seed(self.seed, "combine", stage, tokens))
            sets = [replace(s, combine=make_combine_inputs(self.problem, tokens, generator=gen,
                                                           device=dev)) for s in sets]
            self._sets = sets
        return sets

    def _timing_sets(self, stage: str, tokens: int, dev) -> list[_TimingSet]:
        import torch

        from .runtime import group_arrays
        from .workload import make_inputs, stage_shape

        if self._sets_key == (stage, tokens):
            return self._sets
        self._sets, self._sets_key = [], None
        torch.cuda.empty_cache()
        shape = stage_shape(self.problem, stage)
        rows, esize = shape.rows(tokens), 2
        per_set = esize * (rows * shape.k + shape.groups * shape.n * shape.k) + 4 * rows * shape.n
        l2 = getattr(torch.cuda.get_device_properties(dev), "L2_cache_size", 0) or 50 << 20
        # Enough sets that one replay pass streams several L2s' worth: each call starts cold.
        count = max(2, min(8, math.ceil(4 * l2 / max(per_set, 1))))
        gen = torch.Generator(device=dev)
        gen.manual_seed(_stable_seed(self.seed, "timing", stage, tokens))
        sets = []
        for _ in range(count):
            inputs = make_inputs(self.problem, stage, tokens, routing=self.routing,
                                 generator=gen, device=dev)
            out = inputs.empty_out()
            arrays = (None if inputs.offs is None
                      else group_arrays(inputs.a, inputs.b, inputs.offs, out))
            sets.append(_TimingSet(inputs, out, arrays))
        self._sets, self._sets_key = sets, (stage, tokens)
        return sets

    def layer(self, plans: Sequence[Plan], tokens: int, rounds: int = 3
              ) -> list[Measurement | Failure]:
        """Time the whole fused forward at ``tokens`` tokens under each plan: CUDA-graph replay
        over two input sets, the plans taking turns ``rounds`` times so that drift over the
        seconds of a check hits them alike; a plan's median is the median of its rounds'.
        The kernels passed their stage's gate; here a plan whose output is not finite fails."""
        import torch

        from .bench import time_graph

        dev = self._torch_device()
        with gpu_turn(dev.index):
            layer = self._layer(dev)
            gen = torch.Generator(device=dev)
            gen.manual_seed(_stable_seed(self.seed, "layer", tokens))
            xs = [torch.randn(tokens, self.problem.hidden_size, generator=gen, device=dev,
                              dtype=layer.dtype) for _ in range(2)]
            timings: list[list] = [[] for _ in plans]
            failed: dict[int, Failure] = {}
            for _ in range(rounds):
                for i, plan in enumerate(plans):
                    if i in failed:
                        continue
                    try:
                        layer.use_plan(tokens, plan)
                        if not timings[i] and not bool(torch.isfinite(layer(xs[0])).all()):
                            failed[i] = Failure("wrong", "the layer's output is not finite")
                            continue
                        timings[i].append(time_graph([lambda x=x: layer(x) for x in xs],
                                                     replays=self.replays,
                                                     settle_ms=_LAYER_SETTLE_MS))
                    except Exception as e:  # noqa: BLE001 - classified below
                        if _is_device_error(e, dev):
                            raise DeviceError(f"layer at T={tokens}: {e}") from e
                        failed[i] = Failure("launch", f"{type(e).__name__}: {e}")
        return [failed[i] if i in failed else
                Measurement(statistics.median(t.median_ms for t in ts),
                            min(t.p20_ms for t in ts), max(t.p80_ms for t in ts),
                            sum(t.samples for t in ts))
                for i, ts in enumerate(timings)]

    def _layer(self, dev):
        """The fused layer with random weights of the problem's sizes (made once): the stage
        timing sets are dropped first, the weights of both would not always fit."""
        import torch

        from .fused import FusedLatentMoE

        if self._fused is None:
            self._sets, self._sets_key = [], None
            torch.cuda.empty_cache()
            p = self.problem
            dtype = getattr(torch, p.dtype)
            gen = torch.Generator(device=dev)
            gen.manual_seed(_stable_seed(self.seed, "layer weights"))

            def weight(*shape, dt=dtype):  # unit-variance outputs, as a trained layer's
                w = torch.randn(*shape, generator=gen, device=dev, dtype=dt)
                return w.mul_(shape[-1] ** -0.5)

            e, h, w, i = p.num_experts, p.hidden_size, p.expert_width, p.intermediate_size
            latent = p.latent_size is not None
            self._fused = FusedLatentMoE(
                p, weight(e, h, dt=torch.float32),
                torch.randn(e, generator=gen, device=dev).mul_(0.01),
                weight(w, h) if latent else None, weight(e, p.up_rows, w), weight(e, w, i),
                weight(h, w) if latent else None, arch=self.arch)
        return self._fused

    def peer(self, stage: str, tokens: int) -> Measurement | Failure:
        """Time the torch peer of ``stage`` at ``tokens`` on the timing sets."""
        import torch

        from .bench import time_graph
        from .workload import apply_epilogue

        dev = self._torch_device()
        sets = self._timing_sets(stage, tokens, dev)
        if stage == "fc2":
            sets = self._with_combine(sets, stage, tokens, dev)
        epilogue = sets[0].inputs.shape.epilogue

        def grouped(s):
            y = torch._grouped_mm(s.inputs.a, s.inputs.b.transpose(1, 2), offs=s.inputs.offs)
            return apply_epilogue(y, epilogue) if epilogue == "relu2" else y

        def dense(s):
            if s.combine is not None:  # fc2: torch's combine first, like the kernels' timings
                c = s.combine
                a = c.combined().to(s.inputs.a.dtype)
                return torch.mm(a, s.inputs.b.t())
            if epilogue != "f32":
                return torch.mm(s.inputs.a, s.inputs.b.t())
            try:  # fp32 output straight from cuBLAS where this torch has it (2.8+ on CUDA)
                return torch.mm(s.inputs.a, s.inputs.b.t(), out_dtype=torch.float32)
            except (RuntimeError, TypeError):
                return torch.mm(s.inputs.a, s.inputs.b.t()).float()

        call = dense if sets[0].arrays is None else grouped
        try:
            with gpu_turn(dev.index):
                t = time_graph([lambda s=s: call(s) for s in sets], replays=self.replays)
        except Exception as e:  # noqa: BLE001 - the peer is context, never a stop
            if _is_device_error(e, dev):
                raise DeviceError(f"peer of {stage}: {e}") from e
            return Failure("error", f"{type(e).__name__}: {e}")
        return Measurement(t.median_ms, t.p20_ms, t.p80_ms, t.samples)
