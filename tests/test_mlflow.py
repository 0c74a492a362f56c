"""Remote tracking: a real `mlflow server` on 127.0.0.1 records a tiny study (parent run, nested stage
runs, one run per evaluated policy), read back with `mlflow.search_runs`. An unreachable server fails
the study at once with one line. A server killed mid-study: with `tracking.on_unreachable=continue` the
study says so once and finishes with Parquet as its record, and the next run against the restarted
server backfills every result; with `fail` it stops within seconds with one line."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pyarrow.parquet as pq
import pytest

pytestmark = [pytest.mark.ray, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
DEFAULT = str(ROOT / "configs" / "default.yaml")
TINY = ["data.name=digits", "data.batch_size=32", "pretrain.epochs=1", "indicators.epochs=1", "indicators.bits=[6,4,2]",
        "search.alpha=[2.0]", "search.bitops=[w4a4]", "search.compression_ratio=[none]", "mixquant.qem=[4]",
        "baselines.uniform=[[4,4]]", "baselines.random_per_budget=0", "select.max_policies=1",
        "select.include_uniform=false", "finetune.epochs=1", "finetune.bn_recalib_batches=2", "resources.num_cpus=2"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_server(tmp: Path, port: int | None = None) -> tuple[subprocess.Popen, str]:
    """A real `mlflow server` on 127.0.0.1 over a sqlite store in ``tmp`` (reused when restarted)."""
    tmp.mkdir(parents=True, exist_ok=True)
    port = port or _free_port()
    mlflow_bin = Path(sys.executable).with_name("mlflow")
    proc = subprocess.Popen([str(mlflow_bin), "server", "--host", "127.0.0.1", "--port", str(port),
                             "--backend-store-uri", f"sqlite:///{tmp / 'mlflow.db'}",
                             "--artifacts-destination", str(tmp / "artifacts"), "--workers", "1"],
                            stdout=open(tmp / "server.log", "a"), stderr=subprocess.STDOUT, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    deadline = time.time() + 90
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(uri + "/health", timeout=2) as r:
                if r.status == 200:
                    return proc, uri
        except OSError:
            time.sleep(0.5)
    _stop_server(proc)
    pytest.fail("mlflow server did not start: " + (tmp / "server.log").read_text()[-2000:])


def _stop_server(proc: subprocess.Popen, kill: bool = False) -> None:
    os.killpg(proc.pid, signal.SIGKILL if kill else signal.SIGTERM)  # the server and its workers
    proc.wait(timeout=30)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    proc, uri = _start_server(tmp_path_factory.mktemp("mlflow"))
    yield uri
    _stop_server(proc)


def _run(study_dir: Path, *extra: str, env_extra: dict | None = None, timeout: int = 600):
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env.update(HOME=str(study_dir.parent / "home"), **(env_extra or {}))
    return subprocess.run([sys.executable, "-m", "orchestrator.cli", "run", DEFAULT, f"study.dir={study_dir}",
                           *TINY, *extra], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def _runs(uri: str, study: str):
    import mlflow

    mlflow.set_tracking_uri(uri)
    return mlflow.search_runs(experiment_names=["mpq-sweep"], filter_string=f"tags.`mpq.study` = '{study}'",
                              output_format="list", max_results=1000)


def test_tiny_study_is_recorded_on_a_real_server(server, tmp_path):
    d = tmp_path / "a"
    res = _run(d, "study.name=remote", env_extra={"MLFLOW_TRACKING_URI": server})
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    runs = _runs(server, "remote")
    keys = {r.data.tags["mpq.key"]: r for r in runs}
    assert len(keys) == len(runs)
    parent = keys["study"]
    assert parent.info.status == "FINISHED" and parent.data.params["search.bitops"] == '["w4a4"]'
    for stage in ("pretrain", "indicators", "search", "select", "finetune", "ptq", "report"):
        run = keys[f"stage/{stage}"]
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id, stage
    results = pq.read_table(d / "results" / "results.parquet").to_pylist()
    assert {r["stage"] for r in results} == {"finetune", "ptq"}
    for r in results:
        run = next(x for x in runs if x.info.run_id == r["mlflow_run_id"])
        assert run.data.tags["mpq.key"].startswith(f"policy/{r['stage']}/{r['policy_id']}")
        assert run.data.metrics["top1"] == pytest.approx(r["top1"]) and run.data.metrics["bitops"] == r["bitops"]
    assert keys["stage/indicators"].data.metrics["steps"] > 0
    import mlflow

    arts = {a.path for a in mlflow.MlflowClient(server).list_artifacts(parent.info.run_id, "tables")}
    assert {"tables/search.parquet", "tables/results.parquet"} <= arts


def test_unreachable_server_fails_fast(tmp_path):
    dead = f"http://127.0.0.1:{_free_port()}"
    d = tmp_path / "b"
    t0 = time.perf_counter()
    res = _run(d, "study.name=offline", f"tracking.uri={dead}")
    assert res.returncode == 2 and time.perf_counter() - t0 < 60
    err = res.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: MLflow tracking server") and "unreachable" in err[0]
    assert not (d / "pretrain" / "model.pt").exists()  # failed before any work


def test_server_dying_mid_study_with_continue_keeps_going_and_is_backfilled(tmp_path):
    """The server is killed while the finetune trials run: the study says so once, finishes with every
    result in Parquet, and the next run against the restarted server backfills the missing runs."""
    srv = tmp_path / "srv"
    proc, uri = _start_server(srv)
    d = tmp_path / "s"
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["HOME"] = str(tmp_path / "home")
    study = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "run", DEFAULT, f"study.dir={d}", *TINY,
                              "study.name=dying", f"tracking.uri={uri}", "tracking.on_unreachable=continue",
                              "finetune.epochs=2"],
                             cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 400
        while time.time() < deadline and study.poll() is None and not list((d / "ray").glob("finetune-*")):
            time.sleep(0.5)
        assert study.poll() is None, "the study ended before its finetune stage"
        _stop_server(proc, kill=True)
        t_kill = time.perf_counter()
        out, err = study.communicate(timeout=600)
    finally:
        if study.poll() is None:
            study.kill()
    assert study.returncode == 0, out[-2000:] + err[-3000:]
    assert time.perf_counter() - t_kill < 300
    said = [line for line in out.splitlines() if "stopped answering" in line]
    assert len(said) == 1 and "continuing with Parquet" in said[0], out
    assert "Traceback" not in out + err
    results = pq.read_table(d / "results" / "results.parquet").to_pylist()
    assert {r["stage"] for r in results} == {"finetune", "ptq"} and all(r["top1"] is not None for r in results)
    assert any(r["mlflow_run_id"] is None for r in results)

    proc, uri = _start_server(srv, port=int(uri.rsplit(":", 1)[1]))
    try:
        res = _run(d, "study.name=dying", f"tracking.uri={uri}", "finetune.epochs=2")
        assert res.returncode == 0, res.stderr[-3000:]
        assert "backfilled" in res.stdout
        after = pq.read_table(d / "results" / "results.parquet").to_pylist()
        assert len(after) == len(results) and all(r["mlflow_run_id"] for r in after)
        ids = {r.info.run_id for r in _runs(uri, "dying")}
        assert {r["mlflow_run_id"] for r in after} <= ids
    finally:
        _stop_server(proc)


def test_tracker_notices_a_dead_server_within_seconds(tmp_path):
    """Unreachable at start: ``fail`` is one error within 3 s, ``continue`` a disabled tracker. Dying
    later: ``fail`` raises one UserError within seconds, ``continue`` says so once and goes quiet."""
    from orchestrator.errors import UserError
    from orchestrator.paths import StudyPaths
    from orchestrator.tracking import open_tracker

    paths = StudyPaths(tmp_path / "s")
    dead = f"http://127.0.0.1:{_free_port()}"
    t0 = time.perf_counter()
    with pytest.raises(UserError, match="unreachable"):
        open_tracker(dead, "mpq-sweep", "fail", paths, "dead")
    assert not open_tracker(dead, "mpq-sweep", "continue", paths, "dead").enabled
    assert time.perf_counter() - t0 < 3

    proc, uri = _start_server(tmp_path / "srv")
    said: list[str] = []
    try:
        trackers = {mode: open_tracker(uri, "mpq-sweep", mode, paths, f"dying-{mode}", echo=said.append)
                    for mode in ("fail", "continue")}
        runs = {mode: t.run("study", "x") for mode, t in trackers.items()}
        for mode, t in trackers.items():
            t.log_metrics(runs[mode], {"a": 1.0})
    finally:
        _stop_server(proc, kill=True)
    t0 = time.perf_counter()
    with pytest.raises(UserError, match="stopped answering.*every finished result is in Parquet"):
        trackers["fail"].log_metrics(runs["fail"], {"a": 2.0})
    assert time.perf_counter() - t0 < 15
    cont = trackers["continue"]
    assert cont.log_metrics(runs["continue"], {"a": 2.0}) is None
    assert cont.run("policy/x", "x", parent=runs["continue"]) is None  # a no-op from now on, said once
    assert len(said) == 1 and "continuing with Parquet as the record" in said[0]
    assert time.perf_counter() - t0 < 30 and not any(t.enabled for t in trackers.values())
