"""The public API: LatentMoE, latent_moe and the autotune::latent_moe custom op, on the CPU."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import assert_close
from torch import nn

import autotune.ops as ops
from autotune.ops import LatentMoE, latent_moe
from autotune.problem import LatentMoEProblem
from autotune.reference import latent_moe_reference

pytestmark = pytest.mark.usefixtures("seed")

H, L, I, E, K = 48, 24, 40, 8, 2  # noqa: E741  (I is the paper's name for the expert width)
BF16 = torch.bfloat16


def make_module(latent=L, activation="relu2", dtype=BF16, **kw):
    m = LatentMoE(H, latent, I, E, K, activation=activation, dtype=dtype,
                  routed_scaling_factor=2.5, **kw)
    with torch.no_grad():
        m.gate.e_score_correction_bias.normal_(0, 0.3)
    return m


def functional_args(m):
    """The module's tensors and routing as latent_moe arguments."""
    p = m.problem
    args = (m.gate.weight, m.gate.e_score_correction_bias, m.experts.up_proj,
            m.experts.down_proj)
    kw = dict(top_k=p.top_k, activation=p.activation, scoring=p.scoring, n_group=p.n_group,
              topk_group=p.topk_group, norm_topk_prob=p.norm_topk_prob,
              routed_scaling_factor=p.routed_scaling_factor,
              fc1_latent_proj=None if m.fc1_latent_proj is None else m.fc1_latent_proj.weight,
              fc2_latent_proj=None if m.fc2_latent_proj is None else m.fc2_latent_proj.weight)
    return args, kw


# ----------------------------------------------------------------------------- module layout

@pytest.mark.parametrize("latent", [L, None])
@pytest.mark.parametrize("activation", ["relu2", "swiglu"])
def test_parameter_names_and_shapes(activation, latent):
    m = make_module(latent=latent, activation=activation)
    w = H if latent is None else latent
    rows = 2 * I if activation == "swiglu" else I
    expected = {"gate.weight": ([E, H], torch.float32),
                "experts.up_proj": ([E, rows, w], BF16),
                "experts.down_proj": ([E, w, I], BF16)}
    if latent is not None:
        expected["fc1_latent_proj.weight"] = ([latent, H], BF16)
        expected["fc2_latent_proj.weight"] = ([H, latent], BF16)
    got = {n: (list(p.shape), p.dtype) for n, p in m.named_parameters()}
    assert got == expected
    assert {n: (list(b.shape), b.dtype) for n, b in m.named_buffers()} == {
        "gate.e_score_correction_bias": ([E], torch.float32)}
    assert "gate.e_score_correction_bias" in m.state_dict()  # persistent
    if latent is None:
        assert m.fc1_latent_proj is None and m.fc2_latent_proj is None
    else:
        assert isinstance(m.fc1_latent_proj, nn.Linear) and m.fc1_latent_proj.bias is None
    assert m.problem == LatentMoEProblem(H, latent, I, E, K, activation=activation,
                                         routed_scaling_factor=2.5, dtype="bfloat16")
    assert m.topk_ids_hook is None


def test_fresh_module_has_zero_bias_and_nontrivial_output():
    m = LatentMoE(H, L, I, E, K)
    assert torch.count_nonzero(m.gate.e_score_correction_bias) == 0
    with torch.no_grad():
        out = m(torch.randn(16, H, dtype=BF16))
    assert out.float().std() > 0.05


# ----------------------------------------------------------------------------- forward paths

@pytest.mark.parametrize("latent", [L, None])
@pytest.mark.parametrize("activation", ["relu2", "swiglu"])
@pytest.mark.parametrize("dtype", [torch.float32, BF16, torch.float16], ids=str)
def test_module_functional_and_oracle_agree(dtype, activation, latent):
    m = make_module(latent=latent, activation=activation, dtype=dtype)
    x = torch.randn(2, 3, 5, H, dtype=dtype)
    args, kw = functional_args(m)
    with torch.no_grad():
        out = m(x)
        functional = latent_moe(x, *args, **kw)
        oracle = latent_moe_reference(x, *args, **kw)
    assert out.shape == x.shape and out.dtype == dtype
    assert torch.equal(out, functional) and torch.equal(out, oracle)


def test_tensor_path_goes_through_the_custom_op(monkeypatch):
    calls = []

    def spy(*args, **kw):
        calls.append(args)
        return torch.ops.autotune.latent_moe(*args, **kw)

    monkeypatch.setattr(ops, "latent_moe_op", spy)
    m = make_module()
    with torch.no_grad():
        m(torch.randn(4, H, dtype=BF16))
    assert len(calls) == 1


