"""The public API: the ``LatentMoE`` module, the functional ``latent_moe`` and its custom op.

Dispatch is one small function, :func:`_select_backend`: ``"cutlass"`` runs the fused CUTLASS
pipeline of :mod:`autotune.fused`, ``"reference"`` the fp32 oracle of :mod:`autotune.reference`,
and ``"auto"`` the former where it can run and has been checked (``fused.VERIFIED_ARCHS``) and
the latter elsewhere, with one logged reason.

The pure-tensor path (projections ``None`` or weight tensors, no hook) is one opaque
``torch.library`` custom op, ``autotune::latent_moe``, with a fake (meta) implementation, so
``torch.compile(fullgraph=True)`` traces through it and a fused kernel can later replace it.
Callable projections and the top-k hook are Python and stay outside the op, but are applied on
every path.
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor, nn

from .problem import LatentMoEProblem, check_choice, from_hf_config, load_hf_config
from .reference import latent_moe_reference
from .validate import (
    BACKENDS,
    check_latent_moe_args,
    check_projected,
    dtype_name,
    projection_kind,
)

logger = logging.getLogger(__name__)

__all__ = ["LatentMoE", "latent_moe", "latent_moe_op", "Experts", "TopkRouter"]


# ----------------------------------------------------------------------------- dispatch

_FALLBACK_LOGGED: set[str] = set()


def _auto_backend(x: Tensor) -> Callable[..., Tensor]:
    """The fused CUTLASS path where it can run, else the reference with one logged reason."""
    from . import fused

    unverified = fused.unverified_reason(x.device)

    def run(*args, **kwargs):
        try:
            if unverified:
                raise RuntimeError(unverified)
            return fused.cutlass_forward(*args, **kwargs)
        except (RuntimeError, ValueError, OSError) as e:
            reason = str(e)
            if reason not in _FALLBACK_LOGGED:
                _FALLBACK_LOGGED.add(reason)
                logger.warning("backend='auto' runs the PyTorch reference: %s", reason)
            return latent_moe_reference(*args, **kwargs)

    return run


def _select_backend(backend: str, x: Tensor) -> Callable[..., Tensor]:
    """The implementation to run for ``backend`` on ``x``'s device.

    The callable has :func:`autotune.reference.latent_moe_reference`'s signature.

    Requirements
    ------------
    ``backend`` in ``{"auto", "reference", "cutlass"}`` (``ValueError`` otherwise);
    ``"cutlass"`` raises ``RuntimeError`` naming the reason where the CUTLASS kernels cannot
    run (a GPU without kernels, unsupported dtype or alignment, kernels that fail to build).
    ``"auto"`` runs them only where :data:`autotune.fused.VERIFIED_ARCHS` says the forward was
    checked on such a GPU, else the reference with one logged reason.
    """
    check_choice("backend", backend, BACKENDS)
    if backend == "reference":
        return latent_moe_reference
    if backend == "cutlass":
        if x.device.type != "cuda":
            raise RuntimeError(
                f"backend='cutlass': the CUTLASS backend needs a CUDA GPU and the built kernels "
                f"(x is on {x.device}); use backend='auto' (falls back to the PyTorch reference) "
                "or backend='reference'")
        from .fused import cutlass_forward

        return cutlass_forward
    return _auto_backend(x)


# ----------------------------------------------------------------------------- custom op

@torch.library.custom_op("autotune::latent_moe", mutates_args=())
def latent_moe_op(x: Tensor, gate_weight: Tensor, e_score_correction_bias: Tensor | None,
                  up_proj: Tensor, down_proj: Tensor, fc1_latent_proj: Tensor | None,
                  fc2_latent_proj: Tensor | None, x_latent: Tensor | None, top_k: int,
                  activation: str, scoring: str, n_group: int, topk_group: int,
                  norm_topk_prob: bool, routed_scaling_factor: float,
                  backend: str) -> Tensor:
    """The tensor-only latent MoE op (``torch.ops.autotune.latent_moe``).

    ``x_latent`` is the experts' input when a callable fc1 ran outside the op (then
    ``fc1_latent_proj`` must be ``None``); the router always reads ``x``. With
    ``fc2_latent_proj=None`` the output is the combined expert output at the experts' width, so
    the caller can apply a callable fc2.

    Requirements
    ------------
    As :func:`latent_moe`, except that ``fc2_latent_proj=None`` with latent-width experts is
    allowed (see above).
    """
    fc1: Any = fc1_latent_proj
    if x_latent is not None:
        if fc1_latent_proj is not None:
            raise ValueError("x_latent: given together with fc1_latent_proj; pass one of them")
        width = x_latent.shape[-1]

        def fc1(_: Tensor) -> Tensor:
            return x_latent.reshape(-1, width)

    impl = _select_backend(backend, x)
    return impl(x, gate_weight, e_score_correction_bias, up_proj, down_proj, top_k=top_k,
                activation=activation, scoring=scoring, n_group=n_group, topk_group=topk_group,
                norm_topk_prob=norm_topk_prob, routed_scaling_factor=routed_scaling_factor,
                fc1_latent_proj=fc1, fc2_latent_proj=fc2_latent_proj)


@latent_moe_op.register_fake
def _latent_moe_fake(x, gate_weight, e_score_correction_bias, up_proj, down_proj,
                     fc1_latent_proj, fc2_latent_proj, x_latent, top_k, activation, scoring,
                     n_group, topk_group, norm_topk_prob, routed_scaling_factor, backend):
    width = fc2_latent_proj.shape[0] if fc2_latent_proj is not None else up_proj.shape[-1]
    return x.new_empty((*x.shape[:-1], width))


# ----------------------------------------------------------------------------- functional

def latent_moe(x: Tensor, gate_weight: Tensor, e_score_correction_bias: Tensor | None,
               up_proj: Tensor, down_proj: Tensor, *, top_k: int, activation: str = "relu2",
               scoring: str = "sigmoid", n_group: int = 1, topk_group: int = 1,
               norm_topk_prob: bool = True, routed_scaling_factor: float = 1.0,
               fc1_latent_proj: Any = None, fc2_latent_proj: Any = None,
               topk_ids_hook: Callable[[Tensor], Any] | None = None,
               backend: str = "auto") -> Tensor:
    """The latent MoE layer, functional form (FastDeploy's ``apply_tp`` contract).

    ``out = fc2(sum_j w_j * expert_j(fc1(x)))``; the router reads the full-width ``x`` in fp32.

    Parameters
    ----------
    x : Tensor ``[..., hidden]``
    gate_weight : Tensor ``[E, hidden]``
        fp32 (as Hugging Face keeps it) or x's dtype.
    e_score_correction_bias : Tensor ``[E]`` or None
        fp32 or x's dtype; biases the expert choice only.
    up_proj : Tensor ``[E, I or 2I, width]``
        ``swiglu`` experts hold ``[gate; up]`` (2I rows).
    down_proj : Tensor ``[E, width, I]``
    top_k, activation, scoring, n_group, topk_group, norm_topk_prob, routed_scaling_factor
        As in :class:`~autotune.problem.LatentMoEProblem`.
    fc1_latent_proj, fc2_latent_proj : None, Tensor or callable
        ``None`` (no projection), a weight tensor ``[width, hidden]`` / ``[hidden, width]``
        (runs inside the op, eligible for fusion) or any callable module (runs unfused in
        Python around the op). Never skipped on any path.
    topk_ids_hook : callable or None
        Called once per call with ``topk_ids`` ``[T, top_k]`` int64, also for T = 0 (then with
        an empty ``[0, top_k]`` tensor). A hook is a Python side effect, so this path calls the
        backend directly rather than through the custom op.
    backend : {"auto", "reference", "cutlass"}

    Returns
    -------
    Tensor of x's dtype and shape (T = 0 gives an empty ``[..., hidden]`` tensor).

    Requirements
    ------------
    As :func:`autotune.validate.check_latent_moe_args`: dtypes (experts and tensor projections
    of x's dtype), shapes, one device, valid routing; ``fc2_latent_proj=None`` only when the
    experts run at hidden width. Violations raise ``TypeError``/``ValueError`` naming the
    argument; ``backend="cutlass"`` raises ``RuntimeError`` where its kernels cannot run.
    """
    sizes = check_latent_moe_args(
        x, gate_weight, e_score_correction_bias, up_proj, down_proj, top_k=top_k,
        activation=activation, scoring=scoring, n_group=n_group, topk_group=topk_group,
        fc1_latent_proj=fc1_latent_proj, fc2_latent_proj=fc2_latent_proj, backend=backend)
    if topk_ids_hook is not None and not callable(topk_ids_hook):
        raise TypeError(f"topk_ids_hook: expected a callable or None, got "
                        f"{type(topk_ids_hook).__name__}")
    routing = dict(top_k=top_k, activation=activation, scoring=scoring, n_group=n_group,
                   topk_group=topk_group, norm_topk_prob=norm_topk_prob,
                   routed_scaling_factor=float(routed_scaling_factor))
    fc2_call = projection_kind("fc2_latent_proj", fc2_latent_proj) == "callable"
    if topk_ids_hook is not None:
        impl = _select_backend(backend, x)
        out = impl(x, gate_weight, e_score_correction_bias, up_proj, down_proj,
                   fc1_latent_proj=fc1_latent_proj, fc2_latent_proj=fc2_latent_proj,
                   topk_ids_hook=topk_ids_hook, **routing)
        return _checked_output(out, x, sizes.hidden) if fc2_call else out
    x_latent = None
    fc1 = fc1_latent_proj
    if projection_kind("fc1_latent_proj", fc1_latent_proj) == "callable":
        x_latent = check_projected("fc1_latent_proj", fc1_latent_proj(x), x, sizes.width,
                                   check_dtype=False)
        fc1 = None
    fc2 = None if fc2_call else fc2_latent_proj
    out = latent_moe_op(x, gate_weight, e_score_correction_bias, up_proj, down_proj, fc1, fc2,
                        x_latent, backend=backend, **routing)
    if fc2_call:
        out = _checked_output(fc2_latent_proj(out), x, sizes.hidden)
    return out


def _checked_output(out: Any, x: Tensor, hidden: int) -> Tensor:
    return check_projected("fc2_latent_proj", out, x, hidden, check_dtype=False).to(x.dtype)


# ----------------------------------------------------------------------------- module

class TopkRouter(nn.Module):
    """Router parameters, named as Hugging Face's ``NemotronHTopkRouter`` (kept in fp32)."""

    def __init__(self, hidden_size: int, num_experts: int, device: Any = None):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size, dtype=torch.float32,
                                               device=device))
        self.register_buffer("e_score_correction_bias",
                             torch.zeros(num_experts, dtype=torch.float32, device=device))


