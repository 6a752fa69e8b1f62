"""Several processes (dinv.distributed): one global batch over 2 ranks computes what one process
computes on the whole batch (float64: images, losses and image gradients of every iteration);
independent batches write the one-process dataset, each batch once, and resume after a rank
dies; data-parallel distillation matches one process; `dinv invert` under torchrun.

Each group of processes is started by `dinv.distributed.run_local` (gloo over loopback, a store
on a port the OS picks, one thread per process, a timeout per group)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import dinv
from dinv import distributed, ops
from dinv.data import load_shards, synthesize_dataset
from dinv.distributed import RankFailed, run_local, split_sizes

from .cli._run import dinv as dinv_cli
from .test_inverter import tiny_net

GROUP_TIMEOUT_S = 150
TARGETS = [0, 1, 2, 3, 4, 0, 1, 2]
TOLERANCE = 1e-10
# One global batch, per case: Inverter options, batch shares, iterations and the forced backend
# (None: the C++ kernels). Together they cover both statistics paths (fused BN, hooks), both
# competition formulas, two resolutions (setting 0), equal and unequal shares, the torch
# reference formulations, and start noise drawn from the seed.
CASES = {
    "even": dict(options=dict(fused_bn=True, setting_id=1, competition="reference",
                              adi_scale=0.5), shares=None, iterations=10, backend=None),
    "uneven": dict(options=dict(fused_bn=False, setting_id=0, competition="js", adi_scale=0.5),
                   shares=(5, 3), iterations=10, backend=None),
    "reference-backend": dict(options=dict(fused_bn=True, setting_id=1, competition="reference",
                                           adi_scale=0.5), shares=(5, 3), iterations=3,
                              backend="reference"),
}


def make_inverter(**options):
    """A float64 tiny teacher's Inverter: every loss term on, flips and circular shifts (so that
    every pixel is in every view and has a gradient), a loss log at every iteration."""
    settings = dict(lr=0.1, r_feature=0.05, first_bn_multiplier=10.0, tv_l1=0.3, tv_l2=1e-3,
                    l2=1e-4, main_loss_multiplier=0.7, jitter=2, flip=True, log_every=1)
    return dinv.Inverter(tiny_net().double(), image_shape=(3, 8, 8), **{**settings, **options})


def trajectory(inverter, iterations, backend=None, **arguments):
    """(returned images, loss of every iteration, image gradient of every iteration): the
    gradients are those of this process's images, read by a hook on the optimized tensor."""
    losses, gradients, hooked = [], [], set()
    loss_of_view = inverter._loss

    def recording_loss(images, *args, **kwargs):
        if id(images) not in hooked:
            hooked.add(id(images))
            images.register_hook(lambda grad: gradients.append(grad.detach().clone()))
        return loss_of_view(images, *args, **kwargs)

    inverter._loss = recording_loss
    student = tiny_net(seed=3).double()
    with ops.use_backend(backend):
        images = inverter.invert(TARGETS, iterations=iterations, student=student, seed=3,
                                 callback=lambda i, x, terms: losses.append(terms["loss"]),
                                 **arguments)
    return images, losses, gradients


def naive_sum_across_ranks(local, ranks):
    """Autograd through torch.distributed.nn: its backward all-reduces the gradient again."""
    return torch.distributed.nn.functional.all_reduce(local)


def naive_merge_statistics(local, weights, ranks):
    """Chan's merge by autograd through torch.distributed.nn's all_gather, whose backward sums
    every rank's gradient for each rank's part."""
    rows = torch.stack(torch.distributed.nn.functional.all_gather(local))
    half = local.numel() // 2
    means, variances = rows[:, :half], rows[:, half:]
    w = weights.to(local.dtype).view(-1, 1)
    mean = (w * means).sum(0)
    return torch.cat([mean, (w * (variances + (means - mean) ** 2)).sum(0)])