@pytest.mark.parametrize("lead", [(0,), (2, 0), (0, 3)])
def test_zero_tokens(lead):
    m = make_module()
    seen = []
    x = torch.randn(*lead, H, dtype=BF16)
    with torch.no_grad():
        assert m(x).shape == x.shape
        m.topk_ids_hook = seen.append
        assert m(x).shape == x.shape
    # documented choice: the hook is still called once, with an empty [0, top_k] tensor
    assert len(seen) == 1 and seen[0].shape == (0, K) and seen[0].dtype == torch.int64


def test_hook_attribute_sees_the_oracle_ids():
    m = make_module()
    x = torch.randn(30, H, dtype=BF16)
    seen, oracle_ids = [], []
    m.topk_ids_hook = seen.append
    args, kw = functional_args(m)
    with torch.no_grad():
        out = m(x)
        expected = latent_moe_reference(x, *args, **kw, topk_ids_hook=oracle_ids.append)
    assert torch.equal(out, expected)
    assert len(seen) == 1 and torch.equal(seen[0], oracle_ids[0])


class Counting(nn.Module):
    """Wraps a projection and counts its calls (a projection skipped on a path shows as 0)."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.calls = inner, 0

    def forward(self, x):
        self.calls += 1
        return self.inner(x)


@pytest.mark.parametrize("with_hook", [False, True])
@pytest.mark.parametrize("which", ["both", "fc1", "fc2"])
def test_callable_projections_are_applied_on_every_path(which, with_hook):
    m = make_module()
    fc1 = Counting(nn.Linear(H, L, dtype=BF16))  # with a bias: not fusable as a weight
    fc2 = Counting(nn.Sequential(nn.Linear(L, 64, dtype=BF16), nn.SiLU(),
                                 nn.Linear(64, H, dtype=BF16)))
    args, kw = functional_args(m)
    if which in ("both", "fc1"):
        kw["fc1_latent_proj"] = fc1
    if which in ("both", "fc2"):
        kw["fc2_latent_proj"] = fc2
    x = torch.randn(3, 11, H, dtype=BF16)
    seen = []
    with torch.no_grad():
        out = latent_moe(x, *args, **kw, topk_ids_hook=seen.append if with_hook else None)
        expected = latent_moe_reference(x, *args, **kw)
        without = latent_moe(x, *functional_args(m)[0], **functional_args(m)[1])
    assert out.shape == x.shape and out.dtype == BF16
    assert_close(out, expected, BF16)
    assert (out - without).abs().max() > 0.01  # the callables made a difference
    assert fc1.calls == (2 if which in ("both", "fc1") else 0)
    assert fc2.calls == (2 if which in ("both", "fc2") else 0)
    assert len(seen) == (1 if with_hook else 0)


# ----------------------------------------------------------------------------- bad input

def _bad_cases():
    def up_fp32(a, kw):
        a[3] = a[3].float()

    def fc1_fp32(a, kw):
        kw["fc1_latent_proj"] = kw["fc1_latent_proj"].float()

    def gate_fp16(a, kw):
        a[1] = a[1].half()

    def fc1_meta(a, kw):
        kw["fc1_latent_proj"] = kw["fc1_latent_proj"].to("meta")

    def up_meta(a, kw):
        a[3] = a[3].to("meta")

    def x_width(a, kw):
        a[0] = torch.randn(5, H - 8, dtype=BF16)

    def x_list(a, kw):
        a[0] = [[0.0] * H]

    def x_int(a, kw):
        a[0] = torch.zeros(5, H, dtype=torch.int64)

    def bias_shape(a, kw):
        a[2] = torch.zeros(E + 1)

    def up_rows(a, kw):
        kw["activation"] = "swiglu"

    def fc1_shape(a, kw):
        kw["fc1_latent_proj"] = kw["fc1_latent_proj"][:, :-1]

    def fc1_kind(a, kw):
        kw["fc1_latent_proj"] = 3

    def fc2_none(a, kw):
        kw["fc2_latent_proj"] = None

    def fc1_callable_width(a, kw):
        kw["fc1_latent_proj"] = nn.Linear(H, L + 1, dtype=BF16)

    def fc2_callable_width(a, kw):
        kw["fc2_latent_proj"] = nn.Linear(L, H + 1, dtype=BF16)

    def hook(a, kw):
        kw["topk_ids_hook"] = "print"

    def opt(**change):
        return lambda a, kw: kw.update(change)

    return [
        (x_width, ValueError, rf"x: last dimension must be hidden_size={H}, got {H - 8}"),
        (x_list, TypeError, "x: expected a torch.Tensor"),
        (x_int, TypeError, "x: expected dtype"),
        (up_fp32, TypeError, r"up_proj: expected dtype torch.bfloat16 \(same as x\), got "
                             r"torch.float32"),
        (fc1_fp32, TypeError, "fc1_latent_proj: expected dtype torch.bfloat16"),
        (gate_fp16, TypeError, "gate_weight: expected dtype torch.float32 or torch.bfloat16"),
        (fc1_meta, ValueError, r"fc1_latent_proj: on meta but x is on cpu; move it with "
                               r"\.to\(x\.device\)"),
        (up_meta, ValueError, "up_proj: on meta but x is on cpu"),
        (bias_shape, ValueError, "e_score_correction_bias: expected shape"),
        (up_rows, ValueError, "up_proj: expected shape"),
        (fc1_shape, ValueError, "fc1_latent_proj: expected shape"),
        (fc1_kind, TypeError, "fc1_latent_proj: expected None, a weight tensor or a callable"),
        (fc2_none, ValueError, "fc2_latent_proj: is None"),
        (fc1_callable_width, ValueError, "fc1_latent_proj: the callable's output"),
        (fc2_callable_width, ValueError, "fc2_latent_proj: the callable's output"),
        (hook, TypeError, "topk_ids_hook: expected a callable"),
        (opt(top_k=E + 1), ValueError, rf"top_k \({E + 1}\) must be <= num_experts \({E}\)"),
        (opt(n_group=2, topk_group=3), ValueError, r"topk_group \(3\) must be <= n_group"),
        (opt(n_group=3), ValueError, r"divisible by n_group \(3\)"),
        (opt(activation="gelu"), ValueError, "unknown activation 'gelu'"),
        (opt(scoring="tanh"), ValueError, "unknown scoring 'tanh'"),
        (opt(backend="triton"), ValueError, "unknown backend 'triton'"),
        (opt(top_k=0), ValueError, "top_k must be a positive int"),
    ]


BAD_CASES = _bad_cases()


@pytest.mark.parametrize("mutate,exc,match", BAD_CASES,
                         ids=[f"{i}-{c[2].split(':')[0][:24]}" for i, c in enumerate(BAD_CASES)])
def test_functional_rejects_bad_input(mutate, exc, match):
    m = make_module()
    args, kw = functional_args(m)
    a = [torch.randn(5, H, dtype=BF16), *args]
    mutate(a, kw)
    with pytest.raises(exc, match=match), torch.no_grad():
        latent_moe(*a, **kw)


@pytest.mark.parametrize("change,exc,match", [
    (dict(top_k=E + 1), ValueError, "top_k"),
    (dict(n_group=2, topk_group=3), ValueError, "topk_group"),
    (dict(n_group=3), ValueError, "n_group"),
    (dict(activation="gelu"), ValueError, "activation"),
    (dict(scoring="tanh"), ValueError, "scoring"),
    (dict(backend="triton"), ValueError, "backend"),
    (dict(dtype=torch.int32), ValueError, "dtype"),
    (dict(dtype="bf16"), TypeError, "dtype"),
])
def test_constructor_rejects_bad_arguments(change, exc, match):
    kw = dict(hidden_size=H, latent_size=L, intermediate_size=I, num_experts=E, top_k=K)
    kw.update(change)
    with pytest.raises(exc, match=match):
        LatentMoE(**kw)


def test_module_forward_rejects_bad_x():
    m = make_module()
    with pytest.raises(ValueError, match=rf"x: last dimension must be hidden_size={H}, got 40"):
        m(torch.randn(3, 40, dtype=BF16))
    with pytest.raises(TypeError, match="x: expected dtype torch.bfloat16"):
        m(torch.randn(3, H))


def test_cutlass_backend_is_a_clear_error_without_sm90():
    if torch.cuda.is_available() and torch.cuda.get_device_capability(0) == (9, 0):
        pytest.skip("an sm90 GPU is present")
    m = make_module(backend="cutlass")
    x = torch.randn(4, H, dtype=BF16)
    msg = "CUTLASS backend needs a CUDA GPU and the built kernels"
    with pytest.raises(RuntimeError, match=msg), torch.no_grad():
        m(x)
    m.topk_ids_hook = print
    with pytest.raises(RuntimeError, match=msg), torch.no_grad():
        m(x)
    args, kw = functional_args(make_module())
    with pytest.raises(RuntimeError, match=msg), torch.no_grad():
        latent_moe(x, *args, **kw, backend="cutlass")


def test_explicit_reference_backend():
    m = make_module(backend="reference")
    x = torch.randn(6, H, dtype=BF16)
    args, kw = functional_args(m)
    with torch.no_grad():
        assert torch.equal(m(x), latent_moe_reference(x, *args, **kw))


# ----------------------------------------------------------------------------- torch.compile

# torch's own import of dynamo trips its deprecated torch.jit.script_method; not ours to fix.
quiet_torch_jit = pytest.mark.filterwarnings(
    "ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")

def _compile_case(latent):
    m = make_module(latent=latent, dtype=torch.float32)
    args, kw = functional_args(m)

    def fn(x):
        return latent_moe(x, *args, **kw)

    return fn, torch.randn(2, 7, H)


@quiet_torch_jit
@pytest.mark.parametrize("latent", [L, None])
def test_compile_fullgraph_traces_the_custom_op(latent):
    torch._dynamo.reset()
    fn, x = _compile_case(latent)
    with torch.no_grad():
        compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
        torch.testing.assert_close(compiled(x), fn(x))


@quiet_torch_jit
@pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None,
                    reason="torch.compile's CPU (inductor) backend needs a C++ compiler")
def test_compile_inductor_cpu_matches_eager():
    torch._dynamo.reset()
    fn, x = _compile_case(L)
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(fn, fullgraph=True)(x), fn(x))


@quiet_torch_jit
def test_opcheck_custom_op():
    m = make_module(dtype=torch.float32)
    args, kw = functional_args(m)
    x = torch.randn(2, 5, H)
    op_args = (x, *args, kw["fc1_latent_proj"], kw["fc2_latent_proj"], None, K, "relu2",
               "sigmoid", 1, 1, True, 2.5, "auto")
    with torch.no_grad():
        torch.library.opcheck(torch.ops.autotune.latent_moe.default,
                              tuple(a.detach() if isinstance(a, torch.Tensor) else a
                                    for a in op_args),
                              test_utils=("test_schema", "test_faketensor",
                                          "test_aot_dispatch_static"))


# ----------------------------------------------------------------------------- HF loading

def hf_config(m, **extra):
    p = m.problem
    cfg = {"hidden_size": p.hidden_size, "moe_latent_size": p.latent_size,
           "moe_intermediate_size": p.intermediate_size, "n_routed_experts": p.num_experts,
           "num_experts_per_tok": p.top_k, "n_group": p.n_group, "topk_group": p.topk_group,
           "norm_topk_prob": p.norm_topk_prob,
           "routed_scaling_factor": p.routed_scaling_factor,
           "mlp_hidden_act": "silu" if p.activation == "swiglu" else "relu2"}
    cfg.update(extra)
    return cfg


def hf_state_dict(m, *, layout, prefix="", split_gate=False):
    """The module's weights as a NemotronHMoE block would store them (with a shared expert)."""
    sd = {"gate.weight": m.gate.weight.detach().clone(),
          "gate.e_score_correction_bias": m.gate.e_score_correction_bias.clone(),
          "fc1_latent_proj.weight": m.fc1_latent_proj.weight.detach().clone(),
          "fc2_latent_proj.weight": m.fc2_latent_proj.weight.detach().clone(),
          "shared_experts.up_proj.weight": torch.randn(64, H, dtype=BF16),
          "shared_experts.down_proj.weight": torch.randn(H, 64, dtype=BF16)}
    up, down = m.experts.up_proj.detach(), m.experts.down_proj.detach()
    if layout == "stacked":
        sd["experts.up_proj"], sd["experts.down_proj"] = up.clone(), down.clone()
    else:
        for e in range(up.shape[0]):
            if split_gate:
                sd[f"experts.{e}.gate_proj.weight"] = up[e, :I].clone()
                sd[f"experts.{e}.up_proj.weight"] = up[e, I:].clone()
            else:
                sd[f"experts.{e}.up_proj.weight"] = up[e].clone()
            sd[f"experts.{e}.down_proj.weight"] = down[e].clone()
    return {prefix + k: v for k, v in sd.items()}


