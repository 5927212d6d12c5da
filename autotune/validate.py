"""Input checks shared by the reference, the public ops and the CUDA backends.

Every check raises ``TypeError`` (wrong kind of object or dtype) or ``ValueError`` (wrong shape,
device or routing choice) with a message that starts with the argument's name and says what was
expected, so a caller can fix the call without reading the source. The checks read shapes,
dtypes and devices only: no tensor data, hence no host synchronisation, and they trace cleanly
under ``torch.compile``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .problem import ACTIVATIONS, SCORINGS, check_choice, check_routing

BACKENDS = ("auto", "reference", "cutlass")
SUPPORTED_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_DTYPE_NAMES = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}


@dataclass(frozen=True)
class Sizes:
    """Layer sizes read off the argument shapes.

    ``width`` is the width the experts run at (the latent size, or hidden without projections);
    ``up_rows`` is I or 2I (gated experts).
    """

    hidden: int
    width: int
    intermediate: int
    num_experts: int
    up_rows: int


def dtype_name(dtype: torch.dtype) -> str:
    """The :class:`~autotune.problem.LatentMoEProblem` dtype string of a torch dtype.

    Requirements
    ------------
    ``dtype`` is a ``torch.dtype`` among bfloat16, float16 and float32; otherwise ``TypeError``
    (not a dtype) or ``ValueError`` (unsupported dtype).
    """
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype: expected a torch.dtype, got {type(dtype).__name__}")
    if dtype not in _DTYPE_NAMES:
        raise ValueError(f"dtype: expected one of {_names(SUPPORTED_DTYPES)}, got {dtype}")
    return _DTYPE_NAMES[dtype]


def _names(dtypes: tuple[torch.dtype, ...]) -> str:
    return ", ".join(str(d) for d in dtypes)


def check_tensor(name: str, value: Any) -> torch.Tensor:
    """Return ``value`` if it is a tensor; ``TypeError`` naming ``name`` otherwise."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(value).__name__}")
    return value


def projection_kind(name: str, proj: Any) -> str:
    """Classify a latent projection argument as ``"none"``, ``"tensor"`` or ``"callable"``.

    Requirements
    ------------
    ``proj`` is ``None``, a weight tensor or a callable (an ``nn.Module`` or a function);
    anything else raises ``TypeError`` naming ``name``.
    """
    if proj is None:
        return "none"
    if isinstance(proj, torch.Tensor):
        return "tensor"
    if callable(proj):
        return "callable"
    raise TypeError(f"{name}: expected None, a weight tensor or a callable, "
                    f"got {type(proj).__name__}")


def check_options(*, top_k: int, activation: str, scoring: str, n_group: int, topk_group: int,
                  num_experts: int, backend: str | None = None) -> None:
    """Routing, activation, scoring and (if given) backend choices; ``ValueError`` if invalid."""
    check_routing(num_experts, top_k, n_group, topk_group)
    check_choice("activation", activation, ACTIVATIONS)
    check_choice("scoring", scoring, SCORINGS)
    if backend is not None:
        check_choice("backend", backend, BACKENDS)


def _shape(t: torch.Tensor) -> list[int]:
    return list(t.shape)


