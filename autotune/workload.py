"""The GEMM stages of the latent MoE pipeline, their shapes, token buckets and test inputs.

A tuning run times one *stage* (one GEMM of the forward) at one *token bucket* (tokens per call).
This module says what each stage computes for a :class:`~autotune.problem.LatentMoEProblem` and
``T`` tokens, which config runs it when nothing is tuned, how a router spreads the ``T * top_k``
rows over the experts, and makes the bf16/fp16 inputs plus the fp32 reference output that gate a
kernel before it is timed.

Stages, in pipeline order (see :mod:`autotune.fused`):

``fc1``
    router + ``fc1_latent_proj``: ONE dense GEMM over x, M = T, K = hidden, N = latent + 2E
    rounded up to 8 (the fp32 gate weight rides along as bf16 high and low parts), fp32
    epilogue. Only for problems with a latent width.
``up``
    grouped GEMM 1: per expert M_e rows, N = ``problem.up_rows``, K = ``problem.expert_width``,
    relu2 in the epilogue for relu2 experts.
``down``
    grouped GEMM 2: N = ``problem.expert_width``, K = ``problem.intermediate_size``.
``fc2``
    ``fc2_latent_proj``: dense, M = T, N = hidden, K = latent. Only with a latent width.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch

from .problem import LatentMoEProblem
from .space import DEFAULT_ORDER, SM80_ARCHS, KernelConfig, Sm80Config, Sm100Config, TileOrder

STAGES = ("fc1", "up", "down", "fc2")
GROUPED_STAGES = ("up", "down")
ROUTINGS = ("uniform", "skewed")
# The router GEMM carries the fp32 gate weight as two bf16 parts (high and low), each E rows,
# appended to fc1's rows (see autotune.fused): its N is latent + 2E.
ROUTER_ROWS_PER_EXPERT = 2
# Zipf exponent of the "skewed" routing: expert popularity ~ 1 / rank^s. s = 1 gives the
# hot-expert imbalance reported for trained MoE routers without load balancing at inference.
ZIPF_EXPONENT = 1.0
MAX_BUCKET = 16384
_CONFIG_DTYPE = {"bfloat16": "bf16", "float16": "fp16"}
_TORCH_DTYPE = {"bfloat16": torch.bfloat16, "float16": torch.float16}


def token_buckets(max_tokens: int = MAX_BUCKET) -> tuple[int, ...]:
    """Powers of two and their midpoints from 1 up to ``max_tokens``: 1, 2, 3, 4, 6, 8, 12, ...

    Requirements
    ------------
    ``max_tokens`` is a positive int.
    """
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise ValueError(f"max_tokens must be a positive int, got {max_tokens!r}")
    out = set()
    p = 1
    while p <= max_tokens:
        out.add(p)
        if p >= 2 and p + p // 2 <= max_tokens:
            out.add(p + p // 2)
        p *= 2
    return tuple(sorted(out))


def parse_tokens(text: str | Sequence[int] | None) -> tuple[int, ...]:
    """Token buckets from ``--tokens`` ("1,8,64" or a sequence); None or "all" gives the default.

    Requirements
    ------------
    Every entry is a positive int; duplicates are dropped and the result is sorted. Anything
    else raises ``ValueError`` naming ``--tokens``.
    """
    if text is None or (isinstance(text, str) and text.strip().lower() in ("", "all")):
        return token_buckets()
    parts = text.split(",") if isinstance(text, str) else list(text)
    values = []
    for part in parts:
        try:
            value = int(str(part).strip())
        except ValueError:
            raise ValueError(f"--tokens: {part!r} is not an int (expected e.g. 1,8,64)") from None
        if value < 1:
            raise ValueError(f"--tokens: token counts must be >= 1, got {value}")
        values.append(value)
    if not values:
        raise ValueError("--tokens: no token count given")
    return tuple(sorted(set(values)))


def bucket_for(tokens: int, buckets: Sequence[int]) -> int:
    """The smallest bucket >= ``tokens``, clamped to the largest bucket.

    Requirements
    ------------
    ``tokens`` is an int >= 0; ``buckets`` is a non-empty sorted sequence of positive ints.
    """
    if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 0:
        raise ValueError(f"tokens must be an int >= 0, got {tokens!r}")
    if not buckets:
        raise ValueError("buckets must not be empty")
    i = bisect.bisect_left(buckets, tokens)
    return buckets[min(i, len(buckets) - 1)]


def stages_of(problem: LatentMoEProblem) -> tuple[str, ...]:
    """The GEMM stages the pipeline runs for ``problem`` (fc1/fc2 only with a latent width).

    Requirements
    ------------
    ``problem`` is a :class:`~autotune.problem.LatentMoEProblem`.
    """
    if problem.latent_size is None:
        return GROUPED_STAGES
    return STAGES


def check_stage(problem: LatentMoEProblem, stage: str) -> None:
    """Raise ``ValueError`` unless ``stage`` is one the pipeline runs for ``problem``."""
    if stage not in stages_of(problem):
        raise ValueError(f"stage {stage!r} is not a stage of this problem; expected one of "
                         f"{', '.join(stages_of(problem))}")


@dataclass(frozen=True)
class StageShape:
    """The GEMM one stage runs: ``D = epilogue(A @ B^T)`` per group.

    ``grouped`` stages have ``groups`` experts and ``tokens * top_k`` rows in all; dense stages
    have one group of ``tokens`` rows. ``n`` and ``k`` are the same for every group.
    """

    stage: str
    grouped: bool
    groups: int
    n: int
    k: int
    epilogue: str
    rows_per_token: int

    def rows(self, tokens: int) -> int:
        """Rows of A and D in all for ``tokens`` tokens."""
        return tokens * self.rows_per_token

    def flops(self, tokens: int) -> int:
        return 2 * self.rows(tokens) * self.n * self.k


def stage_epilogue(problem: LatentMoEProblem, stage: str) -> str:
    """The epilogue kind (:data:`autotune.space.EPILOGUES`) the pipeline uses for ``stage``.

    Requirements
    ------------
    ``stage`` is a stage of ``problem`` (else ``ValueError`` naming the stages).
    """
    check_stage(problem, stage)
    if stage == "fc1":
        return "f32"
    if stage == "up" and problem.activation == "relu2":
        return "relu2"
    return "identity"


def stage_shape(problem: LatentMoEProblem, stage: str) -> StageShape:
    """The GEMM of ``stage`` for ``problem``.

    Requirements
    ------------
    ``stage`` is in :func:`stages_of` of ``problem`` (else ``ValueError`` naming the stages).
    """
    epilogue = stage_epilogue(problem, stage)
    p = problem
    if stage == "up":
        return StageShape(stage, True, p.num_experts, p.up_rows, p.expert_width, epilogue,
                          p.top_k)
    if stage == "down":
        return StageShape(stage, True, p.num_experts, p.expert_width, p.intermediate_size,
                          epilogue, p.top_k)
    if stage == "fc1":
        n = p.latent_size + ROUTER_ROWS_PER_EXPERT * p.num_experts
        n += -n % 8  # the pipeline pads the concatenated weight to whole 16-byte rows of D
        return StageShape(stage, False, 1, n, p.hidden_size, epilogue, 1)
    return StageShape(stage, False, 1, p.hidden_size, p.latent_size, epilogue, 1)


def config_dtype(problem: LatentMoEProblem) -> str:
    """The :class:`~autotune.space.KernelConfig` dtype of ``problem`` ("bf16" or "fp16").

    Requirements
    ------------
    ``problem.dtype`` is bfloat16 or float16 (``ValueError`` otherwise: no kernels).
    """
    if problem.dtype not in _CONFIG_DTYPE:
        raise ValueError(f"dtype {problem.dtype} has no kernels; bfloat16 and float16 do")
    return _CONFIG_DTYPE[problem.dtype]


# Default configs per token range until a tuned table applies, from the H200 sweeps logged in
# benchmarks/NOTES.md. While experts see about one token, swap-AB puts the tokens on a 16-wide N
# tile; the dense projections then take 64-row weight tiles so that more SMs stream the weights.
# Up to ~1k tokens swap-AB with a 64-wide N tile; then 128x256 cooperative tiles.
_SMALL, _MID = 16, 1024
_PP, _COOP = "pingpong", "cooperative"


@dataclass(frozen=True)
class Plan:
    """The GEMM configs of one forward: router(+fc1), grouped up, grouped down, fc2, and the
    tile order each one launches with (same order as :meth:`configs`)."""

    router: KernelConfig
    up: KernelConfig
    down: KernelConfig
    fc2: KernelConfig
    orders: tuple[TileOrder, TileOrder, TileOrder, TileOrder] = (DEFAULT_ORDER,) * 4

    def configs(self) -> list[KernelConfig]:
        return [self.router, self.up, self.down, self.fc2]

    def with_stage(self, stage: str, config: KernelConfig, order: TileOrder) -> Plan:
        """This plan with ``stage`` (fc1, up, down or fc2) run by ``config`` at ``order``."""
        orders = list(self.orders)
        orders[PLAN_INDEX[stage]] = order
        return replace(self, orders=tuple(orders), **{PLAN_FIELD[stage]: config})


def default_plan(problem: LatentMoEProblem, tokens: int, arch: str = "sm90") -> Plan:
    """The untuned, always-valid configs of the pipeline for ``tokens`` tokens on ``arch``: the
    sm90 tiers below, or on sm100 and sm80/sm89 their :func:`arch_counterpart`.

    Requirements
    ------------
    ``problem.dtype`` has kernels (bfloat16 or float16; ``ValueError`` otherwise).
    """
    dt = config_dtype(problem)
    if tokens <= _SMALL:
        dense = KernelConfig(64, 16, 128, 1, 1, _PP, True, dtype=dt)
        grouped = KernelConfig(128, 16, 128, 1, 1, _PP, True, dtype=dt)
        router = dense
    elif tokens <= _MID:
        dense = grouped = router = KernelConfig(128, 64, 128, 1, 1, _PP, True, dtype=dt)
    else:
        dense = grouped = KernelConfig(128, 256, 64, 1, 1, _COOP, dtype=dt)
        router = KernelConfig(128, 128, 64, 1, 1, _COOP, dtype=dt)
    up = grouped.with_epilogue("relu2" if problem.activation == "relu2" else "identity")
    plan = Plan(router=router.with_epilogue("f32"), up=up, down=grouped, fc2=dense)
    if arch == "sm90":
        return plan
    return replace(plan, **{f: arch_counterpart(getattr(plan, f), arch)
                            for f in PLAN_FIELD.values()})


def all_default_configs(problem: LatentMoEProblem, arch: str = "sm90"
                        ) -> list[KernelConfig | Sm80Config | Sm100Config]:
    """Every config :func:`default_plan` can pick for ``problem`` on ``arch`` (to build ahead of
    time)."""
    seen: dict[str, KernelConfig | Sm80Config | Sm100Config] = {}
    for tokens in (_SMALL, _MID, _MID + 1):
        for c in default_plan(problem, tokens, arch).configs():
            seen[c.name] = c
    return list(seen.values())


PLAN_FIELD = {"fc1": "router", "up": "up", "down": "down", "fc2": "fc2"}
# Index of each stage's entry in Plan.configs() and Plan.orders.
PLAN_INDEX = {"fc1": 0, "up": 1, "down": 2, "fc2": 3}


def sm100_counterpart(config: KernelConfig) -> Sm100Config:
    """The sm100 kernel that takes the place of an sm90 default ``config`` (same epilogue).

    Ping-pong tiles (one tile per consumer, the decode and swap-AB tiers) become 1SM MMAs of the
    same tile: UMMA takes those M and N extents on one CTA. Cooperative tiles become 2SM MMAs of
    twice the rows over a cluster twice as tall, so each CTA of the pair still computes the sm90
    tile while B is fetched once per pair.
    """
    if config.schedule == "cooperative":
        return Sm100Config(2 * config.tile_m, config.tile_n, config.tile_k, 2 * config.cluster_m,
                           config.cluster_n, "2sm", config.swap_ab, config.epilogue,
                           config.dtype)
    return Sm100Config(config.tile_m, config.tile_n, config.tile_k, config.cluster_m,
                       config.cluster_n, "1sm", config.swap_ab, config.epilogue, config.dtype)


def sm80_counterpart(config: KernelConfig, arch: str = "sm80") -> Sm80Config:
    """The sm80/sm89 kernel that takes the place of an sm90 default ``config`` (same epilogue):
    one of :func:`~autotune.space.default_configs`' three CUTLASS 2.x tiles.

    CUTLASS 2.x has no swap-AB here, so the decode tiers (swap-AB, few rows per expert) take the
    smallest threadblock tile, which wastes the least on mostly empty rows; the prefill tiers
    keep their 128 x N tile with 64 x 64 warp tiles.
    """
    if config.swap_ab:
        tile = (64, 64, 32, 32, 32)
    elif config.tile_n >= 256:
        tile = (128, 256, 32, 64, 64)
    else:
        tile = (128, 128, 32, 64, 64)
    return Sm80Config(*tile, 3, config.epilogue, config.dtype, arch)


def arch_counterpart(config: KernelConfig, arch: str) -> KernelConfig | Sm80Config | Sm100Config:
    """``config`` (an sm90 default) itself on sm90, else its sm100 or sm80/sm89 counterpart."""
    if arch == "sm100":
        return sm100_counterpart(config)
    if arch in SM80_ARCHS:
        return sm80_counterpart(config, arch)
    return config


def default_config(problem: LatentMoEProblem, stage: str, tokens: int,
                   arch: str = "sm90") -> KernelConfig | Sm80Config | Sm100Config:
    """The untuned config of ``stage`` at ``tokens`` tokens: the layer's own default.

    Taken from :func:`default_plan`, so "speedup over the default config" is
    measured against what the layer runs when nothing is tuned (on sm100 and sm80/sm89 the
    counterpart of the sm90 default).

    Requirements
    ------------
    ``stage`` is a stage of ``problem``; ``tokens`` >= 0; ``problem.dtype`` has kernels.
    """
    if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 0:
        raise ValueError(f"tokens must be an int >= 0, got {tokens!r}")
    check_stage(problem, stage)
    config_dtype(problem)
    config = getattr(default_plan(problem, tokens, arch), PLAN_FIELD[stage])
    return config.with_epilogue(stage_epilogue(problem, stage))


def default_tier_configs(problem: LatentMoEProblem, stage: str,
                         arch: str = "sm90") -> list[KernelConfig | Sm80Config | Sm100Config]:
    """Every config :func:`default_config` returns for ``stage`` over the token buckets (to
    build ahead of time)."""
    seen: dict[str, KernelConfig | Sm80Config | Sm100Config] = {}
    for tokens in (*token_buckets(), 1 << 20):
        c = default_config(problem, stage, tokens, arch)
        seen.setdefault(c.name, c)
    return list(seen.values())


def route_sizes(problem: LatentMoEProblem, tokens: int, routing: str = "uniform", *,
                generator: torch.Generator, device: torch.device | str = "cpu") -> torch.Tensor:
    """Rows per expert (int64 [E], summing to ``tokens * top_k``) for one routed batch.

    ``"uniform"`` is the top-k of i.i.d. random scores, what a balanced router gives;
    ``"skewed"`` samples k distinct experts per token from a Zipf-like popularity (Gumbel top-k,
    i.e. sampling without replacement), with the hot experts at random indices.

    Requirements
    ------------
    ``routing`` in :data:`ROUTINGS`; ``tokens`` >= 0; ``generator`` lives on ``device``.
    """
    if routing not in ROUTINGS:
        raise ValueError(f"routing must be one of {', '.join(ROUTINGS)}, got {routing!r}")
    if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 0:
        raise ValueError(f"tokens must be an int >= 0, got {tokens!r}")
    e, k = problem.num_experts, problem.top_k
    if tokens == 0:
        return torch.zeros(e, dtype=torch.int64, device=device)
    u = torch.rand(tokens, e, generator=generator, device=device)
    if routing == "uniform":
        scores = u
    else:
        rank = torch.randperm(e, generator=generator, device=device).to(torch.float32) + 1
        log_p = -ZIPF_EXPONENT * torch.log(rank)
        gumbel = -torch.log(-torch.log(u.clamp(1e-20, 1 - 1e-7)))
        scores = log_p + gumbel
    ids = scores.topk(k, dim=1).indices.flatten()
    return torch.bincount(ids, minlength=e)


@dataclass(frozen=True)
class StageInputs:
    """Inputs of one stage call: A [rows, K], B [G, N, K], offs int32 [G] (cumulative row ends)
    for grouped stages (``offs`` None for dense ones, where B is [N, K])."""

    shape: StageShape
    tokens: int
    a: torch.Tensor
    b: torch.Tensor
    offs: torch.Tensor | None

    @property
    def out_dtype(self) -> torch.dtype:
        return torch.float32 if self.shape.epilogue == "f32" else self.a.dtype

    def empty_out(self, fill: float | None = None) -> torch.Tensor:
        """An output buffer [rows, N], optionally filled (NaN poisons unwritten rows)."""
        out = torch.empty(self.a.shape[0], self.shape.n, dtype=self.out_dtype,
                          device=self.a.device)
        return out if fill is None else out.fill_(fill)


def _nonzero_normal(shape, scale: float, dtype, generator, device) -> torch.Tensor:
    x = torch.randn(shape, generator=generator, device=device) * scale
    # An exact zero operand would hide a kernel that skips or mis-addresses that element.
    x = torch.where(x == 0, torch.full_like(x, scale), x)
    return x.to(dtype)


def make_inputs(problem: LatentMoEProblem, stage: str, tokens: int, *, routing: str = "uniform",
                generator: torch.Generator, device: torch.device | str = "cpu") -> StageInputs:
    """Random inputs of ``stage`` at ``tokens`` tokens, in ``problem.dtype``.

    A is standard normal and B normal scaled by 1/sqrt(K), so outputs are O(1) whatever K is;
    neither holds exact zeros. Grouped stages route the ``tokens * top_k`` rows with
    :func:`route_sizes`.

    Requirements
    ------------
    ``stage`` is a stage of ``problem``; ``problem.dtype`` is bfloat16 or float16; ``tokens``
    >= 1; ``generator`` lives on ``device``.
    """
    shape = stage_shape(problem, stage)
    config_dtype(problem)
    if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1:
        raise ValueError(f"tokens must be an int >= 1, got {tokens!r}")
    dtype = _TORCH_DTYPE[problem.dtype]
    rows = shape.rows(tokens)
    a = _nonzero_normal((rows, shape.k), 1.0, dtype, generator, device)
    scale = 1.0 / math.sqrt(shape.k)
    if not shape.grouped:
        b = _nonzero_normal((shape.n, shape.k), scale, dtype, generator, device)
        return StageInputs(shape, tokens, a, b, None)
    b = _nonzero_normal((shape.groups, shape.n, shape.k), scale, dtype, generator, device)
    sizes = route_sizes(problem, tokens, routing, generator=generator, device=device)
    offs = sizes.cumsum(0).to(torch.int32)
    return StageInputs(shape, tokens, a, b, offs)


@dataclass(frozen=True)
class CombineInputs:
    """fc2's input as the combine launch takes it: the experts' output rows y [T * top_k, K],
    the routing weights [T, top_k] fp32 and each pair's row of y, row_of int32 [T * top_k]."""

    y: torch.Tensor
    weights: torch.Tensor
    row_of: torch.Tensor

    def combined(self) -> torch.Tensor:
        """The fp32 A [T, K] they sum to: ``sum_j weights[t, j] * y[row_of[t * top_k + j]]``."""
        t, k = self.weights.shape
        rows = self.y.float()[self.row_of.long()].view(t, k, -1)
        return (self.weights.unsqueeze(-1) * rows).sum(1)


