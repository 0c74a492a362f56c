"""The finetune sweep on a real local Ray: DDP trials that schedule (issue: the trial used to reserve
the workers' CPUs and then wait for its own Train worker group forever), the LR chosen on a holdout of
the train split, and ASHA that stops a trial only against the same policy's other LRs and records
what the trial really trained."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from orchestrator.results import chosen_results, read_results

pytestmark = [pytest.mark.ray, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
DEFAULT = str(ROOT / "configs" / "default.yaml")
# The reproduction: two DDP workers for every training run, one policy, one finetune epoch.
TINY = ["resources.num_workers=2", "pretrain.epochs=1", "indicators.epochs=1", "select.max_policies=1",
        "select.include_uniform=false", "mixquant.enabled=false", "finetune.epochs=1", "search.bitops=[w4a4]",
        "search.compression_ratio=[none]", "search.alpha=[2.0]", "finetune.bn_recalib_batches=2"]


def _run(study_dir: Path, tmp: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["HOME"] = str(tmp / "home")
    cmd = [sys.executable, "-m", "orchestrator.cli", "run", DEFAULT, f"study.dir={study_dir}", *TINY, *extra]
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def ddp_study(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp")
    _run(tmp / "s", tmp, "resources.num_cpus=3")
    return tmp


def _finetune_rows(study_dir: Path) -> list[dict]:
    return [r for r in read_results(study_dir / "results" / "results.parquet") if r["stage"] == "finetune"]


def test_ddp_finetune_trials_finish_on_three_cpus(ddp_study):
    (row,) = _finetune_rows(ddp_study / "s")
    assert row["status"] == "complete" and row["epochs"] == row["budget_epochs"] == 1
    assert 0.0 <= row["top1"] <= 1.0 and 0.0 <= row["val_top1"] <= 1.0
    assert row["val_split"].startswith("0.1 of train (n=400, seed 0)")  # 10 % of MNIST 5k's 4,000 train images


def test_ddp_finetune_trials_finish_on_two_cpus(ddp_study, tmp_path):
    """All of a 2-CPU machine goes to the two DDP workers; the trial driver holds no CPU."""
    study = tmp_path / "s"
    shutil.copytree(ddp_study / "s", study, ignore=shutil.ignore_patterns("ray_tmp*", "session_*"))
    shutil.rmtree(study / "results")
    for d in (study / "ray").glob("finetune-*"):
        shutil.rmtree(d)
    out = _run(study, tmp_path, "resources.num_cpus=2")
    assert "[finetune] running" in out.stdout and "[pretrain] done already" in out.stdout
    (row,) = _finetune_rows(study)
    assert row["status"] == "complete" and row["top1"] is not None


def test_asha_stops_within_a_policy_and_records_what_was_trained(ddp_study):
    """A diverging LR (50) is stopped by ASHA after one epoch against the same policy's sane LR; its row
    says 'stopped' with the one epoch it trained, has no evaluation-split accuracy, is never chosen,
    and a rerun does not train it again."""
    study = ddp_study / "s"
    asha = ["resources.num_cpus=2", "resources.num_workers=1", "finetune.epochs=3", "finetune.asha=true",
            "finetune.lr_grid=[50.0]", "finetune.max_concurrent_trials=1"]
    _run(study, ddp_study, *asha)
    rows = {r["lr"]: r for r in _finetune_rows(study)}
    assert rows[0.01]["status"] == "complete" and rows[0.01]["epochs"] == 3 and rows[0.01]["top1"] is not None
    stopped = rows[50.0]
    assert stopped["status"] == "stopped" and stopped["epochs"] == 1 and stopped["budget_epochs"] == 3
    assert stopped["top1"] is None and stopped["val_top1"] < rows[0.01]["val_top1"]
    assert [r["lr"] for r in chosen_results(rows.values())] == [0.01]
    again = _run(study, ddp_study, *asha)
    assert "[finetune] done already, skipped" in again.stdout


def test_policy_asha_never_compares_across_policies(tmp_path):
    """Two policies, two LRs each; policy B scores far below A by design (a cheaper policy). One shared
    ASHA bracket stops B's trials for that; PolicyASHA stops only the worse LR of each policy."""
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    from orchestrator.policy_asha import PolicyASHA

    score = {("A", 1): 0.90, ("A", 2): 0.80, ("B", 1): 0.40, ("B", 2): 0.30}

    def trainable(config):
        for epoch in range(1, 5):
            tune.report({"val_top1": score[(config["policy_id"], config["lr"])] + 0.01 * epoch,
                         "training_iteration_epochs": epoch})

    def stopped_early(scheduler, name):
        tuner = tune.Tuner(trainable, param_space={"policy_id": tune.grid_search(["A", "B"]),
                                                   "lr": tune.grid_search([1, 2])},
                           tune_config=tune.TuneConfig(scheduler=scheduler, max_concurrent_trials=1),
                           run_config=tune.RunConfig(name=name, storage_path=str(tmp_path), verbose=0))
        return {(r.config["policy_id"], r.config["lr"]) for r in tuner.fit()
                if r.metrics["training_iteration_epochs"] < 4}

    import tempfile

    # A short session path: Ray's sockets must fit in 107 bytes.
    ray.init(num_cpus=1, include_dashboard=False, _temp_dir=tempfile.mkdtemp(prefix="mpqr"))
    try:
        shared = stopped_early(ASHAScheduler(time_attr="training_iteration_epochs", metric="val_top1", mode="max",
                                             max_t=4, grace_period=1, reduction_factor=2), "shared")
        per_policy = stopped_early(PolicyASHA(max_t=4, grace_period=1, reduction_factor=2), "per_policy")
    finally:
        ray.shutdown()
    assert ("B", 1) in shared  # the bias: a good LR of a cheap policy pruned for the policy's cost
    assert per_policy == {("A", 2), ("B", 2)}
