"""Training and evaluation loops, pure PyTorch (the orchestrator runs them inside Ray Train workers).

- ``joint_step``: LIMPQ's one-time joint training step (Algorithm 1): zero_grad once; for each
  candidate bit b a forward/backward with every searchable layer (and its BN) at b; then one
  uniformly random policy; gradients summed; averaged across data-parallel ranks once; clip_grad_value
  1; one optimizer step.
- ``train_epoch`` / ``evaluate`` / ``recalibrate_bn`` for FP pretraining and single-policy QAT.

Why the joint step averages gradients itself instead of relying on DDP's autograd hooks: it runs
n+1 backward passes per optimizer step, and on the last (random-policy) pass most per-bit step sizes
and BNs are unused. DDP with ``no_sync`` + ``find_unused_parameters`` leaves globally unused
parameters' accumulated gradients un-averaged, so ranks would drift. One flat all-reduce of the
summed gradients per step is exact and cheaper (one collective instead of n+1).
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset

from .quant.policy import Policy
from .quant.swap import set_policy, set_uniform


def world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def make_loader(ds: Dataset, batch_size: int, train: bool, seed: int = 0, num_workers: int = 0,
                drop_last: bool | None = None) -> DataLoader:
    """A loader that shards over the ranks when torch.distributed is initialised.

    Training: ``DistributedSampler`` (a per-epoch shuffle shared by all ranks, each rank a disjoint
    slice, ``set_epoch`` before every epoch). Evaluation: rank r takes samples r, r+size, ... with no
    padding, so summing the ranks' counts in ``evaluate`` counts every sample exactly once
    (DistributedSampler would repeat samples to even the shards out).
    """
    rank, size = world()
    sampler = None
    if size > 1:
        if train:
            sampler = DistributedSampler(ds, num_replicas=size, rank=rank, shuffle=True, seed=seed, drop_last=True)
        else:
            ds = Subset(ds, range(rank, len(ds), size))
    g = torch.Generator().manual_seed(seed)
    return DataLoader(ds, batch_size=batch_size, shuffle=(train and sampler is None), sampler=sampler,
                      num_workers=num_workers, drop_last=train if drop_last is None else drop_last,
                      generator=g, pin_memory=torch.cuda.is_available())


def seed_epoch(loader: DataLoader, seed: int, epoch: int) -> None:
    """Make the epoch's sample order a function of (seed, epoch) only, so a run resumed from an epoch
    checkpoint sees the same batches as an uninterrupted one."""
    if hasattr(loader.sampler, "set_epoch"):
        loader.sampler.set_epoch(epoch)
    elif loader.generator is not None:
        loader.generator.manual_seed(seed * 100_003 + epoch)


def allreduce_gradients(params: Sequence[nn.Parameter]) -> None:
    """Average gradients over ranks in one flat all-reduce.

    Parameters without a gradient are left without one, as on a single rank (zero-filling them would
    let SGD's weight decay and momentum move parameters that no pass used, e.g. the FP BatchNorms and
    the fixed layers' 8-bit step sizes during joint training). Every rank runs the same policies on
    the same model, so the set of parameters with a gradient, and hence the flat layout, is the same
    on every rank.
    """
    average_over_ranks_([p.grad for p in params if p.grad is not None])


def average_over_ranks_(tensors: Sequence[torch.Tensor]) -> None:
    """Replace each tensor by its mean over data-parallel ranks, in place, with one flat all-reduce
    (one collective instead of one per tensor). Every rank must pass the same shapes in the same order."""
    _, size = world()
    if size == 1 or not tensors:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat)
    flat /= size
    offset = 0
    for t in tensors:
        n = t.numel()
        t.copy_(flat[offset:offset + n].view_as(t))
        offset += n


def broadcast_parameters(model: nn.Module) -> None:
    """Make every rank start from rank 0's parameters and buffers."""
    if world()[1] == 1:
        return
    for t in list(model.parameters()) + list(model.buffers()):
        dist.broadcast(t.data, src=0)


@dataclass
class JointStepResult:
    loss: torch.Tensor                    # mean of the n+1 passes' losses, on the device (no host read)
    policies: list[Policy] = field(default_factory=list)


def joint_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, bits: Sequence[int],
               optimizer: torch.optim.Optimizer, criterion: nn.Module, random_policy: Policy,
               amp_dtype: torch.dtype | None = None) -> JointStepResult:
    """One LIMPQ joint step: the n uniform policies, then ``random_policy`` (drawn by the caller with
    ``draw_random_policies`` from a generator seeded identically on all ranks, so the ranks train the
    same policy and the lazy step-size inits line up). Reads nothing back to the host once every
    quantizer has been initialised (the first step)."""
    optimizer.zero_grad(set_to_none=True)
    policies: list[Policy] = []
    total = torch.zeros((), device=x.device)
    steps: list[Callable[[], Policy]] = [(lambda b=b: set_uniform(model, b)) for b in bits]
    steps.append(lambda: set_policy(model, random_policy, fixed_bits=None) or random_policy)
    for configure in steps:
        policies.append(configure())
        with torch.autocast(x.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            loss = criterion(model(x), y)
        loss.backward()  # bf16 autocast needs no GradScaler
        total += loss.detach().float()
    params = [p for p in model.parameters() if p.requires_grad]
    allreduce_gradients(params)
    torch.nn.utils.clip_grad_value_(params, 1.0)
    optimizer.step()
    return JointStepResult(total / len(steps), policies)


def single_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, optimizer: torch.optim.Optimizer,
                criterion: nn.Module, clip: float | None = None,
                amp_dtype: torch.dtype | None = None) -> torch.Tensor:
    """One ordinary step (FP pretraining, single-policy QAT). Under DDP the gradient sync is DDP's.
    Returns the loss on the device: reading it would sync every step."""
    optimizer.zero_grad(set_to_none=True)
    with torch.autocast(x.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        loss = criterion(model(x), y)
    loss.backward()
    if clip:
        torch.nn.utils.clip_grad_value_(model.parameters(), clip)
    optimizer.step()
    return loss.detach().float()


def sgd(model: nn.Module, lr: float, momentum: float = 0.9, weight_decay: float = 2.5e-5) -> torch.optim.SGD:
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)


