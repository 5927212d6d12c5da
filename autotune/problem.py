"""The latent MoE problem: layer sizes, dtype, activation and routing, with presets.

A :class:`LatentMoEProblem` is the single description of a layer that every later stage keys on
(search space, tuning key, tuned tables, runtime dispatch). It holds sizes and routing choices,
never tensors.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, replace
from typing import Any

ACTIVATIONS = ("relu2", "swiglu")
SCORINGS = ("sigmoid", "softmax")
DTYPES = ("bfloat16", "float16", "float32")


def _check_positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value}")


def check_routing(num_experts: int, top_k: int, n_group: int, topk_group: int) -> None:
    """Validate the routing arguments; raise ``ValueError`` naming the argument that is wrong."""
    for name, value in (("num_experts", num_experts), ("top_k", top_k), ("n_group", n_group),
                        ("topk_group", topk_group)):
        _check_positive_int(name, value)
    if top_k > num_experts:
        raise ValueError(f"top_k ({top_k}) must be <= num_experts ({num_experts})")
    if num_experts % n_group:
        raise ValueError(f"num_experts ({num_experts}) must be divisible by n_group ({n_group})")
    if topk_group > n_group:
        raise ValueError(f"topk_group ({topk_group}) must be <= n_group ({n_group})")
    if top_k > topk_group * (num_experts // n_group):
        raise ValueError(
            f"top_k ({top_k}) exceeds the experts in the topk_group ({topk_group}) best groups "
            f"({topk_group * (num_experts // n_group)}); raise topk_group or lower top_k")


def check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    """Raise ``ValueError`` unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}; expected one of {', '.join(choices)}")


