"""Every native backend against the pure-torch reference: forward values and input gradients, for
fp32/fp16/bf16, contiguous and channels_last, odd shapes. Truth is the reference evaluated in
fp64 on the same (already rounded) inputs; see `assert_no_worse_than_reference` for the rule."""
from __future__ import annotations

import pytest
import torch

from dinv import ops
from dinv.ops import _backends

from ._helpers import DTYPES, assert_no_worse_than_reference, backend_params

STAT_SHAPES = [(4, 3, 8, 8), (1, 1, 1, 1), (2, 1, 5, 5), (1, 3, 1, 1), (3, 5, 13, 17),
               (2, 2048, 2, 2), (2, 16, 7, 7), (8, 10), (4, 6, 9)]
TV_SHAPES = [(2, 3, 8, 8), (1, 1, 1, 1), (1, 2, 1, 5), (1, 2, 5, 1), (2, 3, 13, 17), (1, 3, 7, 7)]
LOGIT_SHAPES = [(4, 10), (1, 1), (3, 1000), (2, 5000)]
# The Triton interpreter runs kernels in numpy, program by program: keep its inputs small.
SMALL = {"triton": lambda shape: torch.Size(shape).numel() <= 20000}


def _inputs(shape, dtype, layout, seed, offset=0.5):
    g = torch.Generator().manual_seed(seed)
    # An offset mean makes the shifted/Welford statistics matter (naive E[x²]−E[x]² would lose).
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * 1.5 + offset).to(dtype)
    if layout == "channels_last" and x.dim() == 4:
        x = x.to(memory_format=torch.channels_last)
    if layout == "strided":  # every other column of a wider tensor: no dense layout at all
        x = torch.cat([x, x + 1], dim=-1).view(*shape[:-1], 2, shape[-1]).transpose(-1, -2)
        x = x.flatten(-2)[..., ::2]
    return x


def _check(backend, fn, inputs, differentiable):
    """fn(*inputs) under `backend` vs reference vs fp64 truth; grads w.r.t. `differentiable`."""
    def run(name, tensors):
        with ops.use_backend(name):
            args = [t if i in differentiable else (t.detach() if t is not None else None)
                    for i, t in enumerate(tensors)]
            wrapped = [a.detach().clone().requires_grad_(True) if i in differentiable else a
                       for i, a in enumerate(args)]
            out = fn(*wrapped)
            outs = out if isinstance(out, tuple) else (out,)
            g = torch.Generator().manual_seed(7)
            total = sum((o.double() * torch.randn(o.shape, generator=g, dtype=torch.float64)
                         .to(o.device)).sum() for o in outs)
            grads = torch.autograd.grad(total, [wrapped[i] for i in differentiable])
            return tuple(o.detach() for o in outs), grads

    value = run(backend, inputs)
    reference = run("reference", inputs)
    truth = run("reference", [t.double() if t is not None else None for t in inputs])
    for part in (0, 1):  # forward outputs, then input gradients
        assert_no_worse_than_reference(value[part], reference[part], truth[part], rtol=2e-5)
    for g in value[1]:
        assert g.dtype == inputs[differentiable[0]].dtype


def _skip_big(backend, shape):
    if backend in SMALL and not SMALL[backend](shape):
        pytest.skip(f"{backend} interpreter: shape {shape} too large for CPU tests")


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("shape", STAT_SHAPES, ids=str)
def test_bn_stat_loss(backend, dtype, layout, shape):
    _skip_big(backend, shape)
    if layout == "channels_last" and len(shape) != 4:
        pytest.skip("channels_last is 4-D")
    x = _inputs(shape, dtype, layout, seed=sum(shape))
    c = shape[1]
    rm, rv = torch.randn(c) * 0.3, torch.rand(c) + 0.5
    _check(backend, lambda x, rm, rv: ops.bn_stat_loss(x, rm, rv), [x, rm, rv], [0])
    _check(backend, ops.channel_stats, [x], [0])


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("shape", [(4, 3, 8, 8), (1, 1, 1, 1), (3, 5, 13, 17), (2, 64, 7, 7),
                                   (8, 10)], ids=str)
