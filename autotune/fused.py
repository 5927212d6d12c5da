"""The CUTLASS forward of the latent MoE layer, with the latent projections fused in.

Built for sm90 and checked there against the oracle; the same pipeline runs the sm80/sm89 and
sm100 kernels (the GEMMs share one C ABI). :data:`VERIFIED_ARCHS` keeps the sm100 ones out of
``backend="auto"`` until they have been checked on such a GPU.

Pipeline (one stream, no host synchronisation, CUDA-graph capturable):

1. router + ``fc1_latent_proj``: ONE GEMM over x against ``[W_fc1; W_gate_hi; W_gate_lo]``
   with an fp32 epilogue. The fp32 gate weight is split into bf16 high and low parts, both run on
   the tensor cores with fp32 accumulation, and the routing kernel sums them: logits within about
   2^-16 of the fp32 router at tensor-core speed, sharing x's reads with fc1.
2. routing kernel: scores, grouped top-k (a bisection on the order-preserving keys of the
   scores), weights, per-expert counts and ranks.
3. offsets: prefix sums, compacted per-group shapes and pointer arrays of both grouped GEMMs
   (active experts first).
4. gather: each (token, j) pair's row of fc1's output, converted to bf16, at its sorted place.
   Steps 3 and 4 are one kernel (every block scans the counts itself); up to 16 tokens steps
   2-4 are one single-block kernel (decode: their launches, not their work, were most of the
   routing time; at one token it loads the token's row before the top-k, not after).
5. grouped GEMM 1 with relu2 in its epilogue (SwiGLU: plain GEMM, then a SwiGLU kernel).
6. grouped GEMM 2.
7. combine: routing-weighted sum over the top-k in fp32, fixed order (deterministic).
8. ``fc2_latent_proj`` as one GEMM. Where fc2 runs the gemv (decode), steps 7 and 8 are one
   launch: each CTA sums the combine into shared memory while its first fc2 weights stream in.

On sm90 and newer the routing and gemv kernels (all but the register-fed gemv schedule) launch
early (programmatic dependent launch, ``templates/pdl.cuh``): a kernel's CTAs start while the one
ahead of it ends and wait on the device for its results, and the combine launch streams its fc2
weights before that wait. The routing's first kernel starts early only behind a gemv fc1:
behind a CUTLASS one, which never signals the kernel after it, that launch measured slower (the
combine kernels behind a CUTLASS down GEMM measured faster early and stay so). Stream order and
graph capture are unchanged for the caller.
"""

from __future__ import annotations

import functools
from collections import OrderedDict
from dataclasses import replace

import torch

from .arch import ARCHS, arch_of_capability
from .cache import tuned_table
from .problem import LatentMoEProblem
from .runtime import GroupedGemm, Routing, load, load_routing
from .space import SM80_ARCHS, RoutingConfig, TileOrder, invalid_reason, is_gemv
from .workload import Plan, default_plan

_DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16"}
# Whose kernels have run the fused forward against the oracle: backend="auto" picks the CUTLASS
# path only there (backend="cutlass" runs it everywhere). sm90 on an H200; sm80 and sm89 on an
# H200 too, through the PTX their libraries embed (the driver JIT-compiles the same PTX that
# ptxas turns into A100/L40S code). sm100 has only been compiled.
VERIFIED_ARCHS = ("sm90", "sm80", "sm89")


def tuned_plan(problem: LatentMoEProblem, tokens: int, arch: str = "sm90") -> Plan:
    """The configs and tile orders for ``tokens`` on ``arch``: the tuned table's winners where
    one applies (looked up once per process), the default tiers elsewhere (one warning names the
    tune command)."""
    return tuned_table(problem, arch).plan_for(tokens)


