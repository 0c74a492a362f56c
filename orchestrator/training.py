"""The training stages of a study, driver side: FP pretraining and LIMPQ joint indicator training, each
a Ray Train ``TorchTrainer`` run (Train V2) over ``resources.num_workers`` DDP ranks.

- ``run_pretrain(cfg, paths)``: trains the FP model from scratch (only when ``model.weights`` is not
  given) and writes ``paths.fp_checkpoint`` as ``{"model": state_dict}``.
- ``run_indicators(cfg, paths, fp_checkpoint)``: quantizes the FP model, trains it jointly (LIMPQ
  Algorithm 1), writes the indicator table (Parquet + JSON) and the multi-bit state dict; or, with
  ``indicators.import_path``, imports and validates a published table instead.

Each stage is skipped when its output exists, and a Train run's name is unique per study, stage and
recipe: Ray resumes a ``RunConfig(name)`` it finds on the storage path, which is what makes a rerun after
a crash continue from the last epoch checkpoint (and keeps unrelated runs apart). The per-worker loops
live in ``orchestrator.train_loops``. Results carry per-epoch history for the MLflow sync of the study;
nothing here talks to MLflow.

Test-only fault hook: with ``MPQ_TEST_FAULT_STEP=k`` in the driver's environment, one rank
(``MPQ_TEST_FAULT_RANK``, default 1, or 0 with one worker) exits its process after ``k`` optimizer
steps, once per run (a marker file, ``MPQ_TEST_FAULT_MARKER``, remembers that it fired).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from workloads.errors import InputError

from . import interrupts
from .atomic import atomic_path, write_json
from .config import Config
from .console import CONSOLE
from .errors import UserError
from .indicators import FixedLayer, Indicators, LayerIndicators
from .paths import StudyPaths
from .ray_session import ray_session, require_resources
from .torn_state import check_train_run
from .train_loops import CKPT_FILE, indicator_loop, load_state, pretrain_loop

log = logging.getLogger(__name__)

FIXED_BITS = 8
# (classes, input shape) of the datasets whose shape does not depend on the files on disk.
_DATA_META = {"mnist5k": (10, (1, 28, 28)), "digits": (10, (1, 8, 8)), "cifar10": (10, (3, 32, 32))}


# ----------------------------------------------------------------------------- results
@dataclass(kw_only=True)
class StageResult:
    """What a training stage did, for the console and the study's MLflow sync."""

    history: list[dict] = field(default_factory=list)  # one row per epoch, key "epoch"
    skipped: bool = False                  # output existed (or was given); nothing ran
    run_name: str | None = None            # the Ray Train run (its directory under the storage path)
    wall_seconds: float = 0.0              # stage wall time on the driver
    startup_seconds: float | None = None   # trainer.fit() called -> first training step begins (last attempt)
    steps: int = 0                         # optimizer steps over the whole run, all attempts
    attempt_starts: list[int] = field(default_factory=list)  # epoch each attempt started at: [0] or [0, 1]...

    @property
    def metrics(self) -> dict[str, float]:
        """The last epoch's row plus run totals (flat floats, ready for MLflow)."""
        out = {k: float(v) for k, v in (self.history[-1] if self.history else {}).items() if k != "epoch"}
        out.update(wall_seconds=self.wall_seconds, steps=float(self.steps),
                   restarts=float(max(0, len(self.attempt_starts) - 1)))
        if self.startup_seconds is not None:
            out["startup_seconds"] = self.startup_seconds
        return out


@dataclass(kw_only=True)
class PretrainResult(StageResult):
    checkpoint: Path                       # FP weights, {"model": state_dict}

    def __fspath__(self) -> str:           # usable wherever a path to the weights is expected
        return str(self.checkpoint)


@dataclass(kw_only=True)
class IndicatorResult(StageResult):
    indicators: Indicators
    parquet: Path
    json: Path
    model_path: Path | None = None         # multi-bit state dict (None for an imported table)
    imported: bool = False


# ----------------------------------------------------------------------------- helpers
TRAIN_CHECKPOINTS_KEPT = 2   # pretrain and indicator runs: the last epoch's and the one before


