"""Disk space: a full disk wherever it surfaces (our writes, Ray's checkpoints and state files, MLflow's
sqlite), a watch on free space, and a study's estimated need.

An ``OSError`` with ENOSPC/EDQUOT reaches the driver wrapped many ways (a Ray task error, a Tune trial's
error, Train's worker-group error, SQLAlchemy's ``OperationalError: database or disk is full``), so it is
recognised by walking the exception chain and, for errors that crossed a process boundary as text, by the
C library's message. The CLI turns it into one line naming the directory and its free space, exit 1.
"""
from __future__ import annotations

import errno
import os
import shutil
import threading
from pathlib import Path

FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
# What the messages say once only the text is left (strerror of ENOSPC/EDQUOT, sqlite's SQLITE_FULL).
FULL_TEXTS = ("No space left on device", "Disk quota exceeded", "database or disk is full")


def _chain(exc: BaseException):
    seen: set[int] = set()
    todo = [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        todo += [e.__cause__, e.__context__]
        for attr in ("cause", "orig", "error", "controller_failure"):  # Ray task, SQLAlchemy, Tune, Train
            v = getattr(e, attr, None)
            if isinstance(v, BaseException):
                todo.append(v)
        for v in getattr(e, "exceptions", None) or ():  # ExceptionGroup
            if isinstance(v, BaseException):
                todo.append(v)
        errs = getattr(e, "worker_failures", None)  # Train V2's WorkerGroupError: {rank: exception}
        if isinstance(errs, dict):
            todo += [v for v in errs.values() if isinstance(v, BaseException)]


def disk_full(exc: BaseException) -> OSError | str | None:
    """The full-disk error inside ``exc`` (the OSError itself when it survived, else the message that
    says so), or None."""
    text = None
    for e in _chain(exc):
        if isinstance(e, OSError) and e.errno in FULL_ERRNOS:
            return e
        if text is None and any(t in str(e) for t in FULL_TEXTS):
            text = str(e)
    return text


def _existing(path: str | os.PathLike) -> Path:
    """``path`` or its nearest existing parent (a study directory may not exist yet)."""
    p = Path(path)
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def free_space(path: str | os.PathLike) -> str:
    """Free space of the filesystem holding ``path`` (its nearest existing parent), human-readable."""
    try:
        return f"{_human(shutil.disk_usage(_existing(path)).free)} free"
    except OSError:
        return "free space unknown"


def message(found: OSError | str, fallback_dir: str | os.PathLike | None) -> str:
    """One line: which directory is full, how much is left, and what to do."""
    where = Path(fallback_dir).resolve() if fallback_dir else None
    if isinstance(found, OSError) and found.filename:
        f = Path(os.fsdecode(found.filename)).resolve()
        if where is None or where not in f.parents:  # a file outside the study (a temp dir): name its dir
            where = f.parent
    where = where or Path.cwd()
    return (f"no space left in {where} ({free_space(where)}); free some space there (or set study.dir "
            "to a larger disk), then run the same command to resume")


class DiskFull(Exception):
    """The disk under the study filled up; the CLI prints the message and exits 1."""

    exit_code = 1


def as_disk_full(exc: BaseException, fallback_dir: str | os.PathLike | None) -> DiskFull | None:
    if isinstance(exc, DiskFull):
        return exc
    found = disk_full(exc)
    return DiskFull(message(found, fallback_dir)) if found is not None else None


RESERVE_BYTES = 1 << 20   # below this much free space the disk counts as full


class DiskWatch:
    """Polls the free space of a run's directories from a thread. Ray's processes keep their logs and
    state on the same disk, and when it fills they can hang rather than fail; so when one of ``dirs``
    falls under ``RESERVE_BYTES`` free, the main thread is stopped the way Ctrl-C stops it (SIGUSR2 to
    this process; ``interrupts`` raises it as an interrupt) and ``tripped`` names the directory."""

    def __init__(self, dirs, poll_s: float = 0.5, reserve: int = RESERVE_BYTES):
        self.dirs = list(dict.fromkeys(Path(d) for d in dirs if d))
        self.poll_s, self.reserve = poll_s, reserve
        self.tripped: Path | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="disk-watch", daemon=True)

    def __enter__(self) -> DiskWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _watch(self) -> None:
        while not self._stop.wait(self.poll_s):
            for d in self.dirs:
                try:
                    free = shutil.disk_usage(d).free
                except OSError:
                    continue  # not there (yet), or gone
                if free < self.reserve:
                    self.tripped = d
                    from .interrupts import stop_main

                    stop_main()
                    return

    def error(self) -> DiskFull:
        return DiskFull(message(OSError(errno.ENOSPC, "No space left on device"), self.tripped))


# Ray's session logs, MLflow's store, reports and tables of a study: small next to checkpoints.
FIXED_NEED_BYTES = 64 << 20


def estimate_need(cfg) -> tuple[int, str]:
    """Bytes a study may write at its peak, and how that adds up. A checkpoint holds the model and one
    optimizer state of the same size (SGD momentum); a run keeps ``num_to_keep`` and writes one more
    before it drops the oldest. Finetune trials count at most what the selection can pick."""
    import torch

    from workloads.models import build_model

    from .training import TRAIN_CHECKPOINTS_KEPT, data_meta

    classes, shape = data_meta(cfg)
    with torch.device("meta"):  # no memory, no time: the parameter count is all we need
        model = build_model(cfg.model.name, classes, shape[0])
    ckpt = 2 * sum(p.numel() * p.element_size() for p in model.parameters())
    sel, ft = cfg.select, cfg.finetune
    policies = sel.max_policies + (len(cfg.baselines.uniform) if sel.include_uniform else 0) + \
        (cfg.baselines.random_per_budget * cfg.baselines.max_random_budgets if sel.include_random else 0)
    trials = policies * len({ft.lr, *ft.lr_grid})
    train = 2 * (TRAIN_CHECKPOINTS_KEPT + 1) * ckpt + 2 * ckpt // 2  # pretrain and indicators + model.pt each
    tune = trials * (ft.keep_checkpoints + 1) * ckpt
    total = FIXED_NEED_BYTES + train + tune
    how = (f"{trials} finetune trial(s) x {ft.keep_checkpoints + 1} checkpoint(s) x {_human(ckpt)}, "
           f"pretrain/indicators {_human(train)}, logs and tables {_human(FIXED_NEED_BYTES)}")
    return total, how


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return ""


def short_of_space(cfg, dirs) -> str | None:
    """One line when a directory the study writes to has less free space than it may need, else None."""
    need, how = estimate_need(cfg)
    for d in dict.fromkeys(Path(x) for x in dirs if x):
        try:
            free = shutil.disk_usage(_existing(d)).free
        except OSError:
            continue
        if free < need:
            return (f"[disk] {d} has {_human(free)} free; this study may need about {_human(need)} ({how}); "
                    "finetune.keep_checkpoints bounds the checkpoints kept")
    return None
