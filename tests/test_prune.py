"""dinv.prune: the Taylor criterion against its defining gate gradient, structural pruning of
ResNets to a MACs target, quality on the shipped digits teacher, hardware-aware ranking with a
latency table, saving and reloading a pruned network, and the errors for bad input."""
from __future__ import annotations

import json
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dinv import models, ops
from dinv.data import synthesize_dataset
from dinv.distill import distill_offline
from dinv.files import load_tensors
from dinv.model_utils import state_hash
from dinv.prune import (LatencyTable, TaylorImportance, count_macs, count_params, load_pruned,
                        prune, save_pruned, torch_pruning)
from dinv.training import accuracy

# The digits fixtures (and one intra-op thread: its docstring says why) shared with distillation.
from .digits import make_inverter

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def synthesized(teacher):
    """200 DI images (20 per digit, one batch, 100 iterations): ~25 s on one core."""
    targets = torch.arange(10).repeat(20)
    return make_inverter(teacher).invert(targets, iterations=100, seed=0), targets


def flags(model):
    return [m.training for m in model.modules()], [p.requires_grad for p in model.parameters()]


# -- the criterion ------------------------------------------------------------------------------
class Gate(nn.Module):
    """y = g ⊙ x per channel, g = 1: the multiplicative gate Molchanov's criterion differentiates."""

    def __init__(self, channels: int):
        super().__init__()
        self.g = nn.Parameter(torch.ones(channels))

    def forward(self, x):
        return x * self.g.view(1, -1, *([1] * (x.dim() - 2)))


class GatedNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.bn1, self.gate1 = nn.Conv2d(1, 6, 3, padding=1), nn.BatchNorm2d(6), Gate(6)
        self.conv2, self.bn2, self.gate2 = nn.Conv2d(6, 8, 3, padding=1), nn.BatchNorm2d(8), Gate(8)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        x = F.relu(self.gate1(self.bn1(self.conv1(x))))
        x = F.relu(self.gate2(self.bn2(self.conv2(F.max_pool2d(x, 2)))))
        return self.fc(x.mean((2, 3)))


def randomized(model: nn.Module, seed: int) -> nn.Module:
    """Non-trivial BatchNorm parameters and statistics (β ≠ 0 matters to the identity)."""
    generator = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            for t in (m.weight.data, m.bias.data, m.running_mean):
                t.copy_(torch.randn(t.shape, generator=generator, dtype=t.dtype))
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=generator) + 0.5)
    return model.eval()


def test_taylor_importance_is_the_squared_gate_gradient():
    """(γ·∂L/∂γ + β·∂L/∂β)² per minibatch, averaged, equals (∂L/∂g)² of an explicit gate after
    the BatchNorm, for L = T²·KL(teacher ‖ net) + CE on the synthesis labels, in float64 (the
    teacher differs from the net here, so both terms contribute)."""
    torch.manual_seed(0)
    net = randomized(GatedNet().double(), 1)
    teacher = randomized(GatedNet().double(), 2)
    images = torch.randn(20, 1, 8, 8, dtype=torch.float64)  # minibatches of 8, 8 and 4
    targets = torch.arange(20) % 5
    criterion = TaylorImportance(teacher, images, targets, temperature=3.0, batch_size=8)
    scores = criterion.gate_scores(net, [net.bn1, net.bn2])

    expected = {net.bn1: 0, net.bn2: 0}
    for x, y, t in zip(images.split(8), targets.split(8), criterion.teacher_logits.split(8)):
        logits = net(x)
        loss = ops.kd_loss(logits, t, 3.0) + F.cross_entropy(logits, y)
        g1, g2 = torch.autograd.grad(loss, [net.gate1.g, net.gate2.g])
        expected[net.bn1] = expected[net.bn1] + g1 ** 2 / 3
        expected[net.bn2] = expected[net.bn2] + g2 ** 2 / 3
    for bn in (net.bn1, net.bn2):
        assert expected[bn].abs().max() > 1e-6  # a real signal, not zeros on both sides
        assert torch.allclose(scores[bn], expected[bn], rtol=0, atol=1e-9), (scores[bn],
                                                                            expected[bn])
    assert all(p.requires_grad for p in net.parameters()) and not net.training


