"""Typed study configuration: nested dataclasses loaded from one YAML file plus ``key=value``
overrides, validated once, before any work starts. Unknown keys and bad values are one UserError.

The YAML mirrors the dataclasses: top-level sections ``study, model, data, resources, pretrain,
indicators, search, mixquant, baselines, select, finetune, tracking``.
"""
from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from .errors import UserError

VALID_BITS = range(2, 9)
# Data sets a study starts from pretrained weights on: pretraining them here would be a toy.
PRETRAINED_DATA = ("cifar10", "imagenet")


@dataclass
class StudyCfg:
    name: str = "default"
    dir: str = "studies/default"     # every output, checkpoint, Ray temp dir and the sqlite MLflow store
    seed: int = 0
    lock_stale_s: float = 120.0          # a lock whose heartbeat is older is taken over (another host's run)


@dataclass
class ModelCfg:
    name: str = "small_cnn"
    # FP weights: a torchvision weights name ("ResNet50_Weights.IMAGENET1K_V1", read from the local torch
    # hub cache, never downloaded) or a state-dict file. None -> a pretrain stage (refused for
    # cifar10/imagenet unless the config sets pretrain.epochs).
    weights: str | None = None
    fixed_layers: list[str] | None = None   # none -> first conv + last linear


@dataclass
class DataCfg:
    name: str = "mnist5k"                     # mnist5k | digits | cifar10 | imagenet
    root: str | None = None                # local directory for cifar10 / imagenet
    val_fraction: float = 0.2                 # bundled datasets only: their evaluation split
    holdout_fraction: float = 0.1             # of the train split, held out to pick finetune LRs / early-stop
    image_size: int = 224                     # imagenet only
    batch_size: int = 64                      # per worker
    eval_batch_size: int = 256
    loader_workers: int = 0
    indicator_fraction: float = 1.0           # LIMPQ: half of ImageNet suffices for indicators


@dataclass
class ResourcesCfg:
    address: str | None = None             # Ray address; none -> start a local Ray
    num_cpus: int | None = None            # local Ray only; none -> all cores
    num_workers: int = 1                      # Ray Train workers (DDP ranks) per training run
    cpus_per_worker: int = 1
    use_gpu: bool = False
    amp: bool = False                         # bf16 autocast on GPU
    storage_path: str | None = None        # Ray Train/Tune storage; none -> <study dir>/ray; may be s3://
    max_failures: int = 2                     # worker losses a training run survives


@dataclass
class OptimCfg:
    epochs: int = 3
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 2.5e-5
    warmup_epochs: float = 0.0
    label_smoothing: float = 0.1
    # LR multiplier for the LSQ step sizes (they get no weight decay; quantized stages only, not pretrain).
    # LIMPQ trains them at the weights' LR (1.0); a small, briefly pretrained model's 6..8-bit weight steps (~1e-3)
    # are pushed below zero by that and clamp dead, so the embedded default uses 0.1.
    step_lr_scale: float = 1.0


@dataclass
class IndicatorsCfg(OptimCfg):
    bits: list[int] = field(default_factory=lambda: [6, 5, 4, 3, 2])
    import_path: str | None = None         # published indicators (.json/.parquet) -> no training
    macs_column: str = "macs"                 # for JSON imports carrying another MACs column


@dataclass
class SearchCfg:
    alpha: list[float] = field(default_factory=lambda: [2.0])
    bitops: list[str] = field(default_factory=list)              # "w4a4", "5.6e10", "w2a2..w6a6:9"
    compression_ratio: list[str] = field(default_factory=list)   # "12.2", "4..16:7"
    bits: list[list[int]] = field(default_factory=list)          # candidate lists; none -> indicator bits
    batch_size: int | None = None                             # points per Ray task; none -> auto
    latency: list[str] = field(default_factory=list)             # "1.5", "1..3:5", "none"; needs latency_table
    latency_table: str | None = None                          # CSV layer,w_bits,a_bits,cost
    bounds: str | None = None                                 # JSON {layer: {w_min, w_max, a_min, a_max}}
    max_points: int = 1_000_000                                  # refuse larger grids (they would not fit memory)