def test_bn_inversion(backend, dtype, layout, affine, shape):
    _skip_big(backend, shape)
    if layout == "channels_last" and len(shape) != 4:
        pytest.skip("channels_last is 4-D")
    x = _inputs(shape, dtype, layout, seed=3)
    c = shape[1]
    w, b = (torch.randn(c), torch.randn(c)) if affine else (None, None)
    rm, rv = torch.randn(c) * 0.3, torch.rand(c) + 0.5
    _check(backend, lambda x: ops.bn_inversion(x, w, b, rm, rv, 1e-5), [x], [0])


# Which priors the loss weights: the C++ backward skips the TV family whose weights are all 0.
PRIOR_WEIGHTS = {"all": (1.0, 1.0, 1.0), "tv_l2+l2": (0.0, 1.0, 1.0), "tv_l1": (1.0, 0.0, 0.0)}


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
@pytest.mark.parametrize("weights", sorted(PRIOR_WEIGHTS))
@pytest.mark.parametrize("shape", TV_SHAPES, ids=str)
def test_image_prior(backend, dtype, layout, weights, shape):
    x = _inputs(shape, dtype, layout, seed=11)
    w = PRIOR_WEIGHTS[weights]
    _check(backend, lambda x: tuple(wk * p for wk, p in zip(w, ops.image_prior(x)) if wk),
           [x], [0])


@pytest.mark.parametrize("backend", backend_params())
def test_tv_loss_is_the_image_prior_term(backend):
    x = _inputs((2, 3, 6, 7), torch.float32, "contiguous", seed=4)
    with ops.use_backend(backend):
        prior = ops.image_prior(x)
        assert torch.equal(ops.tv_loss(x, "l1"), prior.tv_l1)
        assert torch.equal(ops.tv_loss(x, "l2"), prior.tv_l2)
    torch.testing.assert_close(prior.l2, x.flatten(1).norm(dim=1).mean())


# The per-row losses: name -> loss of (s, t, T).
ROW_LOSSES = {
    "js_reference": lambda s, t, T: ops.js_competition(s, t, T=T),
    "js": lambda s, t, T: ops.js_competition(s, t, T=T, formula="js"),
    "kd": lambda s, t, T: ops.kd_loss(s, t, T=T),
}
ROW_LOSS_OPS = {"js_reference": "js_rows", "js": "jsd_rows", "kd": "kd_rows"}
# Which logits get gradients: both, or one (the backward then computes only that one).
ROW_GRADS = {"both": [0, 1], "student": [0], "teacher": [1]}


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", LOGIT_SHAPES, ids=str)
@pytest.mark.parametrize("T", [1.0, 3.0])
@pytest.mark.parametrize("loss", sorted(ROW_LOSSES))
def test_row_losses(backend, dtype, shape, T, loss):
    s = _inputs(shape, dtype, "contiguous", seed=5, offset=0.0) * 2.5
    t = _inputs(shape, dtype, "contiguous", seed=6, offset=0.0) * 2.5
    fn = ROW_LOSSES[loss]
    for differentiable in ROW_GRADS.values():
        _check(backend, lambda s, t: fn(s, t, T), [s, t], differentiable)


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("dtypes", [(torch.float16, torch.float32), (torch.bfloat16, torch.float32),
                                    (torch.float32, torch.float64), (torch.float64, torch.float16)],
                         ids=str)