def test_group_importance_sums_the_batchnorms_a_residual_connection_couples():
    torch.manual_seed(0)
    net = randomized(models.create("resnet18_cifar"), 3)
    images = torch.randn(6, 3, 32, 32)
    tp = torch_pruning()
    graph = tp.DependencyGraph().build_dependency(net, example_inputs=images[:1], verbose=False)
    group = graph.get_pruning_group(net.conv1, tp.prune_conv_out_channels, list(range(64)))
    criterion = TaylorImportance(randomized(models.create("resnet18_cifar"), 4), images,
                                 batch_size=3)
    coupled = [net.bn1, net.layer1[0].bn2, net.layer1[1].bn2]
    criterion.refresh(net, [group])
    expected = sum(criterion.gate_scores(net, coupled)[bn] for bn in coupled)
    assert torch.allclose(criterion(group), expected, rtol=1e-12, atol=0)
    # Each BatchNorm contributes: the sum is not any one of them.
    assert all((criterion(group) - criterion.scores[bn]).abs().max() > 0 for bn in coupled)
    assert issubclass(TaylorImportance, tp.importance.Importance)


# -- structure --------------------------------------------------------------------------------
@pytest.mark.parametrize("name,shape", [("resnet18_cifar", (3, 32, 32)),
                                        ("torchvision:resnet18", (3, 64, 64))])
def test_resnet18_prunes_to_the_macs_target_and_still_trains(name, shape):
    torch.manual_seed(0)
    model = models.create(name, num_classes=10).eval()
    before, model_flags = state_hash(model), flags(model)
    images = torch.randn(12, *shape)
    result = prune(model, images, macs_ratio=0.5, steps=2, batch_size=6)
    assert state_hash(model) == before and flags(model) == model_flags
    assert result.macs[0] == count_macs(model, images[:1])
    assert result.macs[1] == count_macs(result.model, images[:1])
    assert abs(result.macs[1] / result.macs[0] - 0.5) <= 0.025
    assert result.params[1] == count_params(result.model) < result.params[0]
    assert result.latency[0] > 0 and result.latency[1] > 0
    assert [r["step"] for r in result.history] == [1, 2]
    assert result.history[0]["macs"] > result.history[1]["macs"]
    modules = dict(result.model.named_modules())
    for layer, (_, after) in result.channels.items():
        module = modules[layer]
        assert after == getattr(module, "out_channels", getattr(module, "out_features",
                                                                 getattr(module, "num_features",
                                                                         None)))
    classifier = "linear" if name == "resnet18_cifar" else "fc"
    assert result.channels[classifier] == (10, 10)
    pruned = result.model.train()
    out = pruned(images[:4])
    F.cross_entropy(out, torch.arange(4)).backward()
    assert out.shape == (4, 10)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in pruned.parameters())


def test_params_and_channel_targets_and_ignored_layers(teacher, synthesized):
    images, targets = synthesized
    result = prune(teacher, (images, targets), params_ratio=0.5, importance="magnitude")
    assert abs(result.params[1] / result.params[0] - 0.5) <= 0.025
    first = teacher.features[0][0]
    result = prune(teacher, images, targets=targets, channels_ratio=0.6, steps=1,
                   ignored_layers=[first])
    prunable = ("features.1.0", "features.3.0", "features.4.0", "features.6.0")
    before = sum(result.channels[n][0] for n in prunable)
    after = sum(result.channels[n][1] for n in prunable)
    assert 0.6 * before - 1 < after <= 0.6 * before  # the fraction of the prunable channels
    assert result.channels["features.0.0"] == (32, 32)  # ignored
    assert result.channels["classifier"] == (10, 10)    # never pruned


