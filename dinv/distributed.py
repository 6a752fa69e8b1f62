"""Several processes (GPUs, nodes) working on one inversion or one dataset, on PyTorch's own
stack: `torch.distributed` process groups (gloo on CPU, NCCL on GPU), launched by `torchrun`.
Everything that touches `torch.distributed` in dinv is here; the Inverter, the dataset writer and
the trainer call these functions with a `Ranks`.

Two ways to share the work:
- independent batches (`dinv.data.synthesize_dataset` under an initialized default group): rank r
  synthesizes batches r, r + N, r + 2N, ... of the run with the seeds one process would use, so
  N ranks write exactly the images one process writes;
- one global batch (`Inverter(..., distributed=True)`): every rank passes the same targets, each
  optimizes its contiguous share of the batch (`split_sizes`), and the loss is the one of the
  whole batch: the BatchNorm statistics are merged across ranks (`merge_statistics`, Chan's
  formula with a hand-written backward) and the other terms' sums are reduced before the
  objective takes means and square roots of them (`sum_across_ranks`, identity backward).

Why the backwards are written by hand: every rank computes the same global loss, so the gradient
with respect to a global quantity is already the same on every rank. Rank r's gradient with
respect to its own contribution follows from it locally, with no second reduction; autograd
through `torch.distributed.nn.functional.all_reduce` would all-reduce the gradient as well and
scale every image gradient by the world size.
"""
from __future__ import annotations

import contextlib
import datetime
import math
import os
import pickle
import queue
import socket
import time
import traceback
from dataclasses import dataclass

import torch


def available() -> bool:
    """Whether a default process group is initialized (torchrun + `init_from_env`, or the
    caller's `torch.distributed.init_process_group`)."""
    return torch.distributed.is_available() and torch.distributed.is_initialized()


@dataclass(frozen=True)
class Ranks:
    """A process group as dinv uses it: `group` (None: the default group), this process's
    `rank` in it and its `size`."""
    group: object
    rank: int
    size: int

    @property
    def first(self) -> bool:
        return self.rank == 0


SINGLE = Ranks(None, 0, 1)


def current(group=None) -> Ranks:
    """The Ranks of `group` (None: the default group); one process (rank 0 of 1) when no
    process group is initialized."""
    if not available():
        if group is not None:
            raise ValueError("a process group was given but torch.distributed is not "
                             "initialized")
        return SINGLE
    return Ranks(group, torch.distributed.get_rank(group), torch.distributed.get_world_size(group))


def ranks_for(option) -> Ranks | None:
    """The Inverter's `distributed` option: False/None (one process), True (the default
    group) or a ProcessGroup, as Ranks (None for one process)."""
    if option is None or option is False:
        return None
    if not available():
        raise ValueError("distributed=True needs an initialized process group: launch with "
                         "torchrun and call torch.distributed.init_process_group() (or "
                         "dinv.distributed.init_from_env()) before building the Inverter")
    if option is True:
        return current()
    if not isinstance(option, torch.distributed.ProcessGroup):
        raise TypeError(f"distributed must be False, True or a torch.distributed.ProcessGroup, "
                        f"got {type(option).__name__}")
    if torch.distributed.get_rank(option) < 0:
        raise ValueError("this process is not a member of the given process group")
    return current(option)


def _source(ranks: Ranks) -> int:
    """The global rank of the group's rank 0 (what broadcasts take)."""
    return 0 if ranks.group is None else torch.distributed.get_global_rank(ranks.group, 0)


# -- processes and their group -----------------------------------------------------------------
def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def init_from_env(device: str = "cpu") -> str:
    """Joins the default process group that torchrun describes in the environment (RANK,
    WORLD_SIZE, MASTER_ADDR, MASTER_PORT), with NCCL for a CUDA `device` and gloo otherwise, and
    returns the device this process uses: `cuda:LOCAL_RANK` for "cuda", else `device`. Without
    torchrun's variables, or when a group exists already, it only returns the device."""
    if launched_by_torchrun() and torch.device(device).type == "cuda" \
            and torch.device(device).index is None:
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    if not launched_by_torchrun() or available():
        return device
    if torch.device(device).type == "cuda":
        torch.cuda.set_device(torch.device(device))
    torch.distributed.init_process_group("nccl" if torch.device(device).type == "cuda"
                                         else "gloo")
    return device


