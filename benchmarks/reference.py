"""The NVlabs/DeepInversion reference (`deepinversion.py`, `utils/utils.py`), written out once for
the benchmarks and the tests: the baseline every speed-up is measured against and the ground truth
every dinv configuration is checked against. Nothing here imports dinv.

- `DeepInversionFeatureHook`, `get_image_prior_losses`, `lr_cosine_policy`, `clip`: the
  reference's code (the hook's dims generalized to any input rank, unchanged on [N, C, H, W]);
- `ReferenceInversion`: `DeepInversionClass.get_images` at setting 1, eager, with the two
  variants a user can build from it (`compile`: torch.compile of forward+loss; `frozen`: no
  teacher weight gradients);
- the reference's formulas as plain functions, for per-op comparisons and parity tests:
  `bn_feature_loss`, `image_differences`, `tv_l1`, `tv_l2`, `l2_prior`, `js_competition`
  (the clamped ADI term), `kd_loss`, `combine_losses` (the total objective) and `reference_loss`
  (that objective for any model and images, with hooks on every BatchNorm layer).
"""
from __future__ import annotations

import math
import random

import torch
import torch.nn.functional as F
from torch import nn, optim

ADI_TEMPERATURE = 3.0  # the reference's `T = 3.0` in the competition term


# ---------------------------------------------------------------------------------------------
# Formulas
# ---------------------------------------------------------------------------------------------
def bn_feature_loss(x, running_mean, running_var):
    """The hook's r_feature: ‖running_var − var‖₂ + ‖running_mean − mean‖₂ with the biased batch
    variance taken through a channel-first contiguous copy. On [N, C, H, W] the reduced dims are
    the reference's [0, 2, 3] and the permutation its (1, 0, 2, 3); other ranks (BatchNorm1d on
    [N, C] or [N, C, L], BatchNorm3d) reduce over every dim but 1 the same way."""
    nch = x.shape[1]
    dims = [0] + list(range(2, x.dim()))
    mean = x.mean(dims)
    var = x.permute([1] + dims).contiguous().view([nch, -1]).var(1, unbiased=False)
    return torch.norm(running_var - var, 2) + torch.norm(running_mean - mean, 2)


class DeepInversionFeatureHook:
    """The reference's BN hook: stores the layer's `r_feature` at every forward."""

    def __init__(self, module):
        self.hook = module.register_forward_hook(self.hook_fn)

    def hook_fn(self, module, input, output):
        self.r_feature = bn_feature_loss(input[0], module.running_mean.data,
                                         module.running_var.data)

    def close(self):
        self.hook.remove()


def image_differences(x):
    """The four neighbour differences of the reference's TV prior (right, down, two diagonals)."""
    diff1 = x[:, :, :, :-1] - x[:, :, :, 1:]
    diff2 = x[:, :, :-1, :] - x[:, :, 1:, :]
    diff3 = x[:, :, 1:, :-1] - x[:, :, :-1, 1:]
    diff4 = x[:, :, :-1, :-1] - x[:, :, 1:, 1:]
    return diff1, diff2, diff3, diff4


def _tv_l2(diffs):
    diff1, diff2, diff3, diff4 = diffs
    return torch.norm(diff1) + torch.norm(diff2) + torch.norm(diff3) + torch.norm(diff4)


def _tv_l1(diffs):
    diff1, diff2, diff3, diff4 = diffs
    loss_var_l1 = (diff1.abs() / 255.0).mean() + (diff2.abs() / 255.0).mean() + (
        diff3.abs() / 255.0).mean() + (diff4.abs() / 255.0).mean()
    return loss_var_l1 * 255.0


def tv_l2(x):
    """The reference's loss_var_l2: the sum of the four differences' Frobenius norms."""
    return _tv_l2(image_differences(x))


def tv_l1(x):
    """The reference's loss_var_l1: the sum of the four differences' mean absolute values."""
    return _tv_l1(image_differences(x))


def get_image_prior_losses(inputs_jit):
    """The reference's TV prior: (loss_var_l1, loss_var_l2), both always computed, from one set
    of differences."""
    diffs = image_differences(inputs_jit)
    return _tv_l1(diffs), _tv_l2(diffs)


def l2_prior(x):
    """The reference's loss_l2: the mean over images of each image's L2 norm."""
    return torch.norm(x.view(x.shape[0], -1), dim=1).mean()


