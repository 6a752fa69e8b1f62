"""The measurement machinery of benchmarks/throughput.py: runners (one per workload and
configuration, each owning a deep copy of the teacher), timing, memory, aten-op counting, FLOPs,
the machine's matmul peak, results, the table, the CSV/JSON/PNG files and the machine's
description. What is measured and how is described in throughput.py's docstring.
"""
from __future__ import annotations

import copy
import csv
import datetime
import gc
import json
import math
import os
import platform
import random
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from benchmarks.reference import ReferenceInversion

DEFAULT_OUT = Path(__file__).resolve().parent / "results"
MEMORY_NOTE = {
    "cpu": "CPU: bytes the run allocates through torch's CPU allocator above the level at its "
           "start (torch.profiler profile_memory allocation events over a 3-iteration call; "
           "includes images, optimizer state, best-image copies, activations and teacher grads, "
           "excludes the teacher's weights)",
    "cuda": "GPU: torch.cuda.max_memory_allocated() during a 3-iteration call minus "
            "memory_allocated() at its start (same scope as on CPU)",
}


@dataclass
class Workload:
    """A teacher, its images and the loss weights both implementations use."""
    name: str
    image_shape: tuple
    mean: tuple
    std: tuple
    batch: int
    classes: int
    coefficients: dict          # Inverter / reference loss weights and lr
    jitter: int
    flip: bool
    rounds: int = 3
    iters: int = 3
    build: Callable[[], nn.Module] | None = field(default=None, repr=False, compare=False)

    def teacher(self) -> nn.Module:
        """A fresh teacher (eval mode), from `build`."""
        return self.build()


@dataclass(frozen=True)
class Config:
    """One timed row: the reference loop or dinv.Inverter, with constructor options."""
    name: str
    kind: str                   # "reference" or "dinv"
    label: str
    options: tuple = ()         # (key, value) pairs for the constructor
    gpu_only: bool = False

    @property
    def compiles(self) -> bool:
        return bool(dict(self.options).get("compile"))


# =============================================================================================
# Runners: one per (workload, config), each owning a deep copy of the teacher. `run(targets,
# iterations, init, seed, callback, every)`: one call from the start images `init`, the jitter and
# flip draws from random.Random(seed) in the reference's order; callback(iteration, loss, images)
# every `every` iterations.
# =============================================================================================
class ReferenceRunner:
    def __init__(self, teacher, workload: Workload, options: dict):
        self.workload = workload
        self.impl = ReferenceInversion(teacher, workload.image_shape, workload.mean, workload.std,
                                       jitter=workload.jitter, flip=workload.flip,
                                       compile=options.get("compile", False),
                                       frozen=options.get("frozen", False),
                                       **workload.coefficients)

    def run(self, targets, iterations, init, seed, callback, every):
        self.impl.get_images(targets, iterations, init, random.Random(seed),
                             callback=callback, every=every)
        self.impl.net_teacher.zero_grad(set_to_none=True)  # housekeeping, outside the timed part

    def close(self):
        self.impl.close()


class DinvRunner:
    def __init__(self, teacher, workload: Workload, options: dict):
        from dinv import Inverter

        self.workload = workload
        c = workload.coefficients
        self.inv = Inverter(teacher, workload.image_shape, workload.mean, workload.std,
                            r_feature=c["r_feature"], first_bn_multiplier=c["first_bn_multiplier"],
                            tv_l1=c["tv_l1"], tv_l2=c["tv_l2"], l2=c["l2"], lr=c["lr"],
                            setting_id=1, clip=True, jitter=workload.jitter, flip=workload.flip,
                            competition="reference", **options)

    def run(self, targets, iterations, init, seed, callback, every):
        from dinv.inverter import LossLog

        self.inv.log_every = every
        self.inv.log = LossLog()
        self.inv.invert(targets, iterations=iterations, seed=seed, init=init, augment_seed=seed,
                        callback=lambda i, images, terms: callback(i, terms["loss"], images))

    def close(self):
        self.inv.close()


def make_runner(config: Config, teacher, workload: Workload, options: dict):
    cls = ReferenceRunner if config.kind == "reference" else DinvRunner
    return cls(teacher, workload, options)