def test_random_is_reproducible_from_its_seed(teacher, synthesized):
    images, _ = synthesized
    runs = [prune(teacher, images[:20], macs_ratio=0.7, importance="random", seed=seed).channels
            for seed in (5, 5, 6)]
    assert runs[0] == runs[1] != runs[2]


# -- quality ----------------------------------------------------------------------------------
def test_taylor_on_synthesized_images_keeps_more_accuracy_than_random(teacher, synthesized,
                                                                     test_digits):
    """80 % of the MACs kept, no fine-tuning, scored on the 200 synthesized images. Measured:
    Taylor 99.1 % on the 450 real test digits (teacher 99.3 %); random 76.4, 75.8 and 66.4 %
    (seeds 0-2, mean 72.9 %); Taylor on 300 other DI images (100 iterations, batches of 100):
    93.1 %."""
    images, targets = synthesized
    taylor = accuracy(prune(teacher, images, targets=targets, macs_ratio=0.8).model,
                      *test_digits)
    random = [accuracy(prune(teacher, images, macs_ratio=0.8, importance="random",
                             seed=seed).model, *test_digits) for seed in range(3)]
    assert taylor >= 0.9, taylor
    assert taylor >= sum(random) / 3 + 0.1, (taylor, random)


@pytest.mark.slow
def test_pruned_to_half_the_macs_and_fine_tuned_on_synthesized_images(teacher, test_digits,
                                                                       tmp_path):
    """≤ 50 % of the MACs (Taylor, 5 steps) on 600 DI images (100 iterations, 6 batches), then
    30 epochs of KD from the unpruned teacher on the same images. Measured: 49.2 % of the MACs
    kept, 60.9 % on the real test digits before fine-tuning, 99.3 % after (the teacher's); the
    same pruning and fine-tuning on 600 Gaussian noise images: 24.0 % before, 30.4 % after.
    Other pools: 300 DI images 98.4 % (noise 30 %), 1000 DI images of 200 iterations 99.3 %
    (noise 43 %). ~1 min on one core."""
    synthesize_dataset(make_inverter(teacher), tmp_path, 600, range(10), batch_size=100,
                       iterations=100, seed=0, save_png=False)
    noise = torch.randn((600, 1, 16, 16), generator=torch.Generator().manual_seed(0))
    finals = {}
    for name, pool in (("synthesized", tmp_path), ("noise", noise)):
        result = prune(teacher, pool, macs_ratio=0.5)
        assert result.macs[1] <= 0.5 * result.macs[0]
        metrics = distill_offline(teacher, result.model, pool, 30, eval_data=test_digits)
        finals[name] = metrics[-1]["val_acc"]
    assert finals["synthesized"] >= 0.98, finals
    assert finals["noise"] < 0.6, finals


# -- hardware-aware ---------------------------------------------------------------------------
def synthetic_table(teacher, expensive=(64, 64)) -> LatencyTable:
    """A device model: every layer costs ∝ c_in·c_out·positions, the (64 -> 64) convolution
    (features.4.0) 10× more per channel."""
    def latency(key, c_in, c_out):
        scale = 10.0 if (key.in_channels, key.out_channels) == expensive else 1.0
        return 1e-4 * scale * c_in * c_out * (key.feature_map[0] ** 2 if key.feature_map else 1)
    return LatencyTable.tabulate(teacher, torch.zeros(1, 1, 16, 16), latency)


def test_hardware_aware_ranking_removes_the_expensive_layer(teacher, synthesized):
    """Same channel budget (70 % of the prunable channels kept). Measured: η = 0 removes 13 of
    the expensive layer's 64 outputs and keeps 66 % of the table's latency; η = 1 removes 44 and
    keeps 16 %."""
    images, targets = synthesized
    table = synthetic_table(teacher)
    runs = {eta: prune(teacher, images, targets=targets, channels_ratio=0.7,
                       latency_table=table, eta=eta) for eta in (0.0, 1.0)}
    kept = {eta: r.channels["features.4.0"][1] for eta, r in runs.items()}
    assert kept[1.0] < kept[0.0], kept
    totals = {eta: sum(after for name, (_, after) in r.channels.items()
                       if name.endswith(".0")) for eta, r in runs.items()}
    assert totals[0.0] == totals[1.0]
    latency = {eta: r.table_latency[1] for eta, r in runs.items()}
    assert latency[1.0] <= 0.9 * latency[0.0], latency
    assert runs[0.0].table_latency[0] == runs[1.0].table_latency[0]