def data_meta(cfg: Config) -> tuple[int, tuple[int, int, int]]:
    """Number of classes and input shape (C, H, W) without loading the dataset."""
    if cfg.data.name in _DATA_META:
        return _DATA_META[cfg.data.name]
    shape = (3, cfg.data.image_size, cfg.data.image_size)
    train = Path(cfg.data.root or "") / "train"
    classes = sum(1 for p in train.iterdir() if p.is_dir()) if train.is_dir() else 0
    return classes or 1000, shape


def _file_digest(path: Path) -> str:
    h = hashlib.sha1()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def run_name(cfg: Config, stage: str, extra: str = "") -> str:
    """Ray Train run name, unique per study (name, directory, seed), stage and recipe, so Ray's
    resume-by-name continues exactly this run and nothing else."""
    d = cfg.to_dict()
    key = json.dumps({"study": [d["study"]["name"], str(cfg.study_dir), d["study"]["seed"]], "model": d["model"],
                      "data": d["data"], stage: d[stage], "extra": extra}, sort_keys=True)
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", cfg.study.name).strip("-") or "study"
    return f"{slug}-{stage}-{hashlib.sha1(key.encode()).hexdigest()[:10]}"


def given_weights(cfg: Config) -> Path | None:
    """The state-dict file ``model.weights`` names (resolved in the torch hub cache for a torchvision
    weights name), or None when the study pretrains. One UserError when it cannot be found."""
    from workloads.models import resolve_weights

    if not cfg.model.weights:
        return None
    try:
        return resolve_weights(cfg.model.weights, cfg.model.name)
    except InputError as e:
        raise UserError(str(e)) from None


def check_fp_checkpoint(cfg: Config, path: str | Path) -> dict[str, torch.Tensor]:
    """The FP state dict in ``path``, normalised to the model's keys; one clear UserError if the file
    is missing, corrupt or does not fit the model."""
    from workloads.models import build_model, load_weights

    classes, shape = data_meta(cfg)
    try:
        model = build_model(cfg.model.name, classes, shape[0])
        load_weights(model, path)
    except InputError as e:
        raise UserError(str(e)) from None
    return model.state_dict()


def _fault_hook(paths: StudyPaths, name: str, num_workers: int) -> dict | None:
    step = os.environ.get("MPQ_TEST_FAULT_STEP")
    if not step:
        return None
    rank = int(os.environ.get("MPQ_TEST_FAULT_RANK", "1" if num_workers > 1 else "0"))
    marker = os.environ.get("MPQ_TEST_FAULT_MARKER") or str(paths.root / f".fault-{name}")
    return {"step": int(step), "rank": rank, "marker": marker}


def _input_error_in(exc: BaseException) -> InputError | None:
    """The InputError a worker raised, if that is what failed the run (Ray wraps worker exceptions)."""
    failures = getattr(exc, "worker_failures", None) or {}
    stack: list[BaseException] = list(failures.values()) + [exc]
    seen: set[int] = set()
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, InputError):
            return e
        # Ray wraps a worker's exception: UserExceptionWithTraceback._base_exc, RayTaskError.cause.
        stack += [getattr(e, "_base_exc", None), getattr(e, "cause", None), e.__cause__, e.__context__]
    return None


@dataclass
class _Fit:
    state: dict[str, Any]
    run_name: str
    wall_seconds: float
    startup_seconds: float | None