# =============================================================================================
# Measurement
# =============================================================================================
def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def timed_call(runner, device, targets, iterations, init, seed, every, want_loss=False):
    """Runs one call; returns (seconds from call start to each timestamp, iteration of each,
    loss at the first timestamp)."""
    stamps, its, losses = [], [], []

    def callback(iteration, loss, images):
        sync(device)
        stamps.append(time.perf_counter())
        its.append(iteration)
        if want_loss and not losses:
            losses.append(float(loss.detach()) if torch.is_tensor(loss) else float(loss))

    sync(device)
    start = time.perf_counter()
    runner.run(targets, iterations, init, seed, callback, every)
    return [s - start for s in stamps], its, (losses[0] if losses else None)


def steady_samples(stamps, its, warmup):
    """Per-iteration seconds of each chunk between timestamps, after the first `warmup`
    iterations."""
    samples = []
    for k in range(1, len(stamps)):
        if its[k - 1] >= warmup:
            samples.append((stamps[k] - stamps[k - 1]) / (its[k] - its[k - 1]))
    return samples


def _alloc_events(prof):
    from torch._C._profiler import _EventType

    events, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        stack.extend(node.children)
        if node.tag == _EventType.Allocation and node.extra_fields.device.type == "cpu":
            events.append((node.start_time_ns, node.extra_fields.alloc_size))
    events.sort()
    return events


def measure_memory(runner, device, targets, init, seed):
    """Peak bytes allocated by a 3-iteration call above the level at its start (MEMORY_NOTE)."""
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        runner.run(targets, 3, init, seed, lambda *a: None, 1)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        runner.run(targets, 3, init, seed, lambda *a: None, 1)
    live = peak = 0
    for _, size in _alloc_events(prof):
        live += size
        peak = max(peak, live)
    return peak


class _OpCounter(TorchDispatchMode):
    """Counts the aten ops that run while `on`, leaving out views and host reads of a value
    (neither launches a kernel)."""

    def __init__(self):
        super().__init__()
        self.on = False
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self.on and not func.is_view and func is not torch.ops.aten._local_scalar_dense.default:
            self.count += 1
        return func(*args, **(kwargs or {}))


def count_ops(runner, targets, init, seed) -> int:
    """aten ops dispatched in iteration 2 of a 3-iteration call. On a GPU each is at least one
    kernel launch, so this is the eager launch count that fused ops and batched loss tails cut
    (measurable on CPU). Not taken for compiled rows: the mode would change what Dynamo traces."""
    counter = _OpCounter()

    def callback(iteration, loss, images):
        counter.on = iteration == 1

    with counter:
        runner.run(targets, 3, init, seed, callback, 1)
    return counter.count


