"""Connecting to Ray: a local single-node Ray for laptops/CI, or an existing cluster by address.

Ray 2.60 keeps token authentication on by default; we never turn it off. A local Ray binds to
127.0.0.1, its dashboard included. The dashboard is on by default (``MPQ_RAY_DASHBOARD=0`` turns it
off): Ray Train V2's placement-group cleaner watches the training controller through the State API it
serves, and without it logs a warning every second of every training run and cannot clean up after a
crashed controller. It costs about 2 s at start-up.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import ray

from .atomic import write_json
from .console import CONSOLE
from .diskspace import DiskWatch
from .errors import UserError
from .paths import StudyPaths
from .status import process_start_time

log = logging.getLogger(__name__)


OWNER = "mpq-owner.json"   # in a local Ray's temp dir: which process started it


def _open_files(proc: Path) -> list[str]:
    out = []
    for fd in (proc / "fd").iterdir():
        try:
            out.append(os.readlink(fd))
        except OSError:
            continue
    return out


def ray_processes(temp_dir: Path) -> list[int]:
    """Pids of processes of a local Ray kept in ``temp_dir``: its command line names the directory, or
    it holds a file there open (Ray's agents and workers rename themselves ``ray::...`` and write to
    their session's log files). Linux only (/proc); elsewhere an empty list."""
    root, mine, out = str(temp_dir), os.getpid(), []
    for entry in Path("/proc").glob("[0-9]*") if Path("/proc").is_dir() else []:
        pid = int(entry.name)
        if pid == mine:
            continue
        try:
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            if "ray" not in cmd:
                continue
            if root in cmd or any(f.startswith(root + os.sep) for f in _open_files(entry)):
                out.append(pid)
        except OSError:
            continue  # gone meanwhile, or not ours to read
    return out


def reap_stale(temp_dir: Path) -> int:
    """Kill what an earlier, killed run left of the local Ray it started in ``temp_dir`` (SIGKILL of the
    driver leaves Ray's agents running). A run that is still alive is left alone. Returns the count."""
    f = temp_dir / OWNER
    try:
        owner = json.loads(f.read_text())
    except (OSError, ValueError):
        return 0
    pid = int(owner.get("pid", -1))
    if pid != os.getpid() and process_start_time(pid) is not None and process_start_time(pid) == owner.get("start"):
        return 0
    killed = 0
    for p in ray_processes(temp_dir):
        try:
            os.kill(p, signal.SIGKILL)
            killed += 1
        except OSError:
            pass
    f.unlink(missing_ok=True)
    return killed


_LOCAL: list[Path] = []   # temp dir of the local Ray this process started, while it runs


def stop_local_ray() -> None:
    """Kill the processes of the local Ray this process started (a second Ctrl-C cannot wait for
    ``ray.shutdown``)."""
    for temp in _LOCAL:
        for p in ray_processes(temp):
            try:
                os.kill(p, signal.SIGKILL)
            except OSError:
                pass


def init_ray(address: str | None, num_cpus: int | None, paths: StudyPaths | None = None,
             num_gpus: int | None = None) -> bool:
    """Start or join Ray unless already initialised. Returns True if this call started it."""
    from . import interrupts

    if ray.is_initialized():
        return False
    started = _init_ray(address, num_cpus, paths, num_gpus)
    interrupts.reinstall()
    CONSOLE.attach_ray()
    return started


def _init_ray(address: str | None, num_cpus: int | None, paths: StudyPaths | None, num_gpus: int | None) -> bool:
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
            temp = paths.ray_temp_dir() if paths is not None else None
            if temp is not None:
                kwargs["_temp_dir"] = str(temp)
                n = reap_stale(temp)
                if n:
                    log.warning("stopped %d process(es) left by an earlier, killed run's Ray in %s", n, temp)
            with _one_start_at_a_time():
                _bind_state_api(kwargs)
                ray.init(**kwargs)
            if temp is not None:
                write_json(temp / OWNER, {"pid": os.getpid(), "start": process_start_time(os.getpid())})
                _LOCAL.append(temp)
    except (ConnectionError, TimeoutError, RuntimeError) as e:
        _unbind_state_api()
        raise UserError(f"cannot reach Ray at {address or 'local'}: {str(e).splitlines()[0]}") from None
    return True


@contextmanager
def ray_session(address: str | None, num_cpus: int | None, paths: StudyPaths | None = None,
                storage: str | None = None) -> Iterator[None]:
    """Ray for the body of the ``with``. With ``paths``, the free space of the study directory, of a
    local Ray's temp dir and of a local ``storage`` path is watched: a disk that fills up ends the body
    with ``DiskFull`` instead of leaving Ray to hang on it."""
    started = init_ray(address, num_cpus, paths)
    watched = []
    if paths is not None:
        watched = [paths.root, *_LOCAL, *([storage] if storage and "://" not in storage else [])]
    try:
        with DiskWatch(watched) as watch:
            try:
                yield
            except KeyboardInterrupt:
                if watch.tripped is not None:
                    raise watch.error() from None
                raise
    finally:
        if started:
            CONSOLE.detach_ray()
            ray.shutdown()
            _reap_own()
            if paths is not None and not (address or os.environ.get("RAY_ADDRESS")):
                (paths.ray_temp_dir() / OWNER).unlink(missing_ok=True)
            _LOCAL.clear()
            _unbind_state_api()


_API_ENV = "RAY_API_SERVER_ADDRESS"
_saved_api: list[str | None] = []


@contextmanager
def _one_start_at_a_time() -> Iterator[None]:
    """Local Rays on one machine start one after the other, so that the dashboard port one picks is
    bound before the next looks for a free one (flock is reliable here: the file is on this machine)."""
    import fcntl
    import tempfile

    with open(Path(tempfile.gettempdir()) / "mpqsweep-ray-start.lock", "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _free_port(preferred: int) -> int:
    for port in (*range(preferred, preferred + 10), 0):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return s.getsockname()[1]
    raise UserError("no free TCP port on 127.0.0.1 for Ray's dashboard; free one or set MPQ_RAY_DASHBOARD=0")


def _bind_state_api(kwargs: dict) -> None:
    """Point our local Ray's processes at its own State API. Ray Train's placement-group cleaner (an actor)
    finds the API by scanning the machine for GCS processes; with a second local Ray running (another
    study) it finds two and dies with "Found multiple active Ray instances". The raylet, and so every
    worker, inherits the driver's environment at ``ray.init``, so the dashboard port is chosen here (8265
    or the next free port) and named in ``RAY_API_SERVER_ADDRESS`` before Ray starts."""
    port = _free_port(8265)
    kwargs["dashboard_port"] = port
    _saved_api.append(os.environ.get(_API_ENV))
    os.environ[_API_ENV] = f"http://127.0.0.1:{port}"


def _unbind_state_api() -> None:
    while _saved_api:
        old = _saved_api.pop()
        if old is None:
            os.environ.pop(_API_ENV, None)
        else:
            os.environ[_API_ENV] = old


def _reap_own(grace_s: float = 5.0) -> None:
    """After ``ray.shutdown``: workers and agents of our local Ray exit on their own, a moment later;
    nothing of it may outlive the command, so what is still there after ``grace_s`` is killed."""
    deadline = time.monotonic() + grace_s
    while _LOCAL and time.monotonic() < deadline:
        if not any(ray_processes(t) for t in _LOCAL):
            return
        time.sleep(0.2)
    stop_local_ray()


def alive_nodes() -> list[dict[str, float]]:
    """Total resources of every alive node of the connected Ray cluster."""
    return [dict(n.get("Resources") or {}) for n in ray.nodes() if n.get("Alive")]


def require_resources(resources) -> None:
    """Fail fast, with one clear line, when the cluster can never satisfy a training run."""
    from .resources import resource_shortfall

    why = resource_shortfall(alive_nodes(), resources)
    if why:
        raise UserError(f"the Ray cluster cannot run this config: {why}")