@contextlib.contextmanager
def torchrun_session(device: str = "cpu"):
    """`init_from_env(device)` for the length of a block, leaving the process group it created
    (if any) destroyed afterwards; yields the device this process uses."""
    created = launched_by_torchrun() and not available()
    device = init_from_env(device)
    try:
        yield device
    finally:
        if created and available():
            torch.distributed.destroy_process_group()


def loopback_interface() -> str | None:
    """The loopback network interface's name (gloo otherwise binds to the address the host name
    resolves to)."""
    for _, name in socket.if_nameindex():
        if name.startswith("lo"):
            return name
    return None


def _worker(rank, size, port, backend, threads, timeout_s, fn, args, results):
    try:
        if backend == "gloo" and "GLOO_SOCKET_IFNAME" not in os.environ:
            interface = loopback_interface()
            if interface is not None:
                os.environ["GLOO_SOCKET_IFNAME"] = interface
        torch.set_num_threads(threads)
        if backend == "nccl":
            torch.cuda.set_device(rank % torch.cuda.device_count())
        timeout = datetime.timedelta(seconds=timeout_s)
        store = torch.distributed.TCPStore("127.0.0.1", port, size, is_master=False,
                                           timeout=timeout)
        torch.distributed.init_process_group(backend, store=store, rank=rank, world_size=size,
                                             timeout=timeout)
        try:
            # Pickled here, by value: the queue's own pickler would pass tensors as shared-memory
            # handles, which die with this process.
            results.put((rank, "ok", pickle.dumps(fn(*args))))
        finally:
            torch.distributed.destroy_process_group()
    except BaseException:  # noqa: BLE001 - reported to the parent, which raises it
        results.put((rank, "error", traceback.format_exc()))


class RankFailed(RuntimeError):
    """A process started by `run_local` raised or exited without a result. `.rank` is the
    first one noticed, `.exitcode` its exit status (None when it raised)."""

    def __init__(self, message: str, rank: int, exitcode: int | None):
        super().__init__(message)
        self.rank, self.exitcode = rank, exitcode


def _raise_if_dead(processes, values) -> None:
    for rank, process in enumerate(processes):
        if rank not in values and process.exitcode not in (None, 0):
            raise RankFailed(f"rank {rank} exited with status {process.exitcode} without a "
                             "result", rank, process.exitcode)


def run_local(fn, size: int, *args, backend: str = "gloo", threads: int = 1,
              timeout_s: float = 300.0) -> list:
    """Runs `fn(*args)` in `size` new processes on this machine, joined in one default process
    group over the loopback interface (a TCP store on a free port of 127.0.0.1), each with
    `threads` intra-op threads (and, for NCCL, GPU rank % device count); returns their return
    values by rank. `fn` must be importable by name (a module-level function) and its results
    picklable. If a process raises or dies, or `timeout_s` passes, the others are stopped and
    RankFailed (TimeoutError) is raised. For tests, benchmarks and notebooks; `torchrun` is
    the launcher for real runs."""
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    timeout = datetime.timedelta(seconds=timeout_s)
    # The parent serves the rendezvous store on a port the OS picks: no free-port race.
    store = torch.distributed.TCPStore("127.0.0.1", 0, size, is_master=True,
                                       wait_for_workers=False, timeout=timeout)
    results = context.Queue()
    processes = [context.Process(target=_worker, daemon=True,
                                 args=(rank, size, store.port, backend, threads, timeout_s, fn,
                                       args, results))
                 for rank in range(size)]
    for process in processes:
        process.start()
    values, deadline = {}, time.monotonic() + timeout_s
    try:
        while len(values) < size:
            try:
                rank, status, value = results.get(timeout=0.2)
            except queue.Empty:
                _raise_if_dead(processes, values)
                if time.monotonic() > deadline:
                    raise TimeoutError(f"run_local: {size - len(values)} of {size} processes "
                                       f"had not finished after {timeout_s:.0f} s")
                continue
            if status == "error":
                # A rank that dies makes its peers' collectives fail: when one died, that is
                # the cause to report.
                grace = time.monotonic() + 2.0
                while time.monotonic() < grace:
                    _raise_if_dead(processes, values)
                    time.sleep(0.05)
                raise RankFailed(f"rank {rank} raised:\n{value}", rank, None)
            values[rank] = pickle.loads(value)
    finally:
        for process in processes:
            process.join(timeout=5 if len(values) == size else 0)
        for process in processes:
            if process.is_alive():
                process.kill()
                process.join()
    return [values[rank] for rank in range(size)]


