"""The LIMPQ search grid: budget specs, grid building, and the fan-out on a real local Ray (2 CPUs)
with the real CBC solver and real Parquet parts: identical to a serial loop and to solving each point
on its own, resumable without duplicates, surviving a killed worker, and 10,000 points.

The instance is a small slice of LIMPQ's published ResNet-50 indicators (first searchable layers,
smaller fc) so every CBC solve takes milliseconds."""
from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import ray

from orchestrator.budget_specs import Uniform, parse_spec
from orchestrator.config import SearchCfg
from orchestrator.errors import UserError
from orchestrator.grid import (
    KILL_ENV,
    POINTS_DIR,
    POLICIES_FILE,
    auto_batch_size,
    build_grid,
    run_grid,
)
from orchestrator.ilp import LimpqIlp
from orchestrator.indicators import Indicators
from orchestrator.search_rows import ModelCosts
from orchestrator.search_table import SCHEMA, part_files, read_search_table, write_part

REF = Path(__file__).resolve().parents[2] / "shared" / "reference" / "limpq_resnet50.json"


def small_indicators(n_layers: int = 6) -> Indicators:
    if not REF.exists():
        pytest.skip(f"{REF} not present")
    d = json.loads(REF.read_text())
    d["layers"] = d["layers"][:n_layers]
    d["fixed_layers"]["fc"]["params"] = 20480  # keep size budgets meaningful for the slice
    return Indicators.from_json_dict(d, "limpq_macs")


def _strip(rows):
    return [{k: v for k, v in r.items() if k != "solve_seconds"} for r in rows]


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False)
    yield
    ray.shutdown()


# ------------------------------------------------------------------------------ specs (no Ray)
def test_uniform_range_hits_uniform_points_and_labels():
    vals = parse_spec("w2a2..w6a6:25")
    assert len(vals) == 25 and vals[0] == Uniform(2, 2) and vals[-1] == Uniform(6, 6)
    for b in (3, 4, 5):  # exactly on the grid, so "w4a4" and the range give the same point
        assert Uniform(b, b) in vals
    assert vals[3].label == "w2.5a2.5" and Uniform(4, 4).label == "w4a4"
    assert parse_spec("1e9..5e9:5") == [1e9, 2e9, 3e9, 4e9, 5e9]
    assert parse_spec("4..16:7", uniform=False) == [4, 6, 8, 10, 12, 14, 16]
    assert parse_spec("none") == [None] and parse_spec("5.6e10") == [5.6e10]


@pytest.mark.parametrize("spec", ["w4x4", "1..2", "1..2:1", "1..2:x", "-3", "0", "w0a4", "1..w4a4:3", "", "nan"])
def test_bad_spec_is_one_user_error_naming_it(spec):
    with pytest.raises(UserError) as e:
        parse_spec(spec)
    assert repr(spec) in str(e.value)


def test_uniform_cr_ratio_specs_resolve_and_grid_is_the_product():
    ind = small_indicators()
    costs = ModelCosts.from_indicators(ind)
    cfg = SearchCfg(alpha=[1.0, 2.0, 2], bitops=["w4a4", "w2a2..w6a6:5", "5.6e9"], compression_ratio=["8", "none"],
                    bits=[[6, 5, 4, 3, 2], [4, 3, 2]])
    g = build_grid(ind, cfg)
    # 2 alphas (2 and 2.0 are one) x 2 bit lists x 6 BitOps (w4a4 is in the range) x 2 ratios
    assert len(g.points) == 2 * 2 * 6 * 2 == len({p.point_id for p in g.points})
    w4 = [p for p in g.points if p.bitops_label == "w4a4"]
    assert w4 and all(p.bitops_budget == costs.uniform_bitops(4, 4) for p in w4)
    assert {p.size_budget for p in g.points} == {costs.size_budget(8.0), None}
    w3 = next(p for p in g.points if p.bitops_label == "w3a3")
    assert w3.bitops_budget == costs.fixed_bitops + sum(costs.macs) * 9
    # ids are stable across builds and change with the indicators
    assert [p.point_id for p in build_grid(ind, cfg).points] == [p.point_id for p in g.points]
    other = small_indicators(5)
    assert not {p.point_id for p in build_grid(other, cfg).points} & {p.point_id for p in g.points}


def test_none_specs_give_single_constraint_points():
    g = build_grid(small_indicators(), SearchCfg(bitops=["none", "w4a4"], compression_ratio=["none", "8"]))
    assert sorted((p.bitops_label or "-", p.compression_ratio_budget or 0) for p in g.points) == \
        [("-", 8.0), ("w4a4", 0), ("w4a4", 8.0)]


