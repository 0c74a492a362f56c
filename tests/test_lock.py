"""One run per study directory: a second `mpqsweep run` of a study that a live process holds is one
line naming the owner and exit 2, before anything starts; a lock left by a dead process (this host) or
with a stale heartbeat (another host) is taken over with a note; `--wait` waits for the owner. Real
processes hold the locks; nothing here starts Ray."""
from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import ray

from orchestrator.cli import main
from orchestrator.lock import LOCK_FILE, StudyLock, read_lock
from orchestrator.status import study_status

ROOT = Path(__file__).resolve().parents[1]
DEFAULT = str(ROOT / "configs" / "default.yaml")
HOLD = "import sys,time; from orchestrator.lock import StudyLock; l=StudyLock(sys.argv[1], 'holder'); " \
       "l.acquire(); print('held', flush=True); time.sleep(float(sys.argv[2])); l.release()"


def _holder(study: Path, seconds: float) -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, "-c", HOLD, str(study), str(seconds)], cwd=ROOT, stdout=subprocess.PIPE,
                         text=True)
    assert p.stdout.readline().strip() == "held"
    return p


def test_second_run_of_a_held_study_is_one_line_and_exit_2(tmp_path, capsys):
    study = tmp_path / "s"
    study.mkdir()
    holder = _holder(study, 60)
    try:
        t0 = time.perf_counter()
        assert main(["run", DEFAULT, f"study.dir={study}"]) == 2
        err = capsys.readouterr().err.strip()
        assert time.perf_counter() - t0 < 10 and "\n" not in err
        assert err.startswith(f"error: study {study} is being run by pid {holder.pid} on {socket.gethostname()}")
        assert not ray.is_initialized() and not (study / "config.yaml").exists()
        assert read_lock(study)["pid"] == holder.pid  # the owner's lock is untouched
    finally:
        holder.kill()
        holder.wait()


def test_lock_of_a_dead_process_is_taken_over_with_a_note(tmp_path):
    study = tmp_path / "s"
    study.mkdir()
    holder = _holder(study, 60)
    holder.kill()  # SIGKILL: its lock stays behind
    holder.wait()
    said: list[str] = []
    lock = StudyLock(study, "test", echo=said.append)
    lock.acquire()
    try:
        assert len(said) == 1 and "taking over" in said[0] and f"pid {holder.pid}" in said[0]
        assert read_lock(study)["pid"] == lock.me["pid"]
    finally:
        lock.release()
    assert not (study / LOCK_FILE).exists()


@pytest.mark.parametrize("age,taken", [(3600, True), (5, False)])
def test_another_hosts_lock_is_stale_only_when_its_heartbeat_is(tmp_path, age, taken):
    study = tmp_path / "s"
    study.mkdir()
    other = {"host": "elsewhere-node", "pid": 1, "pid_start": "1", "started_at": time.time() - 7200,
             "heartbeat": time.time() - age, "command": "mpqsweep run"}
    (study / LOCK_FILE).write_text(json.dumps(other))
    lock = StudyLock(study, "test", stale_after=120, echo=lambda m: None)
    if taken:
        lock.acquire()
        lock.release()
    else:
        with pytest.raises(Exception, match="being run by pid 1 on elsewhere-node"):
            lock.acquire()
        assert read_lock(study)["host"] == "elsewhere-node"


def test_wait_takes_the_lock_when_the_owner_ends(tmp_path):
    study = tmp_path / "s"
    study.mkdir()
    holder = _holder(study, 3)
    said: list[str] = []
    lock = StudyLock(study, "test", echo=said.append)
    t0 = time.perf_counter()
    lock.acquire(wait=True, poll_s=0.2)
    try:
        assert holder.wait(timeout=30) == 0 and time.perf_counter() - t0 >= 1.0
        assert "waiting for the run" in said[0] and read_lock(study)["pid"] == lock.me["pid"]
    finally:
        lock.release()


def test_status_names_the_owner(tmp_path):
    study = tmp_path / "s"
    study.mkdir()
    (study / "config.yaml").write_text("study: {name: x}\n")
    holder = _holder(study, 60)
    try:
        assert f"pid {holder.pid}" in study_status(study)["held_by"]
    finally:
        holder.kill()
        holder.wait()
    assert study_status(study)["held_by"] is None
