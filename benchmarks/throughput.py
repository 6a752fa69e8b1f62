"""End-to-end DeepInversion speed: the NVlabs reference loop (eager, and torch.compile'd) against
cumulative dinv.Inverter configurations, per teacher workload, in one process.

This file holds the workloads, the configurations and the command line; the reference loop is
benchmarks/reference.py, the measurement machinery benchmarks/harness.py.

    PYTHONPATH=. python benchmarks/throughput.py --quick            # a few minutes on 2 CPU cores
    PYTHONPATH=. python benchmarks/throughput.py                    # full (GPU: all workloads)
    PYTHONPATH=. python benchmarks/throughput.py --workloads digits --configs eager,ops,compile
    PYTHONPATH=. python benchmarks/throughput.py --distributed      # 1 vs 2 processes (gloo/NCCL)

What is timed: one optimization iteration (jitter, forward, losses, backward, Adam step, clip,
best-image bookkeeping, as each implementation does it), steady state, at full resolution
(reference setting 1 / dinv setting_id=1). Method, for noisy shared machines:
- every configuration of a workload lives in this process, each with its own deep copy of the
  teacher (nothing one installs on a teacher can affect another);
- a first call per configuration does the warm-up (compilation, allocator) and records the loss
  of iteration 1, which must agree across configurations (same start images, same jitter draws:
  `Inverter.invert(augment_seed=)` draws them as the reference loop does);
- then `rounds` rounds, each running every configuration for `warmup + iters` iterations in a
  rotated order; per-iteration times come from timestamps taken every `every` iterations (1 on
  CPU; 10 on GPU, with a synchronize), the first `warmup` iterations of each call are dropped, and
  the reported figure is the median of all kept samples; ratios compare medians of one run;
- memory is measured in one extra short call per configuration (see MEMORY_NOTE).

--distributed times dinv (one configuration, default channels-last) in groups of processes
started on this machine (`dinv.distributed.run_local`: gloo over loopback on CPU, one thread
per process; NCCL and one GPU per process on GPUs): one process, N independent batches, and one
global batch over N processes (weak: N·batch; strong: batch), and prints images·iterations/s
and the scaling efficiency against one process.
"""
from __future__ import annotations

import argparse
import functools
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from torch import nn

from benchmarks import harness
from benchmarks.harness import DEFAULT_OUT, MEMORY_NOTE, Config, Workload


# =============================================================================================
# Workloads
# =============================================================================================
CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


class TinyNet(nn.Module):
    """The smoke test's teacher: two conv-BN-ReLU, pooling, a linear layer."""

    def __init__(self, classes=5, channels=3):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(channels, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 16, 3, padding=1, stride=2, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1))
        self.classifier = nn.Linear(16, classes)

    def forward(self, x):
        return self.classifier(torch.flatten(self.features(x), 1))


def _settle_running_stats(model, image_shape, batch=4, seed=0):
    """Untrained teachers: non-trivial running statistics from one train-mode forward of noise."""
    generator = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.momentum = 1.0
    model.train()
    with torch.no_grad():
        model(torch.randn((batch,) + tuple(image_shape), generator=generator))
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.momentum = 0.1
            m.running_var.clamp_(min=1e-2)
    return model.eval()


def _build(name, image_shape):
    torch.manual_seed(0)
    if name == "digits":
        from dinv.models import load_digits_teacher
        return load_digits_teacher()
    if name == "tiny":
        return _settle_running_stats(TinyNet(), image_shape)
    if name == "resnet50":
        import torchvision
        return _settle_running_stats(torchvision.models.resnet50(weights=None), image_shape,
                                     batch=2)
    from dinv.models import create
    return _settle_running_stats(create(name), image_shape)


def _coef(lr, r_feature, first_bn_multiplier, tv_l1, tv_l2, l2):
    return dict(lr=lr, r_feature=r_feature, first_bn_multiplier=first_bn_multiplier,
                tv_l1=tv_l1, tv_l2=tv_l2, l2=l2)