def _check_weight_shapes(gate_weight: torch.Tensor, bias: torch.Tensor | None,
                         up_proj: torch.Tensor, down_proj: torch.Tensor,
                         activation: str) -> Sizes:
    if gate_weight.dim() != 2:
        raise ValueError(f"gate_weight: expected shape [num_experts, hidden], got "
                         f"{_shape(gate_weight)}")
    num_experts, hidden = gate_weight.shape
    if bias is not None and _shape(bias) != [num_experts]:
        raise ValueError(f"e_score_correction_bias: expected shape [{num_experts}] "
                         f"(num_experts), got {_shape(bias)}")
    if down_proj.dim() != 3 or down_proj.shape[0] != num_experts:
        raise ValueError(f"down_proj: expected shape [num_experts={num_experts}, width, "
                         f"intermediate], got {_shape(down_proj)}")
    _, width, inter = down_proj.shape
    up_rows = 2 * inter if activation == "swiglu" else inter
    if _shape(up_proj) != [num_experts, up_rows, width]:
        rows = "2*intermediate" if activation == "swiglu" else "intermediate"
        raise ValueError(f"up_proj: expected shape [{num_experts}, {up_rows}, {width}] "
                         f"([num_experts, {rows}, width] for {activation} experts, from "
                         f"down_proj {_shape(down_proj)}), got {_shape(up_proj)}")
    return Sizes(hidden=hidden, width=width, intermediate=inter, num_experts=num_experts,
                 up_rows=up_rows)


def _check_projection_shapes(sizes: Sizes, fc1: Any, fc2: Any, *,
                             require_hidden_output: bool) -> None:
    # Callable projections are opaque here; their outputs are checked once they have run.
    h, w = sizes.hidden, sizes.width
    if isinstance(fc1, torch.Tensor) and _shape(fc1) != [w, h]:
        raise ValueError(f"fc1_latent_proj: expected shape [{w}, {h}] ([latent, hidden]), "
                         f"got {_shape(fc1)}")
    if fc1 is None and w != h:
        raise ValueError(f"up_proj: last dimension must be hidden_size={h} when "
                         f"fc1_latent_proj is None (the experts read x directly), got {w}")
    if isinstance(fc2, torch.Tensor) and _shape(fc2) != [h, w]:
        raise ValueError(f"fc2_latent_proj: expected shape [{h}, {w}] ([hidden, latent]), "
                         f"got {_shape(fc2)}")
    if require_hidden_output and fc2 is None and w != h:
        raise ValueError(f"fc2_latent_proj: is None but the experts' width {w} (down_proj."
                         f"shape[1]) differs from hidden_size={h}; pass the [hidden, latent] "
                         "weight or a callable")


def _check_dtypes(x: torch.Tensor, named: dict[str, torch.Tensor | None]) -> None:
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"x: expected dtype among {_names(SUPPORTED_DTYPES)}, got {x.dtype}")
    for name, t in named.items():
        if t is None:
            continue
        # Hugging Face keeps the router in fp32 (_keep_in_fp32_modules_strict); allow both.
        if name in ("gate_weight", "e_score_correction_bias"):
            if t.dtype not in (torch.float32, x.dtype):
                raise TypeError(f"{name}: expected dtype torch.float32 or {x.dtype} (same as "
                                f"x), got {t.dtype}")
        elif t.dtype != x.dtype:
            raise TypeError(f"{name}: expected dtype {x.dtype} (same as x), got {t.dtype}")


def check_devices(x: torch.Tensor, named: dict[str, torch.Tensor | None]) -> None:
    """``ValueError`` naming the first tensor of ``named`` that is not on ``x``'s device."""
    for name, t in named.items():
        if t is not None and t.device != x.device:
            raise ValueError(f"{name}: on {t.device} but x is on {x.device}; move it with "
                             ".to(x.device)")


