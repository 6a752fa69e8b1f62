"""The native ops as torch ops: gradcheck in fp64, opcheck (schema, fake kernel, autograd
registration, AOT dispatch), composition with torch.compile, and the dispatch rules."""
from __future__ import annotations

import pytest
import torch

from dinv import ops
from dinv.ops import _backends
from dinv.ops._triton_ops import SCHEMAS

from ._helpers import backend_params


def _fp64(*shape, seed=0, scale=1.0, offset=0.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale + offset)


GRADCHECK_CASES = {
    "bn_stat_loss": lambda: ((_fp64(3, 4, 5, 5, offset=0.3),),
                             lambda x: ops.bn_stat_loss(x, torch.zeros(4), torch.ones(4))),
    "bn_stat_loss_channels_last": lambda: (
        (_fp64(2, 3, 4, 5).contiguous(memory_format=torch.channels_last),),
        lambda x: ops.bn_stat_loss(x, torch.zeros(3), torch.ones(3))),
    "channel_stats": lambda: ((_fp64(3, 4, 5, 5, offset=0.3),), ops.channel_stats),
    "bn_inversion": lambda: ((_fp64(2, 3, 4, 4),),
                             lambda x: ops.bn_inversion(x, _fp64(3, seed=1), _fp64(3, seed=2),
                                                        _fp64(3, seed=3), _fp64(3, seed=4).abs(),
                                                        1e-5)),
    # TV l1 is piecewise linear: gradcheck is exact away from d = 0, which random inputs avoid.
    "image_prior": lambda: ((_fp64(2, 2, 5, 6),), ops.image_prior),
    "image_prior_channels_last": lambda: (
        (_fp64(2, 3, 4, 5).contiguous(memory_format=torch.channels_last),), ops.image_prior),
    # Logits small enough that no probability sits on a clamp boundary.
    "js_competition": lambda: ((_fp64(3, 6, seed=1, scale=0.5), _fp64(3, 6, seed=2, scale=0.5)),
                               lambda s, t: ops.js_competition(s, t, T=3.0)),
    "kd_loss": lambda: ((_fp64(3, 7, seed=1), _fp64(3, 7, seed=2)),
                        lambda s, t: ops.kd_loss(s, t, T=2.0)),
}


@pytest.mark.parametrize("backend", ["reference"] + [
    p for p in backend_params() if p.id.startswith("cpp")])
@pytest.mark.parametrize("case", sorted(GRADCHECK_CASES))
def test_gradcheck_fp64(backend, case):
    inputs, fn = GRADCHECK_CASES[case]()
    inputs = tuple(t.requires_grad_(True) for t in inputs)

    def scalar(*args):
        out = fn(*args)
        return out if isinstance(out, torch.Tensor) else tuple(out)

    with ops.use_backend(backend):
        assert torch.autograd.gradcheck(scalar, inputs, eps=1e-6, atol=1e-5)


def _opcheck_args(dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 5, 6, generator=g).to(dtype)
    c = torch.randn(3, generator=g)
    s, t = torch.randn(3, 7, generator=g).to(dtype), torch.randn(3, 7, generator=g).to(dtype)
    return {
        "channel_stats": (x,),
        "channel_stats_backward": (x, c, c, c),
        "bn_stats_forward": (x, c, c, c, c.abs() + 1, 1e-5),
        "bn_stats_backward": (x, x, c, c, c, c, c.abs() + 1, 1e-5),
        "image_prior_sums": (x,),
        "image_prior_backward": (x, torch.randn(2, 4, generator=g), torch.randn(2, generator=g)),
        "js_rows": (s, t, 3.0),
        "js_rows_backward": (torch.randn(3, generator=g), s, t, 3.0),
        "kd_rows": (s, t, 4.0),
        "kd_rows_backward": (torch.randn(3, generator=g), s, t, 4.0),
    }


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_opcheck(backend, name):
    op = getattr(_backends.primitives(backend), name).default
    args = _opcheck_args()[name]
    if name in ("channel_stats", "bn_stats_forward", "image_prior_sums", "js_rows", "kd_rows"):
        differentiable = 2 if name in ("js_rows", "kd_rows") else 1
        args = tuple(a.clone().requires_grad_(True) if i < differentiable else a
                     for i, a in enumerate(args))
    torch.library.opcheck(op, args)