class Experts(nn.Module):
    """Stacked routed-expert weights: ``up_proj [E, I or 2I, width]``, ``down_proj [E, width, I]``.
    """

    def __init__(self, num_experts: int, up_rows: int, width: int, intermediate_size: int,
                 dtype: torch.dtype, device: Any = None):
        super().__init__()
        kw = dict(dtype=dtype, device=device)
        self.up_proj = nn.Parameter(torch.empty(num_experts, up_rows, width, **kw))
        self.down_proj = nn.Parameter(torch.empty(num_experts, width, intermediate_size, **kw))


class LatentMoE(nn.Module):
    """The latent Mixture-of-Experts layer (routed experts only; the shared expert stays outside).

    Parameters
    ----------
    hidden_size, latent_size, intermediate_size, num_experts, top_k, activation, scoring, \
n_group, topk_group, norm_topk_prob, routed_scaling_factor
        As in :class:`~autotune.problem.LatentMoEProblem`; ``latent_size=None`` builds a plain
        MoE at hidden width (``fc1_latent_proj`` and ``fc2_latent_proj`` are then ``None``).
    dtype : torch.dtype
        Dtype of the experts and projections (the router stays fp32, as in Hugging Face).
    device : torch.device or str, optional
    backend : {"auto", "reference", "cutlass"}

    Attributes
    ----------
    gate.weight : Parameter ``[E, hidden]`` fp32
    gate.e_score_correction_bias : buffer ``[E]`` fp32 (persistent, zeros)
    fc1_latent_proj : ``nn.Linear(hidden, latent, bias=False)`` or None
    experts.up_proj, experts.down_proj : Parameters ``[E, I or 2I, width]``, ``[E, width, I]``
    fc2_latent_proj : ``nn.Linear(latent, hidden, bias=False)`` or None
    topk_ids_hook : callable or None
        Called with the ``[T, top_k]`` int64 expert ids of every forward.

    Requirements
    ------------
    Sizes and routing as :class:`~autotune.problem.LatentMoEProblem`; ``dtype`` one of bfloat16,
    float16, float32; ``backend`` as above. Violations raise ``ValueError``/``TypeError``.
    """

    def __init__(self, hidden_size: int, latent_size: int | None, intermediate_size: int,
                 num_experts: int, top_k: int, activation: str = "relu2",
                 scoring: str = "sigmoid", n_group: int = 1, topk_group: int = 1,
                 norm_topk_prob: bool = True, routed_scaling_factor: float = 1.0,
                 dtype: torch.dtype = torch.bfloat16, device: Any = None,
                 backend: str = "auto"):
        super().__init__()
        check_choice("backend", backend, BACKENDS)
        self._problem = LatentMoEProblem(
            hidden_size=hidden_size, latent_size=latent_size,
            intermediate_size=intermediate_size, num_experts=num_experts, top_k=top_k,
            activation=activation, scoring=scoring, n_group=n_group, topk_group=topk_group,
            norm_topk_prob=bool(norm_topk_prob),
            routed_scaling_factor=float(routed_scaling_factor), dtype=dtype_name(dtype))
        p = self._problem
        self.backend = backend
        self.topk_ids_hook: Callable[[Tensor], Any] | None = None
        self.gate = TopkRouter(hidden_size, num_experts, device=device)
        kw = dict(bias=False, dtype=dtype, device=device)
        self.fc1_latent_proj = (None if latent_size is None
                                else nn.Linear(hidden_size, latent_size, **kw))
        self.experts = Experts(num_experts, p.up_rows, p.expert_width, intermediate_size,
                               dtype=dtype, device=device)
        self.fc2_latent_proj = (None if latent_size is None
                                else nn.Linear(latent_size, hidden_size, **kw))
        self.reset_parameters()

    @property
    def problem(self) -> LatentMoEProblem:
        """The layer's :class:`~autotune.problem.LatentMoEProblem` (dtype of the experts now)."""
        return replace(self._problem, dtype=dtype_name(self.experts.up_proj.dtype))

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Normal init with std ``1/sqrt(fan_in)`` (unit-scale outputs); zero routing bias."""
        p = self._problem
        width, inter = p.expert_width, p.intermediate_size
        nn.init.normal_(self.gate.weight, std=1 / math.sqrt(p.hidden_size))
        self.gate.e_score_correction_bias.zero_()
        nn.init.normal_(self.experts.up_proj, std=1 / math.sqrt(width))
        nn.init.normal_(self.experts.down_proj, std=1 / math.sqrt(inter))
        if self.fc1_latent_proj is not None:
            nn.init.normal_(self.fc1_latent_proj.weight, std=1 / math.sqrt(p.hidden_size))
            nn.init.normal_(self.fc2_latent_proj.weight, std=1 / math.sqrt(width))

    def forward(self, x: Tensor) -> Tensor:
        """``x [..., hidden]`` of the module's dtype -> output of the same shape and dtype."""
        p, dtype = self._problem, self.experts.up_proj.dtype
        if isinstance(x, Tensor) and x.dtype != dtype:
            raise TypeError(f"x: expected dtype {dtype} (the module's dtype), got {x.dtype}; "
                            f"cast it with .to({dtype})")
        fc1, fc2 = self.fc1_latent_proj, self.fc2_latent_proj
        return latent_moe(
            x, self.gate.weight, self.gate.e_score_correction_bias, self.experts.up_proj,
            self.experts.down_proj, top_k=p.top_k, activation=p.activation, scoring=p.scoring,
            n_group=p.n_group, topk_group=p.topk_group, norm_topk_prob=p.norm_topk_prob,
            routed_scaling_factor=p.routed_scaling_factor,
            fc1_latent_proj=None if fc1 is None else fc1.weight,
            fc2_latent_proj=None if fc2 is None else fc2.weight,
            topk_ids_hook=self.topk_ids_hook, backend=self.backend)

    def extra_repr(self) -> str:
        return f"{self.problem.key}, backend={self.backend!r}"

    @classmethod
    def from_hf_state_dict(cls, state_dict: dict[str, Tensor],
                           config: dict[str, Any] | str | os.PathLike, *,
                           dtype: torch.dtype = torch.bfloat16, device: Any = None,
                           backend: str = "auto", strict: bool = True) -> LatentMoE:
        """Build the layer from a Hugging Face ``NemotronHMoE`` state dict and its config.

        Parameters
        ----------
        state_dict : dict of str to Tensor
            One MoE block's tensors as they come: ``gate.weight``,
            ``gate.e_score_correction_bias``, ``fc1_latent_proj.weight``,
            ``fc2_latent_proj.weight`` and the experts, either stacked (``experts.up_proj``,
            ``experts.down_proj``) or per expert (``experts.{i}.up_proj.weight`` ``[I, width]``,
            ``experts.{i}.down_proj.weight`` ``[width, I]``; gated experts may split
            ``gate_proj``/``up_proj``). A prefix common to all keys (``model.layers.3.mixer.``)
            is stripped. ``shared_experts.*`` keys are ignored: the shared expert stays with
            the caller.
        config : dict or path of ``config.json``
            Read by :func:`autotune.problem.from_hf_config`.
        dtype, device, backend
            As in the constructor; the router stays fp32.
        strict : bool
            Missing required keys and unexpected keys raise; with ``False`` the missing ones
            keep the random init and unexpected ones are ignored (logged).

        Requirements
        ------------
        Tensor shapes match the config; a mismatch raises ``ValueError`` naming the key, the
        expected and the actual shape (also when not strict).
        """
        problem = from_hf_config(load_hf_config(config), dtype=dtype_name(dtype))
        tensors, missing = _hf_tensors(state_dict, problem, strict)
        p = problem
        module = cls(p.hidden_size, p.latent_size, p.intermediate_size, p.num_experts, p.top_k,
                     activation=p.activation, scoring=p.scoring, n_group=p.n_group,
                     topk_group=p.topk_group, norm_topk_prob=p.norm_topk_prob,
                     routed_scaling_factor=p.routed_scaling_factor, dtype=dtype,
                     device="meta", backend=backend)
        # Built on meta so Nemotron-sized layers skip a random init that is overwritten anyway.
        module = module.to_empty(device=torch.device("cpu") if device is None else device)
        if missing:
            module.reset_parameters()
        elif "gate.e_score_correction_bias" not in tensors:
            module.gate.e_score_correction_bias.zero_()
        module.load_state_dict(tensors, strict=False)
        return module