def js_competition(outputs_student, outputs, T=ADI_TEMPERATURE):
    """ADI's competition term as the reference computes it: 1 − clamp(JS, 0, 1), the JS from
    KLDivLoss(batchmean) against M with P, Q and M clamped to [0.01, 0.99]."""
    kl_loss = nn.KLDivLoss(reduction="batchmean")
    P = F.softmax(outputs_student / T, dim=1)
    Q = F.softmax(outputs / T, dim=1)
    M = 0.5 * (P + Q)
    P = torch.clamp(P, 0.01, 0.99)
    Q = torch.clamp(Q, 0.01, 0.99)
    M = torch.clamp(M, 0.01, 0.99)
    eps = 0.0
    loss_verifier_cig = 0.5 * kl_loss(torch.log(P + eps), M) + 0.5 * kl_loss(torch.log(Q + eps), M)
    return 1.0 - torch.clamp(loss_verifier_cig, 0.0, 1.0)


def kd_loss(student_logits, teacher_logits, T=4.0):
    """Distillation as the reference's students train: batchmean KL of the softened outputs,
    times T²."""
    return F.kl_div(F.log_softmax(student_logits / T, dim=1),
                    F.softmax(teacher_logits / T, dim=1), reduction="batchmean") * (T * T)


def combine_losses(outputs, targets, inputs_jit, feature_losses, coefficients, criterion=None,
                   outputs_student=None, temperature=ADI_TEMPERATURE):
    """The reference's total loss of one view `inputs_jit`: main_loss_multiplier · criterion
    (default cross-entropy) + tv_l2 · loss_var_l2 + tv_l1 · loss_var_l1 + r_feature ·
    Σ rescale · r_feature (the first layer's times first_bn_multiplier) + l2 · loss_l2, plus
    adi_scale · the competition term when `outputs_student` is given and adi_scale != 0.
    `coefficients`: the reference's names (main_loss_multiplier defaults to 1, adi_scale to 0)."""
    c = coefficients
    criterion = criterion if criterion is not None else nn.CrossEntropyLoss()
    loss = criterion(outputs, targets)
    loss_var_l1, loss_var_l2 = get_image_prior_losses(inputs_jit)
    rescale = [c["first_bn_multiplier"]] + [1. for _ in range(len(feature_losses) - 1)]
    loss_r_feature = sum([r_feature * rescale[idx]
                          for (idx, r_feature) in enumerate(feature_losses)])
    loss_aux = c["tv_l2"] * loss_var_l2 + \
        c["tv_l1"] * loss_var_l1 + \
        c["r_feature"] * loss_r_feature + \
        c["l2"] * l2_prior(inputs_jit)
    adi_scale = c.get("adi_scale", 0.0)
    if outputs_student is not None and adi_scale != 0.0:
        loss_aux = loss_aux + adi_scale * js_competition(outputs_student, outputs, temperature)
    return c.get("main_loss_multiplier", 1.0) * loss + loss_aux