@dataclass
class MixQuantCfg:
    enabled: bool = True
    qem: list[float] = field(default_factory=lambda: [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0])
    act_bits: int = 8


@dataclass
class BaselinesCfg:
    uniform: list[list[int]] = field(default_factory=lambda: [[2, 2], [3, 3], [4, 4], [5, 5], [6, 6]])
    random_per_budget: int = 1                # random policies matched to each LIMPQ budget
    max_random_budgets: int = 8


@dataclass
class SelectCfg:
    max_policies: int = 4                     # LIMPQ policies to finetune (see orchestrator/select.py)
    alpha: float | None = None             # which alpha's LIMPQ policies; none -> the first of search.alpha
    include_uniform: bool = True              # finetune the uniform baselines too (same recipe)
    include_random: bool = False


@dataclass
class FinetuneCfg(OptimCfg):
    epochs: int = 2
    lr: float = 0.01
    lr_grid: list[float] = field(default_factory=list)   # optional extra LRs, one trial per (policy, lr)
    bn_recalib_batches: int = 20
    asha: bool = False
    max_concurrent_trials: int | None = None
    from_indicator_model: bool = False        # start from the jointly trained weights instead of FP
    keep_checkpoints: int = 1                 # epoch checkpoints kept per trial (the last resumes it)


@dataclass
class TrackingCfg:
    uri: str | None = None                 # none -> $MLFLOW_TRACKING_URI or sqlite in the study dir
    experiment: str = "mpq-sweep"
    on_unreachable: Literal["fail", "continue"] = "fail"