# ----------------------------------------------------------------------------- HF loading

_ROOTS = ("gate", "fc1_latent_proj", "fc2_latent_proj", "experts", "shared_experts")
_PER_EXPERT = re.compile(r"experts\.(\d+)\.(up_proj|down_proj|gate_proj)\.weight")


def _common_prefix(keys: list[str]) -> str:
    if not keys:
        return ""
    common = keys[0].split(".")[:-1]
    for key in keys[1:]:
        parts = key.split(".")[:-1]
        n = 0
        while n < min(len(common), len(parts)) and common[n] == parts[n]:
            n += 1
        common = common[:n]
    # The prefix ends before the block's own module names (one expert key alone shares
    # "experts.0.up_proj" with itself, which is not a prefix).
    for i, part in enumerate(common):
        if part in _ROOTS:
            common = common[:i]
            break
    return "".join(f"{part}." for part in common)


def _expected_shapes(p: LatentMoEProblem) -> dict[str, list[int]]:
    e, h, w, i = p.num_experts, p.hidden_size, p.expert_width, p.intermediate_size
    shapes = {"gate.weight": [e, h], "gate.e_score_correction_bias": [e],
              "experts.up_proj": [e, p.up_rows, w], "experts.down_proj": [e, w, i]}
    if p.latent_size is not None:
        shapes["fc1_latent_proj.weight"] = [w, h]
        shapes["fc2_latent_proj.weight"] = [h, w]
    return shapes


