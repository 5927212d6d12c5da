"""The fp32 oracle of the whole latent MoE layer, in plain PyTorch, on any device.

Every product and sum runs in fp32 whatever the input dtype; only the final output is cast back
to x's dtype. Kernels are judged against this module (with the per-dtype tolerances of the
tests), so it favours the plainest correct formulation over speed; it is still vectorised per
expert so that Nemotron-sized layers (512 experts, thousands of tokens) run on a CPU.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from .validate import check_latent_moe_args, check_options, check_tensor

TopkIdsHook = Callable[[torch.Tensor], Any]


def _group_limited(choice: torch.Tensor, scoring: str, n_group: int,
                   topk_group: int) -> torch.Tensor:
    # DeepSeek-V3 "noaux_tc": rank groups by the sum of their two best biased scores (one expert
    # per group: its score); DeepSeek-V2 softmax grouping ranks by the group maximum.
    t, e = choice.shape
    grouped = choice.view(t, n_group, e // n_group)
    if scoring == "sigmoid" and grouped.shape[-1] >= 2:
        group_scores = grouped.topk(2, dim=-1).values.sum(-1)
    else:
        group_scores = grouped.amax(dim=-1)
    best = group_scores.topk(topk_group, dim=-1, sorted=False).indices
    keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter(1, best, True)
    keep = keep.unsqueeze(-1).expand_as(grouped).reshape(t, e)
    return choice.masked_fill(~keep, float("-inf"))


def route(x: torch.Tensor, gate_weight: torch.Tensor,
          e_score_correction_bias: torch.Tensor | None = None, *, top_k: int,
          scoring: str = "sigmoid", n_group: int = 1, topk_group: int = 1,
          norm_topk_prob: bool = True,
          routed_scaling_factor: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Router of the layer: scores, grouped top-k and routing weights, in fp32.

    Parameters
    ----------
    x : Tensor ``[T, hidden]``
        Full-width tokens (the router never sees the latent projection).
    gate_weight : Tensor ``[E, hidden]``
    e_score_correction_bias : Tensor ``[E]`` or None
        Added to the scores for the choice only (``None`` means zeros); weights stay unbiased.
    top_k, scoring, n_group, topk_group, norm_topk_prob, routed_scaling_factor
        As in :class:`~autotune.problem.LatentMoEProblem`.

    Returns
    -------
    topk_weights : Tensor ``[T, top_k]`` float32
        Unbiased scores of the chosen experts, renormalised (``w / (sum + 1e-20)``) if
        ``norm_topk_prob``, times ``routed_scaling_factor``.
    topk_ids : Tensor ``[T, top_k]`` int64
        Chosen experts, best biased score first (``torch.topk(sorted=True)`` order).

    Requirements
    ------------
    ``x`` is 2-D with ``x.shape[1] == gate_weight.shape[1]``; the bias has ``E`` entries;
    routing arguments as :func:`autotune.problem.check_routing`; ``scoring`` in
    ``{"sigmoid", "softmax"}``. Violations raise ``ValueError``/``TypeError``.
    """
    x, gate_weight = check_tensor("x", x), check_tensor("gate_weight", gate_weight)
    if x.dim() != 2 or gate_weight.dim() != 2 or x.shape[1] != gate_weight.shape[1]:
        raise ValueError(f"x: expected shape [T, {gate_weight.shape[-1]}] matching gate_weight "
                         f"{list(gate_weight.shape)}, got {list(x.shape)}")
    num_experts = gate_weight.shape[0]
    check_options(top_k=top_k, activation="relu2", scoring=scoring, n_group=n_group,
                  topk_group=topk_group, num_experts=num_experts)
    if e_score_correction_bias is not None and list(e_score_correction_bias.shape) != [
            num_experts]:
        raise ValueError(f"e_score_correction_bias: expected shape [{num_experts}], got "
                         f"{list(e_score_correction_bias.shape)}")
    logits = x.float() @ gate_weight.float().T
    scores = logits.sigmoid() if scoring == "sigmoid" else logits.softmax(dim=-1)
    choice = scores if e_score_correction_bias is None else (
        scores + e_score_correction_bias.float())
    if n_group > 1 and topk_group < n_group:
        choice = _group_limited(choice, scoring, n_group, topk_group)
    topk_ids = choice.topk(top_k, dim=-1, sorted=True).indices
    topk_weights = scores.gather(1, topk_ids)
    if norm_topk_prob:
        topk_weights = topk_weights / (topk_weights.sum(dim=-1, keepdim=True) + 1e-20)
    return topk_weights * routed_scaling_factor, topk_ids