def workloads(device: str, quick: bool) -> dict:
    """Every workload, with its batch and run length for this device and mode."""
    from dinv.presets import IMAGENET, digits_settings

    gpu = device == "cuda"
    d = digits_settings()
    cifar = _coef(0.1, 0.01, 10.0, 0.0, 1e-4, 1e-5)
    imagenet = _coef(*(IMAGENET[k] for k in ("lr", "r_feature", "first_bn_multiplier", "tv_l1",
                                              "tv_l2", "l2")))
    long_run = dict(rounds=5, iters=20) if gpu else dict(rounds=5, iters=8)
    short = dict(rounds=3, iters=20) if gpu else dict(rounds=3, iters=3)
    heavy_short = dict(rounds=3, iters=10) if gpu else dict(rounds=2, iters=2)
    run = (lambda heavy: heavy_short if heavy else short) if quick else (lambda heavy: long_run)
    table = {
        "tiny": Workload("tiny", (3, 8, 8), CIFAR_MEAN, CIFAR_STD, 4, 5,
                         _coef(0.1, 0.05, 10.0, 1e-3, 1e-3, 1e-4), 1, True, rounds=1, iters=2),
        "digits": Workload("digits", d["image_shape"], d["mean"], d["std"], 200, 10,
                           _coef(*(d[k] for k in ("lr", "r_feature", "first_bn_multiplier",
                                                  "tv_l1", "tv_l2", "l2"))),
                           d["jitter"], d["flip"], **run(False)),
        "resnet18_cifar": Workload("resnet18_cifar", (3, 32, 32), CIFAR_MEAN, CIFAR_STD,
                                   64 if (quick and not gpu) else 256, 10, cifar, 2, True,
                                   **run(True)),
        "resnet34_cifar": Workload("resnet34_cifar", (3, 32, 32), CIFAR_MEAN, CIFAR_STD, 256, 10,
                                   cifar, 2, True, **run(True)),
        "resnet50": Workload("resnet50", (3, 224, 224), IMAGENET["mean"], IMAGENET["std"],
                             (16 if quick else 64) if gpu else (2 if quick else 16), 1000,
                             imagenet, 30, True, **run(True)),
    }
    for workload in table.values():
        workload.build = functools.partial(_build, workload.name, workload.image_shape)
    return table


def default_workloads(device: str, quick: bool) -> list:
    if device == "cuda":
        return ["digits", "resnet18_cifar", "resnet34_cifar", "resnet50"]
    return ["digits", "resnet18_cifar"] if quick else \
        ["digits", "resnet18_cifar", "resnet34_cifar", "resnet50"]



# =============================================================================================
# Configurations
# =============================================================================================
def configs(amp_dtype: torch.dtype) -> list:
    """The baselines, then dinv's options added one at a time (each row keeps the ones above)."""
    base = (("fused_bn", False),)
    fused = (("fused_bn", True),)
    cl = fused + (("channels_last", True),)
    amp = cl + (("amp_dtype", amp_dtype),)
    return [
        Config("eager", "reference", "reference loop, eager fp32"),
        Config("ref-compile", "reference", "reference loop, torch.compile(forward+loss)",
               (("compile", True),)),
        Config("ref-compile-frozen", "reference",
               "reference loop, teacher frozen, torch.compile(forward+loss)",
               (("compile", True), ("frozen", True))),
        Config("ops", "dinv", "dinv: fused ops (hooks + channel_stats)", base),
        Config("fused-bn", "dinv", "dinv: + fused BN (fused_bn=True)", fused),
        Config("channels-last", "dinv", "dinv: + channels_last", cl),
        Config("amp", "dinv", "dinv: + autocast", amp, gpu_only=True),
        # On CPU (no autocast row) "compile" stacks on channels-last; on GPU on amp.
        Config("compile", "dinv", "dinv: + compile=True", (("compile", True),)),
        Config("cudagraphs", "dinv", "dinv: + compile='reduce-overhead' (CUDA graphs)",
               (("compile", "reduce-overhead"),), gpu_only=True),
    ]


def resolve_options(config: Config, device: str, amp_dtype) -> dict:
    """A compile row's options: the previous dinv row's (channels-last on CPU, amp on GPU) plus
    its compile mode."""
    options = dict(config.options)
    if config.kind == "dinv" and "compile" in options:
        options = dict(fused_bn=True, channels_last=True, compile=options["compile"])
        if device == "cuda":
            options["amp_dtype"] = amp_dtype
    return options


