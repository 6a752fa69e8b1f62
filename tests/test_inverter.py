"""dinv.Inverter: the loss against the reference formulas, the reference's constructor and
generate_batch, reproducibility, leaving the teacher as it was, errors, and data export."""
from __future__ import annotations

import json
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import dinv
from dinv.augment import gather_hw, jitter_flip_indices
from dinv.data import load_shards, synthesize_dataset
from dinv.inverter import InversionDiverged, cosine_lr, stages_for


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


def reference_loss(net, x, targets, coef, student=None):
    """The reference script's loss, written from its formulas (forward hooks with the
    permute+contiguous variance, four-difference TV, batchmean-KL JS)."""
    feature_losses = []

    def hook(module, inputs, output):
        inp = inputs[0]
        nch = inp.shape[1]
        mean = inp.mean([0] + list(range(2, inp.dim())))
        var = inp.transpose(0, 1).contiguous().view([nch, -1]).var(1, unbiased=False)
        feature_losses.append(torch.norm(module.running_var - var, 2)
                              + torch.norm(module.running_mean - mean, 2))

    handles = [m.register_forward_hook(hook) for m in net.modules()
               if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    try:
        outputs = net(x)
    finally:
        for h in handles:
            h.remove()
    loss = F.cross_entropy(outputs, targets)
    d1 = x[:, :, :, :-1] - x[:, :, :, 1:]
    d2 = x[:, :, :-1, :] - x[:, :, 1:, :]
    d3 = x[:, :, 1:, :-1] - x[:, :, :-1, 1:]
    d4 = x[:, :, :-1, :-1] - x[:, :, 1:, 1:]
    tv_l2 = torch.norm(d1) + torch.norm(d2) + torch.norm(d3) + torch.norm(d4)
    tv_l1 = sum((d.abs() / 255.0).mean() for d in (d1, d2, d3, d4)) * 255.0
    rescale = [coef["first_bn_multiplier"]] + [1.0] * (len(feature_losses) - 1)
    r_feature = sum(r * s for r, s in zip(feature_losses, rescale))
    l2 = torch.norm(x.view(x.shape[0], -1), dim=1).mean()
    aux = coef["tv_l2"] * tv_l2 + coef["tv_l1"] * tv_l1 + coef["r_feature"] * r_feature \
        + coef["l2"] * l2
    if student is not None:
        P = F.softmax(student(x) / 3.0, dim=1)
        Q = F.softmax(outputs / 3.0, dim=1)
        M = 0.5 * (P + Q)
        P, Q, M = (torch.clamp(v, 0.01, 0.99) for v in (P, Q, M))
        kl = nn.KLDivLoss(reduction="batchmean")
        js = 0.5 * kl(torch.log(P), M) + 0.5 * kl(torch.log(Q), M)
        aux = aux + coef["adi_scale"] * (1.0 - torch.clamp(js, 0.0, 1.0))
    return coef["main_loss_multiplier"] * loss + aux


COEF = dict(r_feature=0.05, first_bn_multiplier=10.0, tv_l1=0.3, tv_l2=1e-3, l2=1e-4, lr=0.1,
            main_loss_multiplier=0.7, adi_scale=0.0)


@pytest.mark.parametrize("fused_bn", [False, True])
@pytest.mark.parametrize("adi", [False, True])
def test_loss_and_gradient_match_the_reference_formulas(fused_bn, adi):
    net = tiny_net()
    student = tiny_net(seed=3) if adi else None
    coef = dict(COEF, adi_scale=0.5 if adi else 0.0)
    inv = dinv.Inverter(net, image_shape=(3, 12, 12), fused_bn=fused_bn, **coef)
    targets = torch.tensor([0, 1, 2, 3, 4, 0])
    x = torch.randn(6, 3, 12, 12, generator=torch.Generator().manual_seed(1))
    mine = x.clone().requires_grad_(True)
    with dinv.inverter.frozen(net, student), inv.statistics:
        rows, cols = jitter_flip_indices(12, 12, 0, 0, False)
        loss, _, _ = inv._loss(mine, rows, cols, targets, student, factor=1)
    (grad,) = torch.autograd.grad(loss, mine)
    theirs = x.clone().requires_grad_(True)
    with dinv.inverter.frozen(net, student):
        expected = reference_loss(net, theirs, targets, coef, student)
    (expected_grad,) = torch.autograd.grad(expected, theirs)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("flip", [False, True])
@pytest.mark.parametrize("dy,dx", [(0, 0), (3, -2), (-7, 9)])
def test_jitter_flip_index_math_is_roll_then_flip(dy, dx, flip):
    x = torch.randn(2, 3, 7, 9)
    expected = torch.roll(x, shifts=(dy, dx), dims=(2, 3))
    if flip:
        expected = torch.flip(expected, dims=(3,))
    assert torch.equal(gather_hw(x, *jitter_flip_indices(7, 9, dy, dx, flip)), expected)


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
    with pytest.raises(ValueError, match="init must have shape"):
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


def test_reference_constructor_and_generate_batch(tmp_path):
    """The reference script's own call, with only the import changed."""
    torchvision = pytest.importorskip("torchvision")
    from dinv import Inverter as DeepInversionClass

    net = torchvision.models.resnet18(weights=None).eval()
    parameters = dict(resolution=32, random_label=False, start_noise=True, detach_student=False,
                      do_flip=True, store_best_images=True, iterations=3)
    coefficients = dict(r_feature=0.01, first_bn_multiplier=10.0, tv_l1=0.0, tv_l2=0.0001,
                        l2=0.00001, lr=0.25, main_loss_multiplier=1.0, adi_scale=0.0)
    seen = []
    generator = DeepInversionClass(
        bs=5, use_fp16=False, net_teacher=net, path=str(tmp_path / "gen"),
        final_data_path=str(tmp_path / "final"), parameters=parameters, setting_id=0,
        jitter=30, criterion=nn.CrossEntropyLoss(), coefficients=coefficients,
        network_output_function=lambda x: x,
        hook_for_display=lambda inputs, targets: seen.append(inputs.shape))
    images = generator.generate_batch(net_student=None, targets=None)
    assert images.shape == (5, 3, 32, 32)
    # The preselected classes, cut to the batch size (no multiple-of-42 restriction).
    written = sorted(os.listdir(tmp_path / "final"))
    assert written == ["s001", "s025", "s933", "s946", "s980"]
    assert os.listdir(tmp_path / "gen" / "best_images")
    assert seen == [(5, 3, 32, 32)]
    images = generator.generate_batch(targets=[3, 3])
    assert images.shape == (2, 3, 32, 32)
    assert len(os.listdir(tmp_path / "final" / "s003")) == 2


def test_dataset_export_resumes_without_loss_or_duplicates(tmp_path):
    net = tiny_net()
    inv = dinv.Inverter(net, image_shape=(3, 8, 8))
    common = dict(num_images=7, classes=[0, 1, 2], batch_size=3, iterations=3, seed=5)
    synthesize_dataset(inv, str(tmp_path / "full"), **common)

    def interrupt(batch, images, labels):
        if batch == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        synthesize_dataset(inv, str(tmp_path / "resumed"), on_batch=interrupt, **common)
    with open(tmp_path / "resumed" / "manifest.json") as f:
        assert json.load(f)["completed"] == [0, 1]
    synthesize_dataset(inv, str(tmp_path / "resumed"), **common)
    full, resumed = load_shards(str(tmp_path / "full")), load_shards(str(tmp_path / "resumed"))
    assert torch.equal(full[0], resumed[0]) and torch.equal(full[1], resumed[1])
    assert full[1].tolist() == [0, 1, 2, 0, 1, 2, 0]
    pngs = sum(len(files) for _, _, files in os.walk(tmp_path / "resumed" / "images"))
    assert pngs == 7
    assert (tmp_path / "resumed" / "grid.png").exists()
    with pytest.raises(ValueError, match="another configuration"):
        synthesize_dataset(inv, str(tmp_path / "full"), **dict(common, seed=6))
