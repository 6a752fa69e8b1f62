"""Smoke tests of benchmarks/throughput.py and benchmarks/ops.py: the machinery runs on a tiny
workload in seconds and writes its files, and the benchmark's eager baseline (the reference loop
written out in throughput.py) computes the same loss as dinv.Inverter for the same images and
augmentation, which is what makes its speed-up ratios meaningful."""
from __future__ import annotations

import copy
import json

import pytest
import torch

from benchmarks import ops as ops_bench
from benchmarks import throughput

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
    eager = rows["eager"].loss_it1
    for name in TINY_CONFIGS.split(",")[1:]:
        assert rows[name].loss_it1 == pytest.approx(eager, rel=1e-5), name
    data = json.loads(paths["json"].read_text())
    assert len(data["results"]) == len(rows) and data["meta"]["peak"]["gflops"] > 0
    assert paths["csv"].read_text().splitlines()[0].startswith("workload,config")


class _Stop(Exception):
    pass


def _losses(run, stop_after):
    """Loss of each of the first `stop_after` iterations of a 200-iteration run (200, so both
    schedules warm up over 100 iterations and give the same learning rates)."""
    losses = []

    def callback(iteration, loss):
        losses.append(float(loss.detach()) if torch.is_tensor(loss) else float(loss))
        if iteration == stop_after:
            raise _Stop

    with pytest.raises(_Stop):
        run(callback)
    return losses


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("fused_bn", [False, True])
def test_baseline_matches_dinv(seed, fused_bn):
    """Same start images and jitter/flip draws: the reference loop and dinv.Inverter agree on
    the loss of iteration 1, and still after two Adam steps and clips (iterations 2 and 3)."""
    workload = throughput.workloads("cpu", quick=True)["tiny"]
    teacher = workload.teacher()
    init = torch.randn((workload.batch,) + workload.image_shape,
                       generator=torch.Generator().manual_seed(seed))
    targets = torch.arange(workload.batch) % workload.classes

    reference = throughput.ReferenceRunner(copy.deepcopy(teacher), workload, {})
    dinv_runner = throughput.DinvRunner(copy.deepcopy(teacher), workload, {"fused_bn": fused_bn})
    ref = _losses(lambda cb: reference.run(targets, 200, init, seed, cb, 1), 3)
    got = _losses(lambda cb: dinv_runner.run(targets, 200, init, seed, cb, 1), 3)
    assert got[0] == pytest.approx(ref[0], rel=1e-5)
    assert got == pytest.approx(ref, rel=1e-4)
    # The draws differ across seeds (some flip, some shift), so the check is not vacuous.
    reference.close()
    dinv_runner.close()


def test_draws_cover_flips_and_shifts():
    import random

    draws = set()
    for seed in range(4):
        rng = random.Random(seed)
        draws.add((rng.randint(-1, 1), rng.randint(-1, 1), rng.random() > 0.5))
    assert any(d[2] for d in draws) and any(not d[2] for d in draws)
    assert any(d[0] or d[1] for d in draws)


def test_reference_hook_is_the_reference_formula():
    """The baseline's BN term equals ‖rv − var‖ + ‖rm − mean‖ with the biased variance."""
    bn = torch.nn.BatchNorm2d(4).eval()
    bn.running_mean.uniform_(-1, 1)
    bn.running_var.uniform_(0.5, 2)
    hook = throughput.DeepInversionFeatureHook(bn)
    x = torch.randn(3, 4, 5, 6)
    bn(x)
    mean, var = x.mean((0, 2, 3)), x.var((0, 2, 3), unbiased=False)
    want = (bn.running_var - var).norm() + (bn.running_mean - mean).norm()
    assert float(hook.r_feature) == pytest.approx(float(want), rel=1e-6)
    hook.close()


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
