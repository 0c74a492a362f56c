"""Finetunes of chosen policies on Ray Tune: one trial per (policy, learning rate).

Each trial is single-bit LSQ QAT of its policy (``quantize_model(..., policy=...)``) from the FP
weights, cosine LR with warm-up, BN statistics recalibrated before every evaluation. Every epoch is
scored on a seeded holdout carved from the train split (``val_top1``: what LR choice and early stopping
look at); the evaluation split is measured once, after the last epoch (``top1``/``top5``/``loss``). A
trial runs in one process, or — with ``resources.num_workers > 1`` — as the light driver of a Ray Train
DDP run (``orchestrator.resources``). ASHA is optional and compares a policy's trials only with that
policy's other LRs. ``Tuner.restore`` resumes an interrupted sweep; trials that ended are not rerun.
"""
from __future__ import annotations

import functools
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from ray.tune import Callback
from torch import nn

from workloads.data import holdout_split, load_data
from workloads.models import build_model, load_weights
from workloads.quant import LsqQuantizer, Policy, quantize_model
from workloads.train import (
    cosine_with_warmup,
    evaluate,
    make_loader,
    quant_sgd,
    recalibrate_bn,
    seed_epoch,
    train_epoch,
)

from .config import Config, config_from_dict
from .console import CONSOLE
from .diskspace import disk_full
from .errors import UserError
from .paths import StudyPaths
from .torn_state import check_train_run, set_aside, tune_experiment_problem
from .train_loops import reporting_input_errors

CKPT = "state.pt"


@dataclass
class TrialOutcome:
    policy_id: str
    lr: float
    metrics: dict            # last reported metrics (top1, top5, loss, epoch, ...)
    history: list[dict]      # one dict per reported epoch
    status: str              # "TERMINATED" | "ERROR" | ...


def load_multibit_state(model: nn.Module, path: str | Path) -> None:
    """Start a single-bit model from the jointly trained multi-bit one (``indicators/model.pt``): the
    shared weights, and per layer the step sizes and BatchNorm of the bits the policy gives it. Keys
    are named alike in both (``w_quant.step.4``, ``bn.4.running_mean``); only the per-quantizer
    ``initialized`` flags differ in length and are mapped through the candidate list."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    multi, bits = state["model"], [int(b) for b in state["bits"]]
    own = model.state_dict()
    take = {k: v for k, v in multi.items() if k in own and own[k].shape == v.shape}
    for name, q in model.named_modules():
        if isinstance(q, LsqQuantizer) and f"{name}.initialized" in multi and len(q.bits) == 1:
            flags = multi[f"{name}.initialized"]
            b = q.bits[0]
            ok = len(flags) == len(bits) and b in bits and bool(flags[bits.index(b)])
            take[f"{name}.initialized"] = torch.tensor([ok])
    missing = [k for k in own if k not in take and not k.endswith(("num_batches_tracked", "initialized"))]
    if missing:
        raise UserError(f"{path} does not fit this policy's model: missing {missing[:3]}")
    model.load_state_dict(take, strict=False)


@functools.lru_cache(maxsize=2)
def _load_data(name: str, root: str | None, val_fraction: float, seed: int, image_size: int,
               holdout_fraction: float):
    """(train, holdout, eval) of the study, loaded once per process: Tune reuses trial actors, so every
    trial after an actor's first skips the parse (MNIST 5k) or directory scan (ImageNet). Read-only."""
    data = load_data(name, root, val_fraction=val_fraction, seed=seed, image_size=image_size)
    train, holdout = holdout_split(data, holdout_fraction, seed)
    return data, train, holdout


def holdout_description(cfg: Config, n: int) -> str:
    return f"{cfg.data.holdout_fraction:g} of train (n={n}, seed {cfg.study.seed})"


