"""Per-op forward+backward timing of dinv's fused ops against the reference code's formulations,
on ResNet-50-like layer shapes.

    PYTHONPATH=. python benchmarks/ops.py --quick          # the main path: a table + CSV/JSON
    pytest benchmarks/ops.py --benchmark-only              # the same cases under pytest-benchmark

For each case every implementation runs `torch.autograd.grad(loss, inputs)` on the same inputs:
- "eager-ref": the DeepInversion reference code's formulation, from benchmarks/reference.py (BN
  statistics through permute + contiguous + var, the four-difference TV, the KLDivLoss(batchmean)
  JS competition, F.kl_div distillation);
- "dinv:<backend>": the dinv op with that backend forced (reference = dinv's pure-torch oracle,
  cpp = the C++/CUDA extension, triton = the Triton kernels on GPU), for each backend that can run.
Timings interleave the implementations in rotated rounds and report medians; "x ref" is the
eager-ref median over this implementation's median, from the same run. "GB/s" is the minimal
traffic of the op (each input read once per pass, each output written once; listed per op in
TRAFFIC) over the time; "%BW" is that as a share of the machine's measured copy bandwidth (the
BN-statistic op's GPU target is >= 70 %).
"""
from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.nn.functional as F

from benchmarks import reference
from benchmarks.harness import DEFAULT_OUT, cpu_model, loadavg, sync, write_rows

ACCEPTANCE_SHAPE = (64, 256, 56, 56)
BN_SHAPES = [(64, 256, 56, 56), (64, 512, 28, 28), (64, 1024, 14, 14), (64, 2048, 7, 7)]
TV_SHAPE = (64, 3, 224, 224)
LOGITS_SHAPE = (256, 1000)
# The primitive the dispatcher picks a backend for in each case's dinv op (`dinv.ops._backends.OPS`).
DINV_OPS = {"bn_stat_loss": "channel_stats", "bn_inversion": "bn_stats_forward",
            "tv_loss_l2": "image_prior_sums", "image_priors": "image_prior_sums",
            "js_competition": "js_rows", "kd_loss": "kd_rows"}
# Minimal passes over tensors the size of the op's main input, forward + backward:
TRAFFIC = {
    "bn_stat_loss": 3,   # fwd reads x; bwd reads x, writes dx
    "bn_inversion": 5,   # fwd reads x, writes y; bwd reads grad_y and x, writes dx
    "tv_loss_l2": 3,     # fwd reads x; bwd reads x, writes dx
    "image_priors": 3,   # all three priors from the same passes
    "js_competition": 6,  # fwd reads s, t; bwd reads s, t, writes ds, dt (sizes of one logit)
    "kd_loss": 5,        # fwd reads s, t; bwd reads s, t, writes ds (teacher detached)
}


# ---------------------------------------------------------------------------------------------
# The reference code's formulations (benchmarks/reference.py)
# ---------------------------------------------------------------------------------------------
def ref_bn_inversion(x, weight, bias, running_mean, running_var, grad_y, eps=1e-5):
    """An eval BatchNorm with the reference hook on it: the loss whose gradient is what the fused
    op's backward produces (grad_y · y + the statistic loss)."""
    y = F.batch_norm(x, running_mean, running_var, weight, bias, False, 0.0, eps)
    return (y * grad_y).sum() + reference.bn_feature_loss(x, running_mean, running_var)


def ref_image_priors(x):
    """TV l1 + TV l2 + the L2 prior as the reference's loop computes them
    (`get_image_prior_losses`: the differences once, both norms; then the images' norms)."""
    loss_var_l1, loss_var_l2 = reference.get_image_prior_losses(x)
    return loss_var_l1 + loss_var_l2 + reference.l2_prior(x)


