"""Every native backend against the pure-torch reference: forward values and input gradients, for
fp32/fp16/bf16, contiguous and channels_last, odd shapes. Truth is the reference evaluated in
fp64 on the same (already rounded) inputs; see `assert_no_worse_than_reference` for the rule."""
from __future__ import annotations

import pytest
import torch

from dinv import ops

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


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", LOGIT_SHAPES, ids=str)
@pytest.mark.parametrize("T", [1.0, 3.0])
def test_js_competition(backend, dtype, shape, T):
    s = _inputs(shape, dtype, "contiguous", seed=5, offset=0.0) * 2
    t = _inputs(shape, dtype, "contiguous", seed=6, offset=0.0) * 2
    _check(backend, lambda s, t: ops.js_competition(s, t, T=T), [s, t], [0, 1])


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", LOGIT_SHAPES, ids=str)
@pytest.mark.parametrize("T", [1.0, 4.0])
def test_kd_loss(backend, dtype, shape, T):
    s = _inputs(shape, dtype, "contiguous", seed=8, offset=0.0) * 3
    t = _inputs(shape, dtype, "contiguous", seed=9, offset=0.0) * 3
    _check(backend, lambda s, t: ops.kd_loss(s, t, T=T), [s, t], [0, 1])


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rows_with_underflowing_probabilities(backend, dtype):
    """Logits 200 apart: exp underflows to 0 for most classes (the C++ kernels' polynomial exp
    flushes below FLT_MIN) and KD's xlogy terms with q_j = 0 must give 0, not NaN."""
    g = torch.Generator().manual_seed(3)
    s = (torch.randn(5, 37, generator=g, dtype=torch.float64) * 60).to(dtype)
    t = (torch.randn(5, 37, generator=g, dtype=torch.float64) * 60).to(dtype)
    _check(backend, lambda s, t: ops.kd_loss(s, t, T=1.0), [s, t], [0, 1])
    _check(backend, lambda s, t: ops.js_competition(s, t, T=1.0), [s, t], [0, 1])


@pytest.mark.parametrize("backend", backend_params())
def test_js_detach_student_gives_no_student_gradient(backend):
    s = torch.randn(4, 10, requires_grad=True)
    t = torch.randn(4, 10, requires_grad=True)
    with ops.use_backend(backend):
        ops.js_competition(s, t, detach_student=True).backward()
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
    _check(backend, lambda s, t: ops.js_competition(s, t), [s, t], [0, 1])
    _check(backend, lambda s, t: ops.kd_loss(s, t), [s, t], [0, 1])


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
