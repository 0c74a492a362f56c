"""What a study asks of a Ray cluster, in one place: whether the cluster can ever run its training
(``resource_shortfall``, used by the local pre-flight check and by ``mpqsweep submit``) and how the
finetune sweep is laid out on it (``finetune_plan``).

A finetune trial with one worker trains inside its Tune trial actor, which then holds the worker's
CPUs and GPU. With ``num_workers > 1`` the trial is only the driver of a Ray Train run (Ray's Train V2
+ Tune guide): the run's worker group holds the GPUs and CPUs, the driver takes 1 CPU where the cluster
has one to spare beyond a worker group and otherwise only a little memory, and the number of trials in
flight is what the cluster can feed at once, so no driver waits on a worker group that cannot start.
"""
from __future__ import annotations

from dataclasses import dataclass

from .config import ResourcesCfg

DRIVER_MEMORY = 256 * 2**20  # bytes: a Train driver holds no model or data


def resource_shortfall(nodes: list[dict[str, float]], r: ResourcesCfg) -> str | None:
    """Why a cluster with these alive nodes (their total resources) can never run this study's
    training runs — pretrain, indicators, one finetune trial — or None when it can."""
    cpus = sum(n.get("CPU", 0.0) for n in nodes)
    gpus = sum(n.get("GPU", 0.0) for n in nodes)
    if r.use_gpu:
        if gpus < r.num_workers:
            return (f"resources.use_gpu=true needs {r.num_workers} GPU worker(s) but the cluster has {gpus:g} GPU(s) "
                    f"on {len(nodes)} node(s)")
        if not any(n.get("GPU", 0) >= 1 and n.get("CPU", 0) >= r.cpus_per_worker for n in nodes):
            return f"no node has 1 GPU and {r.cpus_per_worker} CPU(s) for one training worker"
    if cpus < r.num_workers * r.cpus_per_worker:
        return (f"{r.num_workers} training worker(s) x {r.cpus_per_worker} CPU need "
                f"{r.num_workers * r.cpus_per_worker} CPU(s) but the cluster has {cpus:g}")
    if not any(n.get("CPU", 0) >= r.cpus_per_worker for n in nodes):
        return f"no node has resources.cpus_per_worker={r.cpus_per_worker} CPUs"
    return None


@dataclass(frozen=True)
class FinetunePlan:
    trial_resources: dict           # for tune.with_resources: what the trial actor itself holds
    max_concurrent: int             # trials in flight
    distributed: bool               # the trial drives a Ray Train run


def finetune_plan(nodes: list[dict[str, float]], r: ResourcesCfg, max_concurrent: int | None = None) -> FinetunePlan:
    cpus = sum(n.get("CPU", 0.0) for n in nodes)
    gpus = sum(n.get("GPU", 0.0) for n in nodes)
    group_cpus = r.num_workers * r.cpus_per_worker
    if r.num_workers == 1:
        trial = {"cpu": r.cpus_per_worker, "gpu": 1 if r.use_gpu else 0}
        per_trial_cpus = r.cpus_per_worker
    else:
        driver_cpus = 1 if cpus >= group_cpus + 1 else 0
        trial = {"cpu": driver_cpus, "memory": DRIVER_MEMORY}
        per_trial_cpus = group_cpus + driver_cpus
    fits = int(cpus // per_trial_cpus) if per_trial_cpus else 1
    if r.use_gpu:
        fits = min(fits, int(gpus // r.num_workers))
    fits = max(1, fits)
    return FinetunePlan(trial, min(fits, max_concurrent) if max_concurrent else fits, r.num_workers > 1)