def test_latency_target_is_met_on_a_measured_table(teacher, synthesized, tmp_path):
    images, targets = synthesized
    table = LatencyTable.measure(teacher, images[:1], repeats=3, cache_dir=tmp_path)
    assert len(table.entries) == 6  # five convolutions and the classifier, all distinct
    assert all(v > 0 for e in table.entries.values() for row in e.ms for v in row)
    result = prune(teacher, images, targets=targets, latency_ratio=0.6, latency_table=table)
    before, after = result.table_latency
    assert 0.55 <= after / before <= 0.6


def test_latency_table_round_trips_and_refuses_another_device(teacher, tmp_path):
    table = synthetic_table(teacher)
    table.save(tmp_path / "table.json")
    loaded = LatencyTable.load(tmp_path / "table.json")
    assert loaded.entries == table.entries and loaded.device == table.device
    key = next(iter(table.entries))
    assert loaded.latency(key, 7, 9) == table.latency(key, 7, 9)
    data = json.loads((tmp_path / "table.json").read_text())
    data["device"]["name"] = "another CPU"
    (tmp_path / "other.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="another CPU"):
        LatencyTable.load(tmp_path / "other.json")
    foreign = LatencyTable.load(tmp_path / "other.json", check_device=False)
    images = torch.zeros(4, 1, 16, 16)
    with pytest.raises(ValueError, match="measured on cpu: another CPU"):
        prune(teacher, images, latency_table=foreign, eta=1.0)


def test_measured_tables_are_cached_per_device_and_shapes(teacher, tmp_path):
    first = LatencyTable.measure(teacher, torch.zeros(1, 1, 16, 16), repeats=2, cache_dir=tmp_path)
    files = list(tmp_path.iterdir())
    again = LatencyTable.measure(teacher, torch.zeros(1, 1, 16, 16), repeats=2, cache_dir=tmp_path)
    assert again.entries == first.entries  # read back, not measured again
    LatencyTable.measure(teacher, torch.zeros(2, 1, 16, 16), repeats=2, cache_dir=tmp_path)
    assert len(list(tmp_path.iterdir())) == len(files) + 1  # another batch: another table


# -- files ------------------------------------------------------------------------------------
def test_pruned_network_reloads_from_a_file_without_pickled_code(teacher, synthesized, tmp_path):
    images, _ = synthesized
    result = prune(teacher, images[:20], macs_ratio=0.6, importance="magnitude")
    save_pruned(result.model, tmp_path / "pruned.pt", arch="digits_net")
    load_tensors(tmp_path / "pruned.pt")  # weights_only: tensors, numbers and strings only
    reloaded = load_pruned(tmp_path / "pruned.pt")
    assert state_hash(reloaded) == state_hash(result.model)
    with torch.no_grad():
        assert torch.equal(reloaded(images[:8]), result.model(images[:8]))
    into = load_pruned(tmp_path / "pruned.pt", model=models.create("digits_net"))
    assert state_hash(into) == state_hash(result.model)


def test_result_report_is_json(teacher, synthesized):
    images, targets = synthesized
    result = prune(teacher, images[:20], targets=targets[:20], macs_ratio=0.7, steps=2)
    report = json.loads(json.dumps(result.to_json()))
    assert report["target"] == {"measure": "macs", "ratio": 0.7}
    assert report["macs"] == list(result.macs) and report["ratios"]["macs"] <= 0.7
    assert report["channels"]["classifier"] == [10, 10]
    assert len(report["history"]) == 2


# -- bad input --------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs,message", [
    (dict(macs_ratio=0.0), r"macs_ratio must be a number in \(0, 1\)"),
    (dict(macs_ratio=1.0), r"macs_ratio must be a number in \(0, 1\)"),
    (dict(params_ratio=1.5), r"params_ratio must be a number in \(0, 1\)"),
    (dict(latency_ratio=-0.1), r"latency_ratio must be a number in \(0, 1\)"),
    (dict(macs_ratio=0.5, params_ratio=0.5), "give one target ratio"),
    (dict(macs_ratio=1e-6), "out of reach"),
    (dict(steps=0), "steps must be an integer >= 1"),
    (dict(eta=1.0), "need a latency_table"),
    (dict(latency_ratio=0.5), "need a latency_table"),
    (dict(importance="l1"), "importance must be one of"),
    (dict(ignored_layers=["nope"]), "not a module of the model"),
])
def test_bad_arguments_are_clear_errors(teacher, kwargs, message):
    with pytest.raises(ValueError, match=message):
        prune(teacher, torch.zeros(4, 1, 16, 16), **kwargs)