def cosine_with_warmup(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int = 0):
    """Linear warm-up then cosine decay to zero, stepped once per optimizer step."""
    total_steps = max(1, total_steps)

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable, device: torch.device | str = "cpu",
             criterion: nn.Module | None = None) -> dict[str, float]:
    """Top-1, top-5 (as fractions) and mean loss; summed across ranks when distributed."""
    criterion = criterion or nn.CrossEntropyLoss()
    was = model.training
    model.eval()
    stats = torch.zeros(4, dtype=torch.float64, device=device)  # n, top1, top5, loss_sum
    for x, y in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        out = model(x)
        k = min(5, out.shape[1])
        topk = out.topk(k, dim=1).indices
        correct = topk.eq(y[:, None])
        stats[0] += len(y)  # accumulated on the device: one host read per evaluation, not per batch
        stats[1:] += torch.stack([correct[:, 0].sum().double(), correct.any(1).sum().double(),
                                  criterion(out.float(), y).double() * len(y)])
    if world()[1] > 1:
        dist.all_reduce(stats)
    model.train(was)
    n = max(1.0, float(stats[0]))
    return {"top1": float(stats[1]) / n, "top5": float(stats[2]) / n, "loss": float(stats[3]) / n,
            "samples": int(stats[0])}


@torch.no_grad()
def recalibrate_bn(model: nn.Module, loader: Iterable, num_batches: int = 20,
                   device: torch.device | str = "cpu") -> None:
    """Re-estimate BatchNorm running statistics for the current quantized configuration
    (cumulative average over ``num_batches`` training batches), as LIMPQ does before evaluation."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [(m, m.momentum) for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    was = model.training
    model.train()
    for i, (x, _) in enumerate(loader):
        if i >= num_batches:
            break
        model(x.to(device))
    for m, mom in saved:
        m.momentum = mom
    model.train(was)


def train_epoch(model: nn.Module, loader: Iterable, optimizer, scheduler, criterion: nn.Module,
                device="cpu", clip: float | None = None, on_step: Callable[[int, float], None] | None = None,
                amp_dtype=None) -> dict[str, float]:
    model.train()
    t0, losses, n, steps = time.perf_counter(), torch.zeros((), device=device), 0, 0
    for i, (x, y) in enumerate(loader):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        loss = single_step(model, x, y, optimizer, criterion, clip, amp_dtype)
        if scheduler is not None:
            scheduler.step()
        losses += loss
        n += len(y)
        steps += 1
        if on_step:
            on_step(i, loss)
    mean = float(losses) / steps if steps else float("nan")  # the epoch's one host read
    return {"loss": mean, "samples": n, "seconds": time.perf_counter() - t0}


def quant_sgd(model: nn.Module, lr: float, momentum: float = 0.9, weight_decay: float = 2.5e-5,
              step_lr_scale: float = 1.0) -> torch.optim.SGD:
    """SGD for a quantized model: the LSQ step sizes in their own group, at ``lr * step_lr_scale`` and
    without weight decay (decay would only shrink them towards the 1e-5 clamp); everything else as
    ``sgd``. With scale 1 the LRs are LIMPQ's (one LR for all)."""
    steps = [p for n, p in model.named_parameters() if ".step." in n and p.requires_grad]
    ids = {id(p) for p in steps}
    rest = [p for p in model.parameters() if id(p) not in ids and p.requires_grad]
    groups = [{"params": rest}] + ([{"params": steps, "lr": lr * step_lr_scale, "weight_decay": 0.0}] if steps else [])
    return torch.optim.SGD(groups, lr=lr, momentum=momentum, weight_decay=weight_decay)