def _train_loop(loop_cfg: dict, report: Callable, get_checkpoint: Callable, distributed: bool) -> None:
    """Per-process loop shared by the single-process trial and the DDP workers."""
    cfg: Config = config_from_dict(loop_cfg["study"])
    policy = Policy.from_json(loop_cfg["policy"])
    lr = float(loop_cfg["lr"])
    torch.manual_seed(cfg.study.seed)
    if distributed:
        import ray.train.torch as rtt

        device = rtt.get_device()
    else:
        device = torch.device("cuda" if cfg.resources.use_gpu and torch.cuda.is_available() else "cpu")
        torch.set_num_threads(max(1, cfg.resources.cpus_per_worker))
    data, train_ds, holdout = _load_data(cfg.data.name, cfg.data.root, cfg.data.val_fraction, cfg.study.seed,
                                         cfg.data.image_size, cfg.data.holdout_fraction)
    model = build_model(cfg.model.name, data.num_classes, data.input_shape[0])
    if loop_cfg.get("init_is_quantized"):
        quantize_model(model, fixed_layers=cfg.model.fixed_layers, policy=policy)
        load_multibit_state(model, loop_cfg["init_checkpoint"])
    else:
        load_weights(model, loop_cfg["init_checkpoint"])
        quantize_model(model, fixed_layers=cfg.model.fixed_layers, policy=policy)
    model.to(device)
    train_loader = make_loader(train_ds, cfg.data.batch_size, True, cfg.study.seed, cfg.data.loader_workers)
    holdout_loader = make_loader(holdout, cfg.data.eval_batch_size, False, cfg.study.seed, cfg.data.loader_workers)
    eval_loader = make_loader(data.val, cfg.data.eval_batch_size, False, cfg.study.seed, cfg.data.loader_workers)
    ft = cfg.finetune
    steps = ft.epochs * len(train_loader)
    optimizer = quant_sgd(model, lr, ft.momentum, ft.weight_decay, ft.step_lr_scale)
    scheduler = cosine_with_warmup(optimizer, steps, int(ft.warmup_epochs * len(train_loader)))
    start_epoch = 0
    ckpt = get_checkpoint()
    state = None
    if ckpt is not None:
        with ckpt.as_directory() as d:
            try:
                state = torch.load(Path(d) / CKPT, map_location="cpu", weights_only=True)
            except Exception as e:  # torn by a full disk or a crash: this trial starts over
                print(f"finetune checkpoint {ckpt.path} is unreadable ({type(e).__name__}); "
                      "training this trial from its first epoch", flush=True)
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_epoch = int(state["epoch"]) + 1
    train_model = model
    if distributed:
        import ray.train.torch as rtt

        # Initialise the activation step sizes on every rank before DDP registers parameters.
        model.train()
        with torch.no_grad():
            model(next(iter(train_loader))[0].to(device))
        train_model = rtt.prepare_model(model, move_to_device=False)
    criterion = nn.CrossEntropyLoss(label_smoothing=ft.label_smoothing)
    amp = torch.bfloat16 if (cfg.resources.amp and device.type == "cuda") else None
    if distributed:
        import ray.train

        rank = ray.train.get_context().get_world_rank()
    else:
        rank = 0
    last = max(ft.epochs, 1) - 1
    for epoch in range(start_epoch, last + 1):
        t0, started = time.perf_counter(), time.time()
        train = {"loss": float("nan")}
        # Also reseeds the BN recalibration batches: a trial resumed after a kill ends where an
        # uninterrupted one does.
        seed_epoch(train_loader, cfg.study.seed, epoch)
        if ft.epochs > 0:
            train = train_epoch(train_model, train_loader, optimizer, scheduler, criterion, device, amp_dtype=amp)
        # With zero epochs this pass is the calibration: it initialises LSQ activation steps.
        recalibrate_bn(model, train_loader, ft.bn_recalib_batches or 1, device)
        seconds = time.perf_counter() - t0
        held = evaluate(model, holdout_loader, device)
        metrics = {"epoch": epoch, "epochs_trained": min(epoch + 1, ft.epochs), "train_loss": train["loss"],
                   "val_top1": held["top1"], "val_top5": held["top5"], "val_loss": held["loss"],
                   "holdout_samples": held["samples"], "epoch_seconds": seconds, "epoch_start": started,
                   "training_iteration_epochs": epoch + 1}
        if epoch == last:  # the evaluation split, once, when the trial has its full budget
            metrics.update({k: v for k, v in evaluate(model, eval_loader, device).items() if k != "samples"})
        metrics["eval_seconds"] = time.perf_counter() - t0 - seconds
        with tempfile.TemporaryDirectory() as d:
            checkpoint = None
            if rank == 0:
                torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                            "scheduler": scheduler.state_dict(), "epoch": epoch}, Path(d) / CKPT)
                from ray.tune import Checkpoint

                checkpoint = Checkpoint.from_directory(d)
            report(metrics, checkpoint=checkpoint)


def finetune_trial(config: dict) -> None:
    """Tune function trainable."""
    import ray.tune as tune

    cfg = config_from_dict(config["study"])
    if cfg.resources.num_workers <= 1:
        reporting_input_errors(tune.report, _train_loop, config, tune.report, tune.get_checkpoint, distributed=False)
        return
    import ray.train as rt
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    def worker(loop_cfg):
        reporting_input_errors(rt.report, _train_loop, loop_cfg, rt.report, rt.get_checkpoint, distributed=True)

    trial = tune.get_context().get_trial_name()
    check_train_run(config["storage_path"], f"{trial}-ddp", CKPT, lambda line: print(line, flush=True))
    trainer = TorchTrainer(
        worker,
        train_loop_config=config,
        torch_config=TorchConfig(backend="nccl" if cfg.resources.use_gpu else "gloo"),
        scaling_config=rt.ScalingConfig(num_workers=cfg.resources.num_workers, use_gpu=cfg.resources.use_gpu,
                                        resources_per_worker={"CPU": cfg.resources.cpus_per_worker}),
        run_config=rt.RunConfig(name=f"{trial}-ddp", storage_path=config["storage_path"],
                                failure_config=rt.FailureConfig(max_failures=cfg.resources.max_failures),
                                checkpoint_config=rt.CheckpointConfig(num_to_keep=cfg.finetune.keep_checkpoints),
                                callbacks=[TuneReportCallback()]),
    )
    trainer.fit()


