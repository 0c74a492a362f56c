"""A full disk: recognised however it is wrapped, stopped by the free-space watch before Ray hangs on it,
one line naming the directory and its free space, exit 1; the rerun after space is freed completes. The
study case runs on a real 3 MB tmpfs (small enough to fill on any machine) that the test mounts (root only;
skipped otherwise)."""
from __future__ import annotations

import errno
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from test_mlflow import TINY

from orchestrator.config import load_config
from orchestrator.diskspace import DiskWatch, as_disk_full, disk_full, estimate_need, short_of_space
from orchestrator.paths import StudyPaths
from orchestrator.ray_session import ray_processes
from orchestrator.status import study_status

ROOT = Path(__file__).resolve().parents[1]
DEFAULT = str(ROOT / "configs" / "default.yaml")


def _raised(make):
    try:
        make()
    except BaseException as e:  # noqa: BLE001 - the test wants whatever was raised
        return e
    raise AssertionError("nothing raised")


def test_a_full_disk_is_found_however_it_is_wrapped(tmp_path):
    study = tmp_path / "s"

    def write_then_wrap():
        try:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(study / "ray" / "run" / "state.pt"))
        except OSError as e:
            raise RuntimeError("Training failed") from e

    found = as_disk_full(_raised(write_then_wrap), study)
    assert found is not None and str(found).startswith(f"no space left in {study.resolve()} (")
    assert "free)" in str(found) and "run the same command to resume" in str(found)

    def sqlite_full():  # MLflow's store: only the text says so once SQLAlchemy has wrapped it
        try:
            raise sqlite3.OperationalError("database or disk is full")
        except sqlite3.OperationalError as e:
            raise ValueError(f"(sqlite3.OperationalError) {e}") from None
    assert disk_full(_raised(sqlite_full)) is not None
    quota = OSError(errno.EDQUOT, os.strerror(errno.EDQUOT), "/elsewhere/x.tmp")
    assert as_disk_full(quota, study) is not None and "no space left in /elsewhere (" in str(as_disk_full(quota, study))
    assert disk_full(_raised(lambda: open(tmp_path / "missing" / "x"))) is None
    assert disk_full(ValueError("a space left on the device's label")) is None


def test_the_estimate_grows_with_kept_checkpoints_and_warns_only_when_short(tmp_path):
    one = load_config(DEFAULT, ["finetune.keep_checkpoints=1"])
    three = load_config(DEFAULT, ["finetune.keep_checkpoints=3"])
    (n1, how), (n3, _) = estimate_need(one), estimate_need(three)
    assert n3 > n1 and "9 finetune trial(s) x 2 checkpoint(s)" in how
    assert short_of_space(one, [tmp_path]) is None  # the development disk has far more than ~90 MB
    with pytest.raises(Exception, match="finetune.keep_checkpoints must be >= 1"):
        load_config(DEFAULT, ["finetune.keep_checkpoints=0"])


def test_the_watch_stops_the_main_thread_when_free_space_runs_out(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        with DiskWatch([tmp_path], poll_s=0.05, reserve=1 << 62) as watch:  # no disk has 4 EiB free
            for _ in range(200):
                time.sleep(0.05)
    assert watch.tripped == tmp_path
    err = str(watch.error())
    assert err.startswith(f"no space left in {tmp_path} (") and "free)" in err
    with DiskWatch([tmp_path], poll_s=0.05) as calm:
        time.sleep(0.3)
    assert calm.tripped is None


@pytest.fixture
def small_mount(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {res.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


@pytest.mark.ray
@pytest.mark.slow
def test_a_study_on_a_disk_that_fills_up_then_is_enlarged(small_mount, tmp_path):
    study = small_mount / "s"
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS")}
    env["HOME"] = str(tmp_path / "home")
    argv = [sys.executable, "-m", "orchestrator.cli", "run", DEFAULT, f"study.dir={study}", *TINY]

    full = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert full.returncode == 1, full.stdout[-2000:] + full.stderr[-3000:]
    line = full.stderr.strip()
    assert "\n" not in line and line.startswith(f"error: no space left in {study} (") and "free)" in line, line
    assert f"[disk] {study} has 3.0 MB free; this study may need about" in full.stdout
    assert "Traceback" not in full.stdout + full.stderr
    assert study_status(study)["state"] == "failed"
    assert ray_processes(StudyPaths(study).ray_temp_dir()) == []
    # Where the disk fills depends on the machine's log volume; whatever was recorded before is finished.
    results = study / "results" / "results.parquet"
    assert all(r["status"] == "complete" for r in (pq.read_table(results).to_pylist() if results.exists() else []))
    assert not list(study.glob(".*.tmp")) + list(study.glob("*/.*.tmp"))  # no half-written output of ours

    subprocess.run(["mount", "-o", "remount,size=300m", str(small_mount)], check=True)
    done = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert "Traceback" not in done.stdout + done.stderr and "[disk]" not in done.stdout
    assert pq.read_table(study / "search" / "search.parquet").num_rows == 3
    rows = pq.read_table(study / "results" / "results.parquet").to_pylist()
    keys = [(r["policy_id"], r["stage"], r["lr"]) for r in rows]
    assert len(rows) == 4 and len(keys) == len(set(keys))
    assert ray_processes(StudyPaths(study).ray_temp_dir()) == []
