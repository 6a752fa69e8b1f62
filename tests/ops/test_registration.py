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
    "js_competition_js": lambda: ((_fp64(3, 6, seed=1, scale=2), _fp64(3, 6, seed=2, scale=2)),
                                  lambda s, t: ops.js_competition(s, t, T=1.5, formula="js")),
    # exp underflows to 0 for most classes of these rows (fp64: logits/T below −745 or so).
    "js_competition_js_underflow": lambda: (
        (_fp64(2, 5, seed=1, scale=900), _fp64(2, 5, seed=2, scale=900)),
        lambda s, t: ops.js_competition(s, t, T=1.0, formula="js")),
    # One input needs a gradient: the backward computes only that one (student_grad/teacher_grad).
    "js_competition_js_detach_student": lambda: (
        (_fp64(3, 6, seed=2),),
        lambda t: ops.js_competition(_fp64(3, 6, seed=1), t, formula="js", detach_student=True)),
    "kd_loss": lambda: ((_fp64(3, 7, seed=1), _fp64(3, 7, seed=2)),
                        lambda s, t: ops.kd_loss(s, t, T=2.0)),
    "kd_loss_teacher_detached": lambda: (
        (_fp64(3, 7, seed=1),), lambda s: ops.kd_loss(s, _fp64(3, 7, seed=2), T=2.0)),
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


ROW_OPS = ("js_rows", "jsd_rows", "kd_rows")
# (student, teacher) dtypes: the kernels compute both in their promoted dtype, so the row values
# are fp32 for any pair of 16-bit dtypes and fp64 as soon as one side is fp64.
MIXED_DTYPES = [(torch.float16, torch.float32), (torch.bfloat16, torch.float32),
                (torch.float16, torch.bfloat16), (torch.float32, torch.float64),
                (torch.float64, torch.float32)]
GRAD_FLAGS = [(True, True), (True, False), (False, True)]


def _opcheck_args():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 5, 6, generator=g)
    c = torch.randn(3, generator=g)
    args = {
        "channel_stats": (x,),
        "channel_stats_backward": (x, c, c, c),
        "bn_stats_forward": (x, c, c, c, c.abs() + 1, 1e-5),
        "bn_stats_backward": (x, x, c, c, c, c, c.abs() + 1, 1e-5),
        "image_prior_sums": (x,),
        "image_prior_backward": (x, torch.randn(2, 4, generator=g), torch.randn(2, generator=g)),
    }
    for name in ROW_OPS:
        s, t = _logits(torch.float32, torch.float32)
        args[name] = (s, t, 3.0)
        args[name + "_backward"] = (torch.randn(3, generator=g), s, t, 3.0, True, True)
    return args


def _logits(student_dtype, teacher_dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(3, 7, generator=g).to(student_dtype),
            torch.randn(3, 7, generator=g).to(teacher_dtype))


def _with_grad(args, count):
    """args with the first `count` tensors requiring grad (opcheck then tests the autograd)."""
    return tuple(a.clone().requires_grad_(True) if i < count else a for i, a in enumerate(args))


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_opcheck(backend, name):
    op = getattr(_backends.primitives(backend), name).default
    args = _opcheck_args()[name]
    if name in ("channel_stats", "bn_stats_forward", "image_prior_sums") + ROW_OPS:
        args = _with_grad(args, 2 if name in ROW_OPS else 1)
    torch.library.opcheck(op, args)


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("dtypes", MIXED_DTYPES, ids=str)
@pytest.mark.parametrize("name", ROW_OPS)
def test_opcheck_row_ops_mixed_dtypes(backend, dtypes, name):
    """The fake kernels give the real kernels' dtypes for mixed student/teacher dtypes: rows in the
    acc dtype of the promoted dtype, each gradient in its own logits' dtype."""
    library = _backends.primitives(backend)
    s, t = _logits(*dtypes)
    torch.library.opcheck(getattr(library, name).default, _with_grad((s, t, 3.0), 2))
    rows = getattr(library, name)(s, t, 3.0)
    assert rows.dtype == (torch.float64 if torch.float64 in dtypes else torch.float32)
    for flags in GRAD_FLAGS:
        torch.library.opcheck(getattr(library, name + "_backward").default,
                              (torch.randn(3, dtype=rows.dtype), s, t, 3.0, *flags))


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("flags", GRAD_FLAGS, ids=str)
@pytest.mark.parametrize("name", ROW_OPS)
def test_row_backward_computes_only_the_gradients_asked_for(backend, flags, name):
    """A gradient not asked for is an empty tensor; the other is the one computed with both."""
    backward = getattr(_backends.primitives(backend), name + "_backward")
    s, t = _logits(torch.float32, torch.float32)
    grad_rows = torch.randn(3, generator=torch.Generator().manual_seed(1))
    both = backward(grad_rows, s, t, 2.0, True, True)
    opcheck_args = (grad_rows, s, t, 2.0, *flags)
    torch.library.opcheck(backward.default, opcheck_args)
    for wanted, got, full, logits in zip(flags, backward(*opcheck_args), both, (s, t)):
        assert got.dtype == logits.dtype
        if wanted:
            torch.testing.assert_close(got, full, rtol=0, atol=0)
        else:
            assert got.shape == (0,)


