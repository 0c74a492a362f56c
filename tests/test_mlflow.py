"""Remote tracking: a real `mlflow server` on 127.0.0.1 records a tiny study (parent run, nested stage
runs, one run per evaluated policy), read back with `mlflow.search_runs`. An unreachable server fails
the study at once with one line — or, with `tracking.on_unreachable=continue`, the study finishes with
Parquet as its record and the next run against a reachable server backfills every result."""
from __future__ import annotations

import os
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


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mlflow")
    port = _free_port()
    mlflow_bin = Path(sys.executable).with_name("mlflow")
    proc = subprocess.Popen([str(mlflow_bin), "server", "--host", "127.0.0.1", "--port", str(port),
                             "--backend-store-uri", f"sqlite:///{tmp / 'mlflow.db'}",
                             "--artifacts-destination", str(tmp / "artifacts"), "--workers", "1"],
                            stdout=open(tmp / "server.log", "w"), stderr=subprocess.STDOUT, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    deadline = time.time() + 90
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(uri + "/health", timeout=2) as r:
                if r.status == 200:
                    break
        except OSError:
            time.sleep(0.5)
    else:
        proc.kill()
        pytest.fail("mlflow server did not start: " + (tmp / "server.log").read_text()[-2000:])
    yield uri
    proc.terminate()
    proc.wait(timeout=30)


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


def test_unreachable_server_fails_fast_or_continues_and_backfills(server, tmp_path):
    dead = f"http://127.0.0.1:{_free_port()}"
    d = tmp_path / "b"
    t0 = time.perf_counter()
    res = _run(d, "study.name=offline", f"tracking.uri={dead}")
    assert res.returncode == 2 and time.perf_counter() - t0 < 60
    err = res.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: MLflow tracking server") and "unreachable" in err[0]
    assert not (d / "pretrain" / "model.pt").exists()  # failed before any work

    res = _run(d, "study.name=offline", f"tracking.uri={dead}", "tracking.on_unreachable=continue")
    assert res.returncode == 0, res.stderr[-3000:]
    results = pq.read_table(d / "results" / "results.parquet").to_pylist()
    assert results and all(r["mlflow_run_id"] is None for r in results)  # Parquet is the record

    res = _run(d, "study.name=offline", f"tracking.uri={server}")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "backfilled" in res.stdout
    backfilled = pq.read_table(d / "results" / "results.parquet").to_pylist()
    assert len(backfilled) == len(results) and all(r["mlflow_run_id"] for r in backfilled)
    ids = {r.info.run_id for r in _runs(server, "offline")}
    assert {r["mlflow_run_id"] for r in backfilled} <= ids
