"""dinv.Inverter: the loss against the reference formulas, the reference's constructor and
generate_batch, reproducibility, leaving the teacher as it was, errors, and data export."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import dinv
from benchmarks.reference import reference_loss
from dinv.augment import view_indices
from dinv.inverter import InversionDiverged, cosine_lr, stages_for
from dinv.model_utils import frozen


def tiny_net(classes=5, channels=3, seed=0):
    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Conv2d(channels, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, stride=2), nn.BatchNorm2d(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 16), nn.BatchNorm1d(16),
        nn.Linear(16, classes))
    # Non-trivial running statistics, as a trained network has.
    for m in net.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    return net.eval()


COEF = dict(r_feature=0.05, first_bn_multiplier=10.0, tv_l1=0.3, tv_l2=1e-3, l2=1e-4, lr=0.1,
            main_loss_multiplier=0.7, adi_scale=0.0)


@pytest.mark.parametrize("fused_bn", [False, True])
@pytest.mark.parametrize("adi", [False, True])
def test_loss_and_gradient_match_the_reference_formulas(fused_bn, adi):
    net = tiny_net()
    student = tiny_net(seed=3) if adi else None
    coef = dict(COEF, adi_scale=0.5 if adi else 0.0)
    inv = dinv.Inverter(net, image_shape=(3, 12, 12), fused_bn=fused_bn, competition="reference",
                        **coef)
    targets = torch.tensor([0, 1, 2, 3, 4, 0])
    x = torch.randn(6, 3, 12, 12, generator=torch.Generator().manual_seed(1))
    mine = x.clone().requires_grad_(True)
    with frozen(net, student), inv.statistics:
        view = view_indices(12, 12, 0, 0, False)
        loss, _, _ = inv._loss(mine, view, None, targets, student, factor=1)
    (grad,) = torch.autograd.grad(loss, mine)
    theirs = x.clone().requires_grad_(True)
    with frozen(net, student):
        expected = reference_loss(net, theirs, targets, coef, student)
    (expected_grad,) = torch.autograd.grad(expected, theirs)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-4, atol=1e-6)


def test_schedule_and_stages():
    assert stages_for(0) == [(2, 2000), (1, 1000)]
    assert stages_for(1) == [(1, 2000)]
    assert stages_for(2) == [(1, 20000)]
    assert stages_for(0, 30) == [(2, 20), (1, 10)]
    assert stages_for(0, (0, 7)) == [(1, 7)]
    # Warm-up to the base rate over 100 iterations, then cosine to ~0.
    assert cosine_lr(0.2, 0, 2000) == pytest.approx(0.002)
    assert cosine_lr(0.2, 99, 2000) == pytest.approx(0.2)
    assert cosine_lr(0.2, 1999, 2000) < 1e-5


def test_same_seed_same_images_other_seed_other_images():
    net = tiny_net()
    inv = dinv.Inverter(net, image_shape=(3, 8, 8), jitter=2)
    a = inv.invert([0, 1, 2], iterations=6, seed=3)
    b = inv.invert([0, 1, 2], iterations=6, seed=3)
    c = inv.invert([0, 1, 2], iterations=6, seed=4)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


@pytest.mark.slow
def test_compiled_step_matches_eager():
    """compile=True (on CPU: the ops' torch formulations inside one Inductor graph) synthesizes
    the images of the eager C++ path, with no graph break. Slow: one CPU compilation."""
    from torch._dynamo.utils import counters

    net = tiny_net()
    eager = dinv.Inverter(net, image_shape=(3, 8, 8), jitter=2).invert([0, 1, 2], iterations=4,
                                                                       seed=5)
    torch._dynamo.reset()
    counters.clear()
    compiled = dinv.Inverter(net, image_shape=(3, 8, 8), jitter=2, compile=True).invert(
        [0, 1, 2], iterations=4, seed=5)
    assert not counters["graph_break"]
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-4)


class _ScalarReads(TorchDispatchMode):
    """Counts reads of a tensor's value by the host (.item(), float(t), bool(t), `if t:`): on a
    GPU each one waits for every queued kernel."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.is_nonzero.default):
            self.count += 1
        return func(*args, **(kwargs or {}))


def _host_syncs(inv, iterations, **kwargs):
    """Host reads of device values in one invert call; on CUDA also the synchronizing copies
    that torch.cuda's sync debug mode reports."""
    import warnings

    with warnings.catch_warnings(record=True) as caught, _ScalarReads() as reads:
        warnings.simplefilter("always")
        if inv.device.type == "cuda":
            torch.cuda.set_sync_debug_mode("warn")
        try:
            inv.invert([0, 1, 2, 3], iterations=iterations, seed=0, **kwargs)
        finally:
            if inv.device.type == "cuda":
                torch.cuda.set_sync_debug_mode("default")
    return reads.count + sum("synchroniz" in str(w.message) for w in caught)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
@pytest.mark.parametrize("options", [dict(fused_bn=False), dict(fused_bn=True),
                                     dict(fused_bn=True, adi_scale=0.5),
                                     dict(fused_bn=True, amp_dtype=torch.float16)],
                         ids=["hooks", "fused-bn", "adi", "fp16"])
def test_no_host_sync_between_logged_iterations(device, options):
    """The iteration loop never makes the host wait for the device: best-image tracking, NaN
    detection, the learning-rate schedule, the jitter indices, the optimizer step and (fp16)
    the loss scaler stay on the device, and values are read only every `log_every` iterations.
    So the reads in a call do not grow with its iterations (only the last one is logged)."""
    net = tiny_net().to(device)
    student = tiny_net(seed=3).to(device) if options.get("adi_scale") else None
    inv = dinv.Inverter(net, image_shape=(3, 8, 8), jitter=2, log_every=1000, **options)
    _host_syncs(inv, 1, student=student)  # one-time copies (cached per shape) happen here
    short = _host_syncs(inv, 3, student=student)
    long = _host_syncs(inv, 9, student=student)
    assert short > 0  # the counter sees the final log's reads
    assert long == short


def _teacher_state(net):
    return ({k: v.clone() for k, v in net.state_dict().items()},
            [m.training for m in net.modules()], [p.requires_grad for p in net.parameters()])


def _assert_untouched(net, before):
    state, modes, flags = before
    after = net.state_dict()
    assert all(torch.equal(state[k], after[k]) for k in state)
    assert [m.training for m in net.modules()] == modes
    assert [p.requires_grad for p in net.parameters()] == flags
    for m in net.modules():
        assert not m._forward_hooks and not m._forward_pre_hooks
        assert "forward" not in m.__dict__
        assert all(p.grad is None for p in m.parameters(recurse=False))


@pytest.mark.parametrize("fused_bn", [False, True])
def test_teacher_left_exactly_as_it_was(fused_bn):
    net = tiny_net()
    net.train()  # a teacher handed over in train mode comes back in train mode
    net[0].weight.requires_grad_(False)
    before = _teacher_state(net)
    with dinv.Inverter(net, image_shape=(3, 8, 8), fused_bn=fused_bn) as inv:
        inv.invert([1, 2], iterations=3, seed=0)
    _assert_untouched(net, before)


def test_teacher_restored_after_divergence_and_best_images_kept():
    net = tiny_net()
    before = _teacher_state(net)
    calls = {"n": 0}

    def criterion(logits, targets):
        calls["n"] += 1
        loss = F.cross_entropy(logits, targets)
        return loss * float("nan") if calls["n"] >= 5 else loss

    inv = dinv.Inverter(net, image_shape=(3, 8, 8), criterion=criterion, log_every=3)
    with pytest.raises(InversionDiverged) as caught:
        inv.invert([0, 1], iterations=20, seed=0)
    assert caught.value.iteration == 5
    assert torch.isfinite(caught.value.images).all()
    assert "iteration 5" in str(caught.value)
    _assert_untouched(net, before)


def test_clear_errors():
    with pytest.raises(ValueError, match="no BatchNorm"):
        dinv.Inverter(nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten()), image_shape=(3, 8, 8))
    inv = dinv.Inverter(tiny_net(classes=5), image_shape=(3, 8, 8))
    with pytest.raises(ValueError, match="5 outputs"):
        inv.invert([0, 7], iterations=2)
    with pytest.raises(ValueError, match=">= 0"):
        inv.invert([-1], iterations=2)
    with pytest.raises(ValueError, match="empty"):
        inv.invert([], iterations=2)
    with pytest.raises(ValueError, match="init must be a tensor of shape"):
        inv.invert([0], iterations=2, init=torch.zeros(1, 3, 9, 9))
    with pytest.raises(ValueError, match=r"\(C, H, W\)"):
        dinv.Inverter(tiny_net(), image_shape=(8, 8))
    with pytest.raises(ValueError, match="student"):
        dinv.Inverter(tiny_net(), image_shape=(3, 8, 8), adi_scale=1.0).invert([0], 2)


