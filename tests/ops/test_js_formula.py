"""js_competition's formula="js": the true Jensen-Shannon divergence, on every backend, against
plain fp64 formulas of its value and gradient; and how it differs from the reference code's
clamped formula."""
from __future__ import annotations

import math

import pytest
import torch

from dinv import ops
from dinv.ops.js import _clamped_js_reference

from ._helpers import backend_params

BACKENDS = ["reference"] + backend_params()


def _logits(*shape, scale=1.0, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype)


def _js_rows_fp64(s, t, T):
    """JS(P‖Q) per row from its definition, in fp64 (no logs of 0 for these moderate logits)."""
    p, q = torch.softmax(s.double() / T, 1), torch.softmax(t.double() / T, 1)
    m = 0.5 * (p + q)
    return 0.5 * (p * (p / m).log()).sum(1) + 0.5 * (q * (q / m).log()).sum(1)


def _js_grads_fp64(s, t, T):
    """∂(mean over rows of JS)/∂s and /∂t by shared DESIGN's closed form:
    ∂JS/∂s_i = (1/2T)·P_i·(log(P_i/M_i) − Σ_j P_j log(P_j/M_j)), symmetric for t with Q."""
    p, q = torch.softmax(s.double() / T, 1), torch.softmax(t.double() / T, 1)
    m = 0.5 * (p + q)

    def grad(x):
        log_ratio = (x / m).log()
        return x * (log_ratio - (x * log_ratio).sum(1, keepdim=True)) / (2 * T) / s.shape[0]

    return grad(p), grad(q)


def _loss_and_grads(backend, s, t, T, formula="js"):
    s, t = s.clone().requires_grad_(True), t.clone().requires_grad_(True)
    with ops.use_backend(backend):
        loss = ops.js_competition(s, t, T=T, formula=formula)
    return (loss, *torch.autograd.grad(loss, (s, t)))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("T", [1.0, 3.0])
def test_value_and_gradient_are_the_closed_forms(backend, T):
    s, t = _logits(4, 30, scale=2, seed=1), _logits(4, 30, scale=2, seed=2)
    # fp64 where the backend has it (Triton: fp32, checked to fp32 accuracy)
    dtype = torch.float32 if backend == "triton" else torch.float64
    loss, ds, dt = _loss_and_grads(backend, s.to(dtype), t.to(dtype), T)
    want_ds, want_dt = _js_grads_fp64(s, t, T)
    tol = dict(rtol=1e-5, atol=1e-7) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(loss.double(), 1 - _js_rows_fp64(s, t, T).mean(), **tol)
    # loss = 1 − JS
    torch.testing.assert_close(ds.double(), -want_ds, **tol)
    torch.testing.assert_close(dt.double(), -want_dt, **tol)


@pytest.mark.parametrize("backend", BACKENDS)
def test_equal_logits_give_zero_divergence_and_unequal_ones_a_gradient(backend):
    s = _logits(3, 12, seed=3, dtype=torch.float32)
    loss, ds, dt = _loss_and_grads(backend, s, s.clone(), 3.0)
    assert abs(loss.item() - 1.0) < 1e-6
    assert ds.abs().max() < 1e-7 and dt.abs().max() < 1e-7
    loss, ds, dt = _loss_and_grads(backend, s, s + 0.3 * _logits(3, 12, seed=4,
                                                                  dtype=torch.float32), 3.0)
    assert 1e-4 < 1.0 - loss.item() < math.log(2.0)
    assert ds.abs().max() > 1e-5 and dt.abs().max() > 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_disjoint_distributions_reach_ln2(backend):
    s = torch.full((2, 6), -50.0)
    t = torch.full((2, 6), -50.0)
    s[:, 0] = t[:, 1] = 50.0
    loss, _, _ = _loss_and_grads(backend, s, t, 1.0)
    assert abs((1.0 - loss.item()) - math.log(2.0)) < 1e-6


@pytest.mark.parametrize("backend", BACKENDS)
def test_true_js_is_large_where_the_clamped_formula_is_near_zero_without_gradient(backend):
    """1000 classes, T = 3: every probability lies near or below the 0.01 clamp, so the reference
    code's formula gives a tiny (here negative) value that its clamp to [0, 1] turns into a loss
    of exactly 1 with a zero gradient; the true divergence is ~0.3 and has a gradient."""
    s = _logits(8, 1000, scale=4, seed=5, dtype=torch.float32)
    t = _logits(8, 1000, scale=4, seed=6, dtype=torch.float32)
    js_loss, js_ds, js_dt = _loss_and_grads(backend, s, t, 3.0, formula="js")
    clamped_loss, clamped_ds, clamped_dt = _loss_and_grads(backend, s, t, 3.0,
                                                           formula="reference")
    assert 0.2 < 1.0 - js_loss.item() < math.log(2.0)
    assert clamped_loss.item() == 1.0
    assert not clamped_ds.any() and not clamped_dt.any()
    assert js_ds.abs().max() > 1e-5 and js_dt.abs().max() > 1e-5
    # The unclamped reference-formula value is tiny, even negative: not a divergence.
    assert -0.1 < _clamped_js_reference(s, t, 3.0).item() < 0.01


def test_near_uniform_rows_clamp_every_probability():
    """K > 100 near-uniform: all of P, Q, M clamp to 0.01, the reference formula is exactly 0."""
    s, t = _logits(4, 1000, seed=7), _logits(4, 1000, seed=8)
    assert _clamped_js_reference(s, t, 3.0).item() == 0.0
    assert 1.0 - ops.js_competition_reference(s, t, 3.0, formula="js").item() > 0.01


def test_bad_formula_names_the_choices():
    s = torch.randn(2, 5)
    with pytest.raises(ValueError, match="'reference', 'js'.*'jsd'"):
        ops.js_competition(s, s, formula="jsd")
    with pytest.raises(ValueError, match="'reference', 'js'"):
        ops.js_competition_reference(s, s, formula="JS")
