"""LatentMoE and latent_moe on the CUTLASS backend, on the GPU."""

from __future__ import annotations

import logging

import pytest
import torch

from autotune import LatentMoE, latent_moe

pytestmark = pytest.mark.gpu

SUPER = dict(hidden_size=4096, latent_size=1024, intermediate_size=2688, num_experts=512,
             top_k=22, routed_scaling_factor=5.0)


def rel_err(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def module(backend="cutlass", **kw):
    torch.manual_seed(0)
    layer = LatentMoE(**{**SUPER, **kw}, device="cuda", backend=backend)
    with torch.no_grad():
        layer.gate.e_score_correction_bias.normal_(0, 0.05)
    return layer


@pytest.mark.parametrize("shape", [(77,), (2, 3, 5)])
def test_module_cutlass_matches_reference(shape):
    layer = module()
    x = torch.randn(*shape, 4096, device="cuda", dtype=torch.bfloat16)
    out = layer(x)
    layer.backend = "reference"
    ref = layer(x)
    assert out.shape == x.shape and rel_err(out, ref) <= 1e-2


def test_auto_runs_the_fused_path_on_sm90(caplog):
    from autotune import fused

    layer = module(backend="auto")
    fused._PREPARED.clear()
    x = torch.randn(8, 4096, device="cuda", dtype=torch.bfloat16)
    with caplog.at_level(logging.WARNING):
        layer(x)
    assert len(fused._PREPARED) == 1
    assert "runs the PyTorch reference" not in caplog.text


def test_auto_falls_back_with_one_reason_and_cutlass_raises(caplog):
    kw = dict(hidden_size=256, latent_size=100, intermediate_size=64, num_experts=8, top_k=2)
    layer = LatentMoE(**kw, device="cuda", backend="auto")
    x = torch.randn(4, 256, device="cuda", dtype=torch.bfloat16)
    with caplog.at_level(logging.WARNING):
        layer(x), layer(x)
    assert caplog.text.count("runs the PyTorch reference") == 1
    assert "multiple of 8" in caplog.text
    layer.backend = "cutlass"
    with pytest.raises(RuntimeError, match="multiple of 8"):
        layer(x)


def test_weight_update_is_seen():
    layer = module()
    x = torch.randn(16, 4096, device="cuda", dtype=torch.bfloat16)
    before = layer(x)
    with torch.no_grad():
        layer.experts.down_proj.mul_(2.0)
    after = layer(x)
    assert rel_err(after, 2 * before) <= 1e-2


@torch.no_grad()  # inference: the op has no autograd formula
def test_functional_compiles_fullgraph_and_callables_apply():
    layer = module()
    args = (layer.gate.weight, layer.gate.e_score_correction_bias, layer.experts.up_proj,
            layer.experts.down_proj)
    kw = dict(top_k=22, routed_scaling_factor=5.0, fc1_latent_proj=layer.fc1_latent_proj.weight,
              fc2_latent_proj=layer.fc2_latent_proj.weight, backend="cutlass")
    x = torch.randn(33, 4096, device="cuda", dtype=torch.bfloat16)
    eager = latent_moe(x, *args, **kw)
    compiled = torch.compile(lambda x: latent_moe(x, *args, **kw), fullgraph=True)(x)
    assert torch.equal(eager, compiled)
    mods = dict(kw, fc1_latent_proj=layer.fc1_latent_proj, fc2_latent_proj=layer.fc2_latent_proj)
    seen = []
    out = latent_moe(x, *args, **mods, topk_ids_hook=seen.append)
    assert rel_err(out, eager) <= 1e-2 and seen[0].shape == (33, 22)


def test_module_graph_capture():
    layer = module()
    x = torch.randn(64, 4096, device="cuda", dtype=torch.bfloat16)
    layer(x)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        layer(x)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = layer(x)
    x.copy_(torch.randn_like(x))
    g.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, layer(x))