def count_flops(teacher, workload: Workload, device) -> int:
    """Conv/linear/matmul FLOPs of one forward plus the backward w.r.t. the input only (the
    teacher's weights get no gradient), for the workload's batch (counted on a batch of 2 and
    scaled: these FLOPs are linear in the batch)."""
    from torch.utils.flop_counter import FlopCounterMode

    model = copy.deepcopy(teacher).to(device).eval().requires_grad_(False)
    n = min(2, workload.batch)
    x = torch.randn((n,) + workload.image_shape, device=device, requires_grad=True)
    with FlopCounterMode(display=False) as counter:
        model(x).float().sum().backward()
    return int(counter.get_total_flops() * workload.batch // n)


def matmul_peak(device, dtype=torch.float32, n=None, repeats=5) -> dict:
    """Measured matmul throughput (the machine's practical peak): best and median GFLOP/s."""
    n = n or (8192 if device == "cuda" else 2048)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    torch.mm(a, b)
    rates = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        torch.mm(a, b)
        sync(device)
        rates.append(2 * n ** 3 / (time.perf_counter() - start) / 1e9)
    return {"n": n, "dtype": str(dtype).replace("torch.", ""), "best_gflops": max(rates),
            "median_gflops": statistics.median(rates)}


def _dynamo_counters():
    try:
        from torch._dynamo.utils import counters

        return {"graphs": counters["stats"].get("unique_graphs", 0),
                "breaks": sum(counters["graph_break"].values()),
                "recompiles": sum(counters["recompiles"].values()),
                # Warm-up times of compiled rows depend on these: a hit reuses a compilation
                # cached on disk by an earlier process (--cold-compile disables the caches).
                "fxgraph_cache_hit": counters["inductor"].get("fxgraph_cache_hit", 0),
                "fxgraph_cache_miss": counters["inductor"].get("fxgraph_cache_miss", 0),
                "aot_cache_hit": counters["aot_autograd"].get("autograd_cache_hit", 0)}
    except Exception:  # noqa: BLE001 - counters are diagnostics only
        return {}


@dataclass
class Result:
    workload: str
    config: str
    label: str
    device: str
    batch: int
    options: str
    status: str = "ok"
    s_per_it: float | None = None          # median steady-state seconds per iteration
    s_per_it_iqr: float | None = None      # interquartile range of the samples
    samples: int = 0
    img_it_per_s: float | None = None
    speedup_vs_eager: float | None = None  # eager s/it over this config's s/it (same run)
    gflops_achieved: float | None = None   # useful FLOPs (fwd + input-grad bwd) per second
    pct_of_peak: float | None = None       # CPU: % of the measured fp32 mm peak; GPU: MFU
    peak_mem_mb: float | None = None
    ops_per_it: int | None = None          # aten ops (kernel launches on GPU) per eager iteration
    warmup_s: float | None = None          # first iteration of the first call (compile included)
    later_first_it_s: float | None = None  # median first iteration of later calls (re-warm-up)
    loss_it1: float | None = None
    loss_rel_diff: float | None = None     # vs eager's loss at iteration 1, same views
    dynamo: dict = field(default_factory=dict)
    raw: list = field(default_factory=list)


def _median(values):
    return statistics.median(values) if values else None


def _iqr(values):
    if len(values) < 4:
        return None
    q = statistics.quantiles(values, n=4)
    return q[2] - q[0]


def profile_iteration(runner, device, targets, init, seed, rows) -> str:
    """torch.profiler table of iteration 2 of a 3-iteration call (ops by self time)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    prof = profile(activities=activities)

    def callback(iteration, loss, images):
        sync(device)
        if iteration == 1:
            prof.start()
        elif iteration == 2:
            prof.stop()

    runner.run(targets, 3, init, seed, callback, 1)
    sort = "self_device_time_total" if device == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=sort, row_limit=rows, max_name_column_width=48)


def bench_workload(workload: Workload, plan, device, args, flops, log, profiles=None,
                   peak_samples=None):
    """All configurations of one workload, interleaved; returns [Result]. `plan`: [(Config, its
    constructor options on this device)]; `args`: throughput.py's parsed arguments."""
    profiles = profiles if profiles is not None else {}
    base_teacher = workload.teacher()
    compile_ok = args.compile_workloads is None or workload.name in args.compile_workloads
    every = args.every or (10 if device == "cuda" else 1)
    warmup = args.warmup if args.warmup is not None else every
    rounds = args.rounds or workload.rounds
    iters = max(args.iters or workload.iters, every)
    iters = int(math.ceil(iters / every) * every)
    targets = (torch.arange(workload.batch) % workload.classes).to(device)

    def init_images(seed):
        g = torch.Generator().manual_seed(seed)
        return torch.randn((workload.batch,) + workload.image_shape, generator=g).to(device)

    results, runners = {}, {}
    for config, options in plan:
        result = Result(workload.name, config.name, config.label, device, workload.batch,
                        ",".join(f"{k}={v}" for k, v in options.items()))
        results[config.name] = result
        if config.compiles and not compile_ok:
            result.status = "skipped (compile not run for this workload; --compile-workloads)"
            continue
        try:
            teacher = copy.deepcopy(base_teacher).to(device)
            runners[config.name] = make_runner(config, teacher, workload, options)
        except Exception as error:  # noqa: BLE001 - one broken configuration must not stop the run
            result.status = f"error: {type(error).__name__}: {error}"[:300]

    # Warm-up + iteration-1 loss check: same start images and views for every configuration.
    init0 = init_images(1234)
    for name, runner in list(runners.items()):
        result = results[name]
        before = _dynamo_counters()
        try:
            stamps, its, loss = timed_call(runner, device, targets, 2, init0, 1234, 1,
                                           want_loss=True)
            result.warmup_s, result.loss_it1 = stamps[0], loss
        except Exception as error:  # noqa: BLE001
            result.status = f"error: {type(error).__name__}: {error}"[:300]
            runners.pop(name).close()
            continue
        after = _dynamo_counters()
        result.dynamo = {k: after[k] - before.get(k, 0) for k in after}
        cached = (f"   (compile caches: {result.dynamo.get('fxgraph_cache_hit', 0)} hit, "
                  f"{result.dynamo.get('fxgraph_cache_miss', 0)} miss)"
                  if result.dynamo.get("graphs") else "")
        log(f"  {workload.name:15s} {name:14s} warm-up {stamps[0]:8.3f} s   "
            f"loss@1 {loss:.6g}{cached}")

    # Timed rounds, rotated order.
    samples = {name: [] for name in runners}
    later_first = {name: [] for name in runners}
    names = list(runners)
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)] if names else []
        for name in order:
            if name not in runners:
                continue
            seed = 100 + r
            try:
                stamps, its, _ = timed_call(runners[name], device, targets, warmup + iters,
                                            init_images(seed), seed, every)
            except Exception as error:  # noqa: BLE001
                results[name].status = f"error: {type(error).__name__}: {error}"[:300]
                runners.pop(name).close()
                continue
            s = steady_samples(stamps, its, warmup)
            samples[name].extend(s)
            later_first[name].append(stamps[0] / its[0])
            results[name].raw.append([round(v, 6) for v in s])
        if device == "cpu" and peak_samples is not None:
            # The machine's speed drifts on a shared host: sample the matmul peak every round and
            # use the best sample of the whole run.
            peak_samples.append(matmul_peak(device, n=args.mm_size, repeats=2)["best_gflops"])
        log(f"  {workload.name:15s} round {r + 1}/{rounds}: " + "  ".join(
            f"{n} {(_median(samples[n]) or float('nan')) * 1e3:.1f}ms" for n in names
            if n in runners))

    if args.profile:
        for name, runner in runners.items():
            try:
                text = profile_iteration(runner, device, targets, init_images(8), 8,
                                         args.profile)
            except Exception as error:  # noqa: BLE001
                text = f"profile failed: {type(error).__name__}: {error}"
            profiles[(workload.name, name)] = text
            log(f"--- profile of one steady iteration: {workload.name} / {name}\n{text}")

    compiled = {c.name for c, _ in plan if c.compiles}
    for name, runner in list(runners.items()):
        if name not in compiled:
            results[name].ops_per_it = count_ops(runner, targets, init_images(6), 6)
        if args.no_memory:
            runner.close()
            continue
        try:
            results[name].peak_mem_mb = measure_memory(runner, device, targets, init_images(7),
                                                       7) / 2 ** 20
        except Exception as error:  # noqa: BLE001
            results[name].status = f"ok (memory: {type(error).__name__}: {error})"[:300]
        runner.close()
    runners.clear()

    eager = results.get("eager")
    eager_s = _median(samples.get("eager", []))
    for name, result in results.items():
        values = samples.get(name, [])
        if not values:
            if result.status == "ok":
                result.status = "no samples"
            continue
        result.s_per_it = _median(values)
        result.s_per_it_iqr = _iqr(values)
        result.samples = len(values)
        result.img_it_per_s = workload.batch / result.s_per_it
        result.later_first_it_s = _median(later_first[name])
        if eager_s:
            result.speedup_vs_eager = eager_s / result.s_per_it
        if flops:
            result.gflops_achieved = flops / result.s_per_it / 1e9
        if eager is not None and eager.loss_it1 and result.loss_it1 is not None:
            result.loss_rel_diff = abs(result.loss_it1 - eager.loss_it1) / abs(eager.loss_it1)
    return list(results.values())


