"""PTQ evaluation of searched policies: results-table rows (stage ``ptq``) without any training.

A policy's PTQ model is the FP model with
* every weight quantized asymmetrically per tensor (MixQuant's quantizer) at the policy's per-layer
  ``w_bits``, the fixed layers (first conv / last fc, or ``model.fixed_layers``) at 8 bits;
* every Conv2d/Linear input fake-quantized asymmetrically at the policy's per-layer ``a_bits`` (fixed
  layers at 8), its range the min/max seen on ``calib_batches`` training batches (the same batches,
  drawn with the study seed, for every policy, so rows are reproducible and comparable).
BatchNorm stays as trained (no recalibration: this is plain PTQ, the finetune stage is the QAT one).
Top-1 / top-5 / loss are measured on the study's validation split (``workloads.train.evaluate``).

Work split: the policies are cut into batches, one Ray task per batch (each task loads the data and
the FP weights once, then evaluates its policies one after another); ``use_ray=False`` runs the same
code in this process. Workers receive the config as ``cfg.to_dict()`` (plain data, no pickled objects)
and policies as JSON-able dicts.

``bitops`` / ``size_bits`` of a row are computed from the ``costs`` argument (``ModelCosts``, the
searchers' cost convention) when it is given, else left None for the caller to fill from the policy's
search row. ``searcher`` comes from the optional ``searchers`` mapping (policy id → searcher name).
"""
from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

from workloads.errors import InputError
from workloads.quant.policy import Policy

from .config import Config, config_from_dict
from .console import CONSOLE
from .errors import UserError
from .search_rows import FIXED_BITS, ModelCosts

STAGE = "ptq"
DEFAULT_CALIB_BATCHES = 4


def _searchable_and_fixed(model: nn.Module, fixed_cfg: Sequence[str] | None) -> tuple[list[str], list[str]]:
    from workloads.quant.swap import default_fixed_layers

    names = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    fixed = list(default_fixed_layers(model) if fixed_cfg is None else fixed_cfg)
    unknown = [f for f in fixed if f not in names]
    if unknown:
        raise InputError(f"fixed layer(s) {unknown} are not Conv2d/Linear layers of the model")
    return [n for n in names if n not in fixed], fixed


def _evaluate_batch(cfg_dict: dict, fp_checkpoint: str, policies: list[dict], calib_batches: int) -> list[dict]:
    """Evaluate ``policies`` (``Policy.to_json()`` dicts) in this process: one dict per policy with
    policy_id, top1, top5, loss, seconds. Runs inside a Ray task or directly."""
    from workloads.data import load_data
    from workloads.models import build_model, load_weights
    from workloads.quant.ptq import ptq_model
    from workloads.train import evaluate, make_loader

    cfg = config_from_dict(cfg_dict)
    torch.manual_seed(cfg.study.seed)
    use_gpu = cfg.resources.use_gpu and torch.cuda.is_available()
    device = torch.device("cuda" if use_gpu else "cpu")
    if not use_gpu:
        torch.set_num_threads(max(1, cfg.resources.cpus_per_worker))
    data = load_data(cfg.data.name, cfg.data.root, val_fraction=cfg.data.val_fraction, seed=cfg.study.seed,
                     image_size=cfg.data.image_size)
    model = build_model(cfg.model.name, data.num_classes, data.input_shape[0])
    load_weights(model, fp_checkpoint)
    model.to(device).eval()
    searchable, _ = _searchable_and_fixed(model, cfg.model.fixed_layers)

    # The calibration inputs, drawn once (seeded) and shared by every policy of this batch.
    calib_loader = make_loader(data.train, cfg.data.batch_size, True, cfg.study.seed, cfg.data.loader_workers,
                               drop_last=False)
    calib = []
    for x, _ in calib_loader:
        calib.append(x)
        if len(calib) >= calib_batches:
            break
    val_loader = make_loader(data.val, cfg.data.eval_batch_size, False, cfg.study.seed, cfg.data.loader_workers)

    out = []
    for pj in policies:
        t0 = time.perf_counter()
        policy = Policy.from_json(pj)
        if set(policy.layers) != set(searchable) or len(policy.layers) != len(searchable):
            extra = sorted(set(policy.layers) - set(searchable))
            missing = sorted(set(searchable) - set(policy.layers))
            raise InputError(f"PTQ: policy {policy.policy_id} does not match the model's searchable layers "
                             f"(not searchable: {extra[:3]}, missing: {missing[:3]})")
        w = dict(zip(policy.layers, policy.w_bits))
        a = dict(zip(policy.layers, policy.a_bits))
        qmodel = ptq_model(model, w, a, calib, default_bits=FIXED_BITS)
        m = evaluate(qmodel, val_loader, device)
        del qmodel
        out.append({"policy_id": policy.policy_id, "top1": m["top1"], "top5": m["top5"], "loss": m["loss"],
                    "seconds": time.perf_counter() - t0})
    return out