def test_bf16_autocast_on_cpu():
    net = tiny_net()
    inv = dinv.Inverter(net, image_shape=(3, 8, 8), amp_dtype=torch.bfloat16, log_every=1, lr=0.1)
    images = inv.invert([0, 1, 2, 3], iterations=30, seed=0)
    assert images.dtype == torch.float32 and torch.isfinite(images).all()
    losses = inv.log.terms["loss"]
    assert losses[-1] < losses[0]


def test_clipped_to_valid_pixels():
    inv = dinv.Inverter(tiny_net(), image_shape=(3, 8, 8), lr=5.0)
    images = inv.invert([0, 1], iterations=5, seed=0)
    lo, hi = dinv.imaging.pixel_bounds(inv.mean, inv.std)
    assert (images >= lo - 1e-6).all() and (images <= hi + 1e-6).all()


def test_running_statistics_are_read_at_every_invert():
    """A load_state_dict after the Inverter was built is honoured, as the reference reads the
    running statistics at every forward."""
    net, other = tiny_net(seed=0), tiny_net(seed=1)
    x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    inv = dinv.Inverter(net, image_shape=(3, 8, 8))
    before = inv.bn_losses(x)
    net.load_state_dict(other.state_dict())
    after = inv.bn_losses(x)
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, dinv.Inverter(other, image_shape=(3, 8, 8)).bn_losses(x))