def _check_shape(key: str, t: Any, want: list[int]) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"state_dict[{key!r}]: expected a torch.Tensor, got {type(t).__name__}")
    if list(t.shape) != want:
        raise ValueError(f"state_dict[{key!r}]: expected shape {want}, got {list(t.shape)}")
    return t


def _hf_tensors(state_dict: dict[str, Tensor], p: LatentMoEProblem,
                strict: bool) -> tuple[dict[str, Tensor], list[str]]:
    if not isinstance(state_dict, dict):
        raise TypeError(f"state_dict: expected a dict of tensors, got "
                        f"{type(state_dict).__name__}")
    prefix = _common_prefix(list(state_dict))
    shapes = _expected_shapes(p)
    tensors: dict[str, Tensor] = {}
    per_expert: dict[tuple[int, str], tuple[str, Tensor]] = {}
    unexpected, ignored = [], []
    for full_key, t in state_dict.items():
        key = full_key[len(prefix):]
        match = _PER_EXPERT.fullmatch(key)
        if key.startswith("shared_experts."):
            ignored.append(full_key)
        elif match and int(match[1]) < p.num_experts:
            per_expert[(int(match[1]), match[2])] = (full_key, t)
        elif key in shapes:
            tensors[key] = _check_shape(full_key, t, shapes[key])
        else:
            unexpected.append(full_key)
    if ignored:
        logger.info("from_hf_state_dict: ignored %d shared_experts.* keys (the shared expert "
                    "stays with the caller)", len(ignored))
    missing = []
    if per_expert:
        missing, unused = _stack_experts(per_expert, p, prefix, tensors)
        unexpected += unused
    required = [k for k in shapes if k != "gate.e_score_correction_bias" or p.scoring == "sigmoid"]
    missing += [prefix + k for k in required if k not in tensors and not (
        per_expert and k.startswith("experts."))]
    if strict and (missing or unexpected):
        raise ValueError("state_dict: " + "; ".join(
            f"{what} keys: {_listing(keys)}" for what, keys in
            (("missing", missing), ("unexpected", unexpected)) if keys))
    if unexpected:
        logger.info("from_hf_state_dict: ignored unexpected keys %s", _listing(unexpected))
    return tensors, missing


