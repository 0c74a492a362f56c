"""Per-worker training loops that Ray Train runs on every rank: FP pretraining (real DDP through
``ray.train.torch.prepare_model``) and LIMPQ joint indicator training (Algorithm 1, with the manual
gradient all-reduce of ``workloads.train.joint_step``).

Both loops checkpoint once per epoch (model, optimizer, scheduler, step counter, epoch, RNG states incl.
the random-policy generator, history) and resume from ``ray.train.get_checkpoint()`` after a worker
loss, so a restarted run redoes at most the epoch in flight. Checkpoints hold tensors and plain Python
values only: they are written with ``torch.save`` and read with ``torch.load(weights_only=True)``.

The driver side (building the ``TorchTrainer``, the stage functions) is ``orchestrator.training``.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import random
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from workloads.cost import layer_costs
from workloads.data import load_data, subset
from workloads.errors import InputError
from workloads.models import build_model
from workloads.quant import (
    draw_random_policies,
    indicator_records,
    quant_layers,
    quantize_model,
    searchable_names,
    set_uniform,
)
from workloads.train import (
    average_over_ranks_,
    broadcast_parameters,
    cosine_with_warmup,
    evaluate,
    joint_step,
    make_loader,
    quant_sgd,
    seed_epoch,
    sgd,
    train_epoch,
    world,
)

from .config import Config, config_from_dict
from .console import ProgressTicker

CKPT_FILE = "state.pt"
# The random-policy generator is seeded with the study seed plus this offset on every rank, so all
# ranks draw the same random policy at every step (and the lazy activation-step init collectives,
# which run inside the forward at a bit first seen, line up across ranks).
POLICY_SEED_OFFSET = 1009


def policy_generator(seed: int) -> torch.Generator:
    """The random-policy generator of a study with seed ``seed`` (identical on all ranks)."""
    return torch.Generator().manual_seed(seed + POLICY_SEED_OFFSET)


# ----------------------------------------------------------------------------- helpers
def load_state(path: str | Path, where: str | None = None) -> dict[str, Any]:
    """A loop checkpoint, tensors and plain values only. A missing, truncated or foreign file is an
    ``InputError`` naming ``where`` (the checkpoint's storage location; default ``path``)."""
    where = where or str(path)
    # Ray resumes a run from the latest checkpoint it registered, so the way out is a fresh run.
    remedy = f"delete the run directory {where.rstrip('/').rsplit('/', 1)[0]} to train this stage from scratch"
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise InputError(f"training checkpoint {where} has no {CKPT_FILE}; {remedy}") from None
    except Exception as e:  # torch raises several types for truncated or foreign files
        raise InputError(f"training checkpoint {where} is corrupt ({type(e).__name__}); {remedy}") from None
    if not isinstance(state, dict) or not {"model", "optimizer", "scheduler", "epoch", "step"} <= state.keys():
        raise InputError(f"training checkpoint {where} is not a checkpoint of this program; {remedy}")
    return state


def _rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        # The ndarray becomes a tensor: weights_only loading refuses numpy objects.
        "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def _seed_all(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


def _average_float_buffers(model: nn.Module) -> None:
    """Average BatchNorm running statistics over ranks. The joint step syncs gradients only, so each
    rank's statistics drift with its own shard; averaging them once per epoch keeps every rank (and the
    checkpoint, written by rank 0) on statistics from all the data."""
    average_over_ranks_([b for b in model.buffers() if b.is_floating_point()])


def state_checksum(model: nn.Module, buffers: bool = False) -> str:
    """SHA-1 of every parameter (and optionally buffer), to compare ranks bit for bit."""
    h = hashlib.sha1()
    tensors = list(model.parameters()) + (list(model.buffers()) if buffers else [])
    for t in tensors:
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


class _Hooks:
    """Test-only hooks, off unless the driver passes them: a per-rank trace of every step and a
    one-shot fault that kills one rank's process at a given global step."""

    def __init__(self, loop_cfg: dict, rank: int):
        self.rank = rank
        trace = loop_cfg.get("trace_dir")
        self.trace = Path(trace) / f"rank{rank}.jsonl" if trace else None
        if self.trace:
            self.trace.parent.mkdir(parents=True, exist_ok=True)
        self.fault = loop_cfg.get("fault") or None

    def maybe_fault(self, steps_done: int) -> None:
        f = self.fault
        if f and self.rank == int(f["rank"]) and steps_done == int(f["step"]):
            marker = Path(f["marker"])
            if not marker.exists():  # fire once: the restarted worker must get past this step
                marker.parent.mkdir(parents=True, exist_ok=True)
                marker.write_text(str(os.getpid()))
                # Ray Train's controller takes reports (and so registers checkpoints) only when it
                # polls the workers, every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S; a process that dies
                # sooner after a checkpoint loses it. Outlive two polls so the fault is "a worker
                # lost after the last checkpoint", not that race.
                time.sleep(2 * float(os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", 2.0)) + 0.5)
                os._exit(1)

    def record(self, row: dict) -> None:
        if self.trace:  # the pid tells the attempts of a run apart (a restart is a new process)
            with self.trace.open("a") as fh:
                fh.write(json.dumps({**row, "pid": os.getpid()}) + "\n")


def _report(metrics: dict, state: dict | None, rank: int) -> None:
    """Every rank reports (Ray Train needs the same number of reports per rank); rank 0 attaches the
    checkpoint."""
    import ray.train

    if rank != 0 or state is None:
        ray.train.report(metrics, checkpoint=None)
        return
    with tempfile.TemporaryDirectory() as d:
        torch.save(state, Path(d) / CKPT_FILE)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))


def _restore() -> dict[str, Any] | None:
    import ray.train

    ckpt = ray.train.get_checkpoint()
    if ckpt is None:
        return None
    with ckpt.as_directory() as d:
        return load_state(Path(d) / CKPT_FILE, where=ckpt.path)


def _resume(model: nn.Module, optimizer, scheduler, generator: torch.Generator | None = None):
    """Restore the last epoch checkpoint, if Ray Train has one for this run (a restarted worker
    group). Returns (first epoch to run, optimizer steps so far, history, epochs each attempt began
    at — this attempt's included)."""
    start_epoch, step, history, starts = 0, 0, [], []
    state = _restore()
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if generator is not None:
            generator.set_state(state["policy_generator"])
        _set_rng_state(state["rng"])
        start_epoch, step = int(state["epoch"]) + 1, int(state["step"])
        history, starts = list(state["history"]), list(state["starts"])
    starts.append(start_epoch)
    return start_epoch, step, history, starts


def _setup(loop_cfg: dict) -> tuple[Config, int, torch.device]:
    import ray.train
    import ray.train.torch as rtt

    cfg = config_from_dict(loop_cfg["study"])
    torch.set_num_threads(max(1, int(loop_cfg.get("threads") or cfg.resources.cpus_per_worker)))
    _seed_all(cfg.study.seed)
    device = rtt.get_device()  # cuda:<local rank> with use_gpu (Ray sets the visible devices), else cpu
    if device.type == "cuda":
        torch.cuda.set_device(device)  # NCCL collectives outside DDP use the current device
    return cfg, ray.train.get_context().get_world_rank(), device


def _fp_state(loop_cfg: dict) -> dict[str, torch.Tensor]:
    """The FP weights the indicator stage starts from. The driver puts them in Ray's object store,
    so workers on other nodes need no access to the driver's disk."""
    import ray

    ref = loop_cfg["fp_state"]
    return ray.get(ref) if isinstance(ref, ray.ObjectRef) else ref


def _amp_dtype(cfg: Config, device: torch.device) -> torch.dtype | None:
    # bf16 needs no GradScaler; on CPU autocast would only slow the small models down.
    return torch.bfloat16 if cfg.resources.amp and device.type == "cuda" else None


def _data(cfg: Config, loop_cfg: dict | None = None):
    """The study's data: the driver's copy from the object store when it sent one, else loaded here."""
    ref = (loop_cfg or {}).get("data")
    if ref is not None:
        import ray

        return ray.get(ref)
    return load_data(cfg.data.name, cfg.data.root, val_fraction=cfg.data.val_fraction, seed=cfg.study.seed,
                     image_size=cfg.data.image_size)


# ----------------------------------------------------------------------------- FP pretraining
def reporting_input_errors(report, loop, *args, **kwargs) -> None:
    """Bad input is deterministic: a worker or trial that meets it reports it (``input_error``) and
    ends cleanly, so Ray Train / Tune do not restart it ``max_failures`` times to meet it again; the
    driver turns the report into one UserError."""
    try:
        loop(*args, **kwargs)
    except InputError as e:
        report({"input_error": str(e)})


def stop_on_input_error(loop):
    """``reporting_input_errors`` for a Ray Train loop."""
    @functools.wraps(loop)
    def wrapper(loop_cfg: dict) -> None:
        import ray.train

        reporting_input_errors(ray.train.report, loop, loop_cfg)
    return wrapper


@stop_on_input_error
def pretrain_loop(loop_cfg: dict) -> None:
    """FP training from scratch: SGD + cosine with warm-up, DDP via ``prepare_model``; evaluated and
    checkpointed every epoch."""
    import ray.train.torch as rtt

    cfg, rank, device = _setup(loop_cfg)
    hooks = _Hooks(loop_cfg, rank)
    p = cfg.pretrain
    data = _data(cfg)
    model = build_model(cfg.model.name, data.num_classes, data.input_shape[0]).to(device)
    train_loader = make_loader(data.train, cfg.data.batch_size, True, cfg.study.seed, cfg.data.loader_workers)
    val_loader = make_loader(data.val, cfg.data.eval_batch_size, False, cfg.study.seed, cfg.data.loader_workers)
    optimizer = sgd(model, p.lr, p.momentum, p.weight_decay)
    steps_per_epoch = len(train_loader)
    scheduler = cosine_with_warmup(optimizer, p.epochs * steps_per_epoch, int(p.warmup_epochs * steps_per_epoch))
    start_epoch, step, history, starts = _resume(model, optimizer, scheduler)
    ddp = rtt.prepare_model(model, move_to_device=False)  # wraps in DDP only when world size > 1
    criterion = nn.CrossEntropyLoss(label_smoothing=p.label_smoothing)
    amp = _amp_dtype(cfg, device)
    _, size = world()
    first_step: list[float] = []
    ticker = ProgressTicker("pretrain", p.epochs, steps_per_epoch, rank)
    epoch = start_epoch

    def on_step(i: int, loss: float) -> None:
        nonlocal step
        step += 1
        hooks.maybe_fault(step)
        ticker(epoch, i + 1)

    for epoch in range(start_epoch, p.epochs):
        seed_epoch(train_loader, cfg.study.seed, epoch)
        if not first_step:  # start-up ends where the first training step begins
            first_step.append(time.time())
        lr = optimizer.param_groups[0]["lr"]
        tr = train_epoch(ddp, train_loader, optimizer, scheduler, criterion, device, on_step=on_step,
                         amp_dtype=amp)
        # DDP broadcasts rank 0's BatchNorm statistics at every forward, after which each rank adds
        # its own batch: average them so the evaluated and checkpointed statistics are the same on
        # every rank and come from all shards.
        _average_float_buffers(model)
        t_eval = time.perf_counter()
        ev = evaluate(model, val_loader, device)
        row = {"epoch": epoch, "train_loss": tr["loss"], "top1": ev["top1"], "top5": ev["top5"],
               "val_loss": ev["loss"], "epoch_seconds": tr["seconds"], "eval_seconds": time.perf_counter() - t_eval,
               "samples_per_s": tr["samples"] * size / max(tr["seconds"], 1e-9), "lr": lr, "steps": step}
        history.append(row)
        hooks.record({"rank": rank, "epoch": epoch, "step": step, "checksum": state_checksum(model, True)})
        state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                 "scheduler": scheduler.state_dict(), "epoch": epoch, "step": step, "rng": _rng_state(),
                 "history": history, "starts": starts, "num_classes": data.num_classes,
                 "input_shape": list(data.input_shape)}
        _report({**row, "first_step_time": first_step[0] if first_step else float("nan")}, state, rank)