# -- collectives on Python objects (dataset bookkeeping) -----------------------------------------
def on_first_rank(fn, ranks: Ranks):
    """`fn()` run on rank 0 only; every rank returns its result, or raises its exception (so a
    refused configuration stops every rank with the same message)."""
    if ranks.size == 1:
        return fn()
    payload = [None]
    if ranks.first:
        try:
            payload = [("ok", fn())]
        except Exception as error:  # noqa: BLE001 - re-raised on every rank below
            payload = [("error", error)]
    torch.distributed.broadcast_object_list(payload, src=_source(ranks), group=ranks.group)
    status, value = payload[0]
    if status == "error":
        raise value
    return value


def gather_objects(value, ranks: Ranks) -> list:
    """Every rank's `value`, by rank, on every rank."""
    if ranks.size == 1:
        return [value]
    values = [None] * ranks.size
    torch.distributed.all_gather_object(values, value, group=ranks.group)
    return values


def barrier(ranks: Ranks) -> None:
    if ranks.size > 1:
        torch.distributed.barrier(group=ranks.group)


def round_robin(items: list, ranks: Ranks) -> list:
    """This rank's items when the ranks deal `items` out in turn (no padding, no duplicates)."""
    return items[ranks.rank::ranks.size]


# -- data-parallel training ----------------------------------------------------------------------
def data_parallel(model, ranks: Ranks):
    """`model` wrapped in DistributedDataParallel over the ranks (gradients averaged across them
    in the backward; rank 0's parameters and buffers are broadcast to the others at the start,
    and its buffers at every forward). Each rank's BatchNorm layers normalize its own rows:
    PyTorch's SyncBatchNorm runs on GPUs only."""
    device = next(iter(model.parameters())).device
    return torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None,
        process_group=ranks.group)


def training_share(n: int, ranks: Ranks):
    """(first row, rows, loss weight) of this rank's contiguous share of a training batch of `n`
    (all of it when n < ranks). DDP averages the ranks' gradients; a rank's mean loss weighted
    by ranks·rows / n makes that average the gradient of the whole batch's mean (weight 1 when
    every rank holds the whole batch)."""
    if ranks.size == 1 or n < ranks.size:
        return 0, n, 1.0
    sizes = split_sizes(n, ranks.size)
    return sum(sizes[:ranks.rank]), sizes[ranks.rank], ranks.size * sizes[ranks.rank] / n


def mean_across_ranks(value: torch.Tensor, ranks: Ranks) -> torch.Tensor:
    """The mean of every rank's `value` (no gradient)."""
    if ranks.size == 1:
        return value
    total = value.detach().clone()
    torch.distributed.all_reduce(total, group=ranks.group)
    return total / ranks.size


def broadcast_buffers(model, ranks: Ranks) -> None:
    """Rank 0's buffers (BatchNorm running statistics) on every rank, so that every rank holds
    the same model."""
    if ranks.size == 1:
        return
    for buffer in model.buffers():
        torch.distributed.broadcast(buffer, src=_source(ranks), group=ranks.group)