@dataclass
class Config:
    study: StudyCfg = field(default_factory=StudyCfg)
    model: ModelCfg = field(default_factory=ModelCfg)
    data: DataCfg = field(default_factory=DataCfg)
    resources: ResourcesCfg = field(default_factory=ResourcesCfg)
    pretrain: OptimCfg = field(default_factory=lambda: OptimCfg(epochs=3, lr=0.1, weight_decay=5e-4,
                                                                label_smoothing=0.0))
    indicators: IndicatorsCfg = field(default_factory=IndicatorsCfg)
    search: SearchCfg = field(default_factory=SearchCfg)
    mixquant: MixQuantCfg = field(default_factory=MixQuantCfg)
    baselines: BaselinesCfg = field(default_factory=BaselinesCfg)
    select: SelectCfg = field(default_factory=SelectCfg)
    finetune: FinetuneCfg = field(default_factory=FinetuneCfg)
    tracking: TrackingCfg = field(default_factory=TrackingCfg)

    @property
    def study_dir(self) -> Path:
        return Path(self.study.dir).expanduser().resolve()

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def validate(self) -> Config:
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise UserError(f"config: {msg}")

        from workloads.models import REGISTRY

        need(self.study.lock_stale_s > 3 * 10.0, "study.lock_stale_s must be > 30 (three lock heartbeats)")
        need(self.model.name in REGISTRY,
             f"model.name {self.model.name!r} is unknown; known: {', '.join(sorted(REGISTRY))}")
        need(self.data.name in ("mnist5k", "digits", "cifar10", "imagenet"),
             f"data.name {self.data.name!r} is unknown; known: mnist5k, digits, cifar10, imagenet")
        need(self.data.name not in ("cifar10", "imagenet") or bool(self.data.root),
             f"data.root is required for {self.data.name} (a local directory; nothing is downloaded)")
        need(0 < self.data.val_fraction < 1, "data.val_fraction must be in (0, 1)")
        need(0 < self.data.holdout_fraction < 0.5, "data.holdout_fraction must be in (0, 0.5)")
        need(0 < self.data.indicator_fraction <= 1, "data.indicator_fraction must be in (0, 1]")
        for k in ("batch_size", "eval_batch_size", "image_size"):
            need(getattr(self.data, k) > 0, f"data.{k} must be positive")
        need(self.data.loader_workers >= 0, "data.loader_workers must be >= 0")
        need(self.resources.num_workers >= 1, f"resources.num_workers must be >= 1, got {self.resources.num_workers}")
        need(self.resources.cpus_per_worker >= 1, "resources.cpus_per_worker must be >= 1")
        need(self.resources.num_cpus is None or self.resources.num_cpus >= 1, "resources.num_cpus must be >= 1")
        need(self.resources.max_failures >= 0, "resources.max_failures must be >= 0")
        need(not self.resources.amp or self.resources.use_gpu, "resources.amp needs resources.use_gpu")
        for name in ("pretrain", "indicators", "finetune"):
            o: OptimCfg = getattr(self, name)
            need(o.epochs >= 0, f"{name}.epochs must be >= 0")
            need(o.lr > 0, f"{name}.lr must be positive")
            need(0 <= o.momentum < 1, f"{name}.momentum must be in [0, 1)")
            need(o.weight_decay >= 0, f"{name}.weight_decay must be >= 0")
            need(0 <= o.warmup_epochs <= max(o.epochs, 0), f"{name}.warmup_epochs must be in [0, epochs]")
            need(0 <= o.label_smoothing < 1, f"{name}.label_smoothing must be in [0, 1)")
            need(o.step_lr_scale > 0, f"{name}.step_lr_scale must be positive")
        check_bits(self.indicators.bits, "indicators.bits")
        need(self.indicators.import_path is not None or self.indicators.epochs >= 1,
             "indicators.epochs must be >= 1 (or give indicators.import_path)")
        for i, bl in enumerate(self.search.bits):
            check_bits(bl, f"search.bits[{i}]")
            need(set(bl) <= set(self.indicators.bits),
                 f"search.bits[{i}] {bl} uses bits that have no indicators (indicators.bits {self.indicators.bits})")
        need(all(a >= 0 for a in self.search.alpha) and self.search.alpha,
             "search.alpha must be a non-empty list of values >= 0")
        need(bool(self.search.bitops or self.search.compression_ratio or self.search.latency),
             "search needs at least one budget: search.bitops, search.compression_ratio and/or search.latency")
        need(self.search.batch_size is None or self.search.batch_size >= 1, "search.batch_size must be >= 1")
        from .budget_specs import check_search_cfg  # budget spec syntax, latency needs a table
        try:
            check_search_cfg(self.search)
        except UserError as e:
            raise UserError(f"config: search: {e}") from None
        need(all(q > 0 for q in self.mixquant.qem), "mixquant.qem values must be positive")
        need(self.mixquant.act_bits in VALID_BITS, "mixquant.act_bits must be in 2..8")
        for wa in self.baselines.uniform:
            need(len(wa) == 2 and all(b in VALID_BITS for b in wa),
                 f"baselines.uniform entry {wa} must be [w_bits, a_bits] in 2..8")
            need(set(wa) <= set(self.indicators.bits) | {8},
                 f"baselines.uniform entry {wa} uses bits outside indicators.bits {self.indicators.bits}")
        need(self.baselines.random_per_budget >= 0, "baselines.random_per_budget must be >= 0")
        need(self.select.max_policies >= 0, "select.max_policies must be >= 0")
        need(self.select.alpha is None or self.select.alpha in self.search.alpha,
             f"select.alpha {self.select.alpha} is not one of search.alpha {self.search.alpha}")
        need(self.finetune.bn_recalib_batches >= 0, "finetune.bn_recalib_batches must be >= 0")
        need(all(lr > 0 for lr in self.finetune.lr_grid), "finetune.lr_grid values must be positive")
        need(self.finetune.max_concurrent_trials is None or self.finetune.max_concurrent_trials >= 1,
             "finetune.max_concurrent_trials must be >= 1")
        need(self.finetune.keep_checkpoints >= 1, "finetune.keep_checkpoints must be >= 1 (the last epoch's "
             "checkpoint is what resumes an interrupted trial)")
        return self