@pytest.mark.parametrize("config_from", ["dict", "file"])
@pytest.mark.parametrize("prefix", ["", "model.layers.3.mixer."])
@pytest.mark.parametrize("layout", ["per_expert", "stacked"])
def test_from_hf_state_dict_round_trip(layout, prefix, config_from, tmp_path):
    m = make_module()
    cfg = hf_config(m)
    if config_from == "file":
        path = tmp_path / "config.json"
        path.write_text(json.dumps(cfg))
        cfg = str(path)
    loaded = LatentMoE.from_hf_state_dict(hf_state_dict(m, layout=layout, prefix=prefix), cfg)
    assert loaded.problem == m.problem
    assert loaded.gate.weight.dtype == torch.float32
    for key, value in m.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    x = torch.randn(9, H, dtype=BF16)
    with torch.no_grad():
        assert torch.equal(loaded(x), m(x))


def test_from_hf_state_dict_split_gated_experts():
    m = make_module(activation="swiglu")
    sd = hf_state_dict(m, layout="per_expert", split_gate=True)
    loaded = LatentMoE.from_hf_state_dict(sd, hf_config(m))
    assert torch.equal(loaded.experts.up_proj, m.experts.up_proj)


def test_from_hf_state_dict_dtype_and_device():
    m = make_module()
    loaded = LatentMoE.from_hf_state_dict(hf_state_dict(m, layout="stacked"), hf_config(m),
                                          dtype=torch.float32, device="cpu")
    assert loaded.experts.up_proj.dtype == torch.float32 and loaded.problem.dtype == "float32"
    assert loaded.gate.e_score_correction_bias.device.type == "cpu"


