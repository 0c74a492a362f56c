"""Connecting to Ray: a local single-node Ray for laptops/CI, or an existing cluster by address.

Ray 2.60 keeps token authentication on by default; we never turn it off. A local Ray binds to
127.0.0.1, its dashboard included. The dashboard is on by default (``MPQ_RAY_DASHBOARD=0`` turns it
off): Ray Train V2's placement-group cleaner watches the training controller through the State API it
serves, and without it logs a warning every second of every training run and cannot clean up after a
crashed controller. It costs about 2 s at start-up.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Iterator

import ray

from .errors import UserError
from .paths import StudyPaths


def init_ray(address: str | None, num_cpus: int | None, paths: StudyPaths | None = None,
             num_gpus: int | None = None) -> bool:
    """Start or join Ray unless already initialised. Returns True if this call started it."""
    if ray.is_initialized():
        return False
    # Workers import our packages from the driver's environment; keep their logs quiet.
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    try:
        if address:
            ray.init(address=address, log_to_driver=True)
        elif os.environ.get("RAY_ADDRESS"):
            # Inside a Ray job (or RAY_ADDRESS set by hand): join that cluster. Local-only options such
            # as _temp_dir or num_cpus would make ray.init fail to connect.
            ray.init(log_to_driver=True)
        else:
            # Train's controller polls workers every 2 s by default; on a laptop that is most of a short
            # run's idle time and delays checkpoint registration. Clusters keep Ray's default.
            os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
            kwargs = dict(num_cpus=num_cpus, num_gpus=num_gpus, dashboard_host="127.0.0.1", log_to_driver=True,
                          include_dashboard=os.environ.get("MPQ_RAY_DASHBOARD", "1") != "0")
            if paths is not None:
                kwargs["_temp_dir"] = str(paths.ray_temp_dir())
            ray.init(**kwargs)
    except (ConnectionError, TimeoutError, RuntimeError) as e:
        raise UserError(f"cannot reach Ray at {address or 'local'}: {str(e).splitlines()[0]}") from None
    return True


@contextmanager
def ray_session(address: str | None, num_cpus: int | None, paths: StudyPaths | None = None) -> Iterator[None]:
    started = init_ray(address, num_cpus, paths)
    try:
        yield
    finally:
        if started:
            ray.shutdown()


def alive_nodes() -> list[dict[str, float]]:
    """Total resources of every alive node of the connected Ray cluster."""
    return [dict(n.get("Resources") or {}) for n in ray.nodes() if n.get("Alive")]


def require_resources(resources) -> None:
    """Fail fast, with one clear line, when the cluster can never satisfy a training run."""
    from .resources import resource_shortfall

    why = resource_shortfall(alive_nodes(), resources)
    if why:
        raise UserError(f"the Ray cluster cannot run this config: {why}")