def test_seed_none_draws_from_the_global_generator_without_reseeding_it():
    inv = dinv.Inverter(tiny_net(), image_shape=(3, 8, 8), jitter=2)
    torch.manual_seed(7)
    a = inv.invert([0, 1], iterations=3)
    after_a = torch.rand(3)
    torch.manual_seed(7)
    b = inv.invert([0, 1], iterations=3)
    after_b = torch.rand(3)
    assert torch.equal(a, b) and torch.equal(after_a, after_b)
    torch.manual_seed(7)
    torch.rand(1)
    assert not torch.equal(inv.invert([0, 1], iterations=3), a)


def test_augment_seed_fixes_the_views_alone():
    inv = dinv.Inverter(tiny_net(), image_shape=(3, 8, 8), jitter=3)
    a = inv.invert([0, 1], iterations=4, seed=1, augment_seed=5)
    b = inv.invert([0, 1], iterations=4, seed=1, augment_seed=5)
    c = inv.invert([0, 1], iterations=4, seed=1, augment_seed=6)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_competition_option_selects_the_formula():
    net, student = tiny_net(), tiny_net(seed=3)
    with torch.no_grad():
        student[-1].weight.mul_(20)  # a student that disagrees with the teacher
    x = torch.randn(6, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    targets = torch.tensor([0, 1, 2, 3, 4, 0])
    view = view_indices(8, 8, 0, 0, False)
    terms = {}
    for formula in ("js", "reference"):
        inv = dinv.Inverter(net, image_shape=(3, 8, 8), adi_scale=1.0, competition=formula)
        with frozen(net, student), inv.statistics:
            terms[formula] = inv._loss(x, view, None, targets, student, factor=1)[2]["competition"]
    with torch.no_grad():
        p, q = F.softmax(student(x) / 3.0, 1), F.softmax(net(x) / 3.0, 1)
    m = 0.5 * (p + q)
    js = 0.5 * (p * (p / m).log()).sum(1) + 0.5 * (q * (q / m).log()).sum(1)
    torch.testing.assert_close(terms["js"], 1 - js.mean(), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(terms["js"], terms["reference"])
    with pytest.raises(ValueError, match="competition"):
        dinv.Inverter(net, image_shape=(3, 8, 8), competition="kl")


def test_a_float64_teacher_is_inverted_in_float64():
    net = tiny_net().double()
    images = dinv.Inverter(net, image_shape=(3, 8, 8)).invert([0, 1], iterations=3, seed=0)
    assert images.dtype == torch.float64 and torch.isfinite(images).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_half_precision_teacher_gets_fp32_images(dtype):
    net = tiny_net().to(dtype)
    images = dinv.Inverter(net, image_shape=(3, 8, 8)).invert([0, 1], iterations=3, seed=0)
    assert images.dtype == torch.float32 and torch.isfinite(images).all()


@pytest.mark.parametrize("fused_bn", [False, True])
def test_two_inverters_on_one_teacher_nest(fused_bn):
    """An Inverter's callback that uses another Inverter of the same teacher: installation is
    re-entrant, and the teacher comes back untouched."""
    net = tiny_net()
    before = _teacher_state(net)
    outer = dinv.Inverter(net, image_shape=(3, 8, 8), fused_bn=fused_bn, log_every=1)
    inner = dinv.Inverter(net, image_shape=(3, 8, 8), fused_bn=fused_bn)
    seen = []

    def callback(iteration, images, terms):
        seen.append(inner.bn_losses(images))
        inner.invert([1], iterations=1, seed=0)

    outer.invert([0, 1], iterations=3, seed=0, callback=callback)
    assert len(seen) == 3 and all(torch.isfinite(s).all() for s in seen)
    _assert_untouched(net, before)


def _fuzz_case(rng):
    """One random (teacher, Inverter arguments, invert arguments), valid or not."""
    channels = rng.choice([1, 3])
    height, width = rng.randint(1, 12), rng.randint(1, 12)
    dtype = rng.choice([torch.float32, torch.float32, torch.float64, torch.bfloat16, torch.float16])
    teacher = tiny_net(classes=rng.choice([2, 5]), channels=channels, seed=rng.randint(0, 3))
    teacher = teacher.to(dtype)
    kwargs = dict(image_shape=(channels, height, width), mean=(0.5,) * channels,
                  std=(0.25,) * channels, setting_id=rng.choice([0, 1, 2]),
                  jitter=rng.randint(0, 4), jitter_mode=rng.choice(["roll", "shift"]),
                  flip=rng.random() < 0.5, fused_bn=rng.random() < 0.5,
                  channels_last=rng.random() < 0.3, lr=rng.choice([1e-3, 0.05, 0.25, 1.0]),
                  r_feature=rng.choice([0.0, 0.05, 1.0]), tv_l1=rng.choice([0.0, 0.1]),
                  tv_l2=rng.choice([0.0, 1e-3]), l2=rng.choice([0.0, 1e-4]),
                  competition=rng.choice(["js", "reference"]), log_every=rng.choice([1, 100]))
    if dtype == torch.float32 and rng.random() < 0.2:
        kwargs["amp_dtype"] = torch.bfloat16
    student = None
    if rng.random() < 0.25:
        kwargs["adi_scale"] = rng.choice([0.5, 2.0])
        student = tiny_net(classes=teacher[-1].out_features, channels=channels, seed=5).to(dtype)
    bad = rng.random()
    if bad < 0.04:
        kwargs["std"] = (0.0,) * channels
    elif bad < 0.07:
        kwargs["lr"] = rng.choice([float("inf"), float("nan"), 0.0, -1.0])
    elif bad < 0.10:
        kwargs["image_shape"] = (channels, -height, width)
    elif bad < 0.12:
        kwargs["r_feature"] = rng.choice([-1.0, float("nan")])
    count = rng.randint(1, 4)
    targets = [rng.randint(0, 1) for _ in range(count)]
    kind = rng.random()
    if kind < 0.05:
        targets = None
    elif kind < 0.10:
        targets = [float(t) for t in targets]
    elif kind < 0.13:
        targets = [bool(t) for t in targets]
    elif kind < 0.16:
        targets = [targets]  # 2-D
    elif kind < 0.19:
        targets = [9]  # beyond the outputs
    elif kind < 0.22:
        targets = []
    elif kind < 0.26:
        targets = np.array(targets)
    elif kind < 0.30:
        targets = torch.tensor(targets)
    iterations = rng.choice([1, 2, [1, 1], np.int64(2), None])
    if rng.random() < 0.08:
        iterations = rng.choice([[0, 0], [0], 1.5, 0, -2, "2"])
    if iterations is None:
        iterations = [1, 1] if kwargs["setting_id"] == 0 else 1
    return teacher, kwargs, dict(targets=targets, iterations=iterations, student=student,
                                 seed=rng.randint(0, 9))


def test_fuzz_invert_gives_finite_images_or_a_clear_error():
    """600 random (shape, dtype, layout, targets, settings) combinations through
    Inverter.invert for 1-2 iterations: either finite images of the right shape and dtype, or a
    ValueError/TypeError raised before any work; never another exception, never NaN."""
    import random

    rng = random.Random(0)
    outcomes = {"images": 0, "error": 0}
    for case in range(600):
        teacher, kwargs, call = _fuzz_case(rng)
        try:
            inv = dinv.Inverter(teacher, **kwargs)
            images = inv.invert(**call)
        except (ValueError, TypeError):
            outcomes["error"] += 1
            continue
        except Exception as error:  # noqa: BLE001 - the point of the test
            raise AssertionError(f"case {case}: {kwargs} {call}: {type(error).__name__}: "
                                 f"{error}") from error
        expected = torch.float64 if teacher[0].weight.dtype == torch.float64 else torch.float32
        assert images.dtype == expected, (case, kwargs)
        assert images.shape == (len(call["targets"]),) + kwargs["image_shape"], (case, kwargs)
        assert torch.isfinite(images).all(), (case, kwargs, call)
        outcomes["images"] += 1
    # Both kinds of outcome are exercised in earnest.
    assert outcomes["images"] > 250 and outcomes["error"] > 100, outcomes


class _TupleOutput(nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(x), x.mean()


def test_clear_errors_for_bad_values_before_any_work():
    net = tiny_net()
    for kwargs, error, match in (
            (dict(std=(0.2, 0.0, 0.2)), ValueError, "std > 0"),
            (dict(std=(0.2, -1.0, 0.2)), ValueError, "std > 0"),
            (dict(lr=float("inf")), ValueError, "lr"),
            (dict(image_shape=(3, -8, 8)), ValueError, "positive integers"),
            (dict(jitter=-1), ValueError, "jitter"),
            (dict(competition="kl"), ValueError, "competition")):
        with pytest.raises(error, match=match):
            dinv.Inverter(net, **{"image_shape": (3, 8, 8), **kwargs})
    inv = dinv.Inverter(net, image_shape=(3, 8, 8), setting_id=1)
    for targets, error, match in (([0.0, 1.0], TypeError, "integer class indices"),
                                  ([True, False], TypeError, "integer class indices"),
                                  ([[0, 1], [2, 3]], ValueError, "1-D"),
                                  (None, TypeError, "None")):
        with pytest.raises(error, match=match):
            inv.invert(targets, iterations=1)
    for iterations, error, match in (([0], ValueError, "nothing to optimize"),
                                     (2.0, TypeError, "integer"), (0, ValueError, ">= 1")):
        with pytest.raises(error, match=match):
            inv.invert([0], iterations=iterations)
    assert inv.invert([0], iterations=np.int64(1)).shape == (1, 3, 8, 8)
    with pytest.raises(ValueError, match="too small"):
        dinv.Inverter(net, image_shape=(3, 1, 1), setting_id=0).invert([0], iterations=4)
    with pytest.raises(ValueError, match="output_function"):
        dinv.Inverter(_TupleOutput(net), image_shape=(3, 8, 8)).invert([0], iterations=1)
    images = dinv.Inverter(_TupleOutput(net), image_shape=(3, 8, 8),
                           output_function=lambda out: out[0]).invert([0], iterations=1)
    assert torch.isfinite(images).all()