class _PrimitiveCalls(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the calls of dinv primitives (name -> args)."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace in ("dinv", "dinv_triton"):
            self.calls.append((func.__name__.split(".")[0], args))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("name", ROW_OPS)
def test_row_gradients_are_contiguous_for_strided_logits(backend, name):
    """Every backend writes the gradients contiguous, as the fake kernels say, whatever the
    logits' strides (here transposed and column-sliced)."""
    g = torch.Generator().manual_seed(3)
    s = torch.randn(7, 3, generator=g).t()
    t = torch.randn(3, 14, generator=g)[:, ::2]
    backward = getattr(_backends.primitives(backend), name + "_backward")
    args = (torch.randn(3, generator=g), s, t, 2.0, True, True)
    torch.library.opcheck(backward.default, args)
    for grad in backward(*args):
        assert grad.is_contiguous()


# loss of (s, t) -> (its row op, which gradients its backward is asked for)
NEEDED_GRADIENT_CASES = {
    "kd teacher detached": (lambda s, t: ops.kd_loss(s, t.detach()), "kd_rows", (True, False)),
    "js student detached": (lambda s, t: ops.js_competition(s, t, detach_student=True),
                            "js_rows", (False, True)),
    "jsd student detached": (lambda s, t: ops.js_competition(s, t, detach_student=True,
                                                             formula="js"),
                             "jsd_rows", (False, True)),
    "jsd both": (lambda s, t: ops.js_competition(s, t, formula="js"), "jsd_rows", (True, True)),
}


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("case", sorted(NEEDED_GRADIENT_CASES))
def test_autograd_asks_only_for_needed_gradients(backend, case):
    loss, row_op, wanted = NEEDED_GRADIENT_CASES[case]

    def run(name):
        s, t = (v.requires_grad_(True) for v in _logits(torch.float32, torch.float32, seed=2))
        with ops.use_backend(name), _PrimitiveCalls() as mode:
            loss(s, t).backward()
        return mode.calls, (s.grad, t.grad)

    calls, grads = run(backend)
    backward_flags = [tuple(args[-2:]) for name, args in calls if name == row_op + "_backward"]
    assert backward_flags == [wanted]
    _, reference_grads = run("reference")
    for needed, got, want in zip(wanted, grads, reference_grads):
        assert (got is not None) == needed and (want is not None) == needed
        if needed:
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


def test_cpp_and_triton_schemas_agree():
    reason = _backends.why_not("cpp", "channel_stats", [torch.empty(0)])
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


def _all_ops_loss(x, rm, rv, s, t):
    return (ops.bn_stat_loss(x, rm, rv) + sum(ops.image_prior(x))
            + sum(ops.bn_inversion(x, rv, rm, rm, rv, 1e-5)[0].flatten()[:3])
            + ops.js_competition(s, t) + ops.js_competition(s, t, formula="js")
            + ops.kd_loss(s, t))


# None: nothing forced (on CPU the compiled graph then traces the reference).
@pytest.mark.parametrize("backend", [None, "reference"] + [
    p for p in backend_params() if p.id.startswith("cpp")])
def test_compiles_without_graph_breaks(backend):
    """The ops compose with torch.compile (fake kernels): one graph, same values and grads."""
    loss = _all_ops_loss

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
def test_forced_backend_that_cannot_run_names_op_inputs_and_every_reason():
    s, t = torch.randn(4, 10, dtype=torch.float64), torch.randn(4, 10)
    with ops.use_backend("triton"), pytest.raises(ops.BackendUnavailable) as error:
        ops.js_competition(s, t, formula="js")
    message = str(error.value)
    assert "'triton'" in message and "jsd_rows" in message
    assert "(4, 10) float64 on cpu" in message and "(4, 10) float32 on cpu" in message
    for name in _backends.NAMES:
        reason = _backends.why_not(name, "jsd_rows", [s, t], forced_here=(name == "triton"))
        assert f"{name}: {reason or 'available'}" in message
    # Under the interpreter Triton runs CPU tensors when forced, but it has no fp64 kernels.
    assert ("float64" if _backends.triton_interpreting() else "CPU tensor") in message


def test_forced_cpp_on_a_device_without_kernels_raises():
    x = torch.empty(2, 3, 4, 4, device="meta")
    with ops.use_backend("cpp"), pytest.raises(ops.BackendUnavailable,
                                                match=r"channel_stats on \[\(2, 3, 4, 4\) "
                                                      r"float32 on meta\].*cpp: no kernels for "
                                                      r"device meta.*reference: available"):
        ops.channel_stats(x)


def test_why_not_is_per_op(monkeypatch):
    """An extension built from older sources lacks the newer primitives: only their ops fall back
    (and a forced cpp says which kernel is missing)."""
    x = torch.randn(3, 5)
    if _backends.why_not("cpp", "jsd_rows", [x]) is not None:
        pytest.skip(_backends.why_not("cpp", "jsd_rows", [x]))
    stale = {(p, key) for p, key in _backends._loaded["cpp_kernels"] if not p.startswith("jsd")}
    monkeypatch.setitem(_backends._loaded, "cpp_kernels", stale)
    assert "jsd_rows, jsd_rows_backward" in _backends.why_not("cpp", "jsd_rows", [x])
    assert _backends.why_not("cpp", "js_rows", [x]) is None
    assert _backends.select("jsd_rows", x, x) == "reference"
    assert _backends.select("js_rows", x, x) == "cpp"
    with ops.use_backend("cpp"), pytest.raises(ops.BackendUnavailable, match="rebuild"):
        ops.js_competition(x, x, formula="js")


def test_why_not_names_mixed_devices():
    reason = _backends.why_not("cpp", "kd_rows", [torch.randn(2, 3), torch.empty(2, 3,
                                                                                  device="meta")])
    assert "several devices (cpu, meta)" in reason


def test_unknown_op_names_the_ops():
    with pytest.raises(ValueError, match="channel_stats, bn_stats_forward"):
        ops.select("channel_statistics", torch.randn(2, 3))
    with pytest.raises(ValueError, match="unknown dinv op"):
        ops.explain(torch.randn(2, 3))


def test_env_var_forces_backend(monkeypatch):
    monkeypatch.setenv("DINV_BACKEND", "reference")
    assert ops.select("channel_stats", torch.randn(2, 3)) == "reference"
    monkeypatch.setenv("DINV_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="DINV_BACKEND"):
        ops.select("channel_stats", torch.randn(2, 3))


def test_auto_selection_on_cpu_prefers_cpp_and_explains():
    x = torch.randn(2, 3, 4, 4)
    report = ops.explain("channel_stats", x)
    assert list(report) == ["cpp", "triton", "reference"]
    expected = "cpp" if _backends.why_not("cpp", "channel_stats", [x]) is None else "reference"
    assert report[expected] == "selected"
    # Triton never takes CPU tensors unless forced, and says so.
    assert report["triton"] != "selected"
    if _backends._load("triton", _backends._import_triton)[0]:
        assert "CPU tensor" in report["triton"]


def test_compiling_on_cpu_selects_the_reference_unless_forced(monkeypatch):
    x = torch.randn(2, 3, 4, 4)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    for op in _backends.OPS:
        assert ops.select(op, x) == "reference"
    if _backends.why_not("cpp", "channel_stats", [x]) is None:
        assert "torch.compile" in ops.explain("channel_stats", x)["cpp"]
        with ops.use_backend("cpp"):
            assert ops.select("channel_stats", x) == "cpp"


def _compiled_primitives(backend):
    """The dinv primitives in the graph torch.compile captures of _all_ops_loss on CPU."""
    targets = []

    def capture(graph_module, example_inputs):
        targets.extend(str(node.target) for node in graph_module.graph.nodes
                       if node.op == "call_function")
        return graph_module.forward

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 6, 6, generator=g)
    s, t = torch.randn(2, 5, generator=g), torch.randn(2, 5, generator=g)
    torch._dynamo.reset()
    with ops.use_backend(backend):
        torch.compile(_all_ops_loss, fullgraph=True, backend=capture)(
            x, torch.zeros(3), torch.ones(3), s, t)
    # dynamo records the op packets (dinv.kd_rows) or overloads (dinv.kd_rows.default)
    return {target.split(".")[1] for target in targets if target.startswith("dinv")}


def test_compiled_cpu_graph_holds_the_reference_and_a_forced_backend_wins():
    """Under torch.compile on CPU the dispatcher traces the ops' torch formulations (Inductor fuses
    them with their neighbours) instead of calling the opaque C++ kernels; forcing cpp keeps
    them."""
    assert _compiled_primitives(None) == set()
    if _backends.why_not("cpp", "channel_stats", [torch.empty(0)]) is None:
        assert {"channel_stats", "bn_stats_forward", "image_prior_sums", "js_rows", "jsd_rows",
                "kd_rows"} == _compiled_primitives("cpp")


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
