"""State a full disk or a crash can leave torn, found before it is resumed: set aside and redone.

Our own files are written whole (temp file + rename); Ray Train's checkpoint list, Tune's experiment
state and the checkpoints they point to are not. A resumed run that trips over one of them fails deep
inside Ray, again on every rerun, so each is checked here first; an unreadable one is renamed
``NAME.unreadable-TIME`` (kept for a post-mortem, never read again) with one line saying so, and that
piece of work is done again. Local storage only: a remote store (s3://) writes objects whole.
"""
from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path

TRAIN_SNAPSHOT = "checkpoint_manager_snapshot.json"   # Ray Train V2's list of a run's checkpoints


def set_aside(path: str | os.PathLike, why: str, echo: Callable[[str], None]) -> Path:
    p = Path(path)
    dest = p.with_name(f"{p.name}.unreadable-{time.strftime('%Y%m%d-%H%M%S')}")
    os.replace(p, dest)
    echo(f"[resume] {p} is unreadable ({why}); set aside as {dest.name}, doing that work again")
    return dest


def _loads(path: Path) -> str | None:
    """Why the torch checkpoint at ``path`` cannot be read, or None when it can."""
    import torch

    try:
        torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        return f"{path.parent.name} has no {path.name}"
    except Exception as e:  # torch raises several types for a truncated file
        return f"{path.parent.name}/{path.name} is truncated ({type(e).__name__})"
    return None


def train_run_problem(run_dir: str | os.PathLike, ckpt_file: str) -> str | None:
    """Why Ray Train cannot resume the run kept in ``run_dir``, or None (also when there is none)."""
    d = Path(run_dir)
    snap = d / TRAIN_SNAPSHOT
    if not snap.exists():
        return None
    try:
        state = json.loads(snap.read_text())
        latest = (state.get("latest_checkpoint_result") or {}).get("checkpoint_dir_name")
    except (OSError, ValueError, AttributeError) as e:
        return f"its checkpoint list {TRAIN_SNAPSHOT} is torn ({type(e).__name__})"
    return _loads(d / latest / ckpt_file) if latest else None


def check_train_run(storage: str, name: str, ckpt_file: str, echo: Callable[[str], None]) -> None:
    if "://" in storage:
        return
    why = train_run_problem(Path(storage) / name, ckpt_file)
    if why:
        set_aside(Path(storage) / name, why, echo)


def tune_experiment_problem(exp_dir: str | os.PathLike) -> str | None:
    """Why Tune cannot restore the experiment in ``exp_dir`` (a torn state file), or None."""
    d = Path(exp_dir)
    for f in sorted(d.glob("experiment_state-*.json")) + sorted(d.glob("basic-variant-state-*.json")):
        try:
            json.loads(f.read_text())
        except (OSError, ValueError) as e:
            return f"{f.name} is torn ({type(e).__name__})"
    tuner = d / "tuner.pkl"
    if tuner.exists() and tuner.stat().st_size == 0:
        return "tuner.pkl is empty"
    return None