# =============================================================================================
# Several processes (throughput.py --distributed)
# =============================================================================================
DISTRIBUTED_EVERY = 10


@dataclass(frozen=True)
class DistributedRow:
    """One timed row of the --distributed benchmark: `processes` ranks of `threads` threads, in
    mode "single" (one process), "independent" (each rank inverts its own batch of `batch`
    images) or "global" (one batch of `batch` images, `Inverter(distributed=True)`)."""
    label: str
    mode: str
    processes: int
    threads: int
    batch: int


def distributed_rows(process_counts, batch: int, device) -> list:
    """One process, then per count N > 1: (CPU) one process of N threads, N independent
    batches, one global batch of N·batch (each rank `batch`), one of `batch` (each batch/N)."""
    rows = [DistributedRow("1 process", "single", 1, 1, batch)]
    for count in (c for c in process_counts if c > 1):
        if device == "cpu":
            rows.append(DistributedRow(f"1 process, {count} threads", "single", 1, count, batch))
        rows += [DistributedRow(f"{count} processes, independent batches of {batch}",
                                "independent", count, 1, batch),
                 DistributedRow(f"{count} processes, one global batch of {count * batch}",
                                "global", count, 1, count * batch),
                 DistributedRow(f"{count} processes, one global batch of {batch}", "global",
                                count, 1, batch)]
    return rows