def check_latent_moe_args(x: Any, gate_weight: Any, e_score_correction_bias: Any, up_proj: Any,
                          down_proj: Any, *, top_k: int, activation: str, scoring: str,
                          n_group: int, topk_group: int, fc1_latent_proj: Any = None,
                          fc2_latent_proj: Any = None, backend: str | None = None,
                          check_dtypes: bool = True,
                          require_hidden_output: bool = True) -> Sizes:
    """Check the arguments of one latent MoE call and return the sizes they imply.

    Parameters
    ----------
    x, gate_weight, e_score_correction_bias, up_proj, down_proj, fc1_latent_proj, \
fc2_latent_proj
        As in :func:`autotune.ops.latent_moe`. Callable projections are not inspected here
        (their output is checked after they run, see :func:`check_projected`).
    top_k, activation, scoring, n_group, topk_group, backend
        Routing and dispatch choices; ``backend=None`` skips the backend check.
    check_dtypes : bool
        Whether to require the run-time dtype contract (the fp32 oracle accepts any float mix).
    require_hidden_output : bool
        Whether ``fc2_latent_proj=None`` requires the experts to run at hidden width (so the
        output has x's shape). The custom op relaxes this: its caller applies a callable fc2.

    Requirements
    ------------
    ``x`` is ``[..., hidden]``; ``gate_weight`` ``[E, hidden]`` (fp32 or x's dtype);
    ``e_score_correction_bias`` ``None`` or ``[E]`` (fp32 or x's dtype); ``up_proj``
    ``[E, I or 2I, width]`` and ``down_proj`` ``[E, width, I]`` of x's dtype; tensor
    projections ``[width, hidden]`` / ``[hidden, width]`` of x's dtype; all on x's device;
    routing as :func:`autotune.problem.check_routing`. Violations raise ``TypeError`` or
    ``ValueError`` whose message starts with the argument's name.
    """
    x = check_tensor("x", x)
    gate_weight = check_tensor("gate_weight", gate_weight)
    if e_score_correction_bias is not None:
        check_tensor("e_score_correction_bias", e_score_correction_bias)
    up_proj, down_proj = check_tensor("up_proj", up_proj), check_tensor("down_proj", down_proj)
    kinds = {name: projection_kind(name, p) for name, p in
             (("fc1_latent_proj", fc1_latent_proj), ("fc2_latent_proj", fc2_latent_proj))}
    check_choice("activation", activation, ACTIVATIONS)
    sizes = _check_weight_shapes(gate_weight, e_score_correction_bias, up_proj, down_proj,
                                 activation)
    check_options(top_k=top_k, activation=activation, scoring=scoring, n_group=n_group,
                  topk_group=topk_group, num_experts=sizes.num_experts, backend=backend)
    if x.dim() < 1 or x.shape[-1] != sizes.hidden:
        got = x.shape[-1] if x.dim() else "a 0-d tensor"
        raise ValueError(f"x: last dimension must be hidden_size={sizes.hidden}, got {got}")
    _check_projection_shapes(sizes, fc1_latent_proj, fc2_latent_proj,
                             require_hidden_output=require_hidden_output)
    tensors = {"gate_weight": gate_weight, "e_score_correction_bias": e_score_correction_bias,
               "up_proj": up_proj, "down_proj": down_proj}
    for name, kind in kinds.items():
        if kind == "tensor":
            tensors[name] = fc1_latent_proj if name == "fc1_latent_proj" else fc2_latent_proj
    if check_dtypes:
        _check_dtypes(x, tensors)
    check_devices(x, tensors)
    return sizes


def check_projected(name: str, out: Any, x: torch.Tensor, width: int,
                    check_dtype: bool = True) -> torch.Tensor:
    """Check the output of a callable projection: a tensor ``[..., width]`` like ``x``.

    Requirements
    ------------
    ``out`` is a tensor with x's leading dimensions, last dimension ``width``, x's device and
    (if ``check_dtype``) x's dtype; otherwise ``TypeError``/``ValueError`` naming ``name``.
    """
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"{name}: the callable must return a torch.Tensor, got "
                        f"{type(out).__name__}")
    want = [*x.shape[:-1], width]
    if _shape(out) != want:
        raise ValueError(f"{name}: the callable's output must have shape {want}, got "
                         f"{_shape(out)}")
    if check_dtype and out.dtype != x.dtype:
        raise TypeError(f"{name}: the callable's output must have dtype {x.dtype} (same as x), "
                        f"got {out.dtype}")
    if out.device != x.device:
        raise ValueError(f"{name}: the callable's output is on {out.device} but x is on "
                         f"{x.device}")
    return out