@dataclass(frozen=True)
class LatentMoEProblem:
    """Sizes and routing of one latent MoE layer.

    Parameters
    ----------
    hidden_size : int
        Width of the layer's input and output (the router's input width).
    latent_size : int or None
        Width the routed experts run at. ``None`` means no latent projections: a plain MoE at
        ``hidden_size``.
    intermediate_size : int
        Expert intermediate width I (``swiglu`` experts hold 2I up rows).
    num_experts, top_k : int
        Routed experts and experts chosen per token.
    activation : {"relu2", "swiglu"}
    scoring : {"sigmoid", "softmax"}
    n_group, topk_group : int
        Grouped top-k (DeepSeek-V3 style); 1 and 1 is plain top-k.
    norm_topk_prob : bool
        Renormalise the chosen weights to sum to one (before scaling).
    routed_scaling_factor : float
        Multiplies the routing weights.
    dtype : {"bfloat16", "float16", "float32"}
        Activation and weight dtype of the experts and projections.

    Requirements
    ------------
    Sizes are positive ints; ``top_k <= num_experts``; ``num_experts % n_group == 0``;
    ``topk_group <= n_group``. Violations raise ``ValueError``/``TypeError`` naming the field.
    """

    hidden_size: int
    latent_size: int | None
    intermediate_size: int
    num_experts: int
    top_k: int
    activation: str = "relu2"
    scoring: str = "sigmoid"
    n_group: int = 1
    topk_group: int = 1
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.0
    dtype: str = "bfloat16"

    def __post_init__(self) -> None:
        _check_positive_int("hidden_size", self.hidden_size)
        if self.latent_size is not None:
            _check_positive_int("latent_size", self.latent_size)
        _check_positive_int("intermediate_size", self.intermediate_size)
        check_routing(self.num_experts, self.top_k, self.n_group, self.topk_group)
        check_choice("activation", self.activation, ACTIVATIONS)
        check_choice("scoring", self.scoring, SCORINGS)
        check_choice("dtype", self.dtype, DTYPES)

    @property
    def expert_width(self) -> int:
        """Width the experts read and write: the latent width, or hidden without projections."""
        return self.hidden_size if self.latent_size is None else self.latent_size

    @property
    def up_rows(self) -> int:
        """Rows of one expert's up projection: I, or 2I for gated (swiglu) experts."""
        return 2 * self.intermediate_size if self.activation == "swiglu" else self.intermediate_size

    @property
    def key(self) -> str:
        """Procedural identity of the problem, used in tuning keys and file names."""
        latent = "none" if self.latent_size is None else str(self.latent_size)
        return (f"h{self.hidden_size}_l{latent}_i{self.intermediate_size}_e{self.num_experts}"
                f"_k{self.top_k}_g{self.n_group}x{self.topk_group}_{self.activation}"
                f"_{self.scoring}_{self.dtype}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def with_(self, **changes: Any) -> LatentMoEProblem:
        """A copy with some fields changed (validated again)."""
        return replace(self, **changes)


PRESETS: dict[str, LatentMoEProblem] = {
    "nemotron-3-super": LatentMoEProblem(
        hidden_size=4096, latent_size=1024, intermediate_size=2688, num_experts=512, top_k=22,
        activation="relu2", scoring="sigmoid", routed_scaling_factor=5.0),
    "nemotron-3-ultra": LatentMoEProblem(
        hidden_size=8192, latent_size=2048, intermediate_size=5120, num_experts=512, top_k=22,
        activation="relu2", scoring="sigmoid", routed_scaling_factor=5.0),
}
DEFAULT_PRESET = "nemotron-3-super"


def preset(name: str) -> LatentMoEProblem:
    """The named preset problem; ``ValueError`` listing the presets for an unknown name."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; expected one of {', '.join(PRESETS)}")
    return PRESETS[name]


def load_hf_config(config: dict[str, Any] | str | os.PathLike) -> dict[str, Any]:
    """A Hugging Face config as a dict, from a dict or a ``config.json`` path."""
    if isinstance(config, dict):
        return config
    if isinstance(config, (str, os.PathLike)):
        with open(config, encoding="utf-8") as f:
            return json.load(f)
    raise TypeError(f"config must be a dict or a path to config.json, got {type(config).__name__}")


def from_hf_config(config: dict[str, Any] | str | os.PathLike,
                   dtype: str = "bfloat16") -> LatentMoEProblem:
    """The problem of one MoE layer of a Hugging Face Nemotron-H style config.

    Parameters
    ----------
    config : dict or path
        A config dict or the path of a ``config.json``.
    dtype : str
        Dtype to run the layer in (checkpoints ship several).

    Requirements
    ------------
    The config has ``hidden_size``, ``moe_intermediate_size``, ``n_routed_experts`` and
    ``num_experts_per_tok``; ``moe_latent_size`` absent or null means no latent projections.
    A missing key raises ``ValueError`` naming it.
    """
    cfg = load_hf_config(config)
    required = ("hidden_size", "moe_intermediate_size", "n_routed_experts", "num_experts_per_tok")
    missing = [k for k in required if k not in cfg]
    if missing:
        raise ValueError(f"config is missing {', '.join(missing)} (a Nemotron-H MoE config.json "
                         "has them)")
    act = cfg.get("mlp_hidden_act", cfg.get("hidden_act", "relu2"))
    activation = "swiglu" if act in ("silu", "swiglu") else "relu2"
    return LatentMoEProblem(
        hidden_size=int(cfg["hidden_size"]),
        latent_size=(None if cfg.get("moe_latent_size") is None
                     else int(cfg["moe_latent_size"])),
        intermediate_size=int(cfg["moe_intermediate_size"]),
        num_experts=int(cfg["n_routed_experts"]),
        top_k=int(cfg["num_experts_per_tok"]),
        activation=activation,
        scoring=cfg.get("scoring_func", "sigmoid"),
        n_group=int(cfg.get("n_group", 1)),
        topk_group=int(cfg.get("topk_group", 1)),
        norm_topk_prob=bool(cfg.get("norm_topk_prob", True)),
        routed_scaling_factor=float(cfg.get("routed_scaling_factor", 1.0)),
        dtype=dtype,
    )