def time_rank(workload: Workload, options: dict, row: DistributedRow, rounds: int, iters: int,
              device) -> dict:
    """Run in each process of a row: {"s_per_it": its median steady seconds per iteration,
    "images": the images it optimizes}. Every call starts together on all ranks (barrier);
    independent ranks start from their own noise and draws."""
    from dinv import distributed

    ranks = distributed.current()
    runner = DinvRunner(workload.teacher().to(device), workload,
                        dict(options, distributed=row.mode == "global"))
    targets = (torch.arange(row.batch) % workload.classes).to(device)
    offset = ranks.rank if row.mode == "independent" else 0
    # Timestamps (callbacks, and a global batch's divergence check with them) every 10
    # iterations, as a real run's log_every=100 would not add them to every iteration.
    every = min(DISTRIBUTED_EVERY, iters)
    iters = int(math.ceil(iters / every) * every)

    def init_images(seed):
        g = torch.Generator().manual_seed(seed + offset)
        return torch.randn((row.batch,) + workload.image_shape, generator=g).to(device)

    timed_call(runner, device, targets, 2, init_images(1234), 1234 + offset, 1)
    samples = []
    for r in range(rounds):
        distributed.barrier(ranks)
        seed = 100 + r
        stamps, its, _ = timed_call(runner, device, targets, every + iters, init_images(seed),
                                    seed + offset, every)
        samples += steady_samples(stamps, its, every)
    runner.close()
    images = row.batch if row.mode != "global" else \
        distributed.split_sizes(row.batch, ranks.size)[ranks.rank]
    return {"s_per_it": _median(samples), "images": images}


def bench_distributed(workload: Workload, options: dict, rows, rounds: int, iters: int, device,
                      log) -> list:
    """Every row timed in its own group of processes (gloo on CPU, NCCL on GPUs, one GPU per
    rank); returns one dict per row: seconds per iteration of its slowest rank, images ·
    iterations per second (independent: the ranks' sum; global: the batch over the slowest
    rank's time) and the scaling efficiency: the rate over the first row's times the cores
    (processes × threads) or GPUs used."""
    from dinv.distributed import run_local

    backend = "nccl" if device == "cuda" else "gloo"
    results, base = [], None
    for row in rows:
        if device == "cuda" and row.processes > torch.cuda.device_count():
            log(f"  {row.label}: skipped ({torch.cuda.device_count()} GPU(s))")
            continue
        ranks = run_local(time_rank, row.processes, workload, options, row, rounds, iters,
                          device, backend=backend, threads=row.threads, timeout_s=1800)
        slowest = max(r["s_per_it"] for r in ranks)
        rate = sum(r["images"] / r["s_per_it"] for r in ranks) if row.mode == "independent" \
            else row.batch / slowest
        base = base or rate
        result = {**asdict(row), "workload": workload.name, "device": device,
                  "options": ",".join(f"{k}={v}" for k, v in options.items()),
                  "s_per_it": slowest, "img_it_per_s": rate,
                  "scaling_efficiency": rate / (row.processes * row.threads * base),
                  "rank_s_per_it": [r["s_per_it"] for r in ranks]}
        results.append(result)
        log(f"  {row.label:42s} {slowest * 1e3:8.1f} ms/it  {rate:9.1f} img*it/s  "
            f"efficiency {result['scaling_efficiency']:.2f}")
    return results