# ----------------------------------------------------------------------------- LIMPQ joint training
@stop_on_input_error
def indicator_loop(loop_cfg: dict) -> None:
    """LIMPQ's one-time joint training of the multi-bit model (Algorithm 1) on a fraction of the train
    set; the learned step sizes are the indicators. Each epoch's checkpoint also carries the indicator
    records and the per-layer costs, so the driver builds the table from the checkpoint alone."""
    cfg, rank, device = _setup(loop_cfg)
    hooks = _Hooks(loop_cfg, rank)
    ic = cfg.indicators
    bits = list(ic.bits)
    data = _data(cfg, loop_cfg)
    model = build_model(cfg.model.name, data.num_classes, data.input_shape[0])
    model.load_state_dict(_fp_state(loop_cfg))
    costs = [vars(c) for c in layer_costs(model, data.input_shape)]  # on the FP model, before swapping
    quantize_model(model, bits=bits, fixed_layers=cfg.model.fixed_layers)
    fixed = [name for name, _ in quant_layers(model, fixed=True)]
    model.to(device)
    train_ds = subset(data.train, cfg.data.indicator_fraction, cfg.study.seed)
    loader = make_loader(train_ds, cfg.data.batch_size, True, cfg.study.seed, cfg.data.loader_workers)
    val_loader = make_loader(data.val, cfg.data.eval_batch_size, False, cfg.study.seed, cfg.data.loader_workers)
    optimizer = quant_sgd(model, ic.lr, ic.momentum, ic.weight_decay, ic.step_lr_scale)
    steps_per_epoch = len(loader)
    scheduler = cosine_with_warmup(optimizer, ic.epochs * steps_per_epoch, int(ic.warmup_epochs * steps_per_epoch))
    generator = policy_generator(cfg.study.seed)
    start_epoch, step, history, starts = _resume(model, optimizer, scheduler, generator)
    broadcast_parameters(model)  # every rank starts from rank 0's weights, steps and BN statistics
    criterion = nn.CrossEntropyLoss(label_smoothing=ic.label_smoothing)
    amp = _amp_dtype(cfg, device)
    _, size = world()
    first_step = float("nan")
    ticker = ProgressTicker("indicators", ic.epochs, steps_per_epoch, rank)
    for epoch in range(start_epoch, ic.epochs):
        seed_epoch(loader, cfg.study.seed, epoch)
        model.train()
        lr = optimizer.param_groups[0]["lr"]
        t0, loss_sum, n_steps, n_samples = time.perf_counter(), torch.zeros((), device=device), 0, 0
        # The epoch's random policies in one draw: one host read per epoch instead of one per step.
        randoms = draw_random_policies(searchable_names(model), bits, generator, len(loader))
        for x, y in loader:
            hooks.maybe_fault(step)
            if first_step != first_step:  # NaN until the first step starts: start-up ends here
                first_step = time.time()
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            res = joint_step(model, x, y, bits, optimizer, criterion, randoms[n_steps], amp_dtype=amp)
            scheduler.step()
            step += 1
            n_steps += 1
            n_samples += len(y)
            loss_sum += res.loss
            ticker(epoch, n_steps)
            if hooks.trace:
                hooks.record({"rank": rank, "epoch": epoch, "step": step,
                              "policies": [[list(p.w_bits), list(p.a_bits)] for p in res.policies],
                              "checksum": state_checksum(model)})
        train_loss = float(loss_sum) / max(1, n_steps)  # the epoch's one host read (waits for the GPU)
        seconds = time.perf_counter() - t0
        _average_float_buffers(model)
        row: dict[str, float] = {"epoch": epoch, "train_loss": train_loss, "epoch_seconds": seconds,
                                 "samples_per_s": n_samples * size / max(seconds, 1e-9), "lr": lr, "steps": step}
        t_eval = time.perf_counter()
        for b in sorted({max(bits), min(bits)}, reverse=True):
            set_uniform(model, b)  # each bit has its own BN statistics, trained jointly: no recalibration
            row[f"val_top1_w{b}a{b}"] = evaluate(model, val_loader, device)["top1"]
        row["eval_seconds"] = time.perf_counter() - t_eval
        history.append(row)
        hooks.record({"rank": rank, "epoch": epoch, "step": step, "epoch_end": True,
                      "checksum": state_checksum(model, buffers=True)})
        state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                 "scheduler": scheduler.state_dict(), "policy_generator": generator.get_state(),
                 "epoch": epoch, "step": step, "rng": _rng_state(), "history": history, "starts": starts,
                 "records": indicator_records(model), "costs": costs, "fixed": fixed, "bits": bits}
        _report({**row, "first_step_time": first_step}, state, rank)