# Start images and jitter/flip seed of the sync_stats=False run.
PER_RANK_INIT = torch.randn((len(TARGETS), 3, 8, 8), dtype=torch.float64,
                            generator=torch.Generator().manual_seed(4))
PER_RANK_AUGMENT_SEED = 7


def first_terms(inverter, targets, init):
    """The loss terms of one iteration from `init`."""
    terms = []
    inverter.invert(targets, iterations=1, seed=3, init=init, augment_seed=PER_RANK_AUGMENT_SEED,
                    callback=lambda i, x, t: terms.append(t))
    return terms[0]


def global_batch_rank():
    """Every case's trajectory on this rank; "per_rank": the first terms with sync_stats=False;
    "naive": the even case's first iteration with the naive backwards."""
    results = {name: trajectory(make_inverter(distributed=True, batch_shares=case["shares"],
                                              **case["options"]), case["iterations"],
                                case["backend"])
               for name, case in CASES.items()}
    results["per_rank"] = first_terms(make_inverter(distributed=True, sync_stats=False),
                                      TARGETS, PER_RANK_INIT)
    distributed.sum_across_ranks = naive_sum_across_ranks
    distributed.merge_statistics = naive_merge_statistics
    results["naive"] = trajectory(make_inverter(distributed=True, **CASES["even"]["options"]), 1)
    return results