def _activate(u: torch.Tensor, activation: str, intermediate: int) -> torch.Tensor:
    if activation == "relu2":
        return torch.relu(u).square()
    # Gated experts store [gate; up] stacked along the rows of up_proj.
    return F.silu(u[:, :intermediate]) * u[:, intermediate:]


def experts_forward(h: torch.Tensor, up_proj: torch.Tensor, down_proj: torch.Tensor,
                    topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                    activation: str = "relu2") -> torch.Tensor:
    """Routed experts and the weighted combine, at the experts' width, in fp32.

    Parameters
    ----------
    h : Tensor ``[T, width]``
        Expert input (the latent tokens, or x without projections); upcast to fp32.
    up_proj : Tensor ``[E, I or 2I, width]``
        ``relu2`` experts have I rows; ``swiglu`` experts hold ``[gate; up]`` = 2I rows.
    down_proj : Tensor ``[E, width, I]``
    topk_weights, topk_ids : Tensor ``[T, k]``
        As returned by :func:`route`.
    activation : {"relu2", "swiglu"}

    Returns
    -------
    Tensor ``[T, width]`` float32: ``sum_j w[t, j] * down[e_j] @ act(up[e_j] @ h[t])``.

    Requirements
    ------------
    Shapes as above and consistent; ids in ``[0, E)``. Violations raise ``ValueError``.
    """
    sizes = _expert_sizes(h, up_proj, down_proj, topk_weights, topk_ids, activation)
    num_experts, width, inter = sizes
    if topk_ids.numel() and not 0 <= int(topk_ids.min()) <= int(topk_ids.max()) < num_experts:
        raise ValueError(f"topk_ids: expert ids must lie in [0, {num_experts}), got "
                         f"[{int(topk_ids.min())}, {int(topk_ids.max())}]")
    out = torch.zeros(h.shape[0], width, dtype=torch.float32, device=h.device)
    k = topk_ids.shape[1]
    flat_ids = topk_ids.reshape(-1)
    # Sorting the (token, slot) pairs by expert turns the per-token loop into one GEMM pair per
    # expert present; index_add_ accumulates the k contributions of a token in fp32.
    order = torch.argsort(flat_ids, stable=True)
    tokens = order // k
    weights = topk_weights.reshape(-1).float()[order]
    counts = torch.bincount(flat_ids, minlength=num_experts).tolist()
    hf = h.float()
    start = 0
    for e, count in enumerate(counts):
        if count == 0:
            continue
        rows = tokens[start:start + count]
        u = hf[rows] @ up_proj[e].float().T
        y = _activate(u, activation, inter) @ down_proj[e].float().T
        out.index_add_(0, rows, y * weights[start:start + count, None])
        start += count
    return out


def _expert_sizes(h: torch.Tensor, up_proj: torch.Tensor, down_proj: torch.Tensor,
                  topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                  activation: str) -> tuple[int, int, int]:
    if down_proj.dim() != 3 or up_proj.dim() != 3:
        raise ValueError(f"up_proj/down_proj: expected 3-D [E, rows, cols] tensors, got "
                         f"{list(up_proj.shape)} and {list(down_proj.shape)}")
    num_experts, width, inter = down_proj.shape
    rows = 2 * inter if activation == "swiglu" else inter
    if list(up_proj.shape) != [num_experts, rows, width]:
        raise ValueError(f"up_proj: expected shape [{num_experts}, {rows}, {width}] for "
                         f"{activation} experts, got {list(up_proj.shape)}")
    if h.dim() != 2 or h.shape[1] != width:
        raise ValueError(f"h: expected shape [T, {width}], got {list(h.shape)}")
    want = [h.shape[0], topk_ids.shape[-1]]
    if topk_ids.dim() != 2 or list(topk_ids.shape) != want or list(topk_weights.shape) != want:
        raise ValueError(f"topk_weights/topk_ids: expected shape [T={h.shape[0]}, k], got "
                         f"{list(topk_weights.shape)} and {list(topk_ids.shape)}")
    return num_experts, width, inter