def _drop(key):
    return lambda sd: sd.pop(key)


def _set(key, value):
    return lambda sd: sd.__setitem__(key, value)


@pytest.mark.parametrize("edit,match", [
    (_drop("gate.weight"), r"missing keys: gate\.weight"),
    (_drop("fc2_latent_proj.weight"), r"missing keys: fc2_latent_proj\.weight"),
    (_drop("experts.3.down_proj.weight"), r"missing keys: experts\.3\.down_proj\.weight"),
    (_set("router.extra", torch.zeros(1)), r"unexpected keys: router\.extra"),
    (_set("experts.8.up_proj.weight", torch.zeros(I, L)), r"unexpected keys: experts\.8"),
    (_set("experts.up_proj", torch.zeros(E, I, L)), "both experts.up_proj and per-expert"),
])
def test_from_hf_state_dict_strict_errors(edit, match):
    m = make_module()
    sd = hf_state_dict(m, layout="per_expert")
    edit(sd)
    with pytest.raises(ValueError, match=match):
        LatentMoE.from_hf_state_dict(sd, hf_config(m))


@pytest.mark.parametrize("key,bad,match", [
    ("fc1_latent_proj.weight", torch.zeros(L, H + 1),
     rf"fc1_latent_proj\.weight'\]: expected shape \[{L}, {H}\], got \[{L}, {H + 1}\]"),
    ("experts.2.up_proj.weight", torch.zeros(I + 1, L),
     r"experts\.2\.up_proj\.weight'\]: expected shape"),
    ("gate.weight", torch.zeros(E, H - 1), r"gate\.weight'\]: expected shape"),
])
@pytest.mark.parametrize("strict", [True, False])
def test_from_hf_state_dict_shape_mismatch_names_the_key(key, bad, match, strict):
    m = make_module()
    sd = hf_state_dict(m, layout="per_expert", prefix="mixer.")
    sd["mixer." + key] = bad
    with pytest.raises(ValueError, match=match):
        LatentMoE.from_hf_state_dict(sd, hf_config(m), strict=strict)


def test_from_hf_state_dict_not_strict():
    m = make_module()
    sd = hf_state_dict(m, layout="stacked")
    sd.pop("fc2_latent_proj.weight")
    sd["something.else"] = torch.zeros(2)
    loaded = LatentMoE.from_hf_state_dict(sd, hf_config(m), strict=False)
    assert torch.equal(loaded.fc1_latent_proj.weight, m.fc1_latent_proj.weight)
    assert loaded.fc2_latent_proj.weight.float().std() > 0  # kept its random init


def test_from_hf_state_dict_plain_moe_and_softmax_without_bias():
    m = make_module(latent=None, scoring="softmax")
    sd = {"gate.weight": m.gate.weight.detach(), "experts.up_proj": m.experts.up_proj.detach(),
          "experts.down_proj": m.experts.down_proj.detach()}
    loaded = LatentMoE.from_hf_state_dict(sd, hf_config(m, scoring_func="softmax"))
    assert loaded.fc1_latent_proj is None
    assert torch.count_nonzero(loaded.gate.e_score_correction_bias) == 0
