"""Checks of the directories and files a command will use, run before anything starts (Ray, MLflow).

Each failure is one ``UserError`` naming the path and what to do; nothing is left behind.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

from .errors import UserError

# Directories under a study whose contents Ray or MLflow own (many small files): only their top is probed.
_OPAQUE = {".ray", "ray", "mlartifacts"}


def _probe(d: Path, what: str) -> None:
    """Create and remove a file in ``d``: the only test that also catches read-only mounts, full
    quotas and immutable directories (``os.access`` says yes to root for all of them)."""
    try:
        fd, tmp = tempfile.mkstemp(prefix=".mpq-probe.", dir=d)
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        raise UserError(f"{what} {d} is not writable ({e.strerror or e}); fix its permissions or choose "
                        "another directory") from None


def writable_dir(path: str | os.PathLike, what: str = "output directory") -> Path:
    """``path`` as a directory this process can write to (created when missing), or one UserError."""
    p = Path(path).expanduser()
    if p.exists() and not p.is_dir():
        raise UserError(f"{what} {p} is a file, not a directory; give a directory path")
    try:
        p.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create {what} {p} ({e.strerror or e}); choose another directory") from None
    _probe(p, what)
    return p


def writable_tree(root: str | os.PathLike, what: str = "study directory", depth: int = 3) -> Path:
    """``writable_dir(root)`` and every existing sub-directory up to ``depth`` levels below it (a resumed
    study writes into those: results/, search/limpq/points/ ...)."""
    top = writable_dir(root, what)
    level = [top]
    for _ in range(depth):
        nxt = []
        for d in level:
            try:
                children = [c for c in d.iterdir() if c.is_dir() and not c.is_symlink()]
            except OSError as e:
                raise UserError(f"{what}: cannot list {d} ({e.strerror or e})") from None
            for c in children:
                _probe(c, what)
                if c.name not in _OPAQUE:
                    nxt.append(c)
        level = nxt
    return top


def readable_file(path: str | os.PathLike, what: str) -> Path:
    p = Path(path).expanduser()
    if not p.is_file():
        raise UserError(f"{what} {p} does not exist" if not p.exists() else f"{what} {p} is not a file")
    try:
        with p.open("rb") as fh:
            fh.read(1)
    except OSError as e:
        raise UserError(f"{what} {p} cannot be read ({e.strerror or e})") from None
    return p


def check_study_inputs(cfg) -> Path | None:
    """Every file and directory a study reads, checked before anything starts: the data directory's
    layout, ``model.weights`` (resolved and loaded into the model), an imported indicator table, the
    bounds and latency files. Returns the weights file (None when the study pretrains)."""
    from workloads.data import check_data
    from workloads.errors import InputError

    from .grid import check_search_files
    from .indicators import Indicators

    try:
        check_data(cfg.data.name, cfg.data.root)
    except UserError:
        raise
    except InputError as e:
        raise UserError(str(e)) from None
    weights = check_weights(cfg)
    if cfg.indicators.import_path:
        Indicators.load(Path(cfg.indicators.import_path).expanduser(), cfg.indicators.macs_column)
    check_search_files(cfg.search)
    return weights


def check_weights(cfg) -> Path | None:
    """``model.weights`` resolved (a torchvision name in the local hub cache, or a file) and loaded into
    the config's model; None when the study pretrains. One UserError when missing, corrupt or misfit."""
    from .training import check_fp_checkpoint, given_weights

    weights = given_weights(cfg)
    if weights is not None:
        check_fp_checkpoint(cfg, weights)
    return weights


def record_weights(root: Path, cfg, weights: Path) -> None:
    """``STUDY/weights.json``: which weights name, file and bytes (sha1) the study used."""
    from .atomic import write_json
    from .training import _file_digest

    write_json(Path(root) / "weights.json", {"weights": cfg.model.weights, "path": str(weights),
                                             "sha1": _file_digest(weights)})


def claim_study(cfg, root: Path, command: str, wait: bool, echo):
    """How every command that writes a study starts: its inputs checked, the study directory (and a local
    ``resources.storage_path``) writable, then the study's lock taken (``wait``: wait for its owner).
    Returns the held lock and the weights file (None when the study pretrains)."""
    from .lock import StudyLock

    weights = check_study_inputs(cfg)
    storage = cfg.resources.storage_path
    if storage and "://" not in storage:  # Ray Train/Tune checkpoints outside the study directory
        writable_dir(storage, "resources.storage_path")
    writable_tree(root, "study directory")
    lock = StudyLock(root, command, cfg.study.lock_stale_s, echo=echo)
    lock.acquire(wait=wait)
    return lock, weights