@pytest.fixture(scope="module")
def global_runs():
    """(one process's trajectories, each rank's), per case; one group of 2 processes."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = {name: trajectory(make_inverter(**case["options"]), case["iterations"],
                                   case["backend"])
                  for name, case in CASES.items()}
    finally:
        torch.set_num_threads(threads)
    return single, run_local(global_batch_rank, 2, timeout_s=GROUP_TIMEOUT_S)


@pytest.mark.parametrize("case,sizes", [("even", [4, 4]), ("uneven", [5, 3]),
                                       ("reference-backend", [5, 3])])
def test_global_batch_is_the_one_process_batch(global_runs, case, sizes):
    """float64, 10 iterations (3 on the torch reference backend): every rank gets the whole
    batch back, equal to one process's images; every iteration's loss is the same on every rank
    and equal to one process's; the ranks' image gradients, put together, are one process's
    gradient of the whole batch."""
    single, ranks = global_runs
    want_images, want_losses, want_gradients = single[case]
    assert split_sizes(len(TARGETS), 2, CASES[case]["shares"]) == sizes
    for rank, results in enumerate(ranks):
        result = results[case]
        assert result[0].shape == want_images.shape
        assert float((result[0] - want_images).abs().max()) < TOLERANCE
        assert len(result[1]) == CASES[case]["iterations"]
        assert max(abs(a - b) for a, b in zip(result[1], want_losses)) < TOLERANCE
        assert [len(g) for g in result[2]] == [sizes[rank]] * CASES[case]["iterations"]
    gradients = [torch.cat(step) for step in zip(*(r[case][2] for r in ranks))]
    assert len(gradients) == len(want_gradients) == CASES[case]["iterations"]
    for got, want in zip(gradients, want_gradients):
        assert float(want.abs().max()) > 1e-4  # a real gradient, not rounding noise
        assert float((got - want).abs().max()) < TOLERANCE


def test_the_double_all_reduce_backward_is_caught(global_runs):
    """Autograd through torch.distributed.nn's collectives gives world-size times the gradient:
    the equivalence above fails by far more than its tolerance."""
    single, ranks = global_runs
    want = single["even"][2][0]
    got = torch.cat([r["naive"][2][0] for r in ranks])
    assert float((got - want).abs().max()) > 1e3 * TOLERANCE
    assert float((got - 2 * want).abs().max()) < TOLERANCE


def test_per_rank_statistics_are_each_ranks_own(global_runs):
    """sync_stats=False (the reference's multi-GPU behaviour): each rank's BN term is that of
    its share alone, while the other terms stay the whole batch's."""
    terms = [results["per_rank"] for results in global_runs[1]]
    whole_batch = first_terms(make_inverter(), TARGETS, PER_RANK_INIT)
    for rank, rows in enumerate((slice(0, 4), slice(4, 8))):
        alone = first_terms(make_inverter(), TARGETS[rows], PER_RANK_INIT[rows])
        assert terms[rank]["r_feature"] == pytest.approx(alone["r_feature"], rel=1e-12)
        assert terms[rank]["main"] == pytest.approx(whole_batch["main"], rel=1e-12)
    assert terms[0]["r_feature"] != pytest.approx(whole_batch["r_feature"], rel=1e-3)


# -- independent batches -----------------------------------------------------------------------
DATASET = dict(num_images=14, classes=[0, 1, 2, 3, 4], batch_size=2, iterations=2, seed=5)
ALL_BATCHES = set(range(7))


def dataset_rank(out_dir, die_after_first_batch: bool):
    """Synthesizes DATASET into `out_dir`; returns the batches this rank synthesized. Rank 1
    dies right after its first batch if asked."""
    done = []

    def on_batch(batch, images, labels):
        done.append(batch)
        if die_after_first_batch and distributed.current().rank == 1:
            os._exit(3)

    inverter = dinv.Inverter(tiny_net(), image_shape=(3, 8, 8))
    synthesize_dataset(inverter, out_dir, on_batch=on_batch, **DATASET)
    return done


def recorded_batches(out_dir):
    """The batches the manifest and the ranks' progress files record as finished."""
    with open(os.path.join(out_dir, "manifest.json")) as f:
        batches = set(json.load(f)["completed"])
    progress = os.path.join(out_dir, "progress")
    for name in os.listdir(progress) if os.path.isdir(progress) else []:
        with open(os.path.join(progress, name)) as f:
            batches |= {int(b) for b in json.load(f)["shards"]}
    return batches


def assert_same_dataset(out_dir, expected):
    images, labels = load_shards(out_dir)
    assert torch.equal(images, expected[0]) and torch.equal(labels, expected[1])
    assert not os.listdir(os.path.join(out_dir, "progress"))
    pngs = sum(len(files) for _, _, files in os.walk(os.path.join(out_dir, "images")))
    assert pngs == DATASET["num_images"]


def test_independent_batches_write_the_one_process_dataset_and_resume(tmp_path):
    """2 ranks: each batch synthesized by exactly one rank, and the dataset (every shard) equal
    bit for bit to one process's. Then rank 1 dies after its first batch: the run started again
    synthesizes exactly the batches not recorded, and the dataset is again one process's."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        inverter = dinv.Inverter(tiny_net(), image_shape=(3, 8, 8))
        synthesize_dataset(inverter, tmp_path / "one", **DATASET)
    finally:
        torch.set_num_threads(threads)
    expected = load_shards(tmp_path / "one")

    shares = run_local(dataset_rank, 2, str(tmp_path / "two"), False, timeout_s=GROUP_TIMEOUT_S)
    assert set(shares[0]).isdisjoint(shares[1]) and set(shares[0]) | set(shares[1]) == ALL_BATCHES
    assert shares[0] == [0, 2, 4, 6] and shares[1] == [1, 3, 5]
    assert_same_dataset(tmp_path / "two", expected)

    interrupted = str(tmp_path / "interrupted")
    with pytest.raises(RankFailed) as failure:
        run_local(dataset_rank, 2, interrupted, True, timeout_s=GROUP_TIMEOUT_S)
    assert failure.value.rank == 1 and failure.value.exitcode == 3
    recorded = recorded_batches(interrupted)
    assert 1 in recorded and recorded != ALL_BATCHES
    resumed = run_local(dataset_rank, 2, interrupted, False, timeout_s=GROUP_TIMEOUT_S)
    redone = set(resumed[0]) | set(resumed[1])
    assert redone.isdisjoint(recorded) and redone | recorded == ALL_BATCHES
    assert set(resumed[0]).isdisjoint(resumed[1])
    assert_same_dataset(interrupted, expected)


# -- data-parallel distillation -------------------------------------------------------------------
KD = dict(batch_size=64, lr=0.05, seed=0)
KD_EPOCHS = 12


def distill(pool, epochs, student, **options):
    """(metrics, weights) of `student` distilled from the digits teacher on `pool`."""
    from dinv import models
    from dinv.distill import distill_offline

    metrics = distill_offline(models.load_digits_teacher(), student, pool, epochs,
                              **{**KD, **options})
    return metrics, [p.detach().clone() for p in student.parameters()]


def batchnorm_free_student():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(256, 32), torch.nn.ReLU(),
                               torch.nn.Linear(32, 10))


def digits_student():
    from dinv import models

    torch.manual_seed(0)
    return models.create("digits_student")


def distill_rank(pool, eval_data, epochs):
    """On this rank: the digits student's metrics after `epochs` on `pool`, and the weights of
    a BatchNorm-free student after 2 epochs in batches of 51 (shares 26 + 25, a last batch of
    50)."""
    return (distill(pool, epochs, digits_student(), eval_data=eval_data)[0],
            distill(pool[:203], 2, batchnorm_free_student(), batch_size=51)[1])


def adaptive_rank(out_dir):
    """ADI over the ranks: 40 images in batches of 10, one per rank at every other step."""
    from dinv import models
    from dinv.distill import distill_adaptive
    from dinv.presets import digits_settings

    settings = digits_settings()
    settings.pop("iterations")
    teacher = models.load_digits_teacher()
    torch.manual_seed(0)
    student = models.create("digits_student")
    inverter = dinv.Inverter(teacher, **settings, adi_scale=1.0)
    metrics = distill_adaptive(teacher, student, inverter, 40, 2, synth_every=2,
                               synth_batch_size=10, iterations=2, batch_size=10,
                               checkpoint_dir=out_dir)
    return metrics, [p.detach().clone() for p in student.parameters()]


def test_data_parallel_distillation_reaches_the_one_process_accuracy():
    """12 epochs on the 1347 training digits (the teacher's logits are the targets) with 2 ranks
    reach the accuracy of one process on the 450 real test digits within 1 point (each rank's
    BatchNorm normalizes its own half of a batch), both ranks ending with the same student; a
    student without BatchNorm gets one process's weights (fp32 rounding), uneven shares
    included: each rank's loss weight makes DDP's average the whole batch's gradient."""
    from dinv.datasets import load_digits

    pool, test = load_digits("train")[0], load_digits("test")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        one = distill(pool, KD_EPOCHS, digits_student(), eval_data=test)[0]
        one_weights = distill(pool[:203], 2, batchnorm_free_student(), batch_size=51)[1]
    finally:
        torch.set_num_threads(threads)
    (metrics, weights), (other_metrics, _) = run_local(distill_rank, 2, pool, test, KD_EPOCHS,
                                                       timeout_s=GROUP_TIMEOUT_S)
    assert metrics == [dict(row, seconds=r["seconds"]) for row, r in zip(other_metrics, metrics)]
    assert one[-1]["val_acc"] > 0.9
    assert abs(metrics[-1]["val_acc"] - one[-1]["val_acc"]) <= 0.01, (one[-1], metrics[-1])
    assert metrics[-1]["images_seen"] == one[-1]["images_seen"]
    assert max(float((a - b).abs().max()) for a, b in zip(weights, one_weights)) < 1e-6


def test_adaptive_distillation_synthesizes_one_batch_per_rank(tmp_path):
    """ADI over 2 ranks: both batches of a synthesis step are synthesized (one per rank) and
    reach every rank's pool, so the 40 images take half the steps; both ranks end with the same
    student, and rank 0 alone wrote the checkpoint."""
    ranks = run_local(adaptive_rank, 2, str(tmp_path), timeout_s=GROUP_TIMEOUT_S)
    (metrics, weights), (other_metrics, other_weights) = ranks
    assert [(m["images_synthesized"], m["pool_size"]) for m in metrics] == [(40, 40), (40, 40)]
    assert [m["val_acc"] for m in metrics] == [m["val_acc"] for m in other_metrics]
    assert all(torch.equal(a, b) for a, b in zip(weights, other_weights))
    assert (tmp_path / "checkpoint.pt").exists()


# -- the command line under torchrun ------------------------------------------------------------
INVERT = ("invert", "--teacher", "digits", "--num-images", "12", "--batch-size", "3",
          "--iterations", "2", "--classes", "3,4", "--no-png")


def torchrun(*args) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc-per-node 2 -m dinv ARGS` over loopback, captured."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("DINV_DEBUG", None)
    if "GLOO_SOCKET_IFNAME" not in env and distributed.loopback_interface():
        env["GLOO_SOCKET_IFNAME"] = distributed.loopback_interface()
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc-per-node", "2", "-m", "dinv", *[str(a) for a in args]],
                          env=env, capture_output=True, text=True, timeout=GROUP_TIMEOUT_S)


def test_torchrun_invert_writes_the_one_process_dataset(tmp_path):
    """`torchrun --standalone --nproc-per-node 2 -m dinv invert ...` writes the dataset of
    `dinv invert ...`, with one manifest and one summary line."""
    assert dinv_cli(*INVERT, "--out", tmp_path / "one").returncode == 0
    result = torchrun(*INVERT, "--out", tmp_path / "two")
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("batches in") == 1, result.stdout
    one, two = load_shards(tmp_path / "one"), load_shards(tmp_path / "two")
    assert torch.equal(one[0], two[0]) and torch.equal(one[1], two[1])
    assert json.loads((tmp_path / "two" / "manifest.json").read_text())["completed"] == \
        [0, 1, 2, 3]


@pytest.mark.parametrize("mode", ["di", pytest.param("adi", marks=pytest.mark.slow)])
def test_torchrun_distill_writes_one_student(tmp_path, mode):
    """`dinv distill` under torchrun: synthesis shared, the student trained data-parallel; rank
    0 alone prints the epochs and writes the student, metrics and checkpoint."""
    result = torchrun("distill", "--teacher", "digits", "--mode", mode, "--images", "20",
                      "--epochs", "2", "--iterations", "2", "--batch-size", "5",
                      "--kd-batch-size", "10", "--synth-every", "1", "--out", tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("epoch 2:") == 1 and result.stdout.count("student:") == 1
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert [m["images_synthesized"] for m in metrics] == [20, 20]
    assert (tmp_path / "student.pt").exists()


# -- options and shares, in one process -----------------------------------------------------------
def test_split_sizes():
    assert split_sizes(8, 2) == [4, 4]
    assert split_sizes(9, 2) == [5, 4]
    assert split_sizes(8, 2, (5, 3)) == [5, 3]
    assert split_sizes(10, 3) == [4, 3, 3]
    with pytest.raises(ValueError, match="without an image"):
        split_sizes(3, 3, (100, 1, 1))
    with pytest.raises(ValueError, match="cannot give each"):
        split_sizes(1, 2)
    with pytest.raises(ValueError, match="positive numbers"):
        split_sizes(4, 2, (1, 0))


def test_distributed_options_are_checked():
    with pytest.raises(ValueError, match="initialized process group"):
        make_inverter(distributed=True)
    with pytest.raises(ValueError, match="distributed=True"):
        make_inverter(sync_stats=False)
    with pytest.raises(ValueError, match="distributed=True"):
        make_inverter(batch_shares=(1, 1))
    with pytest.raises(TypeError, match="sync_stats"):
        make_inverter(sync_stats="no")
    assert distributed.current() == distributed.SINGLE
    assert "global_batch" not in make_inverter().settings()