# -- one global batch -----------------------------------------------------------------------------
def check_shares(shares, size: int) -> list:
    """`shares` as `size` positive floats (None: equal shares)."""
    if shares is None:
        return [1.0] * size
    try:
        values = [float(s) for s in shares]
    except (TypeError, ValueError):
        values = []
    if len(values) != size or not all(math.isfinite(v) and v > 0 for v in values):
        raise ValueError(f"batch_shares needs {size} positive numbers (one per rank), got "
                         f"{shares!r}")
    return values


def split_sizes(n: int, size: int, shares=None) -> list:
    """How many of `n` images each of `size` ranks holds: contiguous shares proportional to
    `shares` (default equal), each >= 1, the remainder going to the largest fractional parts
    (ties: the lower ranks)."""
    shares = check_shares(shares, size)
    if n < size:
        raise ValueError(f"a global batch of {n} images cannot give each of {size} ranks one")
    total = sum(shares)
    exact = [n * s / total for s in shares]
    sizes = [int(e) for e in exact]
    order = sorted(range(size), key=lambda r: (-(exact[r] - sizes[r]), r))
    for r in order[:n - sum(sizes)]:
        sizes[r] += 1
    if min(sizes) < 1:
        raise ValueError(f"batch_shares {shares} leave a rank without an image of {n}")
    return sizes


def gather_rows(local: torch.Tensor, sizes, ranks: Ranks) -> torch.Tensor:
    """The rows of every rank, concatenated by rank; rank r holds `sizes[r]` rows (any may be
    0). Tensors are padded to the largest share for the collective, which needs equal sizes."""
    if ranks.size == 1:
        return local
    padded = local.new_zeros((max(sizes),) + tuple(local.shape[1:]))
    padded[:len(local)] = local
    parts = [torch.empty_like(padded) for _ in range(ranks.size)]
    torch.distributed.all_gather(parts, padded.contiguous(), group=ranks.group)
    return torch.cat([part[:count] for part, count in zip(parts, sizes)])


class _SumAcrossRanks(torch.autograd.Function):
    """Σ_r x_r. Backward: the identity. Every rank computes the same loss from the sum, so the
    upstream gradient is the same on every rank and is already ∂loss/∂x_r."""

    @staticmethod
    def forward(ctx, local, group):
        total = local.clone()
        torch.distributed.all_reduce(total, group=group)
        return total

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def sum_across_ranks(local: torch.Tensor, ranks: Ranks) -> torch.Tensor:
    """The sum of every rank's `local` (same shape everywhere), differentiable: the gradient of
    a loss computed identically on every rank from the sum, with respect to this rank's part."""
    return _SumAcrossRanks.apply(local, ranks.group)


class _MergeStatistics(torch.autograd.Function):
    """Per-channel (mean, biased var) of the whole batch from every rank's, Chan's parallel
    formula with the shares w_r = n_r / n:
        mean = Σ_r w_r·mean_r          var = Σ_r w_r·(var_r + (mean_r − mean)²)
    Backward (g_mean, g_var: the gradient w.r.t. the global statistics, the same on every rank):
        g_mean_r = w_r·(g_mean + 2·g_var·(mean_r − mean))          g_var_r = w_r·g_var
    after which the local statistics' own backward gives dx = (g_mean + 2·g_var·(x − mean)) / n,
    the input gradient of one process holding the whole batch."""

    @staticmethod
    def forward(ctx, local, weights, ranks):
        rows = [torch.empty_like(local) for _ in range(ranks.size)]
        torch.distributed.all_gather(rows, local.contiguous(), group=ranks.group)
        rows = torch.stack(rows)
        half = local.numel() // 2
        means, variances = rows[:, :half], rows[:, half:]
        w = weights.to(local.dtype).view(-1, 1)
        mean = (w * means).sum(0)
        var = (w * (variances + (means - mean) ** 2)).sum(0)
        ctx.share = float(weights[ranks.rank])
        ctx.save_for_backward(local[:half], mean)
        return torch.cat([mean, var])

    @staticmethod
    def backward(ctx, grad):
        local_mean, mean = ctx.saved_tensors
        half = mean.numel()
        g_mean, g_var = grad[:half], grad[half:]
        return torch.cat([ctx.share * (g_mean + 2 * g_var * (local_mean - mean)),
                          ctx.share * g_var]), None, None


