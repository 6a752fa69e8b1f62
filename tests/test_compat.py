"""dinv.compat: the reference DeepInversionClass's keyword arguments on dinv.Inverter, mixed with
the modern ones, its generate_batch, and the files it writes."""
from __future__ import annotations

import os

import pytest
import torch
from torch import nn

import dinv
from dinv import Inverter as DeepInversionClass
from dinv.compat import PRESELECTED_CLASSES

from .test_inverter import tiny_net

COEFFICIENTS = dict(r_feature=0.01, first_bn_multiplier=10.0, tv_l1=0.0, tv_l2=0.0001, l2=0.00001,
                    lr=0.25, main_loss_multiplier=1.0, adi_scale=0.0)


def reference(tmp_path, **overrides):
    """The reference script's constructor call (its own argument names), at 8x8 pixels."""
    kwargs = dict(bs=3, use_fp16=False, net_teacher=tiny_net(classes=1000), path=str(tmp_path / "gen"),
                  final_data_path=str(tmp_path / "final"),
                  parameters=dict(resolution=8, random_label=False, start_noise=True,
                                  detach_student=False, do_flip=True, store_best_images=True,
                                  iterations=2),
                  setting_id=0, jitter=2, criterion=nn.CrossEntropyLoss(),
                  coefficients=COEFFICIENTS, network_output_function=lambda x: x,
                  hook_for_display=None)
    kwargs.update(overrides)
    return DeepInversionClass(**kwargs)


def test_modern_keywords_mixed_with_reference_ones_apply():
    inv = DeepInversionClass(tiny_net(), amp_dtype=torch.bfloat16, bs=8, jitter_mode="shift",
                             parameters={"resolution": 8})
    assert inv.amp_dtype == torch.bfloat16 and inv.jitter_mode == "shift"
    assert inv.reference.bs == 8 and inv.image_shape == (3, 8, 8)
    inv = DeepInversionClass(net_teacher=tiny_net(), bs=2, r_feature=0.3,
                             parameters={"resolution": 8})
    assert inv.coefficients.r_feature == 0.3  # no `coefficients` given: the keyword decides


@pytest.mark.parametrize("modern,reference_kwargs,names", [
    (dict(amp_dtype=torch.float16), dict(use_fp16=True), ("amp_dtype", "use_fp16")),
    (dict(r_feature=0.3), dict(coefficients=COEFFICIENTS), ("r_feature", "coefficients")),
    (dict(image_shape=(3, 16, 16)), dict(parameters={"resolution": 8}),
     ("image_shape", "parameters")),
    (dict(flip=False), dict(parameters={"resolution": 8, "do_flip": True}), ("flip", "parameters")),
    (dict(output_function=torch.sigmoid), dict(network_output_function=torch.tanh),
     ("output_function", "network_output_function")),
])
def test_a_modern_keyword_that_contradicts_a_reference_argument_is_an_error(modern,
                                                                            reference_kwargs,
                                                                            names):
    with pytest.raises(TypeError, match=rf"{names[0]}=.*conflicts.*{names[1]}"):
        DeepInversionClass(net_teacher=tiny_net(), bs=2, **modern, **reference_kwargs)


def test_teacher_and_net_teacher_must_agree():
    net = tiny_net()
    assert DeepInversionClass(net, net_teacher=net, bs=1).teacher is net
    with pytest.raises(TypeError, match="teacher=.*conflicts.*net_teacher"):
        DeepInversionClass(tiny_net(), net_teacher=net, bs=1)


def test_a_parameters_dict_without_resolution_is_not_ignored():
    inv = DeepInversionClass(net_teacher=tiny_net(), bs=2,
                             parameters={"do_flip": False, "detach_student": True})
    assert inv.flip is False and inv.detach_student is True
    assert inv.image_shape == (3, 224, 224)  # the reference's default resolution
    with pytest.raises(ValueError, match="unknown keys.*'resolutoin'"):
        DeepInversionClass(net_teacher=tiny_net(), bs=2, parameters={"resolutoin": 8})
    with pytest.raises(ValueError, match="missing.*'tv_l1'"):
        DeepInversionClass(net_teacher=tiny_net(), coefficients={"r_feature": 0.1})


def test_the_reference_path_keeps_the_reference_competition_term():
    inv = DeepInversionClass(net_teacher=tiny_net(), bs=2, parameters={"resolution": 8})
    assert inv.competition == "reference"
    assert dinv.Inverter(tiny_net(), image_shape=(3, 8, 8)).competition == "js"


def test_generate_batch_is_reproducible_by_default_and_leaves_the_global_rng(tmp_path):
    first = reference(tmp_path / "a")
    state = torch.get_rng_state()
    a = first.generate_batch(net_student=None, targets=None)
    assert torch.equal(torch.get_rng_state(), state)  # never re-seeded, never drawn from
    b = reference(tmp_path / "b").generate_batch(net_student=None, targets=None)
    assert torch.equal(a, b)
    # The next generation of one generator is another batch; an explicit seed reproduces one.
    c = first.generate_batch(targets=None)
    assert not torch.equal(a, c)
    assert torch.equal(first.generate_batch(targets=None, seed=0), a)


def test_generate_batch_writes_the_reference_files(tmp_path):
    inv = reference(tmp_path)
    images = inv.generate_batch(net_student=None, targets=None)
    assert images.shape == (3, 3, 8, 8)
    assert sorted(os.listdir(tmp_path / "final")) == [f"s{c:03d}" for c in
                                                     sorted(PRESELECTED_CLASSES[:3])]
    assert os.listdir(tmp_path / "gen" / "best_images") == ["output_00000_gpu_0.png"]


def test_flat_reference_file_names_on_request(tmp_path):
    inv = reference(tmp_path, parameters=dict(resolution=8, store_best_images=True, iterations=2,
                                              final_layout="flat"))
    inv.generate_batch(targets=[2, 4])
    inv.generate_batch(targets=[2])
    assert sorted(os.listdir(tmp_path / "final")) == [
        "img_s002_00000_id000_gpu_0_2.jpg", "img_s002_00001_id000_gpu_0_2.jpg",
        "img_s004_00000_id001_gpu_0_2.jpg"]


def test_no_folder_at_the_filesystem_root_when_final_data_path_is_omitted(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    before = set(os.listdir("/"))
    inv = DeepInversionClass(net_teacher=tiny_net(), bs=2,
                             parameters=dict(resolution=8, store_best_images=True, iterations=2),
                             coefficients=COEFFICIENTS)
    inv.generate_batch(targets=[1, 2])
    assert set(os.listdir("/")) == before
    assert sorted(os.listdir(tmp_path / "gen_images_final")) == ["s001", "s002"]


def test_generate_batch_needs_the_reference_constructor():
    with pytest.raises(TypeError, match="reference API"):
        dinv.Inverter(tiny_net(), image_shape=(3, 8, 8)).generate_batch()