@pytest.mark.parametrize("loss", sorted(ROW_LOSSES))
def test_row_losses_with_mixed_dtypes(backend, dtypes, loss):
    """Every backend computes in the acc dtype of the logits' promoted dtype: the loss has that
    dtype and the values of the reference, each gradient its own logits' dtype."""
    s = _inputs((3, 50), dtypes[0], "contiguous", seed=5, offset=0.0) * 2
    t = _inputs((3, 50), dtypes[1], "contiguous", seed=6, offset=0.0) * 2
    reason = _backends.why_not(backend, ROW_LOSS_OPS[loss], [s, t], forced_here=True)
    if reason:
        pytest.skip(f"{backend}: {reason}")
    results = {}
    for name in (backend, "reference"):
        s_, t_ = s.clone().requires_grad_(True), t.clone().requires_grad_(True)
        with ops.use_backend(name):
            value = ROW_LOSSES[loss](s_, t_, 2.0)
        results[name] = (value, *torch.autograd.grad(value, (s_, t_)))
    acc = torch.float64 if torch.float64 in dtypes else torch.float32
    for got, want, dtype in zip(results[backend], results["reference"], (acc,) + dtypes):
        assert got.dtype == want.dtype == dtype
        precision = torch.finfo(dtype).eps if dtype in (torch.float16, torch.bfloat16) else 1e-6
        torch.testing.assert_close(got, want, rtol=precision, atol=precision * 1e-2)


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("loss", sorted(ROW_LOSSES))
def test_rows_with_underflowing_probabilities(backend, dtype, loss):
    """Logits hundreds apart: exp underflows to 0 for most classes (the C++ kernels' polynomial exp
    flushes below FLT_MIN); the xlogy terms with a probability of 0 must give 0, not NaN."""
    g = torch.Generator().manual_seed(3)
    s = torch.randn(5, 37, generator=g, dtype=torch.float64) * 60
    t = torch.randn(5, 37, generator=g, dtype=torch.float64) * 60
    fn = ROW_LOSSES[loss]
    # Parity where three classes share each row's mass: the values and gradients stay O(1). (Where
    # the rows' supports are disjoint the true divergence saturates at ln 2 and its gradient is
    # below fp32's resolution of the O(1) terms it is the difference of.)
    s_top, t_top = s.clone(), t.clone()
    s_top[:, :3] = 400 + torch.randn(5, 3, generator=g, dtype=torch.float64)
    t_top[:, :3] = 400 + torch.randn(5, 3, generator=g, dtype=torch.float64)
    _check(backend, lambda s, t: fn(s, t, 1.0), [s_top.to(dtype), t_top.to(dtype)], [0, 1])
    for logits in ((s, t), (s_top, t_top)):
        s_, t_ = (v.to(dtype).requires_grad_(True) for v in logits)
        with ops.use_backend(backend):
            value = fn(s_, t_, 1.0)
            grads = torch.autograd.grad(value, (s_, t_))
        assert all(torch.isfinite(v).all() for v in (value, *grads))


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("formula", ["reference", "js"])
def test_js_detach_student_gives_no_student_gradient(backend, formula):
    s = torch.randn(4, 10, requires_grad=True)
    t = torch.randn(4, 10, requires_grad=True)
    with ops.use_backend(backend):
        ops.js_competition(s, t, detach_student=True, formula=formula).backward()
    assert s.grad is None and t.grad is not None and t.grad.abs().sum() > 0


@pytest.mark.parametrize("backend", backend_params())
def test_stat_loss_gradient_is_zero_not_nan_at_exact_match(backend):
    x = _inputs((4, 3, 5, 5), torch.float32, "contiguous", seed=1)
    mean, var = ops.channel_stats_reference(x)
    x.requires_grad_(True)
    with ops.use_backend(backend):
        loss = ops.bn_stat_loss(x, mean, var)
        (grad,) = torch.autograd.grad(loss, x)
    assert torch.isfinite(grad).all()
    assert loss.item() < 1e-5


@pytest.mark.parametrize("backend", backend_params())
def test_tv_gradient_finite_on_constant_image(backend):
    x = torch.ones(2, 3, 6, 6, requires_grad=True)
    with ops.use_backend(backend):
        (grad,) = torch.autograd.grad(sum(ops.image_prior(x)[:2]), x)
    assert torch.isfinite(grad).all() and grad.abs().max() == 0


def _device_of(param):
    return "cuda" if param.id.endswith("-cuda") else "cpu"