# ---------------------------------------------------------------------------------------------
# Cases
# ---------------------------------------------------------------------------------------------
@dataclass
class Case:
    op: str
    shape: tuple
    dtype: torch.dtype
    device: str
    channels_last: bool = False

    @property
    def id(self) -> str:
        dt = str(self.dtype).replace("torch.", "")
        cl = "-cl" if self.channels_last else ""
        return f"{self.op}[{'x'.join(map(str, self.shape))}-{dt}{cl}]"

    def nbytes(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return TRAFFIC[self.op] * n * torch.empty((), dtype=self.dtype).element_size()

    def inputs(self, seed=0):
        g = torch.Generator().manual_seed(seed)
        kw = dict(generator=g)
        if self.op in ("js_competition", "kd_loss"):
            # Confident logits, as a trained teacher gives on synthesized images: one class per
            # row stands out (the same class for the student on half of the rows). With flat
            # logits over 1000 classes every probability is below the JS term's 0.01 clamp and
            # its gradient is exactly zero, which would make the comparison vacuous.
            rows, classes = self.shape
            s, t = torch.randn(self.shape, **kw) * 2, torch.randn(self.shape, **kw) * 2
            cls_t = torch.randint(classes, (rows,), **kw)
            cls_s = torch.where(torch.arange(rows) % 2 == 0, cls_t,
                                torch.randint(classes, (rows,), **kw))
            t[torch.arange(rows), cls_t] += 20.0
            s[torch.arange(rows), cls_s] += 20.0
            s, t = s.to(self.device, self.dtype), t.to(self.device, self.dtype)
            s.requires_grad_(True)
            t.requires_grad_(self.op == "js_competition")
            return {"s": s, "t": t}
        x = torch.randn(self.shape, **kw).to(self.device, self.dtype)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        x.requires_grad_(True)
        out = {"x": x}
        if self.op.startswith("bn_"):
            c = self.shape[1]
            out["rm"] = (torch.randn(c, **kw) * 0.1).to(self.device)
            out["rv"] = (torch.rand(c, **kw) + 0.5).to(self.device)
        if self.op == "bn_inversion":
            c = self.shape[1]
            out["w"] = (torch.rand(c, **kw) + 0.5).to(self.device)
            out["b"] = (torch.randn(c, **kw) * 0.1).to(self.device)
            out["gy"] = (torch.randn(self.shape, **kw) * 1e-3).to(self.device, self.dtype)
        return out


def cases(device: str, quick: bool, dtypes=None, channels_last=False) -> list:
    """The benchmark's cases. CPU --quick: batch 8 instead of 64, except bn_stat_loss on the
    acceptance shape 64x256x56x56 fp32."""
    small = quick and device == "cpu"
    dtypes = dtypes or ([torch.float32, torch.bfloat16] if device == "cuda" else [torch.float32])
    scale = (lambda shape: (8,) + tuple(shape[1:])) if small else (lambda shape: tuple(shape))
    out = []
    for dtype in dtypes:
        bn_shapes = [scale(s) for s in BN_SHAPES]
        if small and dtype == torch.float32:
            bn_shapes[0] = ACCEPTANCE_SHAPE
        for shape in bn_shapes:
            out.append(Case("bn_stat_loss", shape, dtype, device))
            if channels_last:
                out.append(Case("bn_stat_loss", shape, dtype, device, channels_last=True))
        for shape in ([scale(s) for s in BN_SHAPES[1:]] if small else bn_shapes):
            out.append(Case("bn_inversion", shape, dtype, device))
        out.append(Case("tv_loss_l2", scale(TV_SHAPE), dtype, device))
        out.append(Case("image_priors", scale(TV_SHAPE), dtype, device))
        out.append(Case("js_competition", LOGITS_SHAPE, dtype, device))
        out.append(Case("kd_loss", LOGITS_SHAPE, dtype, device))
    return out


def backends_for(case: Case) -> list:
    """dinv backends that can run this case's op when forced (the dispatcher says)."""
    from dinv import ops

    op = DINV_OPS[case.op]
    probe = torch.empty(1, device=case.device, dtype=case.dtype)
    runnable = []
    for name in ops.explain(op, probe):
        try:
            with ops.use_backend(name):
                ops.select(op, probe)
        except ops.BackendUnavailable:
            continue
        runnable.append(name)
    return runnable


def implementations(case: Case) -> dict:
    """name -> (function of the inputs dict returning the scalar loss, forced backend or None)."""
    from dinv import ops

    refs = {
        "bn_stat_loss": lambda i: reference.bn_feature_loss(i["x"], i["rm"], i["rv"]),
        # BN parameters stay fp32 with low-precision inputs, as in a model under autocast.
        "bn_inversion": lambda i: ref_bn_inversion(i["x"], i["w"], i["b"], i["rm"], i["rv"],
                                                   i["gy"]),
        "tv_loss_l2": lambda i: reference.tv_l2(i["x"]),
        "image_priors": lambda i: ref_image_priors(i["x"]),
        "js_competition": lambda i: reference.js_competition(i["s"], i["t"]),
        "kd_loss": lambda i: reference.kd_loss(i["s"], i["t"].detach()),
    }

    def dinv_bn_inversion(i):
        y, mean, var = ops.bn_inversion(i["x"], i["w"], i["b"], i["rm"], i["rv"], 1e-5)
        return (y.float() * i["gy"].float()).sum() + ops.stat_divergence(mean, var, i["rm"],
                                                                          i["rv"])

    dinv_fns = {
        "bn_stat_loss": lambda i: ops.bn_stat_loss(i["x"], i["rm"], i["rv"]),
        "bn_inversion": dinv_bn_inversion,
        "tv_loss_l2": lambda i: ops.tv_loss(i["x"], "l2"),
        "image_priors": lambda i: sum(ops.image_prior(i["x"])),
        "js_competition": lambda i: ops.js_competition(i["s"], i["t"], formula="reference"),
        "kd_loss": lambda i: ops.kd_loss(i["s"], i["t"].detach()),
    }
    impls = {"eager-ref": (refs[case.op], None)}
    for backend in backends_for(case):
        impls[f"dinv:{backend}"] = (dinv_fns[case.op], backend)
    return impls


def make_step(case: Case, fn, backend, inputs=None):
    """A zero-argument callable running forward + backward once (gradients w.r.t. the inputs
    that require grad, via autograd.grad: nothing accumulates between calls)."""
    from dinv.ops import use_backend

    inputs = inputs if inputs is not None else case.inputs()
    wrt = [v for v in inputs.values() if v.requires_grad]
    device = case.device

    def step():
        with use_backend(backend):
            loss = fn(inputs)
            grads = torch.autograd.grad(loss, wrt)
        sync(device)
        return loss, grads

    return step


@dataclass
class OpResult:
    case: str
    op: str
    shape: str
    dtype: str
    impl: str
    status: str = "ok"
    ms: float | None = None
    samples: int = 0
    speedup_vs_ref: float | None = None
    gb_per_s: float | None = None
    max_abs_grad_diff: float | None = None  # vs eager-ref, relative to the ref's max |grad|
    loss_rel_diff: float | None = None
    raw_ms: list = field(default_factory=list)


def run_case(case: Case, rounds: int, repeats: int, log=print) -> list:
    impls = implementations(case)
    inputs = case.inputs()
    steps, results, outputs = {}, {}, {}
    for name, (fn, backend) in impls.items():
        results[name] = OpResult(case.id, case.op, "x".join(map(str, case.shape)),
                                 str(case.dtype).replace("torch.", ""), name)
        try:
            steps[name] = make_step(case, fn, backend, inputs)
            loss, grads = steps[name]()  # warm-up; results for the agreement check
            outputs[name] = (loss.detach().double(), [g.detach().double() for g in grads])
            steps[name]()
        except Exception as error:  # noqa: BLE001 - one failing backend must not stop the table
            results[name].status = f"error: {type(error).__name__}: {error}"[:200]
            steps.pop(name, None)
    names = list(steps)
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            for _ in range(repeats):
                start = time.perf_counter()
                steps[name]()
                results[name].raw_ms.append((time.perf_counter() - start) * 1e3)
    ref = results["eager-ref"]
    if ref.raw_ms:
        ref.ms = statistics.median(ref.raw_ms)
    ref_out = outputs.get("eager-ref")
    for name, result in results.items():
        if not result.raw_ms:
            continue
        result.ms = statistics.median(result.raw_ms)
        result.samples = len(result.raw_ms)
        result.gb_per_s = case.nbytes() / (result.ms / 1e3) / 1e9
        if ref.ms:
            result.speedup_vs_ref = ref.ms / result.ms
        if ref_out is not None and name in outputs:
            loss, grads = outputs[name]
            result.loss_rel_diff = float((loss - ref_out[0]).abs()
                                         / ref_out[0].abs().clamp_min(1e-30))
            result.max_abs_grad_diff = max(
                float((g - h).abs().max() / h.abs().max().clamp_min(1e-30))
                for g, h in zip(grads, ref_out[1]))
    del steps, inputs, outputs
    return list(results.values())


def copy_bandwidth(device, mib=None, repeats=5) -> float:
    """GB/s of the fastest of `repeats` copies of one large tensor, counting bytes read and
    written: the memory bandwidth the ops' GB/s is a fraction of (%BW)."""
    mib = mib or (2048 if device == "cuda" else 256)
    src = torch.empty(mib * 2**20 // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(repeats + 1):  # the first copy warms up
        sync(device)
        start = time.perf_counter()
        dst.copy_(src)
        sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * src.numel() * 4 / best / 1e9


def table(results, device, bandwidth) -> str:
    head = (f"{'case':44s} {'impl':15s} {'ms':>9s} {'x ref':>7s} {'GB/s':>8s} {'%BW':>5s} "
            f"{'dloss':>8s} {'dgrad':>8s}  n")
    lines = [head, "-" * len(head)]
    fmt = lambda v, s: "-" if v is None else format(v, s)  # noqa: E731
    for r in results:
        pct_bw = None if r.gb_per_s is None else 100 * r.gb_per_s / bandwidth
        line = (f"{r.case:44s} {r.impl:15s} {fmt(r.ms, '.3f'):>9s} "
                f"{fmt(r.speedup_vs_ref, '.2f'):>7s} {fmt(r.gb_per_s, '.1f'):>8s} "
                f"{fmt(pct_bw, '.0f'):>5s} "
                f"{fmt(r.loss_rel_diff, '.1e'):>8s} {fmt(r.max_abs_grad_diff, '.1e'):>8s}  "
                f"{r.samples}")
        if r.status != "ok":
            line += f"  [{r.status}]"
        lines.append(line)
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="CPU: batch 8 except bn_stat_loss 64x256x56x56 fp32; fewer repeats")
    p.add_argument("--device", default=None)
    p.add_argument("--ops", default=None, help="comma list of ops (default all)")
    p.add_argument("--dtypes", default=None, help="comma list: fp32,bf16,fp16")
    p.add_argument("--channels-last", action="store_true",
                   help="also run bn_stat_loss on channels_last inputs")
    p.add_argument("--rounds", type=int, default=None)
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=str(DEFAULT_OUT))
    p.add_argument("--name", default=None)
    return p.parse_args(argv)