# =============================================================================================
# Command line
# =============================================================================================
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="short runs, small batches on CPU")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--workloads", default=None,
                   help="comma list of tiny,digits,resnet18_cifar,resnet34_cifar,resnet50")
    p.add_argument("--configs", default=None, help="comma list of configuration names")
    p.add_argument("--compile-workloads", default=None,
                   help="workloads whose compile rows run ('all' / 'none'); default: all, but "
                        "only digits on CPU with --quick (CPU compiles of ResNets take minutes)")
    p.add_argument("--batch", type=int, default=None, help="override every workload's batch")
    p.add_argument("--rounds", type=int, default=None)
    p.add_argument("--iters", type=int, default=None, help="timed iterations per call")
    p.add_argument("--warmup", type=int, default=None,
                   help="iterations dropped at the start of each call (default: --every)")
    p.add_argument("--every", type=int, default=None,
                   help="iterations between timestamps (default 1 on CPU, 10 on GPU)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--amp-dtype", default="bf16", choices=["bf16", "fp16"])
    p.add_argument("--peak-tflops", type=float, default=989.0,
                   help="GPU dense bf16 peak for MFU (default: H100 SXM)")
    p.add_argument("--cold-compile", action="store_true",
                   help="disable torch.compile's on-disk caches, so that the compiled rows' "
                        "warm-up is a first compilation (default: whatever the caches hold)")
    p.add_argument("--no-memory", action="store_true", help="skip the memory pass")
    p.add_argument("--profile", type=int, default=0, metavar="ROWS",
                   help="also print (and save) a torch.profiler table of one steady iteration "
                        "per configuration, ROWS ops by self time")
    p.add_argument("--mm-size", type=int, default=None,
                   help="matrix size of the peak matmul (default 2048 CPU, 8192 GPU)")
    p.add_argument("--distributed", action="store_true",
                   help="1 vs N processes instead (see the docstring); one --configs entry")
    p.add_argument("--processes", default="2", help="--distributed: comma list of process "
                   "counts besides 1 (default 2)")
    p.add_argument("--out", default=str(DEFAULT_OUT))
    p.add_argument("--name", default=None, help="file stem (default throughput-<device>[-quick])")
    args = p.parse_args(argv)
    args.amp_dtype_t = torch.bfloat16 if args.amp_dtype == "bf16" else torch.float16
    return args


def _compile_workloads(value, device, quick):
    """--compile-workloads: None (all), or the names whose compile rows run."""
    if value is None:
        return ["digits", "tiny"] if (device == "cpu" and quick) else None
    if value == "all":
        return None
    return [] if value == "none" else value.split(",")


def _config_list(args, device, log) -> list:
    config_list = [c for c in configs(args.amp_dtype_t) if device == "cuda" or not c.gpu_only]
    if args.configs:
        wanted = args.configs.split(",")
        known = {c.name for c in configs(args.amp_dtype_t)}
        if set(wanted) - known:
            raise SystemExit(f"unknown configs {sorted(set(wanted) - known)}; "
                             f"known: {sorted(known)}")
        config_list = [c for c in config_list if c.name in wanted]
    if not any(c.name == "eager" for c in config_list):
        log("note: without the 'eager' configuration there are no speed-up ratios")
    return config_list


def main_distributed(args, device, log):
    """--distributed: the rows of harness.distributed_rows per workload; writes
    throughput-distributed-<device>.csv/json."""
    names = (args.configs or "channels-last").split(",")
    config = next((c for c in configs(args.amp_dtype_t) if c.name == names[0]), None)
    if len(names) != 1 or config is None or config.kind != "dinv" or config.compiles:
        raise SystemExit("--distributed times one eager dinv configuration (--configs ops, "
                         "fused-bn, channels-last or amp)")
    options = resolve_options(config, device, args.amp_dtype_t)
    available = workloads(device, args.quick)
    meta = harness.machine_info(device)
    meta["args"] = {k: v for k, v in vars(args).items() if k != "amp_dtype_t"}
    log(f"# DeepInversion throughput over processes  {meta['date']}  torch {meta['torch']}  "
        f"device {device} ({meta.get('gpu') or meta['cpu']}, {meta['cpu_count']} CPUs, load avg "
        f"{meta.get('loadavg_start')})  config {config.name}")
    results = []
    for name in (args.workloads or "digits").split(","):
        workload = available[name]
        batch = args.batch or workload.batch
        log(f"## {name}: batch {batch} per process, image {workload.image_shape}")
        rows = harness.distributed_rows([int(c) for c in args.processes.split(",")], batch,
                                        device)
        results += harness.bench_distributed(workload, options, rows, args.rounds or 3,
                                             args.iters or 20, device, log)
    stem = args.name or f"throughput-distributed-{device}"
    paths = harness.write_rows(Path(args.out), stem, results, meta,
                               as_json=("rank_s_per_it",))
    log("wrote " + ", ".join(str(p) for p in paths.values()))
    return results, paths


