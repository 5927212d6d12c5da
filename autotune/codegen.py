"""Render kernel configs into CUDA C++ from the Jinja templates.

Templates hold declarations and explicit instantiations only; this module turns a
:class:`~autotune.space.KernelConfig` into the strings they need. Rendering is pure (same config,
same text); writing is write-if-different so unchanged sources keep their timestamps.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import jinja2

from .arch import ARCHS
from .env import generated_dir, template_dir
from .space import (
    KernelConfig,
    RoutingConfig,
    Sm80Config,
    Sm100Config,
    invalid_reason,
    is_gemv,
)

_ELEMENT = {"bf16": "cutlass::bfloat16_t", "fp16": "cutlass::half_t"}
_CUDA_ELEMENT = {"bf16": "__nv_bfloat16", "fp16": "__half"}
_TEMPLATE = {"sm90": "sm90_grouped_gemm.cu.j2", "sm80": "sm80_grouped_gemm.cu.j2",
             "sm89": "sm80_grouped_gemm.cu.j2", "sm100": "sm100_grouped_gemm.cu.j2"}
# Must match enum EpilogueKind in templates/epilogues.cuh (every generation shares it).
_EPILOGUE_KIND = {"identity": "0", "relu2": "1", "f32": "2"}


def _environment() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(template_dir())),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        autoescape=False,
    )


def template_name(config: KernelConfig | Sm80Config | Sm100Config | RoutingConfig) -> str:
    """File name of the template that renders ``config``."""
    if isinstance(config, RoutingConfig):
        return "moe_routing.cu.j2"
    if is_gemv(config):
        return "gemv.cu.j2"
    if config.arch not in _TEMPLATE:
        raise ValueError(f"no template for arch {config.arch!r}; have {', '.join(_TEMPLATE)}")
    return _TEMPLATE[config.arch]


def context(config: KernelConfig | Sm80Config | Sm100Config | RoutingConfig) -> dict[str, str]:
    """The template variables of ``config``, already stringified for C++."""
    # The routing and gemv launches start early where the library's code can wait (pdl.cuh).
    pdl = "true" if ARCHS[config.arch].pdl else "false"
    if isinstance(config, RoutingConfig):
        return {"name": config.name, "element": _CUDA_ELEMENT[config.dtype], "pdl": pdl}
    if is_gemv(config):
        return {"name": config.name, "element": _CUDA_ELEMENT[config.dtype], "pdl": pdl,
                # gemv.cuh runs 4 warps per work item; 8-row items are dealt round-robin to
                # register-fed warps, larger ones stream through shared memory (its two
                # schedules, "items" and "bulk").
                "rows_per_warp": str(config.tile_m // 4), "max_m": str(config.tile_n),
                "epilogue": _EPILOGUE_KIND[config.epilogue],
                "bulk": "true" if config.tile_m > 8 else "false"}
    if isinstance(config, Sm80Config):
        return {"name": config.name, "element": _ELEMENT[config.dtype],
                "epilogue": _EPILOGUE_KIND[config.epilogue],
                **{k: str(getattr(config, k))
                   for k in ("tb_m", "tb_n", "tb_k", "warp_m", "warp_n", "stages")}}
    common = {
        "name": config.name,
        "element": _ELEMENT[config.dtype],
        "tile_m": str(config.tile_m),
        "tile_n": str(config.tile_n),
        "tile_k": str(config.tile_k),
        "cluster_m": str(config.cluster_m),
        "cluster_n": str(config.cluster_n),
        "swap_ab": "true" if config.swap_ab else "false",
        "epilogue": _EPILOGUE_KIND[config.epilogue],
    }
    if isinstance(config, Sm100Config):
        return {**common, "two_sm": "true" if config.schedule == "2sm" else "false"}
    return {**common, "cooperative": "true" if config.schedule == "cooperative" else "false"}


def render(config: KernelConfig | Sm80Config | Sm100Config | RoutingConfig) -> str:
    """The CUDA source of ``config``.

    Requirements
    ------------
    ``config`` passes :func:`~autotune.space.invalid_reason` (else ``ValueError`` with the reason).
    """
    reason = invalid_reason(config)
    if reason:
        raise ValueError(f"config {config.name} is invalid: {reason}")
    return _environment().get_template(template_name(config)).render(**context(config))


def template_files() -> list[Path]:
    """Every template file (sources and headers)."""
    root = template_dir()
    return sorted(p for p in root.iterdir() if p.suffix in (".j2", ".cuh", ".cu"))


# A quoted C++ include or a Jinja include/import/extends: how one template pulls in another.
_INCLUDE = re.compile(r'#include\s+"([^"]+)"|\{%-?\s*(?:include|import|from|extends)\s+'
                      r'["\']([^"\']+)["\']')


def template_closure(name: str) -> list[Path]:
    """The template file ``name`` and every template file it includes, transitively (names that
    are not in the template folder, such as CUTLASS headers, are left to their own hash)."""
    root = template_dir()
    seen: set[str] = set()
    todo = [name]
    while todo:
        n = todo.pop()
        if n in seen or not (root / n).is_file():
            continue
        seen.add(n)
        todo += [a or b for a, b in _INCLUDE.findall((root / n).read_text())]
    return sorted(root / n for n in seen)


def templates_hash(config: KernelConfig | Sm80Config | Sm100Config | RoutingConfig) -> str:
    """Hash of the template files that ``config``'s source is made of (a change to the routing
    templates leaves the GEMM libraries' keys alone, and the other way round)."""
    h = hashlib.sha256()
    for p in template_closure(template_name(config)):
        h.update(p.name.encode())
        h.update(p.read_bytes())
    return h.hexdigest()


def write_source(config: KernelConfig | Sm80Config | Sm100Config | RoutingConfig,
                 out_dir: Path | None = None) -> Path:
    """Render ``config`` into ``out_dir/<name>.cu`` (default :func:`generated_dir`).

    The file is rewritten only when its text changes, through a temporary file and
    ``os.replace`` so a reader never sees half a source.
    """
    out_dir = Path(out_dir) if out_dir is not None else generated_dir()
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{config.name}.cu"
    text = render(config)
    if path.is_file() and path.read_text(encoding="utf-8") == text:
        return path
    tmp = path.with_suffix(f".cu.tmp{hashlib.sha1(text.encode()).hexdigest()[:8]}")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
    return path