class TrialProgress(Callback):
    """The finetune sweep's progress bar (epochs done over all trials; a trial that ended counts in
    full). Holds plain counters only: Tune pickles its callbacks with the experiment."""

    def __init__(self, trials: int, epochs: int):
        self.trials, self.epochs = trials, max(1, epochs)
        self.done: dict[str, int] = {}
        self.ended: set[str] = set()

    def _show(self) -> None:
        n = sum(self.epochs if t in self.ended else min(e, self.epochs) for t, e in self.done.items())
        n += self.epochs * len(self.ended - set(self.done))
        bar = CONSOLE.bars.get("finetune") or CONSOLE.bar("finetune", "finetune", self.trials * self.epochs, "epochs")
        bar.update_to(n, postfix=f"{len(self.ended)}/{self.trials} trials ended")

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self.done[trial.trial_id] = int(result.get("epochs_trained") or result.get("epoch", 0) + 1)
        self._show()

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.ended.add(trial.trial_id)
        self._show()

    on_trial_error = on_trial_complete


def run_finetunes(cfg: Config, paths: StudyPaths, policies: list[Policy], init_checkpoint: Path,
                  name: str = "finetune") -> list[TrialOutcome]:
    """Run (or resume) the Tune sweep over ``policies`` x learning rates; return one outcome per trial."""
    import ray.tune as tune

    if not policies:
        return []
    ft = cfg.finetune
    lrs = [ft.lr] + [lr for lr in ft.lr_grid if lr != ft.lr]
    storage = paths.ray_storage(cfg.resources.storage_path)
    by_id = {p.policy_id: p.to_json() for p in policies}
    param_space = {
        "policy_id": tune.grid_search(sorted(by_id)),
        "lr": tune.grid_search(lrs),
        "policies": by_id,
        "study": cfg.to_dict(),
        "init_checkpoint": str(init_checkpoint),
        "init_is_quantized": bool(ft.from_indicator_model),
        "storage_path": storage,
    }

    def trainable(config):
        finetune_trial({**config, "policy": config["policies"][config["policy_id"]]})

    from .policy_asha import PolicyASHA
    from .ray_session import alive_nodes
    from .resources import finetune_plan

    plan = finetune_plan(alive_nodes(), cfg.resources, ft.max_concurrent_trials)
    trainable = tune.with_resources(trainable, plan.trial_resources)
    scheduler = PolicyASHA(max_t=max(1, ft.epochs)) if ft.asha else None
    if "://" not in storage:
        # Tune warns when trials checkpoint faster than every 5 s; on local disk a snapshot takes ms.
        os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    exp_path = os.path.join(storage, name) if "://" not in storage else f"{storage.rstrip('/')}/{name}"
    local = "://" not in storage
    torn = local and os.path.isdir(exp_path) and tune_experiment_problem(exp_path)
    if torn:
        set_aside(exp_path, torn, CONSOLE.echo)  # finished trials are in results.parquet already
    tuner = None
    if tune.Tuner.can_restore(exp_path):
        # The stored param_space, not this run's: Tune refuses any difference, and a resumed study may
        # differ in keys its trials never read (tracking, resources.num_cpus, study.lock_stale_s ...).
        try:
            tuner = tune.Tuner.restore(exp_path, trainable, resume_errored=True)
        except Exception as e:
            if not local:
                raise
            set_aside(exp_path, f"Tune cannot restore it: {type(e).__name__}", CONSOLE.echo)
    if tuner is None:
        tuner = tune.Tuner(
            trainable,
            param_space=param_space,
            tune_config=tune.TuneConfig(scheduler=scheduler, max_concurrent_trials=plan.max_concurrent,
                                        # A new process per trial (imports, data) costs more than a
                                        # small model's epochs; trials reset all their state anyway.
                                        reuse_actors=True),
            run_config=tune.RunConfig(name=name, storage_path=storage, verbose=0,
                                      callbacks=[TrialProgress(len(by_id) * len(lrs), ft.epochs)],
                                      failure_config=tune.FailureConfig(max_failures=cfg.resources.max_failures),
                                      checkpoint_config=tune.CheckpointConfig(num_to_keep=ft.keep_checkpoints)),
        )
    results = tuner.fit()
    outcomes = []
    for r in results:
        if r.config is None:  # a trial that never started (the sweep was stopped first)
            continue
        if r.error is not None and disk_full(r.error) is not None:
            raise r.error  # the disk filled up under the trial: the same for every other trial
        if (r.metrics or {}).get("input_error"):
            raise UserError(f"finetune: {r.metrics['input_error']}")
        df = r.metrics_dataframe
        history = [] if df is None else [
            {k: float(row[k]) for k in ("epoch", "val_top1", "val_top5", "val_loss", "top1", "top5", "loss",
                                     "train_loss", "epoch_seconds", "eval_seconds", "epoch_start")
             if k in row and row[k] == row[k]}
            for _, row in df.iterrows()]
        outcomes.append(TrialOutcome(policy_id=r.config["policy_id"], lr=float(r.config["lr"]),
                                     metrics=dict(r.metrics or {}), history=history,
                                     status="ERROR" if r.error else "TERMINATED"))
    return outcomes
