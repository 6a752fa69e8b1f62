"""Smoke tests of benchmarks/throughput.py and benchmarks/ops.py: the machinery
(benchmarks/harness.py) runs on a tiny workload in seconds and writes its files, and the
benchmark's eager baseline (the reference loop in benchmarks/reference.py) computes the same loss
as dinv.Inverter for the same images and augmentation, which is what makes its speed-up ratios
meaningful."""
from __future__ import annotations

import contextlib
import copy
import json

import pytest
import torch
import torch.nn.functional as F

from benchmarks import harness, reference, throughput
from benchmarks import ops as ops_bench
from dinv.augment import view_indices
from dinv.imaging import pixel_bounds
from dinv.model_utils import frozen

TINY_CONFIGS = "eager,ops,fused-bn,channels-last"


def test_throughput_smoke(tmp_path):
    results, paths = throughput.main(
        ["--device", "cpu", "--workloads", "tiny", "--configs", TINY_CONFIGS, "--rounds", "1",
         "--iters", "2", "--mm-size", "128", "--out", str(tmp_path), "--name", "smoke"],
        log=lambda *a: None)
    for path in paths.values():
        assert path.exists() and path.stat().st_size > 0
    rows = {r.config: r for r in results}
    assert set(rows) == set(TINY_CONFIGS.split(","))
    for r in results:
        assert r.status == "ok", (r.config, r.status)
        assert r.s_per_it > 0 and r.samples == 2 and r.speedup_vs_eager > 0
        assert r.peak_mem_mb is not None and r.peak_mem_mb > 0
        assert r.warmup_s > 0
        assert r.ops_per_it > 0
    # Fused statistics, fused BN and one-pass priors: fewer ops (GPU launches) per iteration.
    assert rows["ops"].ops_per_it < rows["eager"].ops_per_it
    assert rows["fused-bn"].ops_per_it < rows["ops"].ops_per_it
    eager = rows["eager"].loss_it1
    for name in TINY_CONFIGS.split(",")[1:]:
        assert rows[name].loss_it1 == pytest.approx(eager, rel=1e-5), name
    data = json.loads(paths["json"].read_text())
    assert len(data["results"]) == len(rows) and data["meta"]["peak"]["gflops"] > 0
    assert paths["csv"].read_text().splitlines()[0].startswith("workload,config")


class _Stop(Exception):
    pass


def _trajectory(runner, targets, init, seed, stop_after):
    """(loss, images) after each of the first `stop_after` iterations of a 200-iteration run
    (200, so both schedules warm up over 100 iterations and give the same learning rates)."""
    steps = []

    def callback(iteration, loss, images):
        steps.append((float(loss.detach() if torch.is_tensor(loss) else loss), images.clone()))
        if iteration == stop_after:
            raise _Stop

    with pytest.raises(_Stop):
        runner.run(targets, 200, init, seed, callback, 1)
    return steps


def _view_loss_and_grad(runner, images, targets, dy, dx, flip):
    """Loss of one jittered/flipped view and its gradient w.r.t. the images, through the
    runner's own implementation (the reference's roll+flip and hooks, or dinv's index math,
    statistics and compile mode, called as `invert` calls it)."""
    x = images.clone().requires_grad_(True)
    if isinstance(runner, harness.ReferenceRunner):
        impl = runner.impl
        for p in impl.net_teacher.parameters():
            p.requires_grad_(impl.teacher_requires_grad)
        view = torch.roll(x, shifts=(dy, dx), dims=(2, 3))
        loss = impl.forward_loss(torch.flip(view, dims=(3,)) if flip else view, targets)
    else:
        inv = runner.inv
        view = view_indices(x.shape[2], x.shape[3], dy, dx, flip, inv.jitter_mode, x.device)
        background = pixel_bounds(inv.mean, inv.std, x.device)[0].to(inv.dtype)
        with frozen(inv.teacher), inv.statistics:
            loss, _, _ = inv._loss_fn(1)(x, view, background, targets, None)
    (grad,) = torch.autograd.grad(loss, x)
    return float(loss.detach()), grad


