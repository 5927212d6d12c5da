"""Shared test helpers: per-dtype tolerances, per-test seeding, and the ``gpu`` skip hook."""

from __future__ import annotations

import zlib

import pytest
import torch

# Relative Frobenius error allowed against the fp32 oracle, per activation dtype.
TOLERANCES = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 5e-3}


def rel_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """``||actual - expected||_F / ||expected||_F`` in float64 (0 for two empty tensors)."""
    a, e = actual.double(), expected.double()
    denom = e.norm().item()
    diff = (a - e).norm().item()
    return diff if denom == 0 else diff / denom


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    """Same shape and a relative Frobenius error within ``TOLERANCES[dtype]``."""
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    err = rel_error(actual, expected)
    assert err <= TOLERANCES[dtype], f"relative error {err:.3g} > {TOLERANCES[dtype]} ({dtype})"


@pytest.fixture
def seed(request) -> int:
    """Seed torch's global RNG from the test id: fresh inputs per test, reproducible runs."""
    value = zlib.crc32(request.node.nodeid.encode())
    torch.manual_seed(value)
    return value


def _has_sm90() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability(0) == (9, 0)


def pytest_collection_modifyitems(config, items):
    if _has_sm90():
        return
    skip = pytest.mark.skip(reason="needs an sm90 (compute capability 9.0) CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
