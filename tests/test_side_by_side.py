"""Runs that overlap, as real `mpqsweep run` processes: two different studies at once on one machine (each
its own local Ray, no Ray traceback anywhere, no cross-talk), and a second run of a study that is running
(refused in seconds with exit 2; with ``--wait`` it runs after the first and does no work twice)."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from test_mlflow import TINY

from orchestrator.paths import StudyPaths
from orchestrator.ray_session import ray_processes

pytestmark = [pytest.mark.ray, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
DEFAULT = str(ROOT / "configs" / "default.yaml")
STAGES = ("pretrain", "indicators", "search", "select", "finetune", "ptq")  # the report is always redrawn


def _start(study: Path, env: dict, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "run", DEFAULT, f"study.dir={study}", *TINY,
                             *extra], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


TABLES = ("indicators/indicators.parquet", "search/search.parquet", "results/results.parquet")


def _rows(study: Path) -> dict[str, int]:
    return {t: pq.read_table(study / t).num_rows for t in TABLES}


def test_two_studies_side_by_side_and_a_second_run_of_one(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS")}
    env["HOME"] = str(tmp_path / "home")
    a, b = tmp_path / "a", tmp_path / "b"
    first = _start(a, env)
    other = _start(b, env)
    procs = [first, other]
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not (a / ".lock").exists():
            time.sleep(0.2)
        assert (a / ".lock").exists(), "the first run never took its study's lock"

        t0 = time.perf_counter()
        refused = subprocess.run([sys.executable, "-m", "orchestrator.cli", "run", DEFAULT, f"study.dir={a}", *TINY],
                                 cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
        assert refused.returncode == 2 and time.perf_counter() - t0 < 30, refused.stderr[-2000:]
        line = refused.stderr.strip()
        assert "\n" not in line and f"pid {first.pid}" in line and "--wait" in line, line

        waiter = _start(a, env, "--wait")
        procs.append(waiter)
        outs = [p.communicate(timeout=900) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()

    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, out[-2000:] + err[-3000:]
        assert "Traceback" not in out + err, out + err
    # The waiter ran after the first had finished and found every stage done.
    out, err = outs[2]
    assert "[lock] waiting for the run that holds" in out + err
    assert all(f"[{s}] done already, skipped" in out for s in STAGES), out
    for study in (a, b):
        # No cross-talk: each Ray's processes found their own cluster. (Ray Train may still log a traceback
        # there with "safe to ignore" when two studies overload 2 cores; the console is what must be clean.)
        workers = (study / "logs" / "workers.log").read_text()
        assert "multiple active Ray instances" not in workers and "ConnectionError" not in workers, workers[-3000:]
        assert ray_processes(StudyPaths(study).ray_temp_dir()) == []
    # Same study, same seed: the same tables, each row once.
    ra, rb = _rows(a), _rows(b)
    assert ra == rb and ra["search/search.parquet"] == 3 and ra["results/results.parquet"] == 4, (ra, rb)