def _fit(cfg: Config, paths: StudyPaths, stage: str, loop: Callable[[dict], None], loop_config: dict,
         name: str, trace_dir: Path | None = None) -> _Fit:
    """One Ray Train run of ``loop`` over ``resources.num_workers`` ranks; returns its last checkpoint."""
    import ray.train as rt
    from ray.train.torch import TorchConfig, TorchTrainer

    res = cfg.resources
    require_resources(res)
    check_train_run(paths.ray_storage(res.storage_path), name, CKPT_FILE, CONSOLE.echo)
    loop_config = {**loop_config, "study": cfg.to_dict(),
                   "trace_dir": str(trace_dir) if trace_dir else None,
                   "fault": _fault_hook(paths, name, res.num_workers)}
    trainer = TorchTrainer(
        loop,
        train_loop_config=loop_config,
        torch_config=TorchConfig(backend="nccl" if res.use_gpu else "gloo"),
        scaling_config=rt.ScalingConfig(num_workers=res.num_workers, use_gpu=res.use_gpu,
                                        resources_per_worker={"CPU": res.cpus_per_worker}),
        run_config=rt.RunConfig(
            name=name,
            storage_path=paths.ray_storage(res.storage_path),
            failure_config=rt.FailureConfig(max_failures=res.max_failures),
            # The latest checkpoint is all a resume needs; one more guards against a torn upload.
            checkpoint_config=rt.CheckpointConfig(num_to_keep=TRAIN_CHECKPOINTS_KEPT),
        ),
    )
    # Train's fit() installs a SIGINT handler of its own (abort, then exit 0) and never removes it; ours
    # stops the whole study with one line and the right exit code (orchestrator.interrupts).
    if hasattr(trainer, "_register_sigint_handler"):
        trainer._register_sigint_handler = lambda controller: None
    t0 = time.time()
    try:
        result = trainer.fit()
    except rt.TrainingFailedError as e:
        bad = _input_error_in(e)
        if bad is not None:
            raise UserError(f"{stage}: {bad}") from None
        raise
    finally:
        interrupts.reinstall()
    wall = time.time() - t0
    if (result.metrics or {}).get("input_error"):
        raise UserError(f"{stage}: {result.metrics['input_error']}")
    if result.checkpoint is None:
        raise RuntimeError(f"{stage}: Ray Train run {name} finished without a checkpoint")
    try:
        with result.checkpoint.as_directory() as d:
            state = load_state(Path(d) / CKPT_FILE, where=result.checkpoint.path)
    except InputError as e:
        raise UserError(f"{stage}: {e}") from None
    first = (result.metrics or {}).get("first_step_time")
    startup = float(first) - t0 if first is not None and first == first and first >= t0 else None
    return _Fit(state, name, wall, startup)


def _history_path(stage_dir: Path) -> Path:
    return stage_dir / "history.json"


def _read_history(stage_dir: Path) -> list[dict]:
    p = _history_path(stage_dir)
    try:
        return json.loads(p.read_text())["history"] if p.exists() else []
    except (json.JSONDecodeError, KeyError):
        return []


# ----------------------------------------------------------------------------- pretrain
def run_pretrain(cfg: Config, paths: StudyPaths, *, trace_dir: Path | None = None) -> PretrainResult:
    """Train the FP model from scratch and write ``paths.fp_checkpoint`` (``{"model": state_dict}``).

    Nothing runs when ``cfg.model.weights`` is given (the result points at its file) or when
    ``paths.fp_checkpoint`` exists. SGD with ``cfg.pretrain`` (lr, momentum, weight decay, label
    smoothing), cosine with warm-up, DDP over the Ray Train workers. Starts or joins Ray per
    ``cfg.resources`` unless Ray is already initialised. ``trace_dir``: per-rank step trace (tests).
    """
    given = given_weights(cfg)
    if given is not None:
        return PretrainResult(checkpoint=given, skipped=True)
    out = paths.fp_checkpoint
    if out.exists():
        return PretrainResult(checkpoint=out, skipped=True, history=_read_history(paths.pretrain_dir))
    if cfg.pretrain.epochs < 1:
        raise UserError("pretrain.epochs must be >= 1 to pretrain (or give model.weights)")
    name = run_name(cfg, "pretrain")
    with ray_session(cfg.resources.address, cfg.resources.num_cpus, paths):
        fit = _fit(cfg, paths, "pretrain", pretrain_loop, {}, name, trace_dir)
    s = fit.state
    with atomic_path(out) as tmp:
        torch.save({"model": s["model"]}, tmp)
    write_json(_history_path(paths.pretrain_dir), {"run_name": name, "history": s["history"]})
    return PretrainResult(checkpoint=out, history=list(s["history"]), run_name=name, wall_seconds=fit.wall_seconds,
                          startup_seconds=fit.startup_seconds, steps=int(s["step"]),
                          attempt_starts=list(s["starts"]))