def check_bits(bits: list[int], where: str) -> None:
    if not bits:
        raise UserError(f"config: {where} is empty")
    if len(set(bits)) != len(bits):
        raise UserError(f"config: {where} {bits} has duplicates")
    bad = [b for b in bits if b not in VALID_BITS]
    if bad:
        raise UserError(f"config: {where} {bits} has bit-widths outside 2..8: {bad}")


# ----------------------------------------------------------------------------- loading
def _convert(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _convert(value, args[0], where)
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise UserError(f"config: {where} must be one of {list(typing.get_args(tp))}, got {value!r}")
        return value
    if origin is list:
        (inner,) = typing.get_args(tp)
        if not isinstance(value, list):
            value = [value]  # a scalar where a list is expected is a one-element list
        return [_convert(v, inner, f"{where}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise UserError(f"config: {where} must be a mapping, got {type(value).__name__}")
        return _build(tp, value, where)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise UserError(f"config: {where} must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise UserError(f"config: {where} must be an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML reads 2.5e-5 as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise UserError(f"config: {where} must be a number, got {value!r}")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise UserError(f"config: {where} must be a string, got {value!r}")
    raise TypeError(f"unsupported config type {tp} at {where}")


# Keys that were renamed: the old name gets a pointer to the new one instead of "unknown key".
RENAMED = {"model.checkpoint": "model.weights", "model.torchvision_weights": "model.weights"}


def _build(cls, data: dict, where: str):
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        full = f"{where}.{key}" if where else str(key)
        if full in RENAMED:
            raise UserError(f"config: {full} is now {RENAMED[full]} (a torchvision weights name or a state-dict file)")
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else f"; known keys: {', '.join(names)}"
            raise UserError(f"config: unknown key {where + '.' if where else ''}{key}{hint}")
    base = cls()
    kwargs = {}
    for f in dataclasses.fields(cls):
        path = f"{where}.{f.name}" if where else f.name
        if f.name in data:
            current = getattr(base, f.name)
            if dataclasses.is_dataclass(current) and isinstance(data[f.name], dict):
                merged = {**dataclasses.asdict(current), **data[f.name]}
                kwargs[f.name] = _build(type(current), merged, path)
            else:
                kwargs[f.name] = _convert(data[f.name], hints[f.name], path)
    return dataclasses.replace(base, **kwargs)


def _apply_override(data: dict, item: str) -> None:
    if "=" not in item:
        raise UserError(f"override {item!r} is not key=value (e.g. indicators.epochs=2)")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else None
    except yaml.YAMLError:
        value = raw
    parts = key.strip().split(".")
    node = data
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise UserError(f"override {item!r}: {p} is not a section")
    node[parts[-1]] = value


def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise UserError(f"config file {path} does not exist")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
            where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
            what = " ".join(str(x) for x in (getattr(e, "context", None), getattr(e, "problem", None)) if x) \
                or str(e).splitlines()[0]
            raise UserError(f"config file {where}: not valid YAML: {what}") from None
        if not isinstance(data, dict):
            raise UserError(f"config file {path} must hold a mapping at the top level")
    for item in overrides:
        _apply_override(data, item)
    cfg = _build(Config, data, "").validate()
    pretrain_asked = isinstance(data.get("pretrain"), dict) and "epochs" in data["pretrain"]
    if cfg.data.name in PRETRAINED_DATA and not cfg.model.weights and not pretrain_asked:
        raise UserError(f"config: data {cfg.data.name} needs pretrained weights: set model.weights to a torchvision "
                        "weights name (e.g. ResNet50_Weights.IMAGENET1K_V1, from the local torch hub cache) or a "
                        "state-dict file; to pretrain from scratch instead, set pretrain.epochs explicitly")
    return cfg


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


def config_from_dict(data: dict) -> Config:
    """Rebuild a Config from ``Config.to_dict()`` (how workers receive it: plain data, no pickle)."""
    return _build(Config, data, "").validate()
