"""The implementations LatentMoE is measured against, and the roofline floor.

Every peer takes the weights of :class:`autotune.ops.LatentMoE` positionally,
``(x, gate_weight, e_score_correction_bias, fc1_latent_proj, up_proj, down_proj,
fc2_latent_proj)`` (projections as weight tensors, or ``None`` for a plain MoE at hidden width),
the routing choices as keywords, and returns ``out [..., hidden]`` of x's dtype:

- :func:`grouped_mm_pipeline`: what serving engines run today in PyTorch: fp32 router, fc1 as a
  dense GEMM, tokens sorted by expert, two ``torch._grouped_mm`` calls, fp32 scatter-add
  combine, fc2 as a dense GEMM.
- :func:`triton_sorted_moe`: a Triton sorted-token MoE in the manner of vLLM's ``fused_moe``
  (block-padded sorted token ids, one kernel per expert GEMM that gathers its A rows, activation
  fused in the first GEMM's epilogue, routing weight in the second's). Triton is imported only
  when this peer runs.
- :func:`reference_module`: the fp32 oracle of :mod:`autotune.reference`.

All but the oracle keep every decision on the device (no ``.item()``, no data-dependent shapes),
so they capture in a CUDA graph. :func:`roofline_floor_ms` gives the time no implementation can
beat on a device with the given copy bandwidth and bf16 matmul rate.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from .problem import LatentMoEProblem
from .reference import latent_moe_reference, route
from .validate import Sizes, check_latent_moe_args

__all__ = ["grouped_mm_pipeline", "triton_sorted_moe", "reference_module", "roofline_floor_ms",
           "roofline_bytes_flops", "expected_experts_touched", "TritonConfig", "triton_config",
           "module_inputs", "PEERS", "available_peers", "triton_available"]

PeerFn = Callable[..., torch.Tensor]


# ----------------------------------------------------------------------------- shared pieces

def _check(x, gate_weight, bias, fc1, up_proj, down_proj, fc2, routing) -> Sizes:
    for name, proj in (("fc1_latent_proj", fc1), ("fc2_latent_proj", fc2)):
        if proj is not None and not isinstance(proj, torch.Tensor):
            raise TypeError(f"{name}: the peers take a weight tensor or None, got "
                            f"{type(proj).__name__}")
    return check_latent_moe_args(
        x, gate_weight, bias, up_proj, down_proj, top_k=routing["top_k"],
        activation=routing["activation"], scoring=routing["scoring"],
        n_group=routing["n_group"], topk_group=routing["topk_group"], fc1_latent_proj=fc1,
        fc2_latent_proj=fc2)


def _router(x2, gate_weight, bias, routing) -> tuple[torch.Tensor, torch.Tensor]:
    # The oracle's router is already device-only (fp32 GEMM, topk, gather), so every peer pays
    # the same routing cost and picks the same experts as the oracle it is checked against.
    return route(x2, gate_weight, bias, top_k=routing["top_k"], scoring=routing["scoring"],
                 n_group=routing["n_group"], topk_group=routing["topk_group"],
                 norm_topk_prob=routing["norm_topk_prob"],
                 routed_scaling_factor=routing["routed_scaling_factor"])


def _routing(top_k, activation, scoring, n_group, topk_group, norm_topk_prob,
             routed_scaling_factor) -> dict[str, Any]:
    return dict(top_k=top_k, activation=activation, scoring=scoring, n_group=n_group,
                topk_group=topk_group, norm_topk_prob=bool(norm_topk_prob),
                routed_scaling_factor=float(routed_scaling_factor))


def _activate(u: torch.Tensor, activation: str, inter: int) -> torch.Tensor:
    if activation == "relu2":
        return torch.relu(u).square()
    return F.silu(u[:, :inter]) * u[:, inter:]


def _empty_out(x: torch.Tensor, sizes: Sizes, fc2: torch.Tensor | None) -> torch.Tensor:
    width = sizes.hidden if fc2 is not None else sizes.width
    return x.new_empty((*x.shape[:-1], width))


# ----------------------------------------------------------------------------- grouped_mm

def grouped_mm_pipeline(x: torch.Tensor, gate_weight: torch.Tensor,
                        e_score_correction_bias: torch.Tensor | None,
                        fc1_latent_proj: torch.Tensor | None, up_proj: torch.Tensor,
                        down_proj: torch.Tensor, fc2_latent_proj: torch.Tensor | None, *,
                        top_k: int, activation: str = "relu2", scoring: str = "sigmoid",
                        n_group: int = 1, topk_group: int = 1, norm_topk_prob: bool = True,
                        routed_scaling_factor: float = 1.0) -> torch.Tensor:
    """The latent MoE as serving engines run it in PyTorch, around ``torch._grouped_mm``.

    fp32 router -> ``x @ fc1^T`` -> token copies sorted by expert (stable argsort of the ids)
    and gathered -> ``_grouped_mm`` with ``up_proj`` -> activation -> ``_grouped_mm`` with
    ``down_proj`` -> times the routing weight -> ``index_add_`` combine in fp32 -> cast to x's
    dtype -> ``@ fc2^T``.

    Parameters
    ----------
    x : Tensor ``[..., hidden]``
    gate_weight, e_score_correction_bias : Tensor ``[E, hidden]``, ``[E]`` or None
        Router (fp32 as Hugging Face keeps it, or x's dtype).
    fc1_latent_proj : Tensor ``[latent, hidden]`` or None
    up_proj : Tensor ``[E, I or 2I, latent]``
    down_proj : Tensor ``[E, latent, I]``
    fc2_latent_proj : Tensor ``[hidden, latent]`` or None
    top_k, activation, scoring, n_group, topk_group, norm_topk_prob, routed_scaling_factor
        As in :class:`~autotune.problem.LatentMoEProblem`.

    Returns
    -------
    Tensor ``[..., hidden]`` of x's dtype.

    Requirements
    ------------
    Arguments as :func:`autotune.validate.check_latent_moe_args` (projections are tensors or
    None); ``torch._grouped_mm`` exists (torch >= 2.8; on CUDA it needs sm90+ and bf16). No host
    synchronisation: group offsets come from a scatter-add histogram and a cumsum on the device,
    so the call captures in a CUDA graph.
    """
    routing = _routing(top_k, activation, scoring, n_group, topk_group, norm_topk_prob,
                       routed_scaling_factor)
    sizes = _check(x, gate_weight, e_score_correction_bias, fc1_latent_proj, up_proj,
                   down_proj, fc2_latent_proj, routing)
    if not hasattr(torch, "_grouped_mm"):
        raise RuntimeError(f"grouped_mm_pipeline: torch {torch.__version__} has no "
                           "torch._grouped_mm (needs torch >= 2.8)")
    x2 = x.reshape(-1, sizes.hidden)
    if x2.shape[0] == 0:
        return _empty_out(x, sizes, fc2_latent_proj)
    topk_weights, topk_ids = _router(x2, gate_weight, e_score_correction_bias, routing)
    h = x2 if fc1_latent_proj is None else x2 @ fc1_latent_proj.T
    flat_ids = topk_ids.reshape(-1)
    order = torch.argsort(flat_ids, stable=True)
    token_of = order // top_k
    # torch.bincount sizes its output from the largest id, a host sync; a scatter-add histogram
    # of fixed length E is the capturable equivalent.
    counts = torch.zeros(sizes.num_experts, dtype=torch.int32, device=x.device)
    counts.scatter_add_(0, flat_ids, torch.ones_like(flat_ids, dtype=torch.int32))
    offs = counts.cumsum(0, dtype=torch.int32)
    up = torch._grouped_mm(h[token_of], up_proj.transpose(1, 2), offs=offs)
    act = _activate(up, activation, sizes.intermediate)
    y = torch._grouped_mm(act, down_proj.transpose(1, 2), offs=offs)
    y = y.float() * topk_weights.reshape(-1)[order, None]
    combined = torch.zeros(x2.shape[0], sizes.width, dtype=torch.float32, device=x.device)
    combined.index_add_(0, token_of, y)
    out = combined.to(x.dtype)
    if fc2_latent_proj is not None:
        out = out @ fc2_latent_proj.T
    return out.reshape(*x.shape[:-1], out.shape[-1])


# ----------------------------------------------------------------------------- reference

def reference_module(x: torch.Tensor, gate_weight: torch.Tensor,
                     e_score_correction_bias: torch.Tensor | None,
                     fc1_latent_proj: torch.Tensor | None, up_proj: torch.Tensor,
                     down_proj: torch.Tensor, fc2_latent_proj: torch.Tensor | None, *,
                     top_k: int, activation: str = "relu2", scoring: str = "sigmoid",
                     n_group: int = 1, topk_group: int = 1, norm_topk_prob: bool = True,
                     routed_scaling_factor: float = 1.0) -> torch.Tensor:
    """The fp32 oracle (:func:`autotune.reference.latent_moe_reference`) in the peers' calling
    convention.

    Requirements
    ------------
    As :func:`autotune.reference.latent_moe_reference`. It reads the per-expert counts on the
    host (``.tolist()``), so it synchronises and cannot be captured in a CUDA graph: time it
    eagerly.
    """
    return latent_moe_reference(
        x, gate_weight, e_score_correction_bias, up_proj, down_proj, top_k=top_k,
        activation=activation, scoring=scoring, n_group=n_group, topk_group=topk_group,
        norm_topk_prob=norm_topk_prob, routed_scaling_factor=routed_scaling_factor,
        fc1_latent_proj=fc1_latent_proj, fc2_latent_proj=fc2_latent_proj)


# ----------------------------------------------------------------------------- triton

@dataclass(frozen=True)
class TritonConfig:
    """Tile and launch choices of the Triton sorted-token MoE (both expert GEMMs share them;
    ``block_m`` is also the padding granule of each expert's rows)."""

    block_m: int
    block_n: int
    block_k: int
    group_m: int
    num_warps: int
    num_stages: int


# Keyed by the mean rows per expert, T * top_k / E (Super: T=1 -> 0.04, 128 -> 5.5, 512 -> 22,
# 2048 -> 88, 8192 -> 352). Few rows per expert means every tile streams a weight tile for a
# handful of rows: BLOCK_M 16 (tl.dot's minimum) wastes the least, long BLOCK_K keeps many bytes
# in flight, and GROUP_M 1 since neighbouring blocks belong to different experts. Many rows per
# expert turn the GEMMs compute bound: 64/128-row tiles reuse each weight tile, GROUP_M 8 keeps
# a band of A blocks hot in L2, 8 warps feed the bigger tile. Stages fit the gated (swiglu)
# kernel's second B tile in the 227 KiB of Hopper shared memory. Starting points modelled on
# vLLM's fused_moe defaults and H100/H200 tables, not tuned here.
_TRITON_TABLE: tuple[tuple[float, TritonConfig], ...] = (
    (2.0, TritonConfig(16, 64, 128, 1, 4, 4)),
    (8.0, TritonConfig(16, 128, 128, 1, 4, 3)),
    (32.0, TritonConfig(32, 128, 64, 8, 4, 4)),
    (128.0, TritonConfig(64, 128, 64, 8, 4, 4)),
    (math.inf, TritonConfig(128, 128, 64, 8, 8, 3)),
)


def triton_config(tokens: int, top_k: int, num_experts: int) -> TritonConfig:
    """The table's tile choice for ``tokens`` tokens routed top-``top_k`` over ``num_experts``.

    Requirements
    ------------
    ``tokens >= 0``, ``top_k >= 1``, ``num_experts >= 1`` (``ValueError`` otherwise).
    """
    if tokens < 0 or top_k < 1 or num_experts < 1:
        raise ValueError(f"tokens/top_k/num_experts: expected >= 0, >= 1, >= 1, got {tokens}, "
                         f"{top_k}, {num_experts}")
    rows_per_expert = tokens * top_k / num_experts
    return next(cfg for bound, cfg in _TRITON_TABLE if rows_per_expert <= bound)


def triton_available() -> bool:
    """Whether ``import triton`` works here (the Triton peer needs it; CPU CI may lack it)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


@functools.cache
def _triton_kernel():
    # Triton is imported on first use only. The kernel is defined here, but bound as a module
    # global (not a closure) because older Triton versions resolve names in a kernel body
    # through the function's globals only.
    global triton, tl
    import triton
    import triton.language as tl

    @triton.jit
    def _moe_gemm(a_ptr, b_ptr, c_ptr, w_ptr, sorted_ids_ptr, expert_ids_ptr, total_ptr,
                  padded_rows, N, K, num_valid, stride_am, stride_be, stride_bn, stride_cm,
                  up_offset, A_DIV: tl.constexpr, ACT: tl.constexpr, MUL_WEIGHT: tl.constexpr,
                  EVEN_K: tl.constexpr, DOT_FP32: tl.constexpr, BLOCK_M: tl.constexpr,
                  BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
        # C[id, n] = epilogue(sum_k A[id // A_DIV, k] * B[expert, n, k]) for the sorted token
        # copies `id` of one BLOCK_M block (all of one expert). ACT 0: none, 1: relu2,
        # 2: swiglu (B rows [n] gate, [up_offset + n] up).
        pid = tl.program_id(0)
        num_pid_m = tl.cdiv(padded_rows, BLOCK_M)
        num_pid_n = tl.cdiv(N, BLOCK_N)
        in_group = GROUP_M * num_pid_n
        first_m = (pid // in_group) * GROUP_M
        size_m = tl.minimum(num_pid_m - first_m, GROUP_M)
        pid_m = first_m + (pid % in_group) % size_m
        pid_n = (pid % in_group) // size_m
        if pid_m * BLOCK_M >= tl.load(total_ptr):
            return
        ids = tl.load(sorted_ids_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
        valid = ids < num_valid
        expert = tl.load(expert_ids_ptr + pid_m).to(tl.int64)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = cols < N
        ks = tl.arange(0, BLOCK_K)
        # int64 offsets: the stacked expert weights exceed 2**31 elements at Ultra sizes.
        a_ptrs = a_ptr + (ids // A_DIV).to(tl.int64)[:, None] * stride_am + ks[None, :]
        b_ptrs = (b_ptr + expert * stride_be + cols.to(tl.int64)[None, :] * stride_bn
                  + ks[:, None])
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, tl.cdiv(K, BLOCK_K)):
            k_ok = ks < K - k0 * BLOCK_K
            if EVEN_K:
                a = tl.load(a_ptrs, mask=valid[:, None], other=0.0)
                b = tl.load(b_ptrs, mask=col_ok[None, :], other=0.0)
            else:
                a = tl.load(a_ptrs, mask=valid[:, None] & k_ok[None, :], other=0.0)
                b = tl.load(b_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
            if DOT_FP32:
                # Triton's CPU interpreter multiplies bf16 bit patterns as integers; fp32 is
                # exact there. Never taken on the GPU.
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            acc += tl.dot(a, b)
            if ACT == 2:
                if EVEN_K:
                    b2 = tl.load(b_ptrs + up_offset * stride_bn, mask=col_ok[None, :], other=0.0)
                else:
                    b2 = tl.load(b_ptrs + up_offset * stride_bn,
                                 mask=k_ok[:, None] & col_ok[None, :], other=0.0)
                if DOT_FP32:
                    b2 = b2.to(tl.float32)
                acc_up += tl.dot(a, b2)
            a_ptrs += BLOCK_K
            b_ptrs += BLOCK_K
        if ACT == 1:
            acc = tl.maximum(acc, 0.0)
            acc = acc * acc
        if ACT == 2:
            acc = acc * tl.sigmoid(acc) * acc_up
        if MUL_WEIGHT:
            acc = acc * tl.load(w_ptr + ids, mask=valid, other=0.0)[:, None]
        c_ptrs = c_ptr + ids.to(tl.int64)[:, None] * stride_cm + cols[None, :]
        tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=valid[:, None] & col_ok[None, :])

    return _moe_gemm


def _align_block_size(topk_ids: torch.Tensor, num_experts: int,
                      block_m: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """vLLM's ``moe_align_block_size`` in device-only torch ops.

    Returns ``sorted_ids`` (token-copy ids ``t * k + j`` grouped by expert, each expert's run
    padded to a multiple of ``block_m`` with the sentinel ``T * k``), ``expert_ids`` (the expert
    of each block; ``num_experts`` past the end) and ``total`` (``[1]``: padded rows in use).
    Buffers have their worst-case size, so no shape depends on the routing.
    """
    flat = topk_ids.reshape(-1)
    n = flat.numel()
    counts = torch.zeros(num_experts, dtype=torch.int64, device=flat.device)
    counts.scatter_add_(0, flat, torch.ones_like(flat))
    padded = (counts + block_m - 1) // block_m * block_m
    pad_end = padded.cumsum(0)
    count_start = counts.cumsum(0) - counts
    order = torch.argsort(flat, stable=True)
    expert_of = flat[order]
    rank = torch.arange(n, device=flat.device) - count_start[expert_of]
    position = (pad_end - padded)[expert_of] + rank
    # At most min(E, T*k) experts are non-empty and each pads fewer than block_m rows.
    worst = -(-(n + min(num_experts, n) * (block_m - 1)) // block_m) * block_m
    sorted_ids = torch.full((worst,), n, dtype=torch.int32, device=flat.device)
    sorted_ids.scatter_(0, position, order.to(torch.int32))
    block_start = torch.arange(0, worst, block_m, device=flat.device)
    expert_ids = torch.searchsorted(pad_end, block_start, right=True).to(torch.int32)
    return sorted_ids, expert_ids, pad_end[-1:].to(torch.int32)


def _launch_moe_gemm(a, w, out, weights, bookkeeping, cfg: TritonConfig, *, a_div: int,
                     act: int, up_offset: int, mul_weight: bool) -> None:
    sorted_ids, expert_ids, total = bookkeeping
    n_cols, k = out.shape[1], a.shape[1]
    kernel = _triton_kernel()
    grid = (triton.cdiv(sorted_ids.numel(), cfg.block_m) * triton.cdiv(n_cols, cfg.block_n),)
    on_interpreter = not a.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"
    kernel[grid](
        a, w, out, weights, sorted_ids, expert_ids, total, sorted_ids.numel(), n_cols, k,
        weights.numel(), a.stride(0), w.stride(0), w.stride(1), out.stride(0), up_offset,
        A_DIV=a_div, ACT=act, MUL_WEIGHT=mul_weight, EVEN_K=k % cfg.block_k == 0,
        DOT_FP32=on_interpreter, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
        BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m, num_warps=cfg.num_warps,
        num_stages=cfg.num_stages)


def triton_sorted_moe(x: torch.Tensor, gate_weight: torch.Tensor,
                      e_score_correction_bias: torch.Tensor | None,
                      fc1_latent_proj: torch.Tensor | None, up_proj: torch.Tensor,
                      down_proj: torch.Tensor, fc2_latent_proj: torch.Tensor | None, *,
                      top_k: int, activation: str = "relu2", scoring: str = "sigmoid",
                      n_group: int = 1, topk_group: int = 1, norm_topk_prob: bool = True,
                      routed_scaling_factor: float = 1.0,
                      config: TritonConfig | None = None) -> torch.Tensor:
    """The latent MoE with a Triton sorted-token expert kernel (vLLM ``fused_moe`` style).

    fp32 router -> ``x @ fc1^T`` -> block-padded sorted token-copy ids per expert (device
    ops) -> kernel 1 gathers ``h`` rows by id, multiplies by the expert's ``up_proj`` tile and
    applies the activation in its epilogue, writing ``[T*k, I]`` -> kernel 2 multiplies by
    ``down_proj`` and scales each row by its routing weight, writing ``[T*k, latent]`` -> sum
    over the top-k (fp32) -> cast to x's dtype -> ``@ fc2^T``.

    Parameters
    ----------
    x, gate_weight, e_score_correction_bias, fc1_latent_proj, up_proj, down_proj, \
fc2_latent_proj, top_k, activation, scoring, n_group, topk_group, norm_topk_prob, \
routed_scaling_factor
        As :func:`grouped_mm_pipeline`.
    config : TritonConfig, optional
        Tile choice; default :func:`triton_config` for this token count.

    Returns
    -------
    Tensor ``[..., hidden]`` of x's dtype.

    Requirements
    ------------
    Arguments as :func:`grouped_mm_pipeline`; ``up_proj`` and ``down_proj`` contiguous;
    Triton installed (``RuntimeError`` otherwise); CUDA tensors, or CPU tensors under
    ``TRITON_INTERPRET=1`` (tests). Buffers are sized for the worst case
    (``T*k + min(E, T*k)*(BLOCK_M-1)`` padded rows), so the call captures in a CUDA graph.
    """
    routing = _routing(top_k, activation, scoring, n_group, topk_group, norm_topk_prob,
                       routed_scaling_factor)
    sizes = _check(x, gate_weight, e_score_correction_bias, fc1_latent_proj, up_proj,
                   down_proj, fc2_latent_proj, routing)
    _check_triton_inputs(x, up_proj, down_proj, config)
    x2 = x.reshape(-1, sizes.hidden)
    tokens = x2.shape[0]
    if tokens == 0:
        return _empty_out(x, sizes, fc2_latent_proj)
    cfg = config or triton_config(tokens, top_k, sizes.num_experts)
    topk_weights, topk_ids = _router(x2, gate_weight, e_score_correction_bias, routing)
    h = (x2 if fc1_latent_proj is None else x2 @ fc1_latent_proj.T).contiguous()
    bookkeeping = _align_block_size(topk_ids, sizes.num_experts, cfg.block_m)
    weights = topk_weights.reshape(-1).contiguous()
    copies = tokens * top_k
    hidden_act = torch.empty(copies, sizes.intermediate, dtype=x.dtype, device=x.device)
    _launch_moe_gemm(h, up_proj, hidden_act, weights, bookkeeping, cfg, a_div=top_k,
                     act=1 if activation == "relu2" else 2,
                     up_offset=sizes.intermediate if activation == "swiglu" else 0,
                     mul_weight=False)
    y = torch.empty(copies, sizes.width, dtype=x.dtype, device=x.device)
    _launch_moe_gemm(hidden_act, down_proj, y, weights, bookkeeping, cfg, a_div=1, act=0,
                     up_offset=0, mul_weight=True)
    out = y.view(tokens, top_k, sizes.width).sum(dim=1, dtype=torch.float32).to(x.dtype)
    if fc2_latent_proj is not None:
        out = out @ fc2_latent_proj.T
    return out.reshape(*x.shape[:-1], out.shape[-1])


def _check_triton_inputs(x, up_proj, down_proj, config) -> None:
    if not triton_available():
        raise RuntimeError("triton_sorted_moe: Triton is not installed (pip install triton)")
    if config is not None and not isinstance(config, TritonConfig):
        raise TypeError(f"config: expected a TritonConfig or None, got {type(config).__name__}")
    if not x.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(f"x: triton_sorted_moe needs CUDA tensors (or TRITON_INTERPRET=1 for "
                         f"CPU tensors), got a tensor on {x.device}")
    for name, w in (("up_proj", up_proj), ("down_proj", down_proj)):
        if not w.is_contiguous():
            raise ValueError(f"{name}: must be contiguous (the kernel assumes unit stride "
                             "along K); call .contiguous()")


# ----------------------------------------------------------------------------- registry

PEERS: dict[str, PeerFn] = {
    "grouped_mm": grouped_mm_pipeline,
    "triton": triton_sorted_moe,
    "reference": reference_module,
}


def available_peers() -> dict[str, str | None]:
    """Each peer's name mapped to ``None`` if it can run here, else the reason it cannot."""
    return {
        "grouped_mm": None if hasattr(torch, "_grouped_mm") else
        f"torch {torch.__version__} has no torch._grouped_mm",
        "triton": None if triton_available() else "triton is not installed",
        "reference": None,
    }


def module_inputs(module: torch.nn.Module) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """A :class:`~autotune.ops.LatentMoE`'s weights and routing in the peers' convention.

    Returns ``(weights, routing)`` so that ``peer(x, *weights, **routing)`` runs the layer.

    Requirements
    ------------
    ``module`` has LatentMoE's attributes (``gate``, ``fc1_latent_proj``, ``experts``,
    ``fc2_latent_proj``, ``problem``); ``TypeError`` otherwise.
    """
    needed = ("gate", "fc1_latent_proj", "experts", "fc2_latent_proj", "problem")
    if not all(hasattr(module, a) for a in needed):
        raise TypeError(f"module: expected a LatentMoE, got {type(module).__name__}")
    p: LatentMoEProblem = module.problem
    fc1, fc2 = module.fc1_latent_proj, module.fc2_latent_proj
    weights = (module.gate.weight.detach(), module.gate.e_score_correction_bias,
               None if fc1 is None else fc1.weight.detach(), module.experts.up_proj.detach(),
               module.experts.down_proj.detach(), None if fc2 is None else fc2.weight.detach())
    routing = _routing(p.top_k, p.activation, p.scoring, p.n_group, p.topk_group,
                       p.norm_topk_prob, p.routed_scaling_factor)
    return weights, routing


# ----------------------------------------------------------------------------- roofline

def expected_experts_touched(num_experts: int, tokens: int, top_k: int) -> float:
    """Expected distinct experts hit by ``tokens * top_k`` independent uniform draws.

    ``E * (1 - (1 - 1/E) ** (T*k))``: a balanced router modelled as draws with replacement.
    Real top-k picks k distinct experts per token, which touches slightly more
    (``E * (1 - (1 - k/E) ** T)``; exactly k at T=1 against 21.5 here for E=512, k=22), so the
    floor stays a lower bound.
    """
    if tokens <= 0:
        return 0.0
    return num_experts * -math.expm1(tokens * top_k * math.log1p(-1.0 / num_experts))


def roofline_bytes_flops(problem: LatentMoEProblem, tokens: int) -> tuple[float, float]:
    """Fewest bytes that must move and the matmul flops of one forward with ``tokens`` tokens.

    Bytes: x read and out written (2 bytes each), the fp32 gate weight, fc1 and fc2 weights,
    and the up + down weights of the experts expected to be touched
    (:func:`expected_experts_touched`); intermediates are assumed to stay on chip. Flops: router
    ``2*T*hidden*E``, fc1 and fc2 ``2*T*hidden*latent`` each, experts
    ``2*T*k*(up_rows + I)*width``.

    Requirements
    ------------
    ``tokens >= 0`` (``ValueError`` otherwise); ``problem`` a LatentMoEProblem (``TypeError``).
    """
    if not isinstance(problem, LatentMoEProblem):
        raise TypeError(f"problem: expected a LatentMoEProblem, got {type(problem).__name__}")
    if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 0:
        raise ValueError(f"tokens: expected an int >= 0, got {tokens!r}")
    p, t = problem, tokens
    h, w, inter, e, k = (p.hidden_size, p.expert_width, p.intermediate_size, p.num_experts,
                         p.top_k)
    elt = 4 if p.dtype == "float32" else 2
    proj_elems = 0 if p.latent_size is None else 2 * h * w
    touched = expected_experts_touched(e, t, k)
    nbytes = (2 * t * h * elt + e * h * 4 + proj_elems * elt
              + touched * (p.up_rows + inter) * w * elt)
    flops = 2 * t * h * e + t * proj_elems * 2 + 2 * t * k * (p.up_rows + inter) * w
    return float(nbytes), float(flops)


def roofline_floor_ms(problem: LatentMoEProblem, tokens: int, copy_bw: float,
                      flops: float) -> float:
    """The roofline floor in ms: ``max(bytes / copy_bw, flops / flops_rate)``.

    Parameters
    ----------
    problem : LatentMoEProblem
    tokens : int
    copy_bw : float
        Device copy bandwidth in bytes per second, counting bytes read plus bytes written (as
        :func:`autotune.bench.measure_ceilings` measures it).
    flops : float
        Dense bf16 matmul rate in flop/s.

    Requirements
    ------------
    ``copy_bw`` and ``flops`` positive (``ValueError``); see :func:`roofline_bytes_flops`.
    """
    for name, value in (("copy_bw", copy_bw), ("flops", flops)):
        if not value > 0:
            raise ValueError(f"{name}: expected a positive rate, got {value!r}")
    nbytes, nflops = roofline_bytes_flops(problem, tokens)
    return 1e3 * max(nbytes / copy_bw, nflops / flops)