def _runnable_configs(device, slow):
    rows = []
    for config in throughput.configs(torch.bfloat16):
        if config.name == "eager" or (config.gpu_only and device != "cuda"):
            continue
        marks = [pytest.mark.slow] if config.compiles else []
        if device == "cuda":
            marks.append(pytest.mark.cuda)
        if config.compiles == slow:
            rows.append(pytest.param(device, config.name, marks=marks, id=f"{device}-{config.name}"))
    return rows


# Not 0: the tiny teacher's running statistics were settled on the images of seed 0, where every
# ‖running − batch‖ is ~0 and its gradient direction is rounding noise.
SEEDS = (10, 11, 12)
STEPS = 5
# Tolerances against the eager fp32 reference loop: fp32 configurations differ only by the
# order of floating-point sums (TF32 is off in this test, on GPU); autocast runs the convolutions
# in bf16 (8-bit mantissa).
FP32_TOL = dict(loss=1e-5, grad=(1e-4, 1e-6), images=2e-5)
AMP_TOL = dict(loss=3e-2, grad_cosine=0.99)


@pytest.mark.parametrize("device,config_name",
                         _runnable_configs("cpu", slow=False) + _runnable_configs("cpu", slow=True)
                         + _runnable_configs("cuda", slow=False)
                         + _runnable_configs("cuda", slow=True))
def test_every_config_computes_the_reference_iteration(device, config_name):
    """Each optimization the benchmark times leaves the computation unchanged: for the same
    start images and jitter/flip draws, every configuration gives the eager reference loop's
    loss and image gradient on a jittered, flipped view, and its images after five Adam steps
    and clips."""
    workload = throughput.workloads(device, quick=True)["tiny"]
    teacher = workload.teacher().to(device)
    config = next(c for c in throughput.configs(torch.bfloat16) if c.name == config_name)
    options = throughput.resolve_options(config, device, torch.bfloat16)
    targets = torch.arange(workload.batch, device=device) % workload.classes
    torch._dynamo.reset()
    no_tf32 = contextlib.ExitStack()
    if device == "cuda":
        no_tf32.enter_context(torch.backends.cudnn.flags(enabled=True, allow_tf32=False))
        previous = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False
        no_tf32.callback(setattr, torch.backends.cuda.matmul, "allow_tf32", previous)
    baseline = harness.ReferenceRunner(copy.deepcopy(teacher), workload, {})
    runner = harness.make_runner(config, copy.deepcopy(teacher), workload, options)
    amp = "amp_dtype" in options
    try:
        for seed in SEEDS:
            init = torch.randn((workload.batch,) + workload.image_shape,
                               generator=torch.Generator().manual_seed(seed)).to(device)
            # Same view for both (shift in both directions and a flip: no symmetric shortcut).
            want_loss, want_grad = _view_loss_and_grad(baseline, init, targets, 1, -1, True)
            got_loss, got_grad = _view_loss_and_grad(runner, init, targets, 1, -1, True)
            if amp:
                assert got_loss == pytest.approx(want_loss, rel=AMP_TOL["loss"])
                cosine = F.cosine_similarity(got_grad.flatten(), want_grad.flatten(), dim=0)
                assert cosine > AMP_TOL["grad_cosine"], float(cosine)
                continue
            assert got_loss == pytest.approx(want_loss, rel=FP32_TOL["loss"])
            rtol, atol = FP32_TOL["grad"]
            torch.testing.assert_close(got_grad, want_grad, rtol=rtol,
                                       atol=atol * float(want_grad.abs().max()))
            want = _trajectory(baseline, targets, init, seed, STEPS)
            got = _trajectory(runner, targets, init, seed, STEPS)
            assert [g[0] for g in got] == pytest.approx([w[0] for w in want], rel=1e-4)
            atol = FP32_TOL["images"]
            assert float((want[-1][1] - want[0][1]).abs().max()) > 100 * atol  # Adam moved them
            torch.testing.assert_close(got[-1][1], want[-1][1], rtol=0, atol=atol)
    finally:
        baseline.close()
        runner.close()
        no_tf32.close()