def main(argv=None, log=print):
    args = parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.distributed:
        return main_distributed(args, device, log)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.cold_compile:
        import torch._inductor.config as inductor_config

        inductor_config.force_disable_caches = True
    available = workloads(device, args.quick)
    chosen = args.workloads.split(",") if args.workloads else default_workloads(device, args.quick)
    unknown = [w for w in chosen if w not in available]
    if unknown:
        raise SystemExit(f"unknown workloads {unknown}; known: {', '.join(available)}")
    args.compile_workloads = _compile_workloads(args.compile_workloads, device, args.quick)
    plan = [(c, resolve_options(c, device, args.amp_dtype_t))
            for c in _config_list(args, device, log)]

    meta = harness.machine_info(device)
    log(f"# DeepInversion throughput  {meta['date']}  torch {meta['torch']}  device {device}"
        f"  ({meta.get('gpu') or meta['cpu']}, {meta['threads']} threads, "
        f"{meta['cpu_count']} CPUs, load avg {meta.get('loadavg_start')})")
    log(f"# dinv backend for {device} fp32 tensors: {meta['dinv_backend']}")
    peak = harness.peak_reference(device, args.mm_size, args.peak_tflops)
    log(f"# peak for %peak/MFU: {peak['gflops']:.1f} GFLOP/s ({peak['source']}"
        + ("; re-sampled every round, the best sample is used" if device == "cpu" else "") + ")")
    meta["peak"] = peak
    meta["args"] = {k: v for k, v in vars(args).items() if k != "amp_dtype_t"}
    meta["memory"] = MEMORY_NOTE[device]

    results, profiles, flop_counts = [], {}, meta.setdefault("flops_fwd_input_bwd", {})
    for name in chosen:
        workload = available[name]
        if args.batch:
            workload.batch = args.batch
        try:
            flop_counts[name] = harness.count_flops(workload.teacher(), workload, device)
        except Exception as error:  # noqa: BLE001
            log(f"  FLOP count failed for {name}: {error}")
            flop_counts[name] = None
        log(f"## {name}: batch {workload.batch}, image {workload.image_shape}, fwd+input-grad "
            f"bwd {(flop_counts[name] or 0) / 1e9:.2f} GFLOP/iteration")
        start = time.perf_counter()
        results += harness.bench_workload(workload, plan, device, args, flop_counts[name], log,
                                          profiles, peak.get("samples"))
        log(f"   ({time.perf_counter() - start:.0f} s)")

    harness.finish_peak(peak, device, args.mm_size)
    for r in results:
        if r.gflops_achieved is not None:
            r.pct_of_peak = 100 * r.gflops_achieved / peak["gflops"]
    if harness.loadavg() is not None:
        meta["loadavg_end"] = harness.loadavg()
    log("")
    for name, flops in flop_counts.items():
        if flops:
            log(f"floor for {name}: {flops / 1e9:.2f} GFLOP/iteration at {peak['gflops']:.1f} "
                f"GFLOP/s = {flops / (peak['gflops'] * 1e9) * 1e3:.1f} ms/it")
    log(harness.table(results, device))
    log("")
    log(harness.legend(device, peak["gflops"]))
    for line in harness.loss_warnings(results):
        log(line)
    stem = args.name or f"throughput-{device}" + ("-quick" if args.quick else "")
    paths = harness.write_outputs(Path(args.out), stem, results, meta)
    if profiles:
        paths["profile"] = Path(args.out) / f"{stem}-profile.txt"
        paths["profile"].write_text("\n\n".join(f"=== {w} / {c}\n{t}"
                                                 for (w, c), t in profiles.items()))
    log("wrote " + ", ".join(str(p) for p in paths.values()))
    return results, paths


if __name__ == "__main__":
    main()