def merge_statistics(local: torch.Tensor, weights: torch.Tensor, ranks: Ranks) -> torch.Tensor:
    """[means of every channel of every layer, then their variances] of the whole batch, from
    this rank's vector of the same layout, in one collective; `weights` [size] are the ranks'
    shares n_r / n of the batch. Every BatchNorm's per-channel count on a rank is its image count
    times the layer's spatial size, the same on every rank (one view for all), so the count
    ratios of Chan's formula are the image shares."""
    return _MergeStatistics.apply(local, weights, ranks)


class GlobalBatch:
    """One batch of `sizes[r]` images on each rank r (see `global_batch`): this rank's slice of
    batch-sized tensors, and the reductions the objective of the whole batch needs."""

    def __init__(self, ranks: Ranks, sizes, device):
        self.ranks = ranks
        self.sizes = list(sizes)
        self.total = sum(self.sizes)
        self.offset = sum(self.sizes[:ranks.rank])
        self.count = self.sizes[ranks.rank]
        self.share = self.count / self.total
        self.weights = torch.tensor([s / self.total for s in self.sizes], dtype=torch.float64,
                                    device=device)

    def local(self, tensor: torch.Tensor) -> torch.Tensor:
        """This rank's rows of a tensor of the whole batch."""
        return tensor[self.offset:self.offset + self.count]

    def gather(self, local: torch.Tensor) -> torch.Tensor:
        """The whole batch from every rank's rows (on every rank)."""
        return gather_rows(local, self.sizes, self.ranks)

    def sum(self, local: torch.Tensor) -> torch.Tensor:
        return sum_across_ranks(local, self.ranks)

    def merge(self, local: torch.Tensor) -> torch.Tensor:
        return merge_statistics(local, self.weights, self.ranks)

    def first_nonzero(self, value: torch.Tensor) -> int:
        """The smallest nonzero of every rank's integer scalar `value` (0 if all are 0): where
        the first rank diverged, so that every rank stops at the same check."""
        values = gather_rows(value.reshape(1).to(torch.long), [1] * self.ranks.size,
                             self.ranks).tolist()
        return min((v for v in values if v), default=0)


def global_batch(ranks: Ranks, targets: torch.Tensor, seed, shares=None):
    """(GlobalBatch of `targets`, the seed every rank uses). Checks that every rank passed the
    same targets and seed (a mismatch would silently optimize a different batch on each rank);
    seed None: rank 0 draws one from torch's global generator for all."""
    n = targets.numel()
    positions = torch.arange(1, n + 1, device=targets.device)
    drawn = int(torch.randint(0, 2**62, (1,)).item()) if seed is None else int(seed)
    probe = torch.tensor([n, int(targets.sum()), int((targets * positions).sum()),
                          -1 if seed is None else int(seed), drawn], dtype=torch.long,
                         device=targets.device)
    rows = [torch.empty_like(probe) for _ in range(ranks.size)]
    torch.distributed.all_gather(rows, probe, group=ranks.group)
    if any(not torch.equal(row[:4], rows[0][:4]) for row in rows):
        raise ValueError("distributed=True: every rank must pass the same targets and seed to "
                         "invert() (each optimizes its share of that one batch); they differ")
    sizes = split_sizes(n, ranks.size, shares)
    return GlobalBatch(ranks, sizes, targets.device), int(rows[0][4])