# ----------------------------------------------------------------------------- indicators
def run_indicators(cfg: Config, paths: StudyPaths, fp_checkpoint: str | Path | None, *,
                   trace_dir: Path | None = None) -> IndicatorResult:
    """LIMPQ's indicator stage; writes ``paths.indicators_parquet``, ``paths.indicators_json`` and
    (when trained) the multi-bit state dict ``paths.indicator_model``. Skipped when the Parquet exists.

    Trained: ``quantize_model(bits=cfg.indicators.bits, fixed_layers=cfg.model.fixed_layers)`` on the FP
    weights in ``fp_checkpoint``, then ``cfg.indicators.epochs`` of joint training (Algorithm 1: per
    batch every candidate bit uniformly, then one random policy; summed gradients; one SGD step) on
    ``cfg.data.indicator_fraction`` of the train set, label smoothing, cosine LR. The table holds the
    learned step sizes per (layer, weight|act, bit), the layers' MACs and params at the data's input
    shape, and the fixed layers (W8A8).

    Imported: with ``cfg.indicators.import_path`` the file (Parquet or LIMPQ JSON, MACs from
    ``cfg.indicators.macs_column``) is validated against the model's searchable layers and written out;
    ``fp_checkpoint`` is not used. ``trace_dir``: per-rank step trace (tests).
    """
    if paths.indicators_parquet.exists():
        return IndicatorResult(indicators=Indicators.load(paths.indicators_parquet), parquet=paths.indicators_parquet,
                               json=paths.indicators_json, skipped=True, history=_read_history(paths.indicators_dir),
                               model_path=paths.indicator_model if paths.indicator_model.exists() else None)
    if cfg.indicators.import_path:
        return _import_indicators(cfg, paths)
    if fp_checkpoint is None:
        raise UserError("indicators: no FP weights to train from (give model.weights or run pretrain)")
    fp = Path(os.fspath(fp_checkpoint)).expanduser().resolve()
    fp_state = check_fp_checkpoint(cfg, fp)
    bundled = _check_steps(cfg)
    name = run_name(cfg, "indicators", extra=_file_digest(fp))
    with ray_session(cfg.resources.address, cfg.resources.num_cpus, paths):
        import ray

        # Through the object store, not a path: on a cluster the workers cannot read the driver's disk.
        # The bundled data set (a few MB of tensors) goes the same way because the driver has just
        # loaded it: parsing MNIST 5k again costs each worker ~3 s at every (re)start.
        loop_config = {"fp_state": ray.put(fp_state), "data": ray.put(bundled) if bundled is not None else None}
        fit = _fit(cfg, paths, "indicators", indicator_loop, loop_config, name, trace_dir)
    s = fit.state
    ind = indicators_from_state(s, cfg.model.name)
    with atomic_path(paths.indicator_model) as tmp:
        torch.save({"model": s["model"], "bits": list(s["bits"]), "fixed_layers": list(s["fixed"])}, tmp)
    write_json(_history_path(paths.indicators_dir), {"run_name": name, "history": s["history"]})
    ind.to_json(paths.indicators_json)
    ind.to_parquet(paths.indicators_parquet)  # last: its existence marks the stage done
    return IndicatorResult(indicators=ind, parquet=paths.indicators_parquet, json=paths.indicators_json,
                           model_path=paths.indicator_model, history=list(s["history"]), run_name=name,
                           wall_seconds=fit.wall_seconds, startup_seconds=fit.startup_seconds,
                           steps=int(s["step"]), attempt_starts=list(s["starts"]))


def _check_steps(cfg: Config):
    """A shard smaller than one batch would train nothing (the train loader drops the last batch).
    Checked for the bundled datasets, whose DataBundle is returned (None for the others)."""
    from workloads.data import load_data, subset

    if cfg.data.name not in ("mnist5k", "digits"):
        return None  # large datasets: loading them here only to count would cost more than it saves
    data = load_data(cfg.data.name, val_fraction=cfg.data.val_fraction, seed=cfg.study.seed)
    per_rank = len(subset(data.train, cfg.data.indicator_fraction, cfg.study.seed)) // cfg.resources.num_workers
    if per_rank < cfg.data.batch_size:
        raise UserError(f"indicators: {per_rank} samples per worker is less than one batch "
                        f"(data.batch_size {cfg.data.batch_size}); raise data.indicator_fraction or lower the batch")
    return data


