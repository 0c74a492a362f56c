"""Ctrl-C and SIGTERM on real `mpqsweep` processes: the first signal stops the command within seconds
with one line naming the stage and exit 128+signal, no traceback, no Ray process of ours left alive and
nothing partial recorded; the rerun resumes and completes with no duplicated rows."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from test_mlflow import TINY as MLFLOW_TINY

from orchestrator.paths import StudyPaths
from orchestrator.ray_session import ray_processes
from orchestrator.status import study_status

pytestmark = [pytest.mark.ray, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
DEFAULT = str(ROOT / "configs" / "default.yaml")
# The tiny study of the MLflow tests, with enough indicator and finetune epochs and grid points to be
# stopped midway (still one LIMPQ policy selected).
TINY = [*MLFLOW_TINY, "indicators.epochs=3", "finetune.epochs=3", "search.bitops=[w2a2..w6a6:400]",
        "search.batch_size=16"]


def _env(tmp: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["HOME"] = str(tmp / "home")
    return env


def _start(study: Path, env: dict) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "run", DEFAULT, f"study.dir={study}", *TINY],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _stage(study: Path, pid: int, progress: bool = True) -> str | None:
    """The stage the run ``pid`` is in; with ``progress``, only once that stage has reported progress."""
    try:
        st = json.loads((study / "status.json").read_text())
    except (OSError, ValueError):
        return None
    if st.get("pid") != pid or (progress and not (st.get("progress") or {}).get(st.get("stage"))):
        return None
    return st.get("stage")


def _interrupt_during(study: Path, env: dict, stage: str, sig: int, progress: bool = True):
    """Start the study, send ``sig`` once it is in ``stage`` (its workers running: it has reported
    progress; the report stage has no progress to report); returns (exit code, stdout, stderr, seconds
    from the signal to the exit)."""
    proc = _start(study, env)
    try:
        deadline = time.time() + 400
        while time.time() < deadline and proc.poll() is None and _stage(study, proc.pid, progress) != stage:
            time.sleep(0.05)
        assert proc.poll() is None and _stage(study, proc.pid, progress) == stage, f"never saw {stage} running"
        proc.send_signal(sig)
        t0 = time.perf_counter()
        out, err = proc.communicate(timeout=120)
        return proc.returncode, out, err, time.perf_counter() - t0
    finally:
        if proc.poll() is None:
            proc.kill()


def _stopped_cleanly(study: Path, stage: str, code: int, out: str, err: str, took: float, expect: int = 130) -> None:
    assert code == expect and took < 60, err[-3000:]
    assert re.fullmatch(rf"interrupted during {stage}( \([^\n]*\))?; run the same command to resume", err.strip()), err
    assert "Traceback" not in out + err
    assert ray_processes(StudyPaths(study).ray_temp_dir()) == []
    assert study_status(study)["state"] == "interrupted"


def test_interrupted_at_every_stage_then_rerun(tmp_path):
    study, env = tmp_path / "s", _env(tmp_path)
    temp = StudyPaths(study).ray_temp_dir()

    _stopped_cleanly(study, "pretrain", *_interrupt_during(study, env, "pretrain", signal.SIGINT))
    assert not (study / "pretrain" / "model.pt").exists()

    _stopped_cleanly(study, "indicators", *_interrupt_during(study, env, "indicators", signal.SIGTERM), expect=143)
    assert not (study / "indicators" / "indicators.parquet").exists()  # nothing partial recorded as done
    # A full disk tore Ray Train's checkpoint list mid-write: the rerun sets the run aside and redoes it.
    (run_dir,) = (study / "ray").glob("default-indicators-*")
    (run_dir / "checkpoint_manager_snapshot.json").write_text('{"ray_version": "2.60.0", "checkpoint_res')

    code, out, err, took = _interrupt_during(study, env, "search", signal.SIGINT)
    _stopped_cleanly(study, "search", code, out, err, took)
    assert not (study / "search" / "search.parquet").exists()  # the grid's parts stay for the rerun
    assert "[indicators] done already, skipped" not in out  # the killed indicators stage was redone
    assert f"[resume] {run_dir} is unreadable (its checkpoint list checkpoint_manager_snapshot.json is torn" in out
    assert json.loads(run_dir.joinpath("checkpoint_manager_snapshot.json").read_text())

    code, out, err, took = _interrupt_during(study, env, "finetune", signal.SIGINT)
    _stopped_cleanly(study, "finetune", code, out, err, took)
    assert "[indicators] done already, skipped" in out
    results = study / "results" / "results.parquet"
    partial = pq.read_table(results).to_pylist() if results.exists() else []
    assert all(r["status"] == "complete" for r in partial)

    # ... and Tune's experiment state, torn the same way: the sweep is set aside and run again.
    (exp_dir,) = [d for d in (study / "ray").glob("finetune-*") if ".unreadable-" not in d.name]
    state = max(exp_dir.glob("experiment_state-*.json"))
    state.write_text(state.read_text()[:100])
    code, out, err, took = _interrupt_during(study, env, "ptq", signal.SIGINT)
    _stopped_cleanly(study, "ptq", code, out, err, took)
    assert f"[resume] {exp_dir} is unreadable ({state.name} is torn (JSONDecodeError))" in out

    code, out, err, took = _interrupt_during(study, env, "report", signal.SIGINT, progress=False)
    _stopped_cleanly(study, "report", code, out, err, took)
    assert "[ptq] finished in" in out  # the ptq stage interrupted before was completed by this run

    done = subprocess.run([sys.executable, "-m", "orchestrator.cli", "run", DEFAULT, f"study.dir={study}", *TINY],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "[finetune] done already, skipped" in done.stdout and "[ptq] done already, skipped" in done.stdout
    assert "Traceback" not in done.stdout + done.stderr and "[resume]" not in done.stdout
    rows = pq.read_table(results).to_pylist()
    keys = [(r["policy_id"], r["stage"], r["lr"]) for r in rows]
    assert len(keys) == len(set(keys)) and {r["stage"] for r in rows} == {"finetune", "ptq"}
    assert all(r["epochs"] == 3 for r in rows if r["stage"] == "finetune")
    ids = pq.read_table(study / "search" / "search.parquet").column("point_id").to_pylist()
    assert len(ids) == len(set(ids)) == 400 * 1 + 2  # LIMPQ's grid once, plus MixQuant's QEM and the uniform
    assert ray_processes(temp) == []


def _table(tmp: Path) -> Path:
    layers = [{"name": f"conv{i}", "params": 1000 * i, "macs": 10_000 * i,
               "weight": {str(b): 1.0 / b + i for b in (6, 5, 4, 3, 2)},
               "act": {str(b): 0.5 / b + i for b in (6, 5, 4, 3, 2)}} for i in range(1, 9)]
    p = tmp / "ind.json"
    p.write_text(json.dumps({"bits": [6, 5, 4, 3, 2], "layers": layers, "fixed_layers": {}}))
    return p


def test_search_grid_stops_on_sigint_keeps_its_parts_and_a_second_signal_exits_at_once(tmp_path):
    from orchestrator.grid import POINTS_DIR
    from orchestrator.search_table import read_search_table

    out = tmp_path / "out"
    argv = [sys.executable, "-m", "orchestrator.cli", "search", "--indicators", str(_table(tmp_path)),
            "--bitops", "w2a2..w6a6:4000", "--alpha", "1", "2", "--out", str(out), "--num-cpus", "2",
            "--batch-size", "64"]
    temp = StudyPaths(out).ray_temp_dir()

    def run_until_parts(n_parts: int) -> subprocess.Popen:
        proc = subprocess.Popen(argv, cwd=ROOT, env=_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None and \
                len(list((out / POINTS_DIR).glob("*.parquet"))) < n_parts:
            time.sleep(0.2)
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        return proc

    proc = run_until_parts(3)
    proc.send_signal(signal.SIGINT)
    t0 = time.perf_counter()
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and time.perf_counter() - t0 < 30, err[-3000:]
    assert err.strip() == "interrupted; run the same command to resume"
    first = read_search_table(out / POINTS_DIR)
    assert first and len({r["point_id"] for r in first}) == len(first)
    assert ray_processes(temp) == []

    # A part torn by a full disk (or a crash before the rename reached the disk) is set aside, re-solved.
    torn = sorted((out / POINTS_DIR).glob("*.parquet"))[0]
    torn.write_bytes(torn.read_bytes()[:200])
    proc = run_until_parts(len(list((out / POINTS_DIR).glob("*.parquet"))) + 2)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.3)
    proc.send_signal(signal.SIGINT)
    t0 = time.perf_counter()
    out_text, err = proc.communicate(timeout=60)
    assert f"[resume] {torn} is unreadable" in out_text, out_text[-2000:]
    assert not torn.exists() and list(torn.parent.glob(torn.name + ".unreadable-*"))
    assert proc.returncode == 130 and time.perf_counter() - t0 < 10, err[-3000:]
    assert "Traceback" not in err
    time.sleep(1)
    assert ray_processes(temp) == []
    second = read_search_table(out / POINTS_DIR)
    ids = [r["point_id"] for r in second]
    assert len(ids) == len(set(ids)) and len(ids) > len(first)  # resumed: finished points not solved again