@pytest.mark.parametrize("cfg,match", [
    (SearchCfg(), "grid is empty"),
    (SearchCfg(bitops=["none"], compression_ratio=["none"]), "no point with a budget"),
    (SearchCfg(bitops=["w4a4"], alpha=[-1.0]), "alpha"),
    (SearchCfg(bitops=["w4a4"], bits=[[8, 4]]), "no indicators"),
    (SearchCfg(bitops=["w4a4"], latency=["3"]), "latency table"),
])
def test_bad_grid_is_one_user_error(cfg, match):
    with pytest.raises(UserError, match=match):
        build_grid(small_indicators(), cfg)


def test_auto_batch_size():
    assert auto_batch_size(1000, 2) == 63 and auto_batch_size(10, 2) == 4 and auto_batch_size(10**6, 2) == 512


# --------------------------------------------------------------------------------- on Ray
GRID = SearchCfg(alpha=[1.0, 3.0], bitops=["w2a2..w6a6:9", "1e3"], compression_ratio=["none", "5..12:4"],
                 bits=[[6, 5, 4, 3, 2], [6, 4, 2]], batch_size=8)


def test_ray_equals_serial_and_each_point_alone(local_ray, tmp_path):
    ind = small_indicators()
    on_ray = run_grid(ind, GRID, tmp_path / "ray", use_ray=True, progress=False)
    serial = run_grid(ind, GRID, tmp_path / "serial", use_ray=False, progress=False)
    assert on_ray.n_points == 2 * 2 * 10 * 5 == len(on_ray.rows)
    assert len(on_ray.workers) == 2  # the batches really ran in two worker processes
    assert _strip(on_ray.rows) == _strip(serial.rows)
    statuses = {r["status"] for r in on_ray.rows}
    assert statuses == {"optimal", "infeasible"}
    below = [r for r in on_ray.rows if r["bitops_label"] == "1000"]
    assert below and all(r["status"] == "infeasible" and "below the minimum" in r["reason"] for r in below)
    # every point equals a fresh ILP solved for that point alone (no batching, no proof reuse)
    ilps = {}
    for r in on_ray.rows:
        key = (r["alpha"], r["bits"])
        if key not in ilps:
            ilps[key] = LimpqIlp(ind, alpha=r["alpha"], bits=[int(b) for b in r["bits"].split(",")])
        alone = ilps[key].solve_many([_budgets(r)], reuse=False)[0]
        assert alone.status == r["status"], r
        if alone.status == "optimal":
            assert math.isclose(alone.objective, r["objective"], rel_tol=1e-9)
            assert (alone.w_bits, alone.a_bits) == (r["w_bits"], r["a_bits"])
            assert alone.policy_id == r["policy_id"]
    # the table on disk holds the same rows; the policies table one row per distinct policy
    on_disk = {r["point_id"]: r for r in read_search_table(tmp_path / "ray" / POINTS_DIR)}
    assert _strip(on_disk[r["point_id"]] for r in on_ray.rows) == _strip(on_ray.rows)
    pol = pq.read_table(tmp_path / "ray" / POLICIES_FILE).to_pylist()
    ids = {r["policy_id"] for r in on_ray.rows if r["status"] == "optimal"}
    assert sorted(p["policy_id"] for p in pol) == sorted(ids) == sorted(set(p["policy_id"] for p in pol))
    assert sum(p["n_points"] for p in pol) == on_ray.count("optimal")
    assert pq.read_schema(part_files(tmp_path / "ray" / POINTS_DIR)[0]).names == SCHEMA.names


def _budgets(r):
    from orchestrator.ilp import Budgets
    return Budgets(r["bitops_budget"], r["size_budget"], r["latency_budget"])


def test_resume_solves_only_new_points_and_never_duplicates(local_ray, tmp_path):
    ind = small_indicators()
    out = tmp_path / "grid"
    part = SearchCfg(alpha=[2.0], bitops=["w2a2..w6a6:9"], compression_ratio=["none", "8"], batch_size=4)
    first = run_grid(ind, part, out, progress=False)
    assert first.n_solved == first.n_points == 18 and first.n_resumed == 0
    again = run_grid(ind, part, out, progress=False)
    assert again.n_solved == 0 and again.n_resumed == 18 and again.n_batches == 0
    assert _strip(again.rows) == _strip(first.rows)
    # a bigger grid resumes the 18 finished points; a point that ended in error is solved again
    victim = first.rows[5]
    write_part(out / POINTS_DIR, [dict(victim, status="error", reason="simulated", w_bits=None, a_bits=None,
                                       policy_id=None, objective=None)])
    bigger = SearchCfg(alpha=[2.0], bitops=["w2a2..w6a6:9", "w2a2..w6a6:5"], compression_ratio=["none", "8", "10"],
                       batch_size=4)
    third = run_grid(ind, bigger, out, progress=False)
    assert third.n_points == 27 and third.n_resumed == 17 and third.n_solved == 10
    rows = read_search_table(out / POINTS_DIR)
    assert len(rows) == len({r["point_id"] for r in rows}) == 27
    assert next(r for r in rows if r["point_id"] == victim["point_id"])["status"] == victim["status"]
    assert len(part_files(out / POINTS_DIR)) == 1  # compacted after the run