def _chunks(items: list, n_chunks: int) -> list[list]:
    n_chunks = max(1, min(n_chunks, len(items)))
    size = math.ceil(len(items) / n_chunks)
    return [items[i:i + size] for i in range(0, len(items), size)]


def _run_on_ray(cfg: Config, fp_checkpoint: str, policies: list[dict], calib_batches: int,
                policies_per_task: int | None) -> list[dict]:
    import ray

    res = cfg.resources
    if res.use_gpu and ray.cluster_resources().get("GPU", 0) < 1:
        raise UserError("PTQ: resources.use_gpu is set but the Ray cluster has no GPU")
    if policies_per_task is None:
        # One batch per slot the cluster can run at once: each task loads the data only once.
        cpus = ray.cluster_resources().get("CPU", 1.0)
        slots = max(1, int(cpus // res.cpus_per_worker))
        if res.use_gpu:
            slots = max(1, min(slots, int(ray.cluster_resources()["GPU"])))
        batches = _chunks(policies, slots)
    else:
        if policies_per_task < 1:
            raise UserError(f"PTQ: policies_per_task must be >= 1, got {policies_per_task}")
        batches = [policies[i:i + policies_per_task] for i in range(0, len(policies), policies_per_task)]
    task = ray.remote(_evaluate_batch).options(num_cpus=res.cpus_per_worker, num_gpus=1 if res.use_gpu else 0,
                                                max_retries=res.max_failures, name="ptq_eval")
    cfg_dict = cfg.to_dict()
    refs = [task.remote(cfg_dict, fp_checkpoint, b, calib_batches) for b in batches]
    done: dict = {}
    bar = CONSOLE.bar("ptq", "ptq", len(policies), "policies")
    try:
        pending = list(refs)
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            for ref in ready:
                done[ref] = ray.get(ref)
            bar.update_to(sum(len(rows) for rows in done.values()))
    except ray.exceptions.RayTaskError as e:
        cause = getattr(e, "cause", None)
        if isinstance(cause, InputError):
            raise UserError(str(cause)) from None
        raise
    finally:
        bar.close()
    return [r for ref in refs for r in done[ref]]


def evaluate_ptq(cfg: Config, fp_checkpoint: str | Path, policies: Sequence[Policy], *, use_ray: bool = True,
                 costs: ModelCosts | None = None, searchers: Mapping[str, str] | None = None,
                 calib_batches: int = DEFAULT_CALIB_BATCHES,
                 policies_per_task: int | None = None) -> list[dict]:
    """One results-table row per distinct policy (first-seen order): stage ``ptq``, lr None, epochs 0,
    top1/top5/loss on the validation split, bitops/size_bits from ``costs`` (None without it),
    searcher from ``searchers`` (None when not named), mlflow_run_id None, seconds = that policy's
    calibration + evaluation time in its worker.

    ``use_ray``: one Ray task per batch of policies (``policies_per_task``; default: as many batches
    as the cluster has CPU slots of ``resources.cpus_per_worker``). Ray is started (and stopped) here
    only when it is not already running. ``use_ray=False`` evaluates serially in this process."""
    fp_checkpoint = str(Path(fp_checkpoint).expanduser().resolve())
    if not Path(fp_checkpoint).is_file():
        raise UserError(f"PTQ: FP checkpoint {fp_checkpoint} does not exist")
    if calib_batches < 1:
        raise UserError(f"PTQ: calib_batches must be >= 1, got {calib_batches}")
    distinct: dict[str, Policy] = {}
    for p in policies:
        distinct.setdefault(p.policy_id, p)
    if not distinct:
        return []
    if costs is not None:
        for p in distinct.values():
            if p.layers != costs.layers:
                raise UserError(f"PTQ: policy {p.policy_id}'s layers differ from the cost model's searchable layers")
    payload = [p.to_json() for p in distinct.values()]
    if use_ray:
        from .paths import StudyPaths
        from .ray_session import ray_session

        with ray_session(cfg.resources.address, cfg.resources.num_cpus, StudyPaths(cfg.study_dir)):
            measured = _run_on_ray(cfg, fp_checkpoint, payload, calib_batches, policies_per_task)
    else:
        try:
            measured = _evaluate_batch(cfg.to_dict(), fp_checkpoint, payload, calib_batches)
        except InputError as e:
            raise UserError(str(e)) from None
    by_id = {m["policy_id"]: m for m in measured}
    rows = []
    for pid, p in distinct.items():
        m = by_id[pid]
        rows.append({
            "policy_id": pid,
            "searcher": (searchers or {}).get(pid),
            "stage": STAGE,
            "lr": None,
            "epochs": 0,
            "top1": m["top1"],
            "top5": m["top5"],
            "loss": m["loss"],
            "bitops": float(costs.bitops(p.w_bits, p.a_bits)) if costs is not None else None,
            "size_bits": float(costs.size_bits(p.w_bits)) if costs is not None else None,
            "mlflow_run_id": None,
            "seconds": m["seconds"],
        })
    return rows