def _listing(keys: list[str], limit: int = 12) -> str:
    more = f" ... and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def _stack_experts(per_expert: dict[tuple[int, str], tuple[str, Tensor]], p: LatentMoEProblem,
                   prefix: str, tensors: dict[str, Tensor]) -> tuple[list[str], list[str]]:
    """Stack per-expert weights into ``tensors``; return the missing and the unused keys."""
    for key in ("experts.up_proj", "experts.down_proj"):
        if key in tensors:
            raise ValueError(f"state_dict: has both {prefix}{key} and per-expert "
                             f"{prefix}experts.{{i}}.* keys; pass one layout")
    w, i = p.expert_width, p.intermediate_size
    split_gate = p.activation == "swiglu" and any(n == "gate_proj" for _, n in per_expert)
    parts = {"down_proj": [w, i]}
    parts.update({"gate_proj": [i, w], "up_proj": [i, w]} if split_gate
                 else {"up_proj": [p.up_rows, w]})
    missing = [f"{prefix}experts.{e}.{n}.weight" for e in range(p.num_experts) for n in parts
               if (e, n) not in per_expert]
    unused = [full_key for (_, n), (full_key, _) in per_expert.items() if n not in parts]
    if missing:
        return missing, unused
    got = {n: [_check_shape(*per_expert[(e, n)], want) for e in range(p.num_experts)]
           for n, want in parts.items()}
    up = (torch.cat([torch.stack(got["gate_proj"]), torch.stack(got["up_proj"])], dim=1)
          if split_gate else torch.stack(got["up_proj"]))
    tensors["experts.up_proj"] = up
    tensors["experts.down_proj"] = torch.stack(got["down_proj"])
    return [], unused
