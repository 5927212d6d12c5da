"""The fused forward's plan and dispatch per architecture, without a GPU."""

from __future__ import annotations

import pytest
import torch

from autotune import fused
from autotune.problem import PRESETS
from autotune.space import KernelConfig, Sm80Config, Sm100Config, valid
from autotune.workload import default_plan

SUPER = PRESETS["nemotron-3-super"]
CUDA0 = torch.device("cuda", 0)


@pytest.fixture
def capability(monkeypatch):
    """Pretend the CUDA device has the given compute capability."""
    def set_to(cap):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: cap)
        fused.unsupported_reason.cache_clear()
        fused.unverified_reason.cache_clear()
    yield set_to
    fused.unsupported_reason.cache_clear()
    fused.unverified_reason.cache_clear()


@pytest.mark.parametrize("arch,cls", [("sm90", KernelConfig), ("sm80", Sm80Config),
                                      ("sm89", Sm80Config), ("sm100", Sm100Config)])
@pytest.mark.parametrize("tokens", [1, 300, 8192])
def test_default_plan_takes_the_arch_kernels_with_the_stage_epilogues(arch, cls, tokens):
    # What tuned_plan falls back to where no table applies.
    plan = default_plan(SUPER, tokens, arch)
    assert all(isinstance(c, cls) and c.arch == arch and valid(c, SUPER)
               for c in plan.configs())
    assert (plan.router.epilogue, plan.up.epilogue, plan.down.epilogue,
            plan.fc2.epilogue) == ("f32", "relu2", "identity", "identity")


def test_sm90_default_plan_is_the_layer_default():
    assert default_plan(SUPER, 64, "sm90") == default_plan(SUPER, 64)


@pytest.mark.parametrize("cap,arch,fragment", [
    ((8, 0), None, None),
    ((8, 9), None, None),
    ((10, 0), None, None),
    ((9, 0), "sm80", None),                # sm80 kernels through their PTX on Hopper
    ((8, 0), "sm90", "do not run on"),
    ((9, 0), "sm100", "do not run on"),
    ((7, 5), None, "no kernels for"),
])
def test_unsupported_reason_by_device_and_arch(capability, cap, arch, fragment):
    capability(cap)
    reason = fused.unsupported_reason(SUPER, CUDA0, arch)
    assert reason is None if fragment is None else fragment in reason


def test_auto_keeps_unverified_archs_on_the_reference(capability):
    capability((10, 0))
    reason = fused.unverified_reason(CUDA0)
    assert "sm100" in reason and "backend='cutlass' runs it" in reason
    for verified in ((9, 0), (8, 0), (8, 9)):
        capability(verified)
        assert fused.unverified_reason(CUDA0) is None
    assert fused.unverified_reason(torch.device("cpu")) is None
