"""The study end to end: the README's main-job config (configs/default.yaml), shrunk, through the real
CLI on real local Ray + sqlite MLflow + Parquet. The driver is SIGKILLed mid-run and restarted; `status`
calls the killed run interrupted, the restarted run leaves no Ray process of the first behind, prints
only our own lines, and completes with no duplicated rows or MLflow runs; a third run only resumes; and
LIMPQ's finetuned policies match or beat the uniform ones at equal or lower BitOps."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from orchestrator.paths import StudyPaths
from orchestrator.ray_session import ray_processes
from orchestrator.status import study_status

pytestmark = [pytest.mark.ray, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
DEFAULT = str(ROOT / "configs" / "default.yaml")
# The embedded default, shrunk: fewer epochs, half the data for the indicators, a smaller grid. It
# keeps MNIST 5k: on sklearn's 8x8 digits every policy from W2A2 up finetunes to the same accuracy
# within a few of the 360 validation images, so comparing searchers there compares noise.
SHRUNK = ["pretrain.epochs=2", "indicators.epochs=1", "data.indicator_fraction=0.5", "search.alpha=[2.0]",
          "search.bitops=[w2a2..w6a6:9]", "search.compression_ratio=[none,8]", "mixquant.qem=[1,4,16,64]",
          "baselines.max_random_budgets=3", "select.max_policies=3", "finetune.epochs=1",
          "finetune.bn_recalib_batches=5", "resources.num_cpus=2"]


def _cli(study_dir: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "orchestrator.cli", "run", DEFAULT, f"study.dir={study_dir}", *SHRUNK, *extra]


def _env(tmp: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["HOME"] = str(tmp / "home")  # Ray and MLflow keep nothing outside the test's directories
    return env


def _mlflow_runs(study_dir: Path):
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{study_dir / 'mlflow.db'}")
    return mlflow.search_runs(experiment_names=["mpq-sweep"], output_format="list", max_results=10_000)


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """Kill the study during its finetune stage, then rerun it to completion."""
    tmp = tmp_path_factory.mktemp("study")
    study_dir = tmp / "s"
    env = _env(tmp)
    log = open(tmp / "first.log", "w")
    proc = subprocess.Popen(_cli(study_dir), cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    selected = study_dir / "search" / "selected.json"
    deadline = time.time() + 400
    while time.time() < deadline and proc.poll() is None and not selected.exists():
        time.sleep(0.5)
    assert selected.exists(), (tmp / "first.log").read_text()[-3000:]
    time.sleep(8)  # into the finetune trials
    during = study_status(study_dir)
    killed = proc.poll() is None
    os.kill(proc.pid, signal.SIGKILL)  # the driver alone, as the OOM killer or `kill -9 PID` would
    proc.wait()
    log.close()
    after_kill = {"during": during, "status": study_status(study_dir),
                  "timings": json.loads((study_dir / "timings.json").read_text())}
    t0 = time.perf_counter()
    second = subprocess.run(_cli(study_dir), cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    yield {"dir": study_dir, "killed": killed, "second": second, "second_s": time.perf_counter() - t0, "env": env,
           "after_kill": after_kill, "left_over": ray_processes(StudyPaths(study_dir).ray_temp_dir())}
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # whatever a failed test left of the first run
    except ProcessLookupError:
        pass


def test_killed_study_resumes_and_completes(study):
    d: Path = study["dir"]
    assert study["killed"], "the first run finished before it could be killed"
    out = study["second"].stdout
    for stage in ("pretrain", "indicators", "search", "select"):
        assert f"[{stage}] done already, skipped" in out, out
    for rel in ("pretrain/model.pt", "indicators/indicators.parquet", "indicators/indicators.json",
                "search/search.parquet", "search/selected.json", "results/results.parquet",
                "report/index.html", "report/report.md", "timings.json"):
        assert (d / rel).exists(), rel
    assert list((d / "report").glob("*.png")), "the report has no plots"

    search = pq.read_table(d / "search" / "search.parquet").to_pylist()
    assert {r["searcher"] for r in search} == {"limpq", "mixquant", "uniform", "random"}
    assert len({r["point_id"] for r in search}) == len(search)
    limpq = [r for r in search if r["searcher"] == "limpq"]
    assert len(limpq) == 9 * 2 and all(r["status"] in ("optimal", "infeasible") for r in limpq)

    selected = json.loads((d / "search" / "selected.json").read_text())["selected"]
    results = pq.read_table(d / "results" / "results.parquet").to_pylist()
    keys = [(r["policy_id"], r["stage"], r["lr"]) for r in results]
    assert len(keys) == len(set(keys)), "duplicated result rows"
    want = {(s["policy_id"], stage) for s in selected for stage in s["evaluate"]}
    assert {(r["policy_id"], r["stage"]) for r in results} == want
    assert all(r["mlflow_run_id"] for r in results)
    assert all(0.0 <= r["top1"] <= 1.0 for r in results)

    runs = _mlflow_runs(d)
    run_keys = [r.data.tags["mpq.key"] for r in runs]
    assert len(run_keys) == len(set(run_keys)), "duplicated MLflow runs"
    assert "study" in run_keys and {f"stage/{s}" for s in ("search", "select", "finetune", "ptq")} <= set(run_keys)
    policy_runs = [r for r in runs if r.data.tags["mpq.key"].startswith("policy/")]
    assert len(policy_runs) == len(results)
    by_id = {r.info.run_id: r for r in runs}
    for r in results:
        run = by_id[r["mlflow_run_id"]]
        assert run.info.status == "FINISHED"
        assert run.data.metrics["top1"] == pytest.approx(r["top1"])
        assert run.data.params["searcher"] == r["searcher"]
    parent = next(r for r in runs if r.data.tags["mpq.key"] == "study")
    assert parent.info.status == "FINISHED" and parent.data.tags["mpq.status"] == "complete"

    timings = json.loads((d / "timings.json").read_text())
    last = timings["invocations"][-1]
    assert 0.0 <= last["orchestration_share"] <= 1.0 and last["wall_seconds"] > 0


# Lines of Ray, Tune, Train and MLflow that reached the console before it became ours.
FOREIGN = ["Checkpoint successfully created", "Reporting training result", "PreemptionWatcher",
           "Configuration for experiment", "tensorboard", "View detailed results", "View run", "urllib3",
           "Started a local Ray instance", "Token authentication", "TrainController", "RayTrainWorker",
           "Traceback"]


def test_killed_driver_is_reported_leaves_no_ray_behind_and_the_console_is_ours(study):
    during = study["after_kill"]["during"]
    assert during["state"] == "running" and during["pid"] and \
        {s["stage"]: s["state"] for s in during["stages"]}["select"] == "done", during
    st = study["after_kill"]["status"]
    assert st["state"] == "interrupted", st
    states = {s["stage"]: s["state"] for s in st["stages"]}
    assert states["finetune"] == "interrupted" and states["search"] == "done" and states["report"] == "pending"
    first = study["after_kill"]["timings"]["invocations"][-1]  # the killed run kept its finished stages
    assert not first["complete"] and {"pretrain", "indicators", "search", "select"} <= set(first["stages_run"])

    assert study["left_over"] == [], "processes of a local Ray outlived the study"
    second = study["second"]
    console = second.stdout + second.stderr
    assert not [f for f in FOREIGN if f in console], console[-3000:]
    assert "[finetune] running" in second.stdout and "finetune:" in second.stdout  # our progress
    d: Path = study["dir"]
    assert "Checkpoint successfully created" in (d / "logs" / "workers.log").read_text()  # filed, not lost
    assert study_status(d)["state"] == "complete"
    invocations = json.loads((d / "timings.json").read_text())["invocations"]
    assert [i["complete"] for i in invocations[-2:]] == [False, True]


def test_limpq_matches_or_beats_uniform_at_equal_or_lower_bitops(study):
    results = pq.read_table(study["dir"] / "results" / "results.parquet").to_pylist()
    ft = [r for r in results if r["stage"] == "finetune"]
    uniform = [r for r in ft if r["searcher"] == "uniform"]
    limpq = [r for r in ft if r["searcher"] == "limpq"]
    assert len(limpq) >= 3 and len(uniform) >= 3
    wins = [u for u in uniform if any(l["bitops"] <= u["bitops"] and l["top1"] >= u["top1"] for l in limpq)]
    table = sorted((r["searcher"], r["bitops"], round(r["top1"], 4)) for r in ft)
    assert len(wins) >= 3, table


def test_rerun_only_resumes(study):
    d: Path = study["dir"]
    before_rows = pq.read_table(d / "results" / "results.parquet").num_rows
    before_runs = len(_mlflow_runs(d))
    third = subprocess.run(_cli(d), cwd=ROOT, env=study["env"], capture_output=True, text=True, timeout=600)
    assert third.returncode == 0, third.stderr[-3000:]
    for stage in ("pretrain", "indicators", "search", "select", "finetune", "ptq"):
        assert f"[{stage}] done already, skipped" in third.stdout, third.stdout
    assert pq.read_table(d / "results" / "results.parquet").num_rows == before_rows
    assert len(_mlflow_runs(d)) == before_runs