def test_images_of_the_wrong_shape_are_clear_errors(teacher):
    with pytest.raises(ValueError, match=r"images of shape \(3, 16, 16\) do not fit DigitsNet"):
        prune(teacher, torch.zeros(4, 3, 16, 16))
    with pytest.raises(ValueError, match=r"images are \(1, 16, 16\) but example_inputs are"):
        prune(teacher, torch.zeros(4, 1, 16, 16), example_inputs=torch.zeros(1, 1, 32, 32))
    with pytest.raises(ValueError, match="one class index per image"):
        prune(teacher, torch.zeros(4, 1, 16, 16), targets=[1, 2])


def test_a_table_of_other_shapes_is_refused(teacher):
    table = synthetic_table(teacher)
    with pytest.raises(ValueError, match="measured for another network or input shape"):
        prune(teacher, torch.zeros(4, 1, 32, 32), latency_table=table, eta=1.0)


def test_models_without_a_prunable_layer_are_clear_errors():
    pooled = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
    with pytest.raises(ValueError, match="has no prunable layer"):
        prune(pooled, torch.zeros(4, 3, 8, 8))
    linear = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))  # the classifier only
    with pytest.raises(ValueError, match="the classifier or ignored"):
        prune(linear, torch.zeros(4, 3, 2, 2))


def test_without_torch_pruning_the_error_names_the_extra(teacher, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch_pruning", None)
    with pytest.raises(ImportError, match=r"dinv\[prune\]"):
        prune(teacher, torch.zeros(4, 1, 16, 16))


# -- the benchmark ----------------------------------------------------------------------------
def test_benchmark_smoke_run(tmp_path):
    from benchmarks import prune as prune_benchmark

    rows, paths = prune_benchmark.main(
        ["--images", "20", "--iterations", "2", "--epochs", "1", "--ratios", "0.5", "--methods",
         "taylor/synthesized,hardware-aware", "--resnet-images", "2", "--resnet-batch", "1",
         "--latency-batch", "4", "--pool", str(tmp_path / "pool"), "--out", str(tmp_path),
         "--name", "smoke"], log=lambda *a: None)
    assert [(r["workload"], r["method"]) for r in rows] == [
        ("digits", "unpruned"), ("digits", "taylor/synthesized"), ("digits", "hardware-aware"),
        ("resnet18_cifar", "unpruned"), ("resnet18_cifar", "hardware-aware")]
    for row in (r for r in rows if r["method"] != "unpruned"):
        assert abs(row["macs_kept"] - 0.5) <= 0.025 and 0 < row["table_latency_kept"] < 1
    assert rows[0]["acc_finetuned"] > 0.99 and 0 <= rows[1]["acc_finetuned"] <= 1
    for path in paths.values():
        assert path.exists() and path.stat().st_size > 0