def indicators_from_state(state: dict[str, Any], model_name: str) -> Indicators:
    """The indicator table from an indicator-loop checkpoint (records, costs, fixed layers)."""
    costs = {c["name"]: c for c in state["costs"]}
    layers: dict[str, LayerIndicators] = {}
    for r in state["records"]:
        name = r["layer"]
        if name not in layers:
            layers[name] = LayerIndicators(name, int(costs[name]["params"]), int(costs[name]["macs"]), {}, {})
        getattr(layers[name], r["kind"])[int(r["bits"])] = float(r["value"])
    fixed = [FixedLayer(n, int(costs[n]["params"]), int(costs[n]["macs"]), FIXED_BITS, FIXED_BITS)
             for n in state["fixed"]]
    return Indicators(bits=[int(b) for b in state["bits"]], layers=list(layers.values()), fixed=fixed,
                      model=model_name)


def _model_layers(cfg: Config) -> tuple[nn.Module, list[str], list[str]]:
    """The FP model and its searchable and fixed Conv2d/Linear layer names, in registration order."""
    from workloads.models import build_model
    from workloads.quant.swap import default_fixed_layers

    classes, shape = data_meta(cfg)
    try:
        model = build_model(cfg.model.name, classes, shape[0])
    except InputError as e:
        raise UserError(str(e)) from None
    names = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    fixed = list(default_fixed_layers(model) if cfg.model.fixed_layers is None else cfg.model.fixed_layers)
    unknown = [f for f in fixed if f not in names]
    if unknown:
        raise UserError(f"model.fixed_layers {unknown} are not Conv2d/Linear layers of {cfg.model.name}")
    return model, [n for n in names if n not in fixed], fixed


def _import_indicators(cfg: Config, paths: StudyPaths) -> IndicatorResult:
    from workloads.cost import layer_costs

    t0 = time.perf_counter()
    src = Path(cfg.indicators.import_path).expanduser()
    ind = Indicators.load(src, cfg.indicators.macs_column)
    model, searchable, fixed = _model_layers(cfg)
    have = set(ind.names)
    missing = [n for n in searchable if n not in have]
    unknown = [n for n in ind.names if n not in set(searchable)]
    if missing or unknown:
        def show(xs: list[str]) -> str:
            return ", ".join(xs[:5]) + (f" (+{len(xs) - 5} more)" if len(xs) > 5 else "") if xs else "none"
        raise UserError(f"indicator file {src} does not match {cfg.model.name}'s searchable layers: "
                        f"missing {show(missing)}; unknown {show(unknown)}")
    bad_fixed = [f.name for f in ind.fixed if f.name not in fixed]
    if bad_fixed:
        raise UserError(f"indicator file {src} fixes layer(s) {bad_fixed} that are not fixed layers of "
                        f"{cfg.model.name} (fixed: {fixed}; see model.fixed_layers)")
    absent = [b for b in cfg.indicators.bits if b not in ind.bits]
    if absent:
        raise UserError(f"indicator file {src} has no values for bit-width(s) {absent} of indicators.bits "
                        f"{cfg.indicators.bits} (the file has {ind.bits})")
    order = {n: i for i, n in enumerate(searchable)}
    ind.layers.sort(key=lambda l: order[l.name])
    if not ind.fixed and fixed:
        costs = {c.name: c for c in layer_costs(model, data_meta(cfg)[1])}
        ind.fixed = [FixedLayer(n, costs[n].params, costs[n].macs, FIXED_BITS, FIXED_BITS) for n in fixed]
    ind.model = ind.model or cfg.model.name
    ind.to_json(paths.indicators_json)
    ind.to_parquet(paths.indicators_parquet)
    return IndicatorResult(indicators=ind, parquet=paths.indicators_parquet, json=paths.indicators_json,
                           imported=True, wall_seconds=time.perf_counter() - t0)
