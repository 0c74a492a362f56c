"""Where a study stands, for `mpqsweep status`. A running study keeps ``STUDY/status.json`` (its pid,
current stage, progress, last error); the reader joins it with the durable outputs, so the answer is
right while the study runs, after it finished, and after it was killed."""
from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

import yaml

from .atomic import write_json
from .errors import UserError

STATUS_FILE = "status.json"
STAGES = ("pretrain", "indicators", "search", "select", "finetune", "ptq", "report")
WRITE_EVERY_S = 1.0


def process_start_time(pid: int) -> str | None:
    """A process's start time (clock ticks since boot): with the pid, it tells a live process from a
    new one that reuses the pid. None when there is no such process (or no /proc)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


class StatusWriter:
    """The running study's side: stage transitions, progress counters and the last error, rewritten
    atomically (progress at most every ``WRITE_EVERY_S`` seconds)."""

    def __init__(self, root: Path):
        self.path = Path(root) / STATUS_FILE
        try:
            old = json.loads(self.path.read_text())
        except (OSError, ValueError):
            old = {}
        pid = os.getpid()
        self.state = {"pid": pid, "host": socket.gethostname(), "pid_start": process_start_time(pid),
                      "started_at": time.time(), "updated_at": time.time(), "state": "running", "stage": None,
                      "stages": {}, "progress": {}, "last_error": old.get("last_error")}
        self._last = 0.0
        self._write()

    def _write(self) -> None:
        self.state["updated_at"] = time.time()
        self._last = time.monotonic()
        try:
            write_json(self.path, self.state)
        except OSError:
            pass  # the status file is a convenience: never let it stop the study

    def stage(self, name: str, state: str, seconds: float | None = None) -> None:
        self.state["stages"][name] = {"state": state, **({"seconds": round(seconds, 3)} if seconds is not None else {})}
        self.state["stage"] = name if state == "running" else None
        self._write()

    def progress(self, key: str, n: int, total: int, unit: str, note: str = "") -> None:
        self.state["progress"][key] = {"done": n, "total": total, "unit": unit, "note": note}
        if time.monotonic() - self._last >= WRITE_EVERY_S or n >= total:
            self._write()

    def finish(self, state: str, error: str | None = None) -> None:
        self.state["state"] = state
        if error:
            self.state["last_error"] = {"message": error, "at": time.time(), "stage": self.state.get("stage")}
        self._write()


# ------------------------------------------------------------------------------ reading
def process_alive(record: dict) -> bool | None:
    """Whether the process a record names (``host``, ``pid``, ``pid_start``) still runs: by pid and start
    time (a reused pid is another process); None when this host cannot tell (the record is another
    host's)."""
    if record.get("host") != socket.gethostname() or "pid" not in record:
        return None
    pid = int(record["pid"])
    start = process_start_time(pid)
    if start is None and not Path("/proc").is_dir():
        try:
            os.kill(pid, 0)  # no /proc: the pid alone
        except OSError:
            return False
        return True
    return start is not None and start == record.get("pid_start")


def _alive(st: dict) -> bool:
    return process_alive(st) is True


def _count_rows(files) -> int:
    import pyarrow.parquet as pq

    n = 0
    for f in files:
        try:
            n += pq.ParquetFile(f).metadata.num_rows
        except Exception:  # a torn part is the grid's business (it is rewritten on resume)
            continue
    return n


def study_status(root: str | os.PathLike) -> dict:
    """Every stage's state (done / running / interrupted / failed / pending / skipped) with its figures."""
    from .paths import StudyPaths
    from .results import read_results

    root = Path(root).expanduser()
    if not (root / "config.yaml").is_file():
        raise UserError(f"{root} is not a study directory (no config.yaml); give the study.dir of a study")
    paths = StudyPaths(root)
    cfg = yaml.safe_load((root / "config.yaml").read_text()) or {}
    try:
        st = json.loads((root / STATUS_FILE).read_text())
    except (OSError, ValueError):
        st = {}
    alive = _alive(st) if st else False
    results_file = root / "results" / "results.parquet"
    results = read_results(results_file) if results_file.exists() else []
    selected = []
    if (root / "search" / "selected.json").exists():
        selected = json.loads((root / "search" / "selected.json").read_text()).get("selected", [])
    ft = cfg.get("finetune") or {}
    lrs = [ft.get("lr")] + [lr for lr in ft.get("lr_grid") or [] if lr != ft.get("lr")]
    n_ft = sum("finetune" in s.get("evaluate", []) for s in selected) * len(lrs)
    n_ptq = sum("ptq" in s.get("evaluate", []) for s in selected)
    ft_done = sum(r["stage"] == "finetune" for r in results)
    ptq_done = sum(r["stage"] == "ptq" for r in results)
    points = sorted((root / "search" / "limpq" / "points").glob("*.parquet"))
    grid_total = (st.get("progress", {}).get("search") or {}).get("total")
    weights = bool((cfg.get("model") or {}).get("weights"))

    done = {
        "pretrain": weights or paths.fp_checkpoint.exists(),
        "indicators": paths.indicators_parquet.exists(),
        "search": (root / "search" / "search.parquet").exists(),
        "select": (root / "search" / "selected.json").exists(),
        "finetune": bool(selected) and ft_done >= n_ft,
        "ptq": bool(selected) and ptq_done >= n_ptq,
        "report": (root / "report" / "index.html").exists(),
    }
    detail = {
        "pretrain": "weights given (model.weights)" if weights else "",
        "search": f"{_count_rows(points)} grid points solved" + (f" / {grid_total}" if grid_total else ""),
        "select": f"{len(selected)} policies" if selected else "",
        "finetune": f"{ft_done}/{n_ft} trials finished" if selected else "",
        "ptq": f"{ptq_done}/{n_ptq} policies" if selected else "",
    }
    running = st.get("stage") if alive and st.get("state") == "running" else None
    stages = []
    for name in STAGES:
        recorded = (st.get("stages") or {}).get(name, {}).get("state")
        if name == running:
            state = "running"
        elif name == "report" and running is None and recorded == "done":
            state = "done"
        elif done[name] and name != "report":
            state = "skipped" if name == "pretrain" and weights else "done"
        elif done[name]:
            state = "done"
        elif recorded == "running":   # it was running when the study stopped
            state = "failed" if st.get("state") == "failed" else "interrupted"
        else:
            state = "pending"
        prog = (st.get("progress") or {}).get(name)
        note = detail.get(name, "")
        if state == "running" and prog and prog.get("total"):
            note = (note + "; " if note else "") + f"{prog['done']}/{prog['total']} {prog['unit']}" + \
                (f", {prog['note']}" if prog.get("note") else "")
        stages.append({"stage": name, "state": state, "detail": note})
    overall = "running" if alive and st.get("state") == "running" else \
        st.get("state") if st.get("state") in ("complete", "failed", "interrupted") else \
        ("interrupted" if st.get("state") == "running" else
         "complete" if all(x["state"] in ("done", "skipped") for x in stages) else "stopped")
    from .lock import describe, owner_alive, read_lock

    owner = read_lock(root)
    stale_after = float((cfg.get("study") or {}).get("lock_stale_s", 120.0))
    held = describe(owner) if owner and owner_alive(owner, stale_after) else None
    return {"study": (cfg.get("study") or {}).get("name", root.name), "dir": str(root.resolve()), "held_by": held,
            "state": overall, "pid": st.get("pid"), "host": st.get("host"), "updated_at": st.get("updated_at"),
            "stages": stages, "last_error": st.get("last_error")}


def format_status(s: dict) -> list[str]:
    state = s["state"]
    if state == "running":
        head = f"running (pid {s['pid']} on {s['host']})"
    elif state == "interrupted":
        head = f"interrupted (pid {s['pid']} is gone); run the same command to resume"
    else:
        head = state
    if s.get("updated_at"):
        head += f", last update {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(s['updated_at']))}"
    lines = [f"study {s['study']} ({s['dir']}): {head}"]
    if s.get("held_by"):
        lines.append(f"  held by {s['held_by']}")
    for st in s["stages"]:
        lines.append(f"  {st['stage']:<11} {st['state']:<12} {st['detail']}".rstrip())
    err = s.get("last_error")
    if err:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(err.get("at", 0)))
        lines.append(f"last error ({when}{', in ' + err['stage'] if err.get('stage') else ''}): {err['message']}")
    return lines