def make_combine_inputs(problem: LatentMoEProblem, tokens: int, *, generator: torch.Generator,
                        device: torch.device | str = "cpu") -> CombineInputs:
    """Random :class:`CombineInputs` of ``tokens`` tokens for ``problem``'s fc2: y standard
    normal, weights in [0.5, 1.5) / top_k (so A stays O(1)), the pairs' rows a permutation.

    Requirements
    ------------
    As :func:`make_inputs` for the "fc2" stage.
    """
    dtype = _TORCH_DTYPE[problem.dtype]
    pairs = tokens * problem.top_k
    y = _nonzero_normal((pairs, stage_shape(problem, "fc2").k), 1.0, dtype, generator, device)
    weights = (torch.rand((tokens, problem.top_k), generator=generator, device=device) + 0.5)
    row_of = torch.randperm(pairs, generator=generator, device=device).to(torch.int32)
    return CombineInputs(y, weights / problem.top_k, row_of)


def apply_epilogue(acc: torch.Tensor, epilogue: str) -> torch.Tensor:
    """The stage epilogue on an fp32 accumulator (relu2 = relu(x)^2)."""
    if epilogue == "relu2":
        return torch.relu(acc).square()
    return acc


def reference_output(inputs: StageInputs) -> torch.Tensor:
    """The fp32 oracle of one stage call: per-group fp32 matmuls, then the epilogue.

    Returns
    -------
    Tensor [rows, N] float32, on the inputs' device.

    Requirements
    ------------
    ``inputs`` comes from :func:`make_inputs` (or has its shapes); reads the group sizes to the
    host once, so it is not for use inside graph capture.
    """
    a, b = inputs.a.float(), inputs.b.float()
    if inputs.offs is None:
        acc = a @ b.T
    else:
        # One host read of the group sizes: this is the test oracle, not the pipeline.
        sizes = torch.diff(inputs.offs.to(torch.int64), prepend=inputs.offs.new_zeros(1)).tolist()
        parts = [chunk @ b[g].T for g, chunk in enumerate(torch.split(a, sizes))]
        acc = torch.cat(parts) if parts else a.new_empty(0, b.shape[1])
    return apply_epilogue(acc, inputs.shape.epilogue)


def rel_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """``||actual - expected||_F / ||expected||_F`` in float64; inf when ``actual`` holds NaN.

    Requirements
    ------------
    Same shapes (``ValueError`` otherwise); ``expected`` is finite.
    """
    if actual.shape != expected.shape:
        raise ValueError(f"shapes differ: {tuple(actual.shape)} vs {tuple(expected.shape)}")
    # In row chunks: a float64 copy of a prefill-sized output would take tens of GB at once.
    a2d, e2d = actual.reshape(actual.shape[0], -1), expected.reshape(expected.shape[0], -1)
    rows = max(1, (1 << 24) // max(1, a2d.shape[1]))
    num = den = 0.0
    for a, e in zip(a2d.split(rows), e2d.split(rows), strict=True):
        a, e = a.double(), e.double()
        if not bool(torch.isfinite(a).all()):
            return math.inf
        num += float((a - e).square().sum())
        den += float(e.square().sum())
    return math.sqrt(num) if den == 0 else math.sqrt(num / den)