def _torch_dtype(name: str) -> torch.dtype:
    return {"bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def device_arch_of(device: torch.device) -> str | None:
    """The kernel architecture of a CUDA ``device`` (None when no kernels are built for it)."""
    return arch_of_capability(torch.cuda.get_device_capability(device))


@functools.lru_cache(maxsize=256)
def unsupported_reason(problem: LatentMoEProblem, device: torch.device,
                       arch: str | None = None) -> str | None:
    """Why the fused path cannot run ``problem`` on ``device`` with ``arch``'s kernels (default:
    the device's own architecture), or None (memoised: it is asked on every call).

    sm80/sm89 kernels also run on newer GPUs (their libraries embed PTX); the others only on
    their own architecture."""
    if device.type != "cuda":
        return f"tensors are on {device}, the CUTLASS backend needs a CUDA device"
    cap = torch.cuda.get_device_capability(device)
    found = arch_of_capability(cap)
    arch = arch or found
    if arch not in ARCHS:
        return (f"the CUTLASS backend has no kernels for {device} (sm{cap[0]}{cap[1]}); it has "
                f"{', '.join(ARCHS)}")
    if arch != found and not (arch in SM80_ARCHS and tuple(cap) >= ARCHS[arch].capability):
        return f"{arch} kernels do not run on {device} (sm{cap[0]}{cap[1]})"
    if problem.dtype not in ("bfloat16", "float16"):
        return f"dtype {problem.dtype} has no kernels (bfloat16 and float16 do)"
    routing = RoutingConfig(_DTYPE_NAMES[_torch_dtype(problem.dtype)], arch)
    for config in [*default_plan(problem, 1, arch).configs(), routing]:
        reason = invalid_reason(config, problem)
        if reason:
            return reason
    return None


@functools.lru_cache(maxsize=64)
def unverified_reason(device: torch.device) -> str | None:
    """Why ``backend="auto"`` keeps the CUTLASS path off ``device`` although it may run there
    (its architecture's forward not yet checked on such a GPU), or None."""
    if device.type != "cuda":
        return None
    arch = device_arch_of(device)
    if arch is None or arch in VERIFIED_ARCHS:
        return None
    return (f"the CUTLASS forward with {arch} kernels has not been checked against the oracle "
            f"on an {arch} GPU yet; backend='cutlass' runs it")


class FusedLatentMoE:
    """Prepared weights and loaded kernels of one layer on one device.

    Parameters
    ----------
    problem : LatentMoEProblem
    gate_weight : Tensor [E, hidden], fp32 or the layer dtype
    e_score_correction_bias : Tensor [E] or None
    fc1 : Tensor [latent, hidden] or None (then the experts read x, or the ``xe`` given to call)
    up_proj, down_proj : Tensors [E, I or 2I, width], [E, width, I]
    fc2 : Tensor [hidden, latent] or None
    unfused : set of {"router_fc1", "relu2", "combine_fc2"}
        Fusions to undo, for before/after measurements only: "router_fc1" runs fc1 as its own
        GEMM (bf16 out) beside a router-only GEMM; "relu2" runs grouped GEMM 1 with a plain
        epilogue and the activation as separate torch ops; "combine_fc2" runs the combine
        kernel and then fc2 where they would be one launch.
    arch : str, optional
        Whose kernels run (default: the device's architecture); "sm80" on an sm90 GPU runs the
        CUTLASS 2.x kernels through their PTX, as an A100 would.

    Requirements
    ------------
    :func:`unsupported_reason` is None for ``problem``, the weights' device and ``arch``; the
    weights are contiguous and of ``problem.dtype`` (the gate may be fp32). Kernels compile into
    the cache on first use of a token range, so warm each range up before capturing a graph.
    """

    def __init__(self, problem, gate_weight, e_score_correction_bias, fc1, up_proj, down_proj,
                 fc2, unfused=frozenset(), arch: str | None = None):
        self.unfused = frozenset(unfused)
        if not self.unfused <= {"router_fc1", "relu2", "combine_fc2"}:
            raise ValueError("unfused: expected a subset of router_fc1, relu2, combine_fc2; got "
                             f"{unfused}")
        self.problem = problem
        self.dtype = up_proj.dtype
        self.device = up_proj.device
        self.arch = arch or device_arch_of(self.device)
        gate = gate_weight.float()
        hi = gate.to(self.dtype)
        lo = (gate - hi.float()).to(self.dtype)
        self.has_lo = bool(lo.abs().amax().item() > 0)  # once, at preparation time
        self.w_fc1 = None
        if fc1 is not None and "router_fc1" in self.unfused:
            self.w_fc1, fc1 = fc1.to(self.dtype).contiguous(), None
        parts = ([] if fc1 is None else [fc1.to(self.dtype)]) + [hi] + ([lo] if self.has_lo
                                                                      else [])
        w_cat = torch.cat(parts)
        # Pad to 8 rows: the fp32 output rows stay 16-byte aligned for TMA and the gather's
        # vector loads whatever the expert count.
        pad = -w_cat.shape[0] % 8
        self.w_cat = torch.cat([w_cat, w_cat.new_zeros(pad, w_cat.shape[1])]).contiguous()
        self.fc1_rows = 0 if fc1 is None else fc1.shape[0]
        self.bias = (None if e_score_correction_bias is None
                     else e_score_correction_bias.float().contiguous())
        self.up = up_proj.contiguous()
        self.down = down_proj.contiguous()
        self.fc2 = None if fc2 is None else fc2.to(self.dtype).contiguous()
        self.routing: Routing = load_routing(RoutingConfig(_DTYPE_NAMES[self.dtype], self.arch))
        self._plans: dict[int, tuple[tuple[GroupedGemm, ...], tuple[TileOrder, ...], bool]] = {}

    def kernels(self, tokens: int) -> tuple[tuple[GroupedGemm, ...], tuple[TileOrder, ...],
                                            bool]:
        """Loaded kernels for ``tokens``, their tile orders (both in :meth:`Plan.configs`
        order) and whether fc2 runs the combine launch (resolved once per token count, never
        per call)."""
        if tokens not in self._plans:
            self.use_plan(tokens, tuned_plan(self.problem, tokens, self.arch))
        return self._plans[tokens]

    def use_plan(self, tokens: int, plan: Plan) -> None:
        """Run ``plan`` (its kernels loaded now) at ``tokens`` tokens from now on, in place of
        the tuned table's: how the tuner times one plan against another in the whole layer."""
        if "relu2" in self.unfused:
            plan = replace(plan, up=plan.up.with_epilogue("identity"))
        kernels = tuple(load(c) for c in plan.configs())
        p = self.problem
        combine = (self.fc2 is not None and "combine_fc2" not in self.unfused
                   and kernels[3].combines(tokens, p.expert_width, p.top_k))
        self._plans[tokens] = kernels, plan.orders, combine

    def __call__(self, x: torch.Tensor, xe: torch.Tensor | None = None,
                 topk_ids_hook=None) -> torch.Tensor:
        """The layer on x [T, hidden]; ``xe`` [T, width] is the experts' input when fc1 is not
        fused (a callable projection applied by the caller). Returns [T, hidden or width].

        Runs on the weights' device whichever device is current (the libraries launch on the
        current device's context); ``x`` must be there too (``ValueError`` otherwise)."""
        if x.device != self.device:
            raise ValueError(f"x is on {x.device} but the layer's weights are on {self.device}; "
                             f"move x to {self.device}")
        with torch.cuda.device(self.device):
            return self._forward(x, xe, topk_ids_hook)

    def _forward(self, x: torch.Tensor, xe: torch.Tensor | None, topk_ids_hook) -> torch.Tensor:
        p = self.problem
        t, k, e = x.shape[0], p.top_k, p.num_experts
        width, inter, up_rows = p.expert_width, p.intermediate_size, p.up_rows
        if t == 0:
            return x.new_empty(0, p.hidden_size if self.fc2 is not None else width)
        (router, up, down, fc2), (o_router, o_up, o_down, o_fc2), combine = self.kernels(t)

        def new(*shape, dtype=self.dtype):
            # Sizes depend on T only, never on the routing: the caching allocator serves them
            # inside graph capture too.
            return torch.empty(shape, dtype=dtype, device=x.device)

        if self.w_fc1 is not None:  # unfused measurement variant
            xe = fc2.dense(x, self.w_fc1, new(t, width))
        cat = new(t, self.w_cat.shape[0], dtype=torch.float32)
        router.dense(x, self.w_cat, cat, o_router)
        ids, weights = new(t, k, dtype=torch.int32), new(t, k, dtype=torch.float32)
        counts, slot = new(e, dtype=torch.int32), new(t, k, dtype=torch.int32)
        hi_col = self.fc1_rows
        lo_col = hi_col + e if self.has_lo else -1
        rows = t * k
        a1, h1 = new(rows, width), new(rows, up_rows)
        h2 = h1 if p.activation == "relu2" else new(rows, inter)
        y2 = new(rows, width)
        start = new(e, dtype=torch.int32)
        mnk1, mnk2 = new(e, 3, dtype=torch.int32), new(e, 3, dtype=torch.int32)
        ptrs1, ptrs2 = new(3, e, dtype=torch.int64), new(3, e, dtype=torch.int64)
        row_of = new(rows, dtype=torch.int32)
        # The experts' input: fc1's fp32 columns of the router GEMM, else x or the caller's.
        src, src_f32 = (cat, 1) if self.fc1_rows else (x if xe is None else xe.contiguous(), 0)
        # The routing starts early only behind a gemv router GEMM (measured: module docstring).
        early = int(is_gemv(router.config))
        self.routing("route_gather", cat, cat.shape[1], hi_col, lo_col, self.bias, t, e, k,
                     p.n_group, p.topk_group, int(p.scoring == "softmax"),
                     int(p.norm_topk_prob), float(p.routed_scaling_factor), ids, weights, counts,
                     slot, start, mnk1, ptrs1, mnk2, ptrs2, a1, self.up, h1, h2, self.down, y2,
                     width, up_rows, inter, src, src.shape[1], src_f32, row_of, early)
        if topk_ids_hook is not None:
            topk_ids_hook(ids.long())
        up.run(mnk1, ptrs1[0], ptrs1[1], ptrs1[2], o_up)
        if "relu2" in self.unfused and p.activation == "relu2":
            h1.relu_().square_()
        if p.activation == "swiglu":
            self.routing("swiglu", h1, h2, rows, inter)
        down.run(mnk2, ptrs2[0], ptrs2[1], ptrs2[2], o_down)
        if combine:
            return fc2.combine_dense(y2, weights, row_of, self.fc2, new(t, self.fc2.shape[0]))
        y_lat = new(t, width)
        self.routing("combine", y2, weights, row_of, t, k, width, y_lat)
        if self.fc2 is None:
            return y_lat
        out = new(t, self.fc2.shape[0])
        return fc2.dense(y_lat, self.fc2, out, o_fc2)


_PREPARED: OrderedDict[tuple, FusedLatentMoE] = OrderedDict()
_MAX_PREPARED = 16


def _tensor_key(t) -> tuple | None:
    # Storage, version counter and layout: an in-place update (load_state_dict, an optimiser
    # step) bumps _version, so the prepared copy is rebuilt rather than silently stale.
    if not isinstance(t, torch.Tensor):
        return None
    return (t.data_ptr(), t._version, tuple(t.shape), t.dtype, t.device)


def problem_of(x, gate_weight, up_proj, down_proj, *, top_k, activation, scoring, n_group,
               topk_group, norm_topk_prob, routed_scaling_factor, projected: bool):
    """The :class:`LatentMoEProblem` of a call's tensors (``projected``: any projection)."""
    return LatentMoEProblem(
        hidden_size=x.shape[-1], latent_size=up_proj.shape[-1] if projected else None,
        intermediate_size=down_proj.shape[-1], num_experts=gate_weight.shape[0], top_k=top_k,
        activation=activation, scoring=scoring, n_group=n_group, topk_group=topk_group,
        norm_topk_prob=norm_topk_prob, routed_scaling_factor=float(routed_scaling_factor),
        dtype={torch.bfloat16: "bfloat16", torch.float16: "float16"}.get(x.dtype, "float32"))


def cutlass_forward(x, gate_weight, e_score_correction_bias, up_proj, down_proj, *, top_k,
                    activation="relu2", scoring="sigmoid", n_group=1, topk_group=1,
                    norm_topk_prob=True, routed_scaling_factor=1.0, fc1_latent_proj=None,
                    fc2_latent_proj=None, topk_ids_hook=None):
    """The layer on the fused CUTLASS path (the device's own kernels); same signature and
    result as the oracle.

    ``fc1_latent_proj`` may be a weight (fused with the router) or a callable whose output the
    experts read; ``fc2_latent_proj`` a weight or None. Weights are prepared once per storage and
    version (the first call per weight set reads one scalar back to the host, so warm up before
    capturing a CUDA graph); later calls never synchronise.

    Requirements
    ------------
    :func:`unsupported_reason` is None for the call's problem and device (``RuntimeError``
    with the reason otherwise).
    """
    fc1_callable = fc1_latent_proj is not None and not isinstance(fc1_latent_proj, torch.Tensor)
    fc2_callable = fc2_latent_proj is not None and not isinstance(fc2_latent_proj, torch.Tensor)
    problem = problem_of(x, gate_weight, up_proj, down_proj, top_k=top_k, activation=activation,
                         scoring=scoring, n_group=n_group, topk_group=topk_group,
                         norm_topk_prob=norm_topk_prob,
                         routed_scaling_factor=routed_scaling_factor,
                         projected=fc1_latent_proj is not None or fc2_latent_proj is not None)
    reason = unsupported_reason(problem, x.device)
    if reason:
        raise RuntimeError(f"backend='cutlass' cannot run this call: {reason}")
    fc1 = None if fc1_callable else fc1_latent_proj
    fc2 = None if fc2_callable else fc2_latent_proj
    weights = (gate_weight, e_score_correction_bias, fc1, up_proj, down_proj, fc2)
    key = (problem, *(_tensor_key(t) for t in weights))
    layer = _PREPARED.get(key)
    if layer is None:
        layer = FusedLatentMoE(problem, *weights)
        _PREPARED[key] = layer
        while len(_PREPARED) > _MAX_PREPARED:
            _PREPARED.popitem(last=False)
    _PREPARED.move_to_end(key)
    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    xe = fc1_latent_proj(x2).to(x.dtype) if fc1_callable else None
    out = layer(x2, xe=xe, topk_ids_hook=topk_ids_hook)
    if fc2_callable:
        out = fc2_latent_proj(out).to(x.dtype)
    return out.reshape(*x.shape[:-1], out.shape[-1])
