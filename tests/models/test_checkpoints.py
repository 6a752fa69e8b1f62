"""dinv.models.load_teacher: every kind of file it accepts, and every kind it refuses."""
import os
import sys
import types

import pytest
import torch
from torch import nn

from dinv import models


def images(shape=(2, 3, 32, 32), seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def trained_like(name, seed=0, **kwargs):
    """A model with random weights and BatchNorm statistics, so that a wrong load shows."""
    torch.manual_seed(seed)
    model = models.create(name, **kwargs)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, tensor in model.state_dict().items():
            if key.endswith("running_var"):
                tensor.copy_(torch.rand(tensor.shape, generator=generator) + 0.5)
            elif key.endswith("running_mean"):
                tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.1)
    return model.eval()


def same_logits(a, b, x):
    with torch.no_grad():
        return torch.equal(a.eval()(x), b.eval()(x))


class CreatesMarker:
    """Unpickling this runs os.mkdir(marker): what a malicious checkpoint would do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


# -- "digits" -----------------------------------------------------------------------------------
def test_digits_is_the_shipped_teacher():
    teacher = models.load_teacher("digits")
    assert isinstance(teacher, models.DigitsNet) and not teacher.training
    shipped = models.load_digits_teacher()
    x = images((4, 1, 16, 16))
    assert same_logits(teacher, shipped, x)
    assert next(teacher.parameters()).device.type == "cpu"


# -- state_dicts with arch ----------------------------------------------------------------------
@pytest.mark.parametrize("name", ["resnet18_cifar", "vgg11_bn_cifar", "digits_student"])
def test_plain_state_dict_with_arch(name, tmp_path):
    source = trained_like(name)
    path = tmp_path / "weights.pt"
    torch.save(source.state_dict(), path)
    teacher = models.load_teacher(path, arch=name)
    assert not teacher.training and type(teacher) is type(source)
    shape = (2, 1, 16, 16) if name.startswith("digits") else (2, 3, 32, 32)
    assert same_logits(teacher, source, images(shape))
    # A str path works as well as a Path.
    assert same_logits(models.load_teacher(str(path), arch=name), source, images(shape))


@pytest.mark.parametrize("wrapper", ["state_dict", "model", "net", "model_state_dict"])
def test_wrapped_state_dicts(wrapper, tmp_path):
    source = trained_like("resnet18_cifar", seed=1)
    optimizer = torch.optim.SGD(source.parameters(), lr=0.1, momentum=0.9)
    path = tmp_path / "checkpoint.pt"
    torch.save({wrapper: source.state_dict(), "epoch": 7, "best_acc": 0.93,
                "optimizer": optimizer.state_dict()}, path)
    teacher = models.load_teacher(path, arch="resnet18_cifar")
    assert same_logits(teacher, source, images())


@pytest.mark.parametrize("prefix", ["module.", "_orig_mod.", "module._orig_mod.",
                                    "_orig_mod.module."])
def test_dataparallel_and_compile_prefixes_are_stripped(prefix, tmp_path):
    source = trained_like("resnet18_cifar", seed=2)
    path = tmp_path / "prefixed.pt"
    torch.save({"state_dict": {prefix + k: v for k, v in source.state_dict().items()}}, path)
    assert same_logits(models.load_teacher(path, arch="resnet18_cifar"), source, images())


def test_legacy_serialization_format(tmp_path):
    source = trained_like("digits_student", seed=9)
    path = tmp_path / "legacy.pt"
    torch.save(source.state_dict(), path, _use_new_zipfile_serialization=False)
    teacher = models.load_teacher(path, arch="digits_student")
    assert same_logits(teacher, source, images((2, 1, 16, 16)))


def test_real_dataparallel_state_dict(tmp_path):
    source = trained_like("digits_student", seed=3)
    path = tmp_path / "dp.pt"
    torch.save(nn.DataParallel(source).state_dict(), path)
    assert next(iter(torch.load(path, weights_only=True))).startswith("module.")
    teacher = models.load_teacher(path, arch="digits_student")
    assert same_logits(teacher, source, images((2, 1, 16, 16)))


def test_num_classes_is_inferred_from_the_classifier(tmp_path):
    source = trained_like("resnet34_cifar", seed=4, num_classes=100)
    path = tmp_path / "c100.pt"
    torch.save({"model": {"module." + k: v for k, v in source.state_dict().items()}}, path)
    teacher = models.load_teacher(path, arch="resnet34_cifar")
    assert teacher.linear.out_features == 100
    assert same_logits(teacher, source, images())
    # An explicit num_classes that contradicts the file is a mismatch, named.
    with pytest.raises(ValueError, match=r"c100\.pt.*resnet34_cifar.*linear\.weight"):
        models.load_teacher(path, arch="resnet34_cifar", num_classes=10)


def test_torchvision_state_dict_loads_as_it_is(tmp_path):
    source = trained_like("torchvision:resnet18", seed=5, num_classes=10)
    path = tmp_path / "tv_resnet18.pt"
    torch.save(source.state_dict(), path)
    teacher = models.load_teacher(path, arch="torchvision:resnet18")
    assert teacher.fc.out_features == 10  # inferred: torchvision's default is 1000
    assert same_logits(teacher, source, images((2, 3, 64, 64)))


def test_map_location_places_the_model(tmp_path):
    path = tmp_path / "w.pt"
    torch.save(trained_like("digits_student").state_dict(), path)
    teacher = models.load_teacher(path, arch="digits_student", map_location="meta")
    assert all(p.device.type == "meta" for p in teacher.parameters())
    assert models.load_teacher("digits", map_location="meta").classifier.weight.is_meta


def test_timm_arch_without_timm_says_how_to_install(tmp_path, monkeypatch):
    path = tmp_path / "w.pt"
    torch.save(trained_like("digits_student").state_dict(), path)
    monkeypatch.setitem(sys.modules, "timm", None)  # `import timm` raises ImportError
    with pytest.raises(ImportError, match="pip install timm"):
        models.load_teacher(path, arch="timm:resnet18")


def test_timm_arch_builds_through_timm(tmp_path, monkeypatch):
    calls = []

    def create_model(name, pretrained=False, num_classes=10):
        calls.append((name, pretrained, num_classes))
        return models.create("digits_student", num_classes=num_classes)

    monkeypatch.setitem(sys.modules, "timm", types.SimpleNamespace(create_model=create_model))
    source = trained_like("digits_student", seed=6, num_classes=4)
    path = tmp_path / "timm.pt"
    torch.save(source.state_dict(), path)
    teacher = models.load_teacher(path, arch="timm:tiny_thing")
    assert calls[-1] == ("tiny_thing", False, 4)
    assert same_logits(teacher, source, images((2, 1, 16, 16)))


# -- mismatches -----------------------------------------------------------------------------------
def test_wrong_arch_names_file_arch_keys_and_the_likely_arch(tmp_path):
    path = tmp_path / "rn18.pt"
    torch.save(models.create("resnet18_cifar").state_dict(), path)
    with pytest.raises(ValueError) as info:
        models.load_teacher(path, arch="resnet34_cifar")
    message = str(info.value)
    assert str(path) in message and "'resnet34_cifar'" in message
    assert "missing keys" in message and "layer1.2.conv1.weight" in message
    assert "'resnet18_cifar'" in message  # the layout it does match


def test_torchvision_layout_into_cifar_arch_suggests_torchvision(tmp_path):
    path = tmp_path / "tv.pt"
    torch.save(models.create("torchvision:resnet18").state_dict(), path)
    with pytest.raises(ValueError) as info:
        models.load_teacher(path, arch="resnet18_cifar")
    message = str(info.value)
    assert str(path) in message and "unexpected keys" in message
    assert "layer2.0.downsample.0.weight" in message and "missing keys" in message
    assert "torchvision:resnet18" in message


def test_unknown_arch_is_rejected(tmp_path):
    path = tmp_path / "w.pt"
    torch.save(models.create("digits_student").state_dict(), path)
    with pytest.raises(ValueError, match="unknown arch 'resnet1000_cifar'.*resnet18_cifar"):
        models.load_teacher(path, arch="resnet1000_cifar")


# -- without arch -------------------------------------------------------------------------------
def test_state_dict_without_arch_asks_for_it(tmp_path):
    path = tmp_path / "sd.pt"
    torch.save({"state_dict": models.create("resnet34_cifar").state_dict()}, path)
    with pytest.raises(ValueError) as info:
        models.load_teacher(path)
    message = str(info.value)
    assert str(path) in message and "state_dict" in message and "arch=" in message
    assert "digits_net" in message and "torchvision:" in message  # the known names
    assert "its keys match 'resnet34_cifar'" in message


def test_whole_pickled_model_needs_trust_pickle(tmp_path):
    source = trained_like("digits_student", seed=7)
    path = tmp_path / "whole.pt"
    torch.save(source, path)
    with pytest.raises(ValueError) as info:
        models.load_teacher(path)
    message = str(info.value)
    assert str(path) in message and "arbitrary code" in message
    assert "arch=" in message and "torch.save(model.state_dict(), path)" in message
    assert "trust_pickle=True" in message
    teacher = models.load_teacher(path, trust_pickle=True)
    assert not teacher.training and same_logits(teacher, source, images((2, 1, 16, 16)))
    # With an arch, a trusted whole model gives its weights to that arch.
    teacher = models.load_teacher(path, arch="digits_student", trust_pickle=True)
    assert same_logits(teacher, source, images((2, 1, 16, 16)))


def test_training_checkpoint_with_python_objects_needs_trust_pickle(tmp_path):
    import argparse

    source = trained_like("digits_student", seed=8)
    path = tmp_path / "with_args.pt"
    torch.save({"state_dict": source.state_dict(), "args": argparse.Namespace(lr=0.1)}, path)
    with pytest.raises(ValueError, match="argparse.Namespace"):
        models.load_teacher(path, arch="digits_student")
    teacher = models.load_teacher(path, arch="digits_student", trust_pickle=True)
    assert same_logits(teacher, source, images((2, 1, 16, 16)))


# -- files that are not checkpoints ---------------------------------------------------------------
def broken_files(tmp_path):
    good = tmp_path / "good.pt"
    torch.save(models.create("digits_student").state_dict(), good)
    data = good.read_bytes()
    files = {
        "text.pt": b"this is not a checkpoint\n",
        "empty.pt": b"",
        "truncated.pt": data[: len(data) // 2],
        "corrupt.pt": data[:200] + bytes(b ^ 0xFF for b in data[200:400]) + data[400:],
        "random.pt": bytes(torch.randint(0, 256, (4096,),
                                         generator=torch.Generator().manual_seed(0)).tolist()),
    }
    for name, content in files.items():
        (tmp_path / name).write_bytes(content)
    return [tmp_path / name for name in files]


@pytest.mark.parametrize("arch", [None, "digits_student"])
def test_non_torch_files_are_named_not_readable(tmp_path, arch):
    for path in broken_files(tmp_path):
        with pytest.raises(ValueError) as info:
            models.load_teacher(path, arch=arch)
        assert str(path) in str(info.value), path
        assert "not a readable torch checkpoint" in str(info.value), (path, str(info.value))


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="no_such.pt"):
        models.load_teacher(tmp_path / "no_such.pt")
    with pytest.raises(FileNotFoundError, match="no such file"):
        models.load_teacher(str(tmp_path / "no_such.pt"), arch="resnet18_cifar")
    with pytest.raises(ValueError, match="directory"):
        models.load_teacher(tmp_path)


# -- never running a pickled payload --------------------------------------------------------------
@pytest.mark.parametrize("arch", [None, "resnet18_cifar"])
@pytest.mark.parametrize("layout", ["bare", "wrapped", "legacy_format"])
def test_malicious_pickle_is_never_run_without_trust(tmp_path, arch, layout):
    marker = tmp_path / "marker"
    payload = CreatesMarker(marker)
    path = tmp_path / "evil.pt"
    if layout == "bare":
        torch.save(payload, path)
    else:
        torch.save({"state_dict": models.create("resnet18_cifar").state_dict(), "x": payload},
                   path, _use_new_zipfile_serialization=layout != "legacy_format")
    with pytest.raises(ValueError, match="arbitrary code"):
        models.load_teacher(path, arch=arch)
    assert not marker.exists()


def test_malicious_pickle_control_runs_when_trusted(tmp_path):
    # The payload is live: trusting the file runs it (so the test above does test something).
    marker = tmp_path / "marker"
    path = tmp_path / "evil.pt"
    torch.save(CreatesMarker(marker), path)
    with pytest.raises(ValueError):
        models.load_teacher(path, trust_pickle=True)  # runs, then finds no model
    assert marker.exists()
