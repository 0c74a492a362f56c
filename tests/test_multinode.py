"""Multi-node simulation with ray.cluster_utils.Cluster: a head and two worker nodes of one CPU each.
Grid tasks spread over the nodes, and removing a node in the middle of a grid loses no point (its
tasks are retried elsewhere); 2-rank indicator training must place its two 1-CPU workers on two
different nodes and still keeps the ranks bit-identical."""
from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
import ray
import torch
from ray.cluster_utils import Cluster

from orchestrator.config import load_config
from orchestrator.grid import run_grid
from orchestrator.indicators import Indicators
from orchestrator.paths import StudyPaths
from orchestrator.search_table import part_files, read_search_table
from orchestrator.training import run_indicators
from workloads.models import build_model

pytestmark = [pytest.mark.ray, pytest.mark.slow]

REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference" / "limpq_resnet50.json"


@pytest.fixture(scope="module")
def cluster():
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    workers = [c.add_node(num_cpus=1) for _ in range(2)]
    c.wait_for_nodes()
    ray.init(address=c.address)
    yield c, workers
    ray.shutdown()
    c.shutdown()


def _search_cfg(**kw):
    over = [f"search.{k}={v}" for k, v in kw.items()]
    return load_config(None, ["indicators.bits=[6,5,4,3,2]", *over]).search


@pytest.mark.skipif(not REFERENCE.exists(), reason="shared/reference not present")
def test_grid_spreads_over_nodes_and_survives_losing_one(cluster, tmp_path):
    c, workers = cluster
    ind = Indicators.load(REFERENCE, "limpq_macs")
    cfg = _search_cfg(bitops="[w2a2..w6a6:60]", compression_ratio="[none,6,8,10,12]", alpha="[1.0,2.0]",
                      batch_size=8)
    serial = run_grid(ind, cfg, tmp_path / "serial", use_ray=False, progress=False)

    # 1. With one CPU per node, two tasks in flight can only run on two nodes.
    spread = run_grid(ind, cfg, tmp_path / "spread", use_ray=True, progress=False)
    assert len(spread.nodes) == 2, f"grid tasks ran on {len(spread.nodes)} node(s)"

    # 2. Remove a node once the grid is under way: its tasks are retried on the other one.
    out = tmp_path / "ray"
    removed = threading.Event()

    def remove_when_started() -> None:
        deadline = time.time() + 120
        while time.time() < deadline and len(part_files(out / "points")) < 2:
            time.sleep(0.05)
        c.remove_node(workers[1])
        removed.set()

    t = threading.Thread(target=remove_when_started)
    t.start()
    try:
        run = run_grid(ind, cfg, out, use_ray=True, progress=False)
    finally:
        t.join()
        workers[1] = c.add_node(num_cpus=1)  # the next test needs two nodes again
        c.wait_for_nodes()
    assert removed.is_set()
    for r_ in (spread, run):
        assert r_.n_points == serial.n_points == 600
        assert r_.count("error") == 0, [r["reason"] for r in r_.rows if r["status"] == "error"][:3]
    rows = {r["point_id"]: r for r in read_search_table(out / "points")}
    assert len(rows) == 600
    for r in serial.rows:
        got = rows[r["point_id"]]
        assert (got["status"], got["policy_id"]) == (r["status"], r["policy_id"])


def test_indicator_workers_on_two_nodes_stay_identical(cluster, tmp_path):
    alive = [n for n in ray.nodes() if n["Alive"] and n["Resources"].get("CPU", 0) > 0]
    assert len(alive) == 2 and all(n["Resources"]["CPU"] == 1 for n in alive)  # 1-CPU ranks cannot share
    torch.manual_seed(0)
    fp = tmp_path / "fp.pt"
    torch.save({"model": build_model("small_cnn", 10, 1).state_dict()}, fp)
    cfg = load_config(None, [f"study.dir={tmp_path / 'study'}", "data.name=digits", "data.batch_size=32",
                             "indicators.bits=[6,4,2]", "indicators.epochs=1", "search.bitops=[w4a4]",
                             "baselines.uniform=[[4,4]]", "resources.num_workers=2", "resources.cpus_per_worker=1"])
    res = run_indicators(cfg, StudyPaths(cfg.study_dir), fp, trace_dir=tmp_path / "trace")
    t0, t1 = ([json.loads(x) for x in (tmp_path / "trace" / f"rank{r}.jsonl").read_text().splitlines()]
              for r in (0, 1))
    assert res.steps > 0 and len(t0) == len(t1)
    assert [x["checksum"] for x in t0] == [x["checksum"] for x in t1]