def test_draws_cover_flips_and_shifts():
    """The trajectories above see flipped and unflipped views, shifted along both axes."""
    import random

    draws = set()
    for seed in SEEDS:
        rng = random.Random(seed)
        draws.update((rng.randint(-1, 1), rng.randint(-1, 1), rng.random() > 0.5)
                     for _ in range(STEPS))
    assert any(d[2] for d in draws) and any(not d[2] for d in draws)
    assert any(d[0] for d in draws) and any(d[1] for d in draws)


@pytest.mark.parametrize("bn,shape", [(torch.nn.BatchNorm2d, (3, 4, 5, 6)),
                                      (torch.nn.BatchNorm1d, (6, 4)),
                                      (torch.nn.BatchNorm1d, (3, 4, 7)),
                                      (torch.nn.BatchNorm3d, (2, 4, 3, 5, 2))],
                         ids=["2d", "1d-NC", "1d-NCL", "3d"])
def test_reference_hook_is_the_reference_formula(bn, shape):
    """The baseline's BN term equals ‖rv − var‖ + ‖rm − mean‖ with the biased variance over
    every dim but the channels, for any BatchNorm's input rank."""
    bn = bn(4).eval()
    bn.running_mean.uniform_(-1, 1)
    bn.running_var.uniform_(0.5, 2)
    hook = reference.DeepInversionFeatureHook(bn)
    x = torch.randn(shape)
    bn(x)
    dims = (0,) + tuple(range(2, x.dim()))
    mean, var = x.mean(dims), x.var(dims, unbiased=False)
    want = (bn.running_var - var).norm() + (bn.running_mean - mean).norm()
    assert float(hook.r_feature) == pytest.approx(float(want), rel=1e-6)
    hook.close()


def test_reference_loss_is_the_reference_loop_objective():
    """`reference.reference_loss` (hooks on every BatchNorm) is the loss the reference loop
    optimizes, on a teacher whose BatchNorms are all 2-d; with a student it adds adi_scale times
    the reference's clamped competition term; it leaves no hook behind."""
    workload = throughput.workloads("cpu", quick=True)["tiny"]
    teacher, student = workload.teacher(), workload.teacher()
    torch.nn.init.normal_(student.classifier.weight)
    coefficients = dict(workload.coefficients, main_loss_multiplier=0.7)
    impl = reference.ReferenceInversion(teacher, workload.image_shape, workload.mean,
                                        workload.std, **coefficients)
    targets = torch.arange(workload.batch) % workload.classes
    x = torch.randn((workload.batch,) + workload.image_shape,
                    generator=torch.Generator().manual_seed(10))
    with torch.no_grad():
        want = impl.forward_loss(x, targets)
    impl.close()
    with torch.no_grad():
        got = reference.reference_loss(teacher, x, targets, coefficients)
        assert float(got) == pytest.approx(float(want), rel=1e-6)
        adi = reference.reference_loss(teacher, x, targets, dict(coefficients, adi_scale=0.5),
                                       student=student)
        competition = reference.js_competition(student(x), teacher(x))
    assert float(adi - got) == pytest.approx(0.5 * float(competition), rel=1e-5)
    assert 0 < float(competition) < 1
    assert not any(m._forward_hooks for m in teacher.modules())


