"""Kernel configurations, their one validity predicate, and the search space per architecture.

A :class:`KernelConfig` (:class:`Sm80Config`, :class:`Sm100Config` on those architectures) names
one compiled grouped-GEMM variant. Its :attr:`KernelConfig.name` is procedural
(``sm90_bf16_128x128x64_c1x2_coop``) and serves as identity, file name, symbol prefix and log key.
:func:`invalid_reason` is the single predicate: enumeration, the tuner, codegen and the runtime all
ask it, so an invalid point never reaches a compile.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from dataclasses import asdict, dataclass, replace
from typing import TypeVar

from .arch import get_arch
from .problem import LatentMoEProblem

SCHEDULES = ("cooperative", "pingpong")
# The CUDA-core decode kernel (templates/gemv.cuh), an sm90 KernelConfig schedule of its own.
GEMV = "gemv"
DTYPES = ("bf16", "fp16")
# What the epilogue does with the fp32 accumulator: store it ("identity"), store relu(acc)^2
# ("relu2", Nemotron 3's expert activation), or store it in fp32 ("f32", the router logits).
EPILOGUES = ("identity", "relu2", "f32")
_SCHEDULE_TAG = {"cooperative": "coop", "pingpong": "pp", GEMV: GEMV}
_DTYPE_BYTES = {"bf16": 2, "fp16": 2}

# TMA needs 16-byte aligned global strides, so every GEMM extent that is a leading dimension
# (K of A and B, N of D) must be a multiple of 16 bytes.
ALIGN_BYTES = 16
# Conservative shared memory kept for the epilogue's staging buffers and the pipeline barriers,
# which CUTLASS carves out of the same opt-in budget before it sizes the mainloop stages.
_EPILOGUE_SMEM = 32 * 1024
_MIN_STAGES = 2
# Clusters above 8 CTAs are "non-portable" on Hopper and need an opt-in launch attribute that the
# CUTLASS adapter does not set, so they would fail to launch.
_MAX_CLUSTER = 8


_Config = TypeVar("_Config", bound="_GemmConfig")


class _GemmConfig:
    """What every grouped-GEMM config class shares: its stored form (the dataclass fields) and
    the epilogue swap. Subclasses are frozen dataclasses with an ``epilogue`` field."""

    def to_dict(self) -> dict:
        return asdict(self)

    def with_epilogue(self: _Config, epilogue: str) -> _Config:
        return replace(self, epilogue=epilogue)

    @classmethod
    def from_dict(cls: type[_Config], d: dict) -> _Config:
        return cls(**d)


@dataclass(frozen=True)
class _Cutlass3Config(_GemmConfig):
    """The fields and name a CUTLASS 3.x tile config has on sm90 and sm100 alike."""

    tile_m: int
    tile_n: int
    tile_k: int
    cluster_m: int = 1
    cluster_n: int = 1
    schedule: str = "cooperative"
    swap_ab: bool = False
    epilogue: str = "identity"
    dtype: str = "bf16"
    arch: str = "sm90"

    @property
    def name(self) -> str:
        swap = "_swapab" if self.swap_ab else ""
        epi = "" if self.epilogue == "identity" else f"_{self.epilogue}"
        return (f"{self.arch}_{self.dtype}_{self.tile_m}x{self.tile_n}x{self.tile_k}"
                f"_c{self.cluster_m}x{self.cluster_n}_"
                f"{_SCHEDULE_TAG.get(self.schedule, self.schedule)}{swap}{epi}")


@dataclass(frozen=True)
class KernelConfig(_Cutlass3Config):
    """One sm90 ptr-array grouped-GEMM variant.

    The GEMM is ``D_g = A_g @ B_g^T`` per group g, A [M_g, K] and B [N_g, K] and D [M_g, N_g] all
    row-major. ``swap_ab`` computes ``D_g^T = B_g @ A_g^T`` instead, so that a group with few
    rows (few tokens per expert) lands on the tile's N side, where wgmma allows small extents.
    Tile and cluster refer to the GEMM the kernel actually runs (after the swap). ``epilogue`` is
    one of :data:`EPILOGUES`; the search space enumerates "identity" and each pipeline stage sets
    its own kind with :meth:`with_epilogue`.

    ``schedule`` "gemv" is the CUDA-core decode kernel (templates/gemv.cuh) instead of a CUTLASS
    one, for groups of a few rows, where the GEMM is a weight stream: weights on the M side
    (``swap_ab``), ``tile_m`` weight rows per work item (4 warps' worth; 8-row items are dealt
    round-robin to register-fed warps, 16- and 32-row ones stream one contiguous run per SM
    through shared memory with the bulk-copy engine), ``tile_n`` rows of A per pass over them,
    ``tile_k`` 256 (one warp's 16-byte loads), no cluster.
    """


@dataclass(frozen=True)
class TileOrder:
    """The order in which a kernel's persistent CTAs walk the output tiles: a launch argument,
    not a compile-time choice, so one compiled config runs with any order.

    ``raster`` "m" walks along M first, "n" along N; ``swizzle`` tiles (1, 2, 4 or 8) form one
    band across the raster direction. Both only change which tiles run at the same time, i.e.
    how well the operands they share stay in L2.
    """

    raster: str = "m"
    swizzle: int = 1

    @property
    def tag(self) -> str:
        return f"{self.raster}{self.swizzle}"

    @classmethod
    def from_tag(cls, tag: str) -> TileOrder:
        """The order of a :attr:`tag` such as "n4"; ``ValueError`` for anything else."""
        order = cls(tag[:1], int(tag[1:])) if (isinstance(tag, str) and tag[1:].isdigit()) else None
        if order is None or order not in TILE_ORDERS:
            raise ValueError(f"tile order {tag!r}: expected one of "
                             f"{', '.join(o.tag for o in TILE_ORDERS)}")
        return order

    @property
    def abi(self) -> tuple[int, int]:
        """(raster, swizzle) as the kernels' C ABI takes them (grouped_gemm_common.cuh)."""
        return (0 if self.raster == "m" else 1), self.swizzle


TILE_ORDERS = tuple(TileOrder(r, s) for r in ("m", "n") for s in (1, 2, 4, 8))
DEFAULT_ORDER = TileOrder()


def tile_orders(config: KernelConfig | Sm80Config | Sm100Config) -> tuple[TileOrder, ...]:
    """The tile orders ``config``'s kernel takes at launch: all of :data:`TILE_ORDERS` for the
    CUTLASS 3.x kernels of sm90 and sm100 (group tile scheduler arguments); the default alone
    for the CUTLASS 2.x ones of sm80/sm89, which compile their swizzle in, and for the gemv
    kernels, whose work items are rows of weights with no 2-D tile grid to reorder."""
    if isinstance(config, _Cutlass3Config) and not is_gemv(config):
        return TILE_ORDERS
    return (DEFAULT_ORDER,)


@dataclass(frozen=True)
class RoutingConfig:
    """The routing and bookkeeping kernels (top-k, offsets, gather, SwiGLU, combine) of one
    element type; built and cached like a GEMM config, with nothing to tune."""

    dtype: str = "bf16"
    arch: str = "sm90"

    @property
    def name(self) -> str:
        return f"{self.arch}_{self.dtype}_moe_routing"


@dataclass(frozen=True)
class Sm80Config(_GemmConfig):
    """One sm80/sm89 CUTLASS 2.x grouped-GEMM variant: threadblock tile, warp tile, stages.

    Same GEMM, C ABI and epilogues as :class:`KernelConfig` (``D_g = A_g @ B_g^T``, row-major;
    relu2 through CUTLASS 2.x's LinearCombinationGeneric, fp32 D for the router logits); the warp
    tile's K equals the threadblock's, and the tensor-core instruction is Ampere's 16x8x16.
    """

    tb_m: int
    tb_n: int
    tb_k: int
    warp_m: int
    warp_n: int
    stages: int
    epilogue: str = "identity"
    dtype: str = "bf16"
    arch: str = "sm80"

    @property
    def name(self) -> str:
        epi = "" if self.epilogue == "identity" else f"_{self.epilogue}"
        return (f"{self.arch}_{self.dtype}_{self.tb_m}x{self.tb_n}x{self.tb_k}"
                f"_w{self.warp_m}x{self.warp_n}_s{self.stages}{epi}")


SM80_ARCHS = ("sm80", "sm89")


def _sm80_reason(c: Sm80Config, smem_per_block: int) -> str | None:
    if c.arch not in SM80_ARCHS:
        return f"Sm80Config is for {', '.join(SM80_ARCHS)}, not {c.arch}"
    if c.dtype not in DTYPES:
        return f"dtype {c.dtype!r} not in {DTYPES}"
    if c.epilogue not in EPILOGUES:
        return f"epilogue {c.epilogue!r} not in {EPILOGUES}"
    if c.tb_m not in (32, 64, 128, 256) or c.tb_n not in (32, 64, 128, 256):
        return f"threadblock tile {c.tb_m}x{c.tb_n} must use 32, 64, 128 or 256"
    if c.tb_k not in (32, 64):
        return f"threadblock K must be 32 or 64, got {c.tb_k}"
    # Warp tiles are whole multiples of the 16x8x16 mma, and a threadblock holds 1-8 warps.
    if c.warp_m not in (16, 32, 64, 128) or c.warp_n not in (16, 32, 64, 128):
        return f"warp tile {c.warp_m}x{c.warp_n} must use 16, 32, 64 or 128"
    if c.tb_m % c.warp_m or c.tb_n % c.warp_n:
        return f"warp tile {c.warp_m}x{c.warp_n} does not divide {c.tb_m}x{c.tb_n}"
    warps = (c.tb_m // c.warp_m) * (c.tb_n // c.warp_n)
    if warps not in (1, 2, 4, 8):
        return f"{warps} warps per threadblock; 1, 2, 4 or 8 are supported"
    # cp.async multistage mainloop: at least three stages keep loads in flight.
    if not 3 <= c.stages <= 6:
        return f"stages must be in [3, 6], got {c.stages}"
    need = c.stages * (c.tb_m + c.tb_n) * c.tb_k * _DTYPE_BYTES[c.dtype]
    if need > smem_per_block:
        return (f"{c.stages} stages of {c.tb_m}x{c.tb_n}x{c.tb_k} need {need} B of shared "
                f"memory, over {smem_per_block} B on {c.arch}")
    return None


SM100_SCHEDULES = ("1sm", "2sm")


@dataclass(frozen=True)
class Sm100Config(_Cutlass3Config):
    """One sm100 (Blackwell, CUTLASS 3.x UMMA) ptr-array grouped-GEMM variant.

    Same GEMM, swap-AB meaning, epilogues and C ABI as :class:`KernelConfig`. ``schedule`` is
    "1sm" (one CTA issues each MMA) or "2sm" (a pair of CTAs along cluster M issues one MMA
    together). The tile is the MMA tile, as CUTLASS's sm100 builders take it: with "2sm" it
    spans the CTA pair, each CTA holding ``tile_m / 2`` rows of A and ``tile_n / 2`` rows of B.
    """

    schedule: str = "1sm"
    arch: str = "sm100"

    @property
    def mma_ctas(self) -> int:
        """CTAs that share one MMA: 2 for "2sm", else 1."""
        return 2 if self.schedule == "2sm" else 1


# Shared memory the sm100 kernel keeps outside the epilogue and the mainloop stages: pipeline
# barriers, scheduler responses, the TMEM base pointer and the ptr-array kernel's two tensor maps.
_SM100_KERNEL_SMEM = 1024


def _sm100_reason(c: Sm100Config, smem_per_block: int) -> str | None:
    if c.arch != "sm100":
        return f"Sm100Config is for sm100, not {c.arch}"
    if c.schedule == "2sm" and c.cluster_m % 2:
        return f"2SM MMA pairs CTAs along cluster M, which must be even, got {c.cluster_m}"
    # Per CTA: with 2SM MMA each CTA of the pair holds half of A's rows and stages half of B's.
    cta_m = c.tile_m // c.mma_ctas
    stage = (c.tile_m + c.tile_n) // c.mma_ctas * c.tile_k * _DTYPE_BYTES[c.dtype]
    return _cutlass3_reason(c, SM100_SCHEDULES, cta_m, stage, _SM100_KERNEL_SMEM, smem_per_block)


# Tile M each schedule takes, and its name in messages. sm90: cooperative splits the tile's M
# between two consumer warpgroups of 64 rows each; ping-pong gives each warpgroup a whole tile, so
# 64 rows suffice. sm100: UMMA takes 64 or 128 rows from one CTA's tensor memory, 128 or 256
# across a 2SM pair.
_TILE_M = {"cooperative": ("cooperative", (128, 256)), "pingpong": ("pingpong", (64, 128)),
           "1sm": ("1SM MMA", (64, 128)), "2sm": ("2SM MMA", (128, 256))}


def _tile_reason(c: KernelConfig | Sm100Config, schedules: tuple[str, ...]) -> str | None:
    if c.schedule not in schedules:
        return f"schedule {c.schedule!r} not in {schedules}"
    if c.dtype not in DTYPES:
        return f"dtype {c.dtype!r} not in {DTYPES}"
    if c.epilogue not in EPILOGUES:
        return f"epilogue {c.epilogue!r} not in {EPILOGUES}"
    label, tile_ms = _TILE_M[c.schedule]
    if c.tile_m not in tile_ms:
        return f"{label} needs tile M of {tile_ms[0]} or {tile_ms[1]}, got {c.tile_m}"
    # wgmma's N extent is a multiple of 8 up to 256, UMMA's of 16; the TMA epilogue tiles N by
    # 16. On sm100, N <= 256 fp32 columns is at most half of tensor memory's 512, so the
    # accumulator is always double-buffered (the epilogue drains one tile while the MMA fills the
    # next).
    if not 16 <= c.tile_n <= 256 or c.tile_n % 16:
        return f"tile N must be a multiple of 16 in [16, 256], got {c.tile_n}"
    # One K block must be a whole number of 128-byte swizzle atoms (64 bf16) or a 64-byte one.
    if c.tile_k * _DTYPE_BYTES[c.dtype] not in (64, 128, 256):
        return f"tile K of {c.tile_k} {c.dtype} is not 64, 128 or 256 bytes"
    return None


def _cluster_reason(c: KernelConfig | Sm100Config, cta_m: int) -> str | None:
    for side, v in (("cluster M", c.cluster_m), ("cluster N", c.cluster_n)):
        if v not in (1, 2, 4, 8):
            return f"{side} must be 1, 2, 4 or 8, got {v}"
    if c.cluster_m * c.cluster_n > _MAX_CLUSTER:
        return f"cluster size {c.cluster_m * c.cluster_n} exceeds the portable {_MAX_CLUSTER}"
    # TMA multicast splits each CTA's A tile (``cta_m`` rows) among the cluster's N-side CTAs and
    # the B tile among its M-side CTAs; each slice must stay a whole number of 8-row core
    # matrices.
    if (cta_m // c.cluster_n) % 8 or cta_m % c.cluster_n:
        return f"tile M {c.tile_m} does not split into {c.cluster_n} multicast slices of 8k rows"
    if (c.tile_n // c.cluster_m) % 8 or c.tile_n % c.cluster_m:
        return f"tile N {c.tile_n} does not split into {c.cluster_m} multicast slices of 8k rows"
    return None


def _cutlass3_reason(c: KernelConfig | Sm100Config, schedules: tuple[str, ...], cta_m: int,
                     stage_bytes: int, kernel_smem: int, smem_per_block: int) -> str | None:
    """The CUTLASS 3.x checks sm90 and sm100 share: tile, cluster, and at least two mainloop
    stages of ``stage_bytes`` per CTA beside the epilogue and ``kernel_smem`` in shared memory."""
    reason = _tile_reason(c, schedules) or _cluster_reason(c, cta_m)
    if reason:
        return reason
    need = _MIN_STAGES * stage_bytes + _EPILOGUE_SMEM + kernel_smem
    if need > smem_per_block:
        return (f"{_MIN_STAGES} stages of {stage_bytes} B per CTA plus the epilogue need {need} B "
                f"of shared memory, over {smem_per_block} B")
    return None


def _problem_reason(c: KernelConfig | Sm80Config | Sm100Config,
                    problem: LatentMoEProblem) -> str | None:
    per = ALIGN_BYTES // _DTYPE_BYTES[c.dtype]
    dims = {"expert width (latent or hidden)": problem.expert_width,
            "intermediate_size": problem.intermediate_size, "hidden_size": problem.hidden_size}
    for what, v in dims.items():
        if v % per:
            return f"{what}={v} is not a multiple of {per} elements ({ALIGN_BYTES}-byte TMA rows)"
    want = {"bfloat16": "bf16", "float16": "fp16"}.get(problem.dtype)
    if want != c.dtype:
        return f"config dtype {c.dtype} does not match problem dtype {problem.dtype}"
    return None


def invalid_reason(config: KernelConfig | Sm80Config | Sm100Config | RoutingConfig,
                   problem: LatentMoEProblem | None = None) -> str | None:
    """Why ``config`` cannot run (on ``problem`` if given), or None if it is valid.

    The one validity predicate: tile/schedule/cluster legality, the shared-memory budget of the
    architecture for at least two pipeline stages, and the problem's 16-byte alignment.
    """
    try:
        arch = get_arch(config.arch)
    except ValueError as e:
        return str(e)
    if isinstance(config, RoutingConfig):
        if config.dtype not in DTYPES:
            return f"dtype {config.dtype!r} not in {DTYPES}"
        return None if problem is None else _routing_reason(problem)
    if isinstance(config, Sm80Config):
        reason = _sm80_reason(config, arch.smem_per_block)
        return reason or (None if problem is None else _problem_reason(config, problem))
    if isinstance(config, Sm100Config):
        reason = _sm100_reason(config, arch.smem_per_block)
        return reason or (None if problem is None else _problem_reason(config, problem))
    if config.arch != "sm90":
        other = "Sm100Config" if config.arch == "sm100" else "Sm80Config"
        return f"KernelConfig is the sm90 config; use {other} for {config.arch}"
    if config.schedule == GEMV:
        reason = _gemv_reason(config)
    else:
        stage = (config.tile_m + config.tile_n) * config.tile_k * _DTYPE_BYTES[config.dtype]
        reason = _cutlass3_reason(config, SCHEDULES, config.tile_m, stage, 0, arch.smem_per_block)
    return reason or (None if problem is None else _problem_reason(config, problem))


# gemv work items: 4 warps of 2, 4 or 8 weight rows; A rows per pass live in registers.
_GEMV_TILE_M = (8, 16, 32)
_GEMV_TILE_N = (1, 2, 4, 8)
_GEMV_TILE_K = 256


def _gemv_reason(c: KernelConfig) -> str | None:
    if c.dtype not in DTYPES:
        return f"dtype {c.dtype!r} not in {DTYPES}"
    if c.epilogue not in EPILOGUES:
        return f"epilogue {c.epilogue!r} not in {EPILOGUES}"
    if not c.swap_ab:
        return "gemv streams the weights on the M side: it needs swap_ab=True"
    if (c.cluster_m, c.cluster_n) != (1, 1):
        return f"gemv runs without clusters, got {c.cluster_m}x{c.cluster_n}"
    if c.tile_m not in _GEMV_TILE_M:
        return f"gemv takes tile M (weight rows per item) in {_GEMV_TILE_M}, got {c.tile_m}"
    if c.tile_n not in _GEMV_TILE_N:
        return f"gemv takes tile N (rows of A per pass) in {_GEMV_TILE_N}, got {c.tile_n}"
    if c.tile_k != _GEMV_TILE_K:
        return f"gemv's tile K is {_GEMV_TILE_K} (a warp of 16-byte loads), got {c.tile_k}"
    return None


def multicast_variant(config: object) -> KernelConfig | None:
    """The cluster-of-two variant of a wide sm90 tile that fetches its token tile once for
    both CTAs (TMA multicast), or None.

    In a grouped MoE GEMM an expert's rows of tokens are read again for every weight tile of
    that expert; two CTAs with the same token tile and neighbouring weight tiles can share
    one fetch: cluster N = 2 without swap-AB (tokens on M), cluster M = 2 with it (tokens on
    N). Only c1x1 tensor-core tiles of the prefill kind have one: at least 128 weight rows
    per tile and, after a swap-AB, at least 64 token rows (decode tiles hold a few tokens,
    where there is little to share).
    """
    if not isinstance(config, KernelConfig) or is_gemv(config):
        return None
    if (config.cluster_m, config.cluster_n) != (1, 1):
        return None
    if config.swap_ab:
        if config.tile_m < 128 or config.tile_n < 64:
            return None
        variant = replace(config, cluster_m=2)
    else:
        if config.tile_n < 128:
            return None
        variant = replace(config, cluster_n=2)
    return variant if invalid_reason(variant) is None else None


def is_gemv(config: object) -> bool:
    """Whether ``config`` is the CUDA-core decode kernel (no tiles to reorder, no tensor cores)."""
    return getattr(config, "schedule", None) == GEMV


# The offsets scan the per-expert counts within one block, and the grouped top-k keeps its
# group scores in shared memory.
MAX_EXPERTS = 4096
MAX_GROUPS = 128


def _routing_reason(problem: LatentMoEProblem) -> str | None:
    if problem.num_experts > MAX_EXPERTS:
        return f"num_experts={problem.num_experts} exceeds {MAX_EXPERTS}"
    if problem.n_group > MAX_GROUPS:
        return f"n_group={problem.n_group} exceeds {MAX_GROUPS}"
    if problem.expert_width % 8:
        return f"expert width {problem.expert_width} is not a multiple of 8"
    return None


def config_from_dict(d: dict) -> KernelConfig | Sm80Config | Sm100Config:
    """The config a ``to_dict()`` came from, its class picked by the "arch" field (a table or
    a trial stores configs of any architecture this way).

    Requirements
    ------------
    ``d`` holds the fields of one config class (``TypeError`` otherwise).
    """
    if not isinstance(d, dict):
        raise TypeError(f"a config is a dict of its fields, got {type(d).__name__}")
    arch = d.get("arch", "sm90")
    cls = Sm100Config if arch == "sm100" else Sm80Config if arch in SM80_ARCHS else KernelConfig
    return cls.from_dict(d)


def valid(config: KernelConfig | Sm80Config | Sm100Config | RoutingConfig,
          problem: LatentMoEProblem | None = None) -> bool:
    """True when :func:`invalid_reason` finds nothing."""
    return invalid_reason(config, problem) is None


_AXES = {
    "tile_m": (64, 128, 256),
    "tile_n": (16, 32, 64, 128, 192, 256),
    "tile_k": (64, 128),
    "cluster": ((1, 1), (2, 1), (1, 2)),
    "schedule": SCHEDULES,
    "swap_ab": (False, True),
}


_SM80_AXES = {
    "tb": ((64, 64), (64, 128), (128, 64), (128, 128), (128, 256), (256, 128)),
    "tb_k": (32, 64),
    "warp": ((32, 32), (32, 64), (64, 32), (64, 64)),
    "stages": (3, 4, 5),
}


# Clusters (M, N): 2SM MMA needs an even cluster M, 1SM takes any of them.
_SM100_AXES = {
    "tile_m": (64, 128, 256),
    "tile_n": (16, 32, 64, 128, 192, 256),
    "tile_k": (64, 128),
    "cluster": ((1, 1), (2, 1), (1, 2), (2, 2), (4, 1)),
    "schedule": SM100_SCHEDULES,
    "swap_ab": (False, True),
}


def search_space(arch: str = "sm90", problem: LatentMoEProblem | None = None,
                 dtype: str = "bf16") -> list[KernelConfig] | list[Sm80Config] | list[Sm100Config]:
    """Every valid config of ``arch`` (for ``problem`` if given), in a stable order."""
    get_arch(arch)
    out = []
    if arch in SM80_ARCHS:
        for (bm, bn), bk, (wm, wn), st in itertools.product(*_SM80_AXES.values()):
            c = Sm80Config(bm, bn, bk, wm, wn, st, "identity", dtype, arch)
            if valid(c, problem):
                out.append(c)
        return out
    cls, axes = (Sm100Config, _SM100_AXES) if arch == "sm100" else (KernelConfig, _AXES)
    for tm, tn, tk, (cm, cn), sched, swap in itertools.product(*axes.values()):
        c = cls(tm, tn, tk, cm, cn, sched, swap, "identity", dtype, arch)
        if valid(c, problem):
            out.append(c)
    if arch == "sm90":
        out += [c for c in gemv_configs(dtype) if valid(c, problem)]
    return out


# The decode kernels the tuner tries beside the tensor-core tiles: 8 or 16 weight rows per item,
# one row of A per pass (a token per expert) or four (a few tokens through a dense projection).
_GEMV_POINTS = ((8, 1), (16, 1), (8, 4), (16, 4))


def gemv_configs(dtype: str = "bf16") -> list[KernelConfig]:
    """The sm90 search space's "gemv" configs (see :class:`KernelConfig`)."""
    return [KernelConfig(tm, tn, _GEMV_TILE_K, 1, 1, GEMV, True, "identity", dtype, "sm90")
            for tm, tn in _GEMV_POINTS]


def default_configs(arch: str = "sm90", dtype: str = "bf16"
                    ) -> list[KernelConfig] | list[Sm80Config] | list[Sm100Config]:
    """A small always-valid subset: prefill (large tiles), mid, and decode kernels."""
    get_arch(arch)
    if arch in SM80_ARCHS:
        # Ada's 99 KB of shared memory per block bounds the larger tiles to three stages.
        return [Sm80Config(64, 64, 32, 32, 32, 3, "identity", dtype, arch),
                Sm80Config(128, 128, 32, 64, 64, 3, "identity", dtype, arch),
                Sm80Config(128, 256, 32, 64, 64, 3, "identity", dtype, arch)]
    if arch == "sm100":
        # 2SM pairs for prefill (each CTA keeps a 128-row tile, B is fetched once per pair),
        # a 1SM tile, and 1SM swap-AB for decode, where UMMA takes N down to 16.
        return [Sm100Config(256, 256, 64, 2, 1, "2sm", False, "identity", dtype, arch),
                Sm100Config(256, 128, 64, 2, 1, "2sm", False, "identity", dtype, arch),
                Sm100Config(128, 128, 64, 1, 1, "1sm", False, "identity", dtype, arch),
                Sm100Config(128, 32, 128, 1, 1, "1sm", True, "identity", dtype, arch)]
    return [
        KernelConfig(128, 256, 64, 1, 1, "cooperative", False, "identity", dtype, arch),
        KernelConfig(128, 128, 64, 2, 1, "cooperative", False, "identity", dtype, arch),
        KernelConfig(64, 128, 64, 1, 1, "pingpong", False, "identity", dtype, arch),
        KernelConfig(128, 32, 128, 1, 1, "pingpong", True, "identity", dtype, arch),
    ]


def space_hash(configs: list[KernelConfig] | list[Sm80Config] | list[Sm100Config]) -> str:
    """Short hash of a search space; part of the tuning key."""
    blob = json.dumps([c.to_dict() for c in configs], sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]