def test_cpp_and_triton_schemas_agree():
    reason = _backends.why_not("cpp", [torch.empty(0)])
    if reason:
        pytest.skip(reason)
    for name, schema in SCHEMAS.items():
        cpp = str(getattr(torch.ops.dinv, name).default._schema)
        assert cpp == f"dinv::{name}{schema}"


@pytest.mark.parametrize("backend", backend_params())
def test_ops_accept_any_layout_under_inductor(backend):
    """flexible_layout: Inductor passes its chosen strides (e.g. channels_last convolution outputs)
    instead of inserting copies to the eager strides before every op."""
    library = _backends.primitives(backend)
    for name in SCHEMAS:
        assert torch.Tag.flexible_layout in getattr(library, name).default.tags, name


@pytest.mark.parametrize("backend", ["reference"] + [
    p for p in backend_params() if p.id.startswith("cpp")])
def test_compiles_without_graph_breaks(backend):
    """The ops compose with torch.compile (fake kernels): one graph, same values and grads."""
    def loss(x, rm, rv, s, t):
        return (ops.bn_stat_loss(x, rm, rv) + sum(ops.image_prior(x))
                + ops.js_competition(s, t) + ops.kd_loss(s, t))

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 6, 6, generator=g, requires_grad=True)
    s = torch.randn(2, 5, generator=g, requires_grad=True)
    t = torch.randn(2, 5, generator=g, requires_grad=True)
    rm, rv = torch.zeros(3), torch.ones(3)
    torch._dynamo.reset()
    with ops.use_backend(backend):
        eager = loss(x, rm, rv, s, t)
        eager_grads = torch.autograd.grad(eager, (x, s, t))
        compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")(x, rm, rv, s, t)
        compiled_grads = torch.autograd.grad(compiled, (x, s, t))
    torch.testing.assert_close(compiled, eager)
    for a, b in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(a, b)


# -- dispatch -----------------------------------------------------------------------------------
def test_forced_backend_that_cannot_run_raises():
    with ops.use_backend("triton"), pytest.raises(ops.BackendUnavailable, match="triton"):
        if _backends.triton_interpreting():
            ops.channel_stats(torch.randn(2, 3, 4, 4, dtype=torch.float64))  # no fp64 in Triton
        else:
            ops.channel_stats(torch.randn(2, 3, 4, 4))


def test_env_var_forces_backend(monkeypatch):
    monkeypatch.setenv("DINV_BACKEND", "reference")
    assert ops.select(torch.randn(2, 3)) == "reference"
    monkeypatch.setenv("DINV_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="DINV_BACKEND"):
        ops.select(torch.randn(2, 3))


def test_auto_selection_on_cpu_prefers_cpp_and_explains():
    x = torch.randn(2, 3, 4, 4)
    report = ops.explain(x)
    assert list(report) == ["cpp", "triton", "reference"]
    expected = "cpp" if _backends.why_not("cpp", [x]) is None else "reference"
    assert report[expected] == "selected"
    # Triton never takes CPU tensors unless forced, and says so.
    assert report["triton"] != "selected"
    if _backends._load_triton()[0]:
        assert "CPU tensor" in report["triton"]


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="channel"):
        ops.bn_stat_loss(torch.randn(5), torch.zeros(5), torch.ones(5))
    with pytest.raises(ValueError, match="shape"):
        ops.bn_stat_loss(torch.randn(2, 3, 4, 4), torch.zeros(4), torch.ones(4))
    with pytest.raises(ValueError, match="N, C, H, W"):
        ops.tv_loss(torch.randn(3, 4, 4))
    with pytest.raises(ValueError, match="kind"):
        ops.tv_loss(torch.randn(1, 3, 4, 4), "l3")
    with pytest.raises(ValueError, match="one shape"):
        ops.js_competition(torch.randn(2, 5), torch.randn(2, 6))