@pytest.mark.parametrize("backend,device", [
    pytest.param(p.values[0], _device_of(p), marks=p.marks, id=p.id)
    for p in backend_params() + backend_params("cuda")])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_non_finite_inputs_stay_non_finite(backend, device, bad):
    """A NaN/inf in the input makes exactly the reference's outputs non-finite (a teacher or
    image gone bad must surface, not be zeroed away by a select such as `q > 0 ? … : 0`)."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(3, 4, 5, 6, generator=g)
    x[1, 2, 3, 4] = bad
    s, t = torch.randn(3, 7, generator=g), torch.randn(3, 7, generator=g)
    t_bad, s_bad = t.clone(), s.clone()
    t_bad[1, 2] = bad
    s_bad[2, 5] = bad
    rm, rv = torch.zeros(4), torch.ones(4)
    cases = {
        "channel_stats": (ops.channel_stats, (x,)),
        "bn_stat_loss": (lambda x: ops.bn_stat_loss(x, rm.to(x.device), rv.to(x.device)), (x,)),
        "bn_inversion": (lambda x: ops.bn_inversion(x, rv.to(x.device), rm.to(x.device),
                                                    rm.to(x.device), rv.to(x.device), 1e-5), (x,)),
        "image_prior": (ops.image_prior, (x,)),
        "kd teacher": (ops.kd_loss, (s, t_bad)),
        "kd student": (ops.kd_loss, (s_bad, t)),
        "js teacher": (ops.js_competition, (s, t_bad)),
        "js student": (ops.js_competition, (s_bad, t)),
        "jsd teacher": (lambda s, t: ops.js_competition(s, t, formula="js"), (s, t_bad)),
        "jsd student": (lambda s, t: ops.js_competition(s, t, formula="js"), (s_bad, t)),
    }
    for name, (fn, args) in cases.items():
        args = [a.to(device) for a in args]
        with ops.use_backend(backend):
            got = fn(*args)
        with ops.use_backend("reference"):
            want = fn(*args)
        got = got if isinstance(got, tuple) else (got,)
        want = want if isinstance(want, tuple) else (want,)
        assert any((~torch.isfinite(w)).any() for w in want), name  # the case is not vacuous
        # Which entries are non-finite, not NaN vs inf: a Welford mean turns x = inf into NaN
        # (inf − inf in its update) where the reference's sum gives inf.
        for g_, w in zip(got, want):
            assert torch.equal(torch.isfinite(g_).cpu(), torch.isfinite(w).cpu()), (name, g_, w)


# -- on a GPU: the same parity for the CUDA kernels and Triton --------------------------------
@pytest.mark.parametrize("backend", backend_params("cuda"))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("shape", STAT_SHAPES + [(64, 256, 56, 56)], ids=str)
def test_bn_stat_loss_cuda(backend, dtype, layout, shape):
    if layout == "channels_last" and len(shape) != 4:
        pytest.skip("channels_last is 4-D")
    x = _inputs(shape, dtype, layout, seed=2).cuda()
    rm, rv = torch.randn(shape[1]).cuda() * 0.3, torch.rand(shape[1]).cuda() + 0.5
    _check(backend, lambda x, rm, rv: ops.bn_stat_loss(x, rm, rv), [x, rm, rv], [0])
    _check(backend, lambda x: ops.bn_inversion(x, rm * 0 + 1, rm, rm, rv, 1e-5), [x], [0])


@pytest.mark.parametrize("backend", backend_params("cuda"))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", TV_SHAPES + [(64, 3, 224, 224)], ids=str)
def test_image_prior_cuda(backend, dtype, shape):
    for layout in ("contiguous", "channels_last", "strided"):
        x = _inputs(shape, dtype, layout, seed=2).cuda()
        _check(backend, ops.image_prior, [x], [0])


@pytest.mark.parametrize("backend", backend_params("cuda"))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", LOGIT_SHAPES + [(256, 1000)], ids=str)
def test_rows_cuda(backend, dtype, shape):
    s = _inputs(shape, dtype, "contiguous", seed=5, offset=0.0).cuda() * 2
    t = _inputs(shape, dtype, "contiguous", seed=6, offset=0.0).cuda() * 2
    for loss in ROW_LOSSES.values():
        _check(backend, lambda s, t: loss(s, t, 3.0), [s, t], [0, 1])


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_ops_run_on_their_inputs_device_not_the_current_one(backend):
    """Inputs on cuda:1 while cuda:0 is current: the kernels run on cuda:1 (the C++ ops take a
    device guard, the Triton ops get one at registration)."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    x = _inputs((4, 8, 6, 6), torch.float32, "contiguous", seed=3).to("cuda:1")
    s, t = torch.randn(4, 10, device="cuda:1"), torch.randn(4, 10, device="cuda:1")
    with torch.cuda.device(0), ops.use_backend(backend):
        got = [*ops.channel_stats(x), *ops.image_prior(x), ops.kd_loss(s, t)]
    want = [*ops.channel_stats_reference(x), *ops.image_prior_reference(x),
            ops.kd_loss_reference(s, t)]
    for g, w in zip(got, want):
        assert g.device == x.device
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)