# =============================================================================================
# Reporting
# =============================================================================================
def loadavg():
    """The 1/5/15-minute load averages, or None where the OS has none."""
    try:
        return os.getloadavg()
    except OSError:
        return None


def machine_info(device) -> dict:
    """Date, host, software versions, CPU/GPU, threads, load and the dinv backend that runs the
    ops on this device."""
    info = {"date": datetime.datetime.now().isoformat(timespec="seconds"),
            "host": platform.node(), "python": platform.python_version(),
            "torch": torch.__version__, "device": device, "threads": torch.get_num_threads(),
            "cpu": cpu_model(), "cpu_count": os.cpu_count()}
    if loadavg() is not None:
        info["loadavg_start"] = loadavg()
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
    x = torch.empty(1, device=device)
    try:
        from dinv import ops

        info["dinv_backend"] = ops.select("channel_stats", x)
    except Exception as error:  # noqa: BLE001 - diagnostics only
        info["dinv_backend"] = f"unknown ({error})"
    try:
        from dinv import ops

        info["dinv_backends"] = ops.explain("channel_stats", x)
    except Exception:  # noqa: BLE001
        pass
    return info


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def peak_reference(device, mm_size=None, peak_tflops=989.0) -> dict:
    """The peak %peak/MFU are taken of: on GPU the given dense bf16 peak (a bf16 matmul is
    measured alongside), on CPU the measured fp32 matmul (re-sampled through the run: `samples`)."""
    if device == "cuda":
        peak = {"source": "--peak-tflops (dense bf16)", "gflops": peak_tflops * 1e3}
        try:
            peak["measured_bf16_mm"] = matmul_peak(device, torch.bfloat16, n=mm_size)
        except Exception:  # noqa: BLE001
            pass
        return peak
    mm = matmul_peak(device, n=mm_size)
    return {"source": "measured fp32 torch.mm (best of 5)", "gflops": mm["best_gflops"],
            "measured_fp32_mm": mm, "samples": [mm["best_gflops"]]}


def finish_peak(peak, device, mm_size=None) -> None:
    """CPU: one last matmul sample; the peak becomes the best sample of the run."""
    if device != "cpu":
        return
    samples = peak.pop("samples")
    peak["measured_fp32_mm_end"] = matmul_peak(device, n=mm_size)
    samples.append(peak["measured_fp32_mm_end"]["best_gflops"])
    peak["gflops"] = max(samples)
    peak["samples_gflops"] = [round(v, 2) for v in samples]
    peak["source"] = (f"measured fp32 torch.mm {peak['measured_fp32_mm']['n']}^2, best of "
                      f"{len(samples)} samples taken through the run")


def _fmt(value, spec):
    return "-" if value is None else format(value, spec)


COLUMNS = [("workload", "workload", 15, "s"), ("config", "config", 14, "s"),
           ("batch", "batch", 5, "d"), ("s_per_it", "ms/it", 9, None),
           ("img_it_per_s", "img*it/s", 9, ".1f"), ("speedup_vs_eager", "x eager", 7, ".2f"),
           ("gflops_achieved", "GFLOP/s", 8, ".1f"), ("pct_of_peak", "%peak", 6, ".1f"),
           ("peak_mem_mb", "mem MB", 8, ".1f"), ("ops_per_it", "ops/it", 6, "d"),
           ("warmup_s", "warmup s", 8, ".2f"),
           ("later_first_it_s", "1st-it s", 8, ".3f"), ("loss_rel_diff", "dloss@1", 8, ".1e")]