def _project(proj: Any, t: torch.Tensor) -> torch.Tensor:
    if proj is None:
        return t.float()
    if isinstance(proj, torch.Tensor):
        return t.float() @ proj.float().T
    return proj(t).float()


def latent_moe_reference(x: torch.Tensor, gate_weight: torch.Tensor,
                         e_score_correction_bias: torch.Tensor | None, up_proj: torch.Tensor,
                         down_proj: torch.Tensor, *, top_k: int, activation: str = "relu2",
                         scoring: str = "sigmoid", n_group: int = 1, topk_group: int = 1,
                         norm_topk_prob: bool = True, routed_scaling_factor: float = 1.0,
                         fc1_latent_proj: Any = None, fc2_latent_proj: Any = None,
                         topk_ids_hook: TopkIdsHook | None = None) -> torch.Tensor:
    """The whole latent MoE layer (FastDeploy's ``apply_tp`` contract) in fp32.

    ``out = fc2(sum_j w_j * expert_j(fc1(x)))`` with routing on the full-width ``x``.

    Parameters
    ----------
    x : Tensor ``[..., hidden]``
        Leading dimensions are flattened to T tokens and restored on the output.
    gate_weight, e_score_correction_bias
        Router, see :func:`route`.
    up_proj, down_proj
        Stacked expert weights, see :func:`experts_forward`.
    top_k, activation, scoring, n_group, topk_group, norm_topk_prob, routed_scaling_factor
        As in :class:`~autotune.problem.LatentMoEProblem`.
    fc1_latent_proj, fc2_latent_proj : None, Tensor or callable
        ``None`` skips the projection; a weight (``[latent, hidden]`` / ``[hidden, latent]``)
        is applied in fp32; a callable is applied as-is: fc1 to ``x``, fc2 to the combined
        expert output cast to x's dtype (what such a module sees in a real model). Both are
        applied on every path.
    topk_ids_hook : callable or None
        Called exactly once per call with ``topk_ids`` ``[T, top_k]`` int64, also for T = 0
        (then with an empty ``[0, top_k]`` tensor), so expert-load counters see every call.

    Returns
    -------
    Tensor of x's dtype, shape ``[..., out]`` with ``out`` = hidden (or the experts' width when
    ``fc2_latent_proj`` is ``None`` and the experts run at latent width).

    Requirements
    ------------
    Shapes, devices and routing as :func:`autotune.validate.check_latent_moe_args` (dtypes may
    mix: everything is upcast). Inputs are never modified.
    """
    sizes = check_latent_moe_args(
        x, gate_weight, e_score_correction_bias, up_proj, down_proj, top_k=top_k,
        activation=activation, scoring=scoring, n_group=n_group, topk_group=topk_group,
        fc1_latent_proj=fc1_latent_proj, fc2_latent_proj=fc2_latent_proj, check_dtypes=False,
        require_hidden_output=False)
    x2 = x.reshape(-1, sizes.hidden)
    topk_weights, topk_ids = route(
        x2, gate_weight, e_score_correction_bias, top_k=top_k, scoring=scoring,
        n_group=n_group, topk_group=topk_group, norm_topk_prob=norm_topk_prob,
        routed_scaling_factor=routed_scaling_factor)
    if topk_ids_hook is not None:
        topk_ids_hook(topk_ids)
    h = _project(fc1_latent_proj, x2)
    if list(h.shape) != [x2.shape[0], sizes.width]:
        raise ValueError(f"fc1_latent_proj: output must have shape [{x2.shape[0]}, "
                         f"{sizes.width}], got {list(h.shape)}")
    y = experts_forward(h, up_proj, down_proj, topk_weights, topk_ids, activation)
    if fc2_latent_proj is not None and not isinstance(fc2_latent_proj, torch.Tensor):
        y = y.to(x.dtype)
    out = _project(fc2_latent_proj, y)
    return out.to(x.dtype).reshape(*x.shape[:-1], out.shape[-1])