def test_killed_task_is_retried_and_table_complete(local_ray, tmp_path, monkeypatch):
    ind = small_indicators()
    marker = tmp_path / "killed-once"
    monkeypatch.setenv(KILL_ENV, str(marker))
    res = run_grid(ind, GRID, tmp_path / "grid", use_ray=True, progress=False)
    monkeypatch.delenv(KILL_ENV)
    assert marker.exists()  # one task did kill its worker process
    assert res.count("error") == 0 and len(res.rows) == res.n_points == res.n_solved
    serial = run_grid(ind, GRID, tmp_path / "serial", use_ray=False, progress=False)
    assert _strip(res.rows) == _strip(serial.rows)
    assert len(read_search_table(tmp_path / "grid" / POINTS_DIR)) == res.n_points


def test_ten_thousand_points(local_ray, tmp_path):
    ind = small_indicators(3)
    costs = ModelCosts.from_indicators(ind)
    lo, hi = costs.uniform_bitops(2, 2) * 0.95, costs.uniform_bitops(6, 6)
    cfg = SearchCfg(alpha=[2.0], bitops=[f"{lo!r}..{hi!r}:100"], compression_ratio=["4..15:100"])
    res = run_grid(ind, cfg, tmp_path / "grid", use_ray=True, progress=False)
    assert res.n_points == len(res.rows) == 10_000 and res.n_solved == 10_000
    assert res.count("optimal") + res.count("infeasible") == 10_000 and res.count("optimal") > 1000
    rows = read_search_table(tmp_path / "grid" / POINTS_DIR)
    assert len({r["point_id"] for r in rows}) == len(rows) == 10_000
    pol = pq.read_table(tmp_path / "grid" / POLICIES_FILE)
    assert pol.num_rows == len({r["policy_id"] for r in res.rows if r["policy_id"]}) == res.n_policies
    ilp = LimpqIlp(ind, alpha=2.0)
    for r in random.Random(0).sample(res.rows, 25):  # spot-check against points solved alone
        alone = ilp.solve_many([_budgets(r)], reuse=False)[0]
        assert alone.status == r["status"]
        assert (alone.w_bits, alone.a_bits) == ((r["w_bits"] or []), (r["a_bits"] or []))
    again = run_grid(ind, cfg, tmp_path / "grid", use_ray=True, progress=False)
    assert again.n_solved == 0 and again.n_resumed == 10_000


def test_latency_budgets_and_bounds_reach_the_ilp(tmp_path):
    from orchestrator.ilp import LatencyTable

    ind = small_indicators(4)
    lat = tmp_path / "lat.csv"
    lines = ["layer,w_bits,a_bits,cost"] + [f"{l.name},{w},{a},{(l.macs * w * a) / 1e9:.6f}"
                                            for l in ind.layers for w in ind.bits for a in ind.bits]
    lat.write_text("\n".join(lines) + "\n")
    bounds = tmp_path / "bounds.json"
    bounds.write_text(json.dumps({ind.layers[0].name: {"w_min": 5, "a_min": 5}}))
    cfg = SearchCfg(alpha=[2.0], latency=["0.5..3:6", "none"], compression_ratio=["6", "none"],
                    latency_table=str(lat), bounds=str(bounds))
    res = run_grid(ind, cfg, tmp_path / "grid", use_ray=False, progress=False)
    assert res.n_points == 7 * 2 - 1  # (latency none, cr none) is no point
    table = LatencyTable.load(lat)
    ilp = LimpqIlp(ind, alpha=2.0, latency_table=table, bounds=json.loads(bounds.read_text()))
    for r in res.rows:
        alone = ilp.solve_many([_budgets(r)], reuse=False)[0]
        assert alone.status == r["status"] and alone.w_bits == (r["w_bits"] or [])
        if r["status"] == "optimal":
            assert r["latency"] <= (r["latency_budget"] or math.inf) + 1e-9
            assert r["w_bits"][0] >= 5 and r["a_bits"][0] >= 5 and r["latency"] == pytest.approx(alone.latency)
    assert {r["status"] for r in res.rows} == {"optimal", "infeasible"}