def table(results, device) -> str:
    head = "  ".join(f"{title:>{width}s}" if spec != "s" else f"{title:<{width}s}"
                     for _, title, width, spec in COLUMNS)
    if device == "cuda":
        head = head.replace(" %peak", "   MFU")
    lines = [head, "-" * len(head)]
    for r in results:
        cells = []
        for key, _, width, spec in COLUMNS:
            value = getattr(r, key)
            if key == "s_per_it":
                text = _fmt(None if value is None else value * 1e3, ".1f")
            else:
                text = _fmt(value, spec if spec != "s" else "")
            cells.append(f"{text:<{width}s}" if spec == "s" else f"{text:>{width}s}")
        line = "  ".join(cells)
        if r.status != "ok":
            line += f"  [{r.status}]"
        lines.append(line)
    return "\n".join(lines)


def legend(device, peak_gflops) -> str:
    return (f"ms/it: median steady-state seconds per iteration; x eager: eager ms/it / this ms/it, "
            f"same process; GFLOP/s: conv/linear FLOPs of forward + input-gradient backward per "
            f"second; {'MFU' if device == 'cuda' else '%peak'}: of {peak_gflops:.0f} GFLOP/s; "
            f"mem: {MEMORY_NOTE[device]}; ops/it: aten ops per eager iteration, views excluded "
            f"(on a GPU, kernel launches); warmup s: first iteration of the first call (compile "
            f"included); 1st-it s: first iteration of later calls; dloss@1: relative difference "
            f"of the iteration-1 loss from eager's (same images and views).")


def loss_warnings(results) -> list:
    """A line per configuration whose iteration-1 loss is off eager's (same images and views)."""
    lines = []
    for r in results:
        tolerance = 2e-2 if "amp_dtype" in r.options else 1e-4
        if r.loss_rel_diff is not None and r.loss_rel_diff > tolerance:
            lines.append(f"WARNING: {r.workload}/{r.config}: iteration-1 loss differs from eager's "
                         f"by {r.loss_rel_diff:.2e} (relative) for the same images and views: "
                         "the configurations do not compute the same objective")
    return lines


def write_rows(out: Path, stem: str, rows, meta, skip=(), as_json=()) -> dict:
    """`stem`.csv (the rows' keys but `skip`, the `as_json` ones last, JSON-encoded) and
    `stem`.json ({"meta", "results": rows}) under `out`; returns their paths."""
    out.mkdir(parents=True, exist_ok=True)
    paths = {"csv": out / f"{stem}.csv", "json": out / f"{stem}.json"}
    keys = [k for k in rows[0] if k not in skip and k not in as_json] + list(as_json) \
        if rows else []
    with open(paths["csv"], "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({**row, **{k: json.dumps(row[k]) for k in as_json}})
    with open(paths["json"], "w") as f:
        json.dump({"meta": meta, "results": rows}, f, indent=1, default=str)
    return paths


def write_outputs(out: Path, stem: str, results, meta) -> dict:
    """CSV, JSON and the speed-up bar chart (PNG) of a throughput run."""
    paths = write_rows(out, stem, [asdict(r) for r in results], meta, skip=("raw",),
                       as_json=("dynamo",))
    paths["png"] = out / f"{stem}.png"
    plot(results, paths["png"], meta)
    return paths


def plot(results, path, meta):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    loads = [w for w in dict.fromkeys(r.workload for r in results)]
    names = [c for c in dict.fromkeys(r.config for r in results)]
    value = {(r.workload, r.config): r.speedup_vs_eager for r in results}
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(loads) * max(1, len(names)) / 3), 4.5))
    width = 0.8 / max(1, len(names))
    for i, name in enumerate(names):
        xs = [j + (i - (len(names) - 1) / 2) * width for j in range(len(loads))]
        ys = [value.get((w, name)) or 0.0 for w in loads]
        bars = ax.bar(xs, ys, width, label=name)
        for bar, y in zip(bars, ys):
            if y:
                ax.annotate(f"{y:.2f}", (bar.get_x() + bar.get_width() / 2, y), ha="center",
                            va="bottom", fontsize=7)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks(range(len(loads)))
    ax.set_xticklabels(loads)
    ax.set_ylabel("speed-up vs eager reference (same run)")
    where = meta.get("gpu") or meta.get("cpu")
    ax.set_title(f"DeepInversion iteration, {where}, {meta.get('threads')} thread(s), "
                 f"torch {meta.get('torch')}", fontsize=9)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