def test_ops_bench_case_runs():
    """One small case of benchmarks/ops.py per op: every implementation runs and agrees with
    the reference formulation."""
    for case in [ops_bench.Case("bn_stat_loss", (2, 8, 5, 5), torch.float32, "cpu"),
                 ops_bench.Case("bn_inversion", (2, 8, 5, 5), torch.float32, "cpu"),
                 ops_bench.Case("tv_loss_l2", (2, 3, 9, 9), torch.float32, "cpu"),
                 ops_bench.Case("image_priors", (2, 3, 9, 9), torch.float32, "cpu"),
                 ops_bench.Case("js_competition", (4, 10), torch.float32, "cpu"),
                 ops_bench.Case("kd_loss", (4, 10), torch.float32, "cpu")]:
        rows = ops_bench.run_case(case, rounds=1, repeats=1, log=lambda *a: None)
        assert rows[0].impl == "eager-ref" and len(rows) >= 2
        for r in rows:
            assert r.status == "ok" and r.ms > 0, (case.id, r.impl, r.status)
            assert r.loss_rel_diff < 1e-4 and r.max_abs_grad_diff < 1e-4, (case.id, r.impl)


@pytest.mark.slow
def test_throughput_smoke_compiled(tmp_path):
    """The compiled rows (reference forward+loss under torch.compile, Inverter(compile=True)) run
    and compute the eager loss. Slow: three CPU compilations, 20-60 s each on 2 busy cores."""
    results, _ = throughput.main(
        ["--device", "cpu", "--workloads", "tiny", "--configs",
         "eager,ref-compile,ref-compile-frozen,compile", "--rounds", "1", "--iters", "2", "--mm-size", "128", "--no-memory", "--out",
         str(tmp_path)], log=lambda *a: None)
    rows = {r.config: r for r in results}
    for r in results:
        assert r.status == "ok" and r.s_per_it > 0, (r.config, r.status)
    for name in ("ref-compile", "ref-compile-frozen", "compile"):
        assert rows[name].loss_it1 == pytest.approx(rows["eager"].loss_it1, rel=1e-5)
        assert rows[name].dynamo.get("breaks", 0) == 0, rows[name].dynamo


def test_ops_bench_main_writes_its_table(tmp_path):
    lines = []
    results = ops_bench.main(["--quick", "--ops", "kd_loss", "--rounds", "1", "--repeats", "1",
                              "--out", str(tmp_path), "--name", "smoke"], log=lines.append)
    data = json.loads((tmp_path / "smoke.json").read_text())
    assert data["meta"]["copy_gb_per_s"] > 0
    assert len(data["results"]) == len(results) >= 2
    assert any("%BW" in line for line in lines)


def test_distributed_rows_run_and_report_scaling():
    """Two rows of `throughput.py --distributed` on the tiny workload (one process; one global
    batch over 2 processes): each is timed in its own group and reports its rate and scaling
    efficiency."""
    workload = throughput.workloads("cpu", quick=True)["tiny"]
    rows = [harness.DistributedRow("1 process", "single", 1, 1, 4),
            harness.DistributedRow("2 processes, one global batch", "global", 2, 1, 4)]
    results = harness.bench_distributed(workload, {"fused_bn": True}, rows, 1, 2, "cpu",
                                        log=lambda *a: None)
    assert [r["processes"] for r in results] == [1, 2]
    assert results[0]["scaling_efficiency"] == 1.0
    for r in results:
        assert r["s_per_it"] > 0 and r["img_it_per_s"] > 0 and r["scaling_efficiency"] > 0
        assert len(r["rank_s_per_it"]) == r["processes"]
    assert [row.mode for row in harness.distributed_rows([2], 4, "cpu")] == \
        ["single", "single", "independent", "global", "global"]
    with pytest.raises(SystemExit, match="one eager dinv configuration"):
        throughput.main(["--distributed", "--configs", "compile"], log=lambda *a: None)


@pytest.mark.slow
def test_throughput_distributed_smoke(tmp_path):
    """`throughput.py --distributed` end to end: every row, written to CSV/JSON."""
    results, paths = throughput.main(
        ["--distributed", "--device", "cpu", "--workloads", "tiny", "--rounds", "1", "--iters",
         "1", "--out", str(tmp_path), "--name", "smoke"], log=lambda *a: None)
    assert len(results) == 5 and all(r["img_it_per_s"] > 0 for r in results)
    assert json.loads(paths["json"].read_text())["results"][0]["mode"] == "single"
