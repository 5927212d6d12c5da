"""Environment switches and the folders derived from them; every switch has the AUTOTUNE_ prefix.

- ``AUTOTUNE_CACHE_DIR``: built kernels, tuning journals, user-tuned tables
  (default ``$XDG_CACHE_HOME/autotune``, else ``~/.cache/autotune``).
- ``AUTOTUNE_CONFIG_DIR``: tuned tables that override the cache and the shipped ones (unset).
- ``AUTOTUNE_GENERATED_DIR``: where rendered CUDA sources go (``generated/`` of a checkout,
  else ``<cache>/generated``).
- ``AUTOTUNE_NVCC``: the nvcc executable (default ``$CUDA_HOME/bin/nvcc``, then ``PATH``).
- ``AUTOTUNE_JOBS``: parallel nvcc processes (default from cores and available memory).
- ``AUTOTUNE_LOG_LEVEL``: level of the "autotune" logger (default WARNING).
"""

from __future__ import annotations

import os
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
_CHECKOUT = PACKAGE_DIR.parent


def cache_dir() -> Path:
    """Root of the user cache (``AUTOTUNE_CACHE_DIR``, else ``$XDG_CACHE_HOME/autotune``)."""
    env = os.environ.get("AUTOTUNE_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "autotune"


def config_dir() -> Path | None:
    """Override folder of tuned tables (``AUTOTUNE_CONFIG_DIR``), or None."""
    env = os.environ.get("AUTOTUNE_CONFIG_DIR")
    return Path(env).expanduser() if env else None


def template_dir() -> Path:
    """The CUDA templates: ``templates/`` of a checkout, else the copy shipped in the wheel."""
    checkout = _CHECKOUT / "templates"
    if (checkout / "sm90_grouped_gemm.cu.j2").is_file():
        return checkout
    return PACKAGE_DIR / "templates"


def generated_dir() -> Path:
    """Where rendered sources go (``AUTOTUNE_GENERATED_DIR``, else ``generated/``)."""
    env = os.environ.get("AUTOTUNE_GENERATED_DIR")
    if env:
        return Path(env).expanduser()
    checkout = _CHECKOUT / "generated"
    if checkout.is_dir() and os.access(checkout, os.W_OK):
        return checkout
    return cache_dir() / "generated"