def reference_loss(net, x, targets, coefficients, student=None, temperature=ADI_TEMPERATURE):
    """The reference's loss of images `x` (one view, no jitter) for `net`: a
    DeepInversionFeatureHook on every BatchNorm layer (1d/2d/3d: any input rank), rescaled in
    module order, and the ADI term when a `student` is given (and adi_scale != 0). Differentiable
    w.r.t. `x`; the caller decides the modes (e.g. `dinv.model_utils.frozen`)."""
    hooks = [DeepInversionFeatureHook(m) for m in net.modules()
             if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    try:
        outputs = net(x)
        feature_losses = [hook.r_feature for hook in hooks]
    finally:
        for hook in hooks:
            hook.close()
    outputs_student = student(x) if student is not None else None
    return combine_losses(outputs, targets, x, feature_losses, coefficients,
                          outputs_student=outputs_student, temperature=temperature)


# ---------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------
def lr_cosine_policy(base_lr, warmup_length, epochs):
    def _lr_fn(iteration, epoch):
        if epoch < warmup_length:
            lr = base_lr * (epoch + 1) / warmup_length
        else:
            e = epoch - warmup_length
            es = epochs - warmup_length
            lr = 0.5 * (1 + math.cos(math.pi * e / es)) * base_lr
        return lr

    def _alr(optimizer, iteration, epoch):
        lr = _lr_fn(iteration, epoch)
        for param_group in optimizer.param_groups:
            param_group["lr"] = lr
    return _alr


def clip(image_tensor, mean, std):
    """The reference's per-channel clamp to the normalized [0, 1] pixel range."""
    for c in range(len(mean)):
        m, s = mean[c], std[c]
        image_tensor[:, c] = torch.clamp(image_tensor[:, c], -m / s, (1 - m) / s)
    return image_tensor


class ReferenceInversion:
    """`DeepInversionClass.get_images` of the reference, setting 1 (one full-resolution stage,
    Adam betas (0.5, 0.9), clipping), fp32, teacher in eval mode with its parameters still
    requiring grad, hooks on every BatchNorm2d, `optimizer.zero_grad(); net.zero_grad()` each
    iteration, torch.roll jitter + torch.flip, `loss.item()` and a clone of the images every
    iteration. `compile` wraps the forward+loss function in torch.compile (the strongest peer a
    user can build from the reference; jitter, backward and the step stay eager); `frozen` is the
    one-line user fix of not computing the teacher's weight gradients."""

    def __init__(self, teacher, image_shape, mean, std, *, r_feature, first_bn_multiplier, tv_l1,
                 tv_l2, l2, lr, main_loss_multiplier=1.0, jitter=30, flip=True, compile=False,
                 frozen=False):
        self.net_teacher = teacher.eval()
        self.teacher_requires_grad = not frozen
        self.loss_r_feature_layers = [DeepInversionFeatureHook(m) for m in teacher.modules()
                                      if isinstance(m, nn.BatchNorm2d)]
        self.image_shape, self.mean, self.std = tuple(image_shape), tuple(mean), tuple(std)
        self.coefficients = dict(r_feature=r_feature, first_bn_multiplier=first_bn_multiplier,
                                 tv_l1=tv_l1, tv_l2=tv_l2, l2=l2,
                                 main_loss_multiplier=main_loss_multiplier)
        self.lr = lr
        self.jitter, self.flip = jitter, flip
        self.criterion = nn.CrossEntropyLoss()
        self.forward_loss = self._forward_loss
        if compile:
            self.forward_loss = torch.compile(self._forward_loss,
                                              mode=None if compile is True else compile)

    def _forward_loss(self, inputs_jit, targets):
        outputs = self.net_teacher(inputs_jit)
        return combine_losses(outputs, targets, inputs_jit,
                              [mod.r_feature for mod in self.loss_r_feature_layers],
                              self.coefficients, self.criterion)

    def get_images(self, targets, iterations, inputs, rng=random, callback=None, every=1):
        """`inputs`: the start images (the reference draws torch.randn); `rng`: the source of the
        jitter/flip draws (the reference uses the global `random` module); `callback(iteration,
        loss, images)` every `every` iterations (the harness's timestamps)."""
        # Runners share the teacher: set its parameters as this configuration has them.
        for p in self.net_teacher.parameters():
            p.requires_grad_(self.teacher_requires_grad)
        inputs = inputs.detach().clone().requires_grad_(True)
        optimizer = optim.Adam([inputs], lr=self.lr, betas=[0.5, 0.9], eps=1e-8)
        do_clip = True
        lr_scheduler = lr_cosine_policy(self.lr, 100, iterations)
        lim_0, lim_1 = self.jitter, self.jitter
        best_cost = 1e4
        best_inputs = None
        iteration = 0
        for iteration_loc in range(iterations):
            iteration += 1
            lr_scheduler(optimizer, iteration_loc, iteration_loc)
            inputs_jit = inputs
            off1 = rng.randint(-lim_0, lim_0)
            off2 = rng.randint(-lim_1, lim_1)
            inputs_jit = torch.roll(inputs_jit, shifts=(off1, off2), dims=(2, 3))
            flip = rng.random() > 0.5
            if flip and self.flip:
                inputs_jit = torch.flip(inputs_jit, dims=(3,))
            optimizer.zero_grad()
            self.net_teacher.zero_grad()
            loss = self.forward_loss(inputs_jit, targets)
            loss.backward()
            optimizer.step()
            if do_clip:
                inputs.data = clip(inputs.data, self.mean, self.std)
            if best_cost > loss.item() or iteration == 1:
                best_inputs = inputs.data.clone()
            if callback is not None and iteration % every == 0:
                callback(iteration, loss, inputs.detach())
        return best_inputs

    def close(self):
        for hook in self.loss_r_feature_layers:
            hook.close()