_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def main(argv=None, log=print):
    args = parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    dtypes = [_DTYPES[d] for d in args.dtypes.split(",")] if args.dtypes else None
    selected = cases(device, args.quick, dtypes, args.channels_last)
    if args.ops:
        selected = [c for c in selected if c.op in args.ops.split(",")]
    rounds = args.rounds or (3 if args.quick else 5)
    repeats = args.repeats or (2 if args.quick and device == "cpu" else 10)
    meta = {"date": datetime.datetime.now().isoformat(timespec="seconds"),
            "torch": torch.__version__, "device": device, "threads": torch.get_num_threads(),
            "cpu": cpu_model(), "gpu": torch.cuda.get_device_name() if device == "cuda" else None,
            "rounds": rounds, "repeats": repeats}
    if loadavg() is not None:
        meta["loadavg"] = loadavg()
    log(f"# dinv op benchmark  {meta['date']}  torch {meta['torch']}  {device} "
        f"({meta['gpu'] or meta['cpu']}, {meta['threads']} threads, load {meta.get('loadavg')})")
    meta["copy_gb_per_s"] = copy_bandwidth(device)
    log(f"# memory bandwidth (best tensor copy, read + write): {meta['copy_gb_per_s']:.1f} GB/s")
    results = []
    for case in selected:
        start = time.perf_counter()
        rows = run_case(case, rounds, repeats, log)
        results += rows
        log(f"  {case.id:44s} " + "  ".join(
            f"{r.impl} {'-' if r.ms is None else f'{r.ms:.2f}ms'}" for r in rows)
            + f"   ({time.perf_counter() - start:.0f} s)")
        if device == "cuda":
            torch.cuda.empty_cache()
    log("")
    log(table(results, device, meta["copy_gb_per_s"]))
    log("")
    log("x ref: eager-ref ms / this ms (same run); GB/s: minimal traffic (TRAFFIC passes over the "
        "main input) / time; %BW: of the measured copy bandwidth; dloss, dgrad: relative difference from eager-ref (loss; max |grad "
        "diff| / max |ref grad|).")
    stem = args.name or f"ops-{device}" + ("-quick" if args.quick else "")
    paths = write_rows(Path(args.out), stem, [asdict(r) for r in results], meta,
                       skip=("raw_ms",))
    log(f"wrote {paths['csv']}, {paths['json']}")
    return results


# ---------------------------------------------------------------------------------------------
# pytest-benchmark: `pytest benchmarks/ops.py --benchmark-only` (quick shapes; set
# DINV_OPS_BENCH_FULL=1 for the full ones)
# ---------------------------------------------------------------------------------------------
try:
    import pytest
except ImportError:  # pragma: no cover - the script path needs no pytest
    pytest = None

if pytest is not None and "pytest" in sys.modules and __name__ != "__main__":
    _DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
    _CASES = {c.id: c for c in cases(_DEVICE, quick=not os.environ.get("DINV_OPS_BENCH_FULL"))}

    def _params():
        out = []
        for case in _CASES.values():
            for impl in ["eager-ref"] + [f"dinv:{b}" for b in backends_for(case)]:
                out.append(pytest.param(case.id, impl, id=f"{case.id}-{impl}"))
        return out

    @pytest.mark.parametrize("case_id,impl", _params())
    def test_op(benchmark, case_id, impl):
        case = _CASES[case_id]
        fn, backend = implementations(case)[impl]
        step = make_step(case, fn, backend)
        step()
        benchmark.group = case.id
        benchmark(step)


if __name__ == "__main__":
    main()
