"""MixQuant (QE table, pick rule, Parquet cache, QEM sweep) and the uniform / random baselines.
Pure unit tests: no Ray; the weights are a small CNN briefly trained on sklearn's digits."""
import math

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from torch import nn

from orchestrator.baselines import (
    Budget,
    budgets_from_rows,
    random_policies,
    random_policy,
    run_baselines,
    uniform_policies,
)
from orchestrator.config import BaselinesCfg, MixQuantCfg
from orchestrator.errors import UserError
from orchestrator.mixquant import CACHE_NAME, QeTable, load_or_compute_qe_table, mixquant_sweep, run_mixquant
from orchestrator.search_rows import ModelCosts, rows_to_table
from workloads.data import load_data
from workloads.models import build_model
from workloads.quant.ptq import QE_BITS, mixquant_bits, qe_table, quant_error

QEMS = [0.5, 1, 1.5, 2, 3, 4, 8, 16, 32, 64, 128, 256, 1024, 1e5]


@pytest.fixture(scope="module")
def trained():
    """small_cnn after two quick epochs on digits (real, non-random weights) and its cost model."""
    torch.manual_seed(0)
    data = load_data("digits", val_fraction=0.2, seed=0)
    model = build_model("small_cnn", 10, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    loader = torch.utils.data.DataLoader(data.train, batch_size=64, shuffle=True,
                                         generator=torch.Generator().manual_seed(0))
    model.train()
    for _ in range(2):
        for x, y in loader:
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    model.eval()
    return model, ModelCosts.from_model(model, data.input_shape)


# ------------------------------------------------------------------------------ QE table
def test_qe_decreases_with_bits_on_trained_weights(trained):
    model, costs = trained
    table = qe_table(model, costs.layers)
    assert list(table) == list(costs.layers)
    for name, qe in table.items():
        assert list(qe) == list(QE_BITS)
        errs = [qe[b] for b in sorted(qe)]  # 2..8
        assert all(a > b > 0 for a, b in zip(errs, errs[1:])), (name, errs)
        # 6 bits fewer is a 64x coarser grid: the error grows by well over an order of magnitude
        assert qe[2] > 100 * qe[8]
        w = dict(model.named_modules())[name].weight.detach()
        assert qe[4] == pytest.approx(quant_error(w, 4), rel=1e-6)


def test_pick_rule_on_hand_made_table():
    table = {"a": {8: 1.0, 7: 2.0, 6: 4.0, 5: 9.0, 4: 20.0, 3: 50.0, 2: 200.0},
             # not monotone: 5 bits happen to fit a QEM that 6 and 7 bits do not
             "b": {8: 2.0, 7: 30.0, 6: 30.0, 5: 3.0, 4: 400.0, 3: 500.0, 2: 600.0}}
    assert mixquant_bits(table, 1.0) == {"a": 8, "b": 8}
    assert mixquant_bits(table, 0.5) == {"a": 8, "b": 8}          # nothing fits: stay at 8
    assert mixquant_bits(table, 2.0) == {"a": 7, "b": 5}          # boundary QE_b == QEM * QE_8 counts
    assert mixquant_bits(table, 9.0) == {"a": 5, "b": 5}
    assert mixquant_bits(table, 50.0) == {"a": 3, "b": 5}
    assert mixquant_bits(table, 300.0) == {"a": 2, "b": 2}
    with pytest.raises(ValueError):
        mixquant_bits(table, -1.0)


def test_sweep_rows_from_hand_made_table():
    costs = ModelCosts(("a", "b"), (100, 10), (5, 7), fixed_bitops=640, fixed_size=80, fp_size_bits=32 * 22)
    qe = {"a": {8: 1.0, 7: 2.0, 6: 4.0, 5: 9.0, 4: 20.0, 3: 50.0, 2: 200.0},
          "b": {8: 1.0, 7: 100.0, 6: 200.0, 5: 300.0, 4: 400.0, 3: 500.0, 2: 600.0}}
    table = QeTable(qe, QE_BITS, "fp", 0.0)
    out = mixquant_sweep(table, costs, [4, 4.0, 1000], act_bits=6)
    assert len(out.rows) == 2  # 4 and 4.0 are one point
    r4, r1000 = out.rows
    assert (r4["w_bits"], r4["a_bits"], r4["qem"]) == ([6, 8], [6, 6], 4.0)
    assert r4["bitops"] == 640 + 100 * 6 * 6 + 10 * 8 * 6
    assert r4["size_bits"] == 80 + 5 * 6 + 7 * 8
    assert r4["objective"] == pytest.approx((4.0 + 1.0) / 2)
    assert (r4["searcher"], r4["status"], r4["alpha"], r4["bitops_budget"]) == ("mixquant", "optimal", None, None)
    assert r1000["w_bits"] == [2, 2]
    assert set(out.policies) == {r4["policy_id"], r1000["policy_id"]}
    with pytest.raises(UserError):
        mixquant_sweep(table, costs, [0.0], act_bits=8)
    with pytest.raises(UserError):
        mixquant_sweep(QeTable({"b": qe["b"], "a": qe["a"]}, QE_BITS, "fp", 0.0), costs, [1.0], 8)


def test_qe_cache_hit_and_miss_when_weights_change(trained, tmp_path):
    model, costs = trained
    model = type(model)()  # a private copy we may modify
    model.load_state_dict(trained[0].state_dict())
    path = tmp_path / CACHE_NAME
    first = load_or_compute_qe_table(model, costs.layers, path)
    assert not first.from_cache and path.exists()
    meta = pq.read_table(path).schema.metadata
    assert meta[b"mpq.fingerprint"].decode() == first.fingerprint
    second = load_or_compute_qe_table(model, costs.layers, path)
    assert second.from_cache and second.qe == first.qe and second.layers == first.layers
    # other bits: a different table, recomputed
    assert not load_or_compute_qe_table(model, costs.layers, path, bits=(8, 4, 2)).from_cache
    assert load_or_compute_qe_table(model, costs.layers, path, bits=(8, 4, 2)).from_cache
    # changed weights: miss, new values, and the cache now holds the new table
    with torch.no_grad():
        dict(model.named_modules())[costs.layers[0]].weight.mul_(1.5)
    third = load_or_compute_qe_table(model, costs.layers, path)
    assert not third.from_cache and third.fingerprint != first.fingerprint
    assert third.qe[costs.layers[0]][8] == pytest.approx(first.qe[costs.layers[0]][8] * 1.5**2, rel=1e-3)
    assert load_or_compute_qe_table(model, costs.layers, path).from_cache
    # a corrupt cache is recomputed, not an error
    path.write_bytes(b"not parquet")
    assert not load_or_compute_qe_table(model, costs.layers, path).from_cache
    with pytest.raises(UserError):
        load_or_compute_qe_table(model, costs.layers, None, bits=(7, 6))


def test_larger_qem_never_raises_bits(trained):
    model, costs = trained
    table = load_or_compute_qe_table(model, costs.layers, None)
    out = mixquant_sweep(table, costs, QEMS, act_bits=8)
    assert [r["qem"] for r in out.rows] == [float(q) for q in QEMS]
    for lo, hi in zip(out.rows, out.rows[1:]):
        assert all(b_hi <= b_lo for b_lo, b_hi in zip(lo["w_bits"], hi["w_bits"])), (lo["qem"], hi["qem"])
        assert hi["bitops"] <= lo["bitops"] and hi["size_bits"] <= lo["size_bits"]
        assert hi["objective"] >= lo["objective"]
    assert out.rows[0]["w_bits"] == [8] * len(costs.layers)   # QEM < 1: nothing beats QE_8
    assert out.rows[-1]["w_bits"] == [2] * len(costs.layers)  # a huge QEM allows 2 bits everywhere
    assert len({tuple(r["w_bits"]) for r in out.rows}) >= 4    # the sweep really trades bits


def test_run_mixquant_writes_cache_and_schema_rows(trained, tmp_path):
    model, costs = trained
    out = run_mixquant(model, costs, MixQuantCfg(qem=[1.0, 2.0, 2, 16.0], act_bits=6), tmp_path)
    assert (tmp_path / CACHE_NAME).exists() and not out.qe_table.from_cache
    assert len(out.rows) == 3 and all(r["a_bits"] == [6] * len(costs.layers) for r in out.rows)
    again = run_mixquant(model, costs, {"qem": [4.0], "act_bits": 8}, tmp_path)
    assert again.qe_table.from_cache
    t = rows_to_table(out.rows + again.rows)
    assert t.column("qem").to_pylist() == [1.0, 2.0, 16.0, 4.0]
    assert t.column("searcher").to_pylist() == ["mixquant"] * 4


# ------------------------------------------------------------------------------ baselines
def _slots_maximal(costs: ModelCosts, budget: Budget, w, a, cands) -> bool:
    """No single weight or activation slot can go one candidate step up and still fit."""
    c = sorted(cands)
    for kind in ("w", "a"):
        for l in range(len(w)):
            bits = list(w if kind == "w" else a)
            i = c.index(bits[l])
            if i == len(c) - 1:
                continue
            bits[l] = c[i + 1]
            w2, a2 = (bits, a) if kind == "w" else (w, bits)
            if budget.fits(costs.bitops(w2, a2), costs.size_bits(w2)):
                return False
    return True


def test_uniform_rows(trained):
    _, costs = trained
    out = uniform_policies(costs, [[2, 2], [4, 4], [4, 4], [8, 4]])
    assert [r["bits"] for r in out.rows] == ["w2a2", "w4a4", "w8a4"]
    n = len(costs.layers)
    for r, (w, a) in zip(out.rows, [(2, 2), (4, 4), (8, 4)]):
        assert r["w_bits"] == [w] * n and r["a_bits"] == [a] * n
        assert r["bitops"] == costs.uniform_bitops(w, a)
        assert r["size_bits"] == costs.size_bits([w] * n)
        assert (r["searcher"], r["status"], r["objective"]) == ("uniform", "optimal", None)
    with pytest.raises(UserError):
        uniform_policies(costs, [[4]])


def test_random_policies_fit_are_maximal_and_reproducible(trained):
    _, costs = trained
    cands = [6, 5, 4, 3, 2]
    n = len(costs.layers)
    budgets = [Budget(bitops=float(costs.uniform_bitops(3, 3))),
               Budget(bitops=float(costs.uniform_bitops(5, 4))),
               Budget(size_bits=costs.size_budget(10.0), compression_ratio=10.0),
               Budget(bitops=float(costs.uniform_bitops(4, 4)), size_bits=costs.size_budget(8.0)),
               Budget()]
    out = random_policies(costs, budgets, cands, per_budget=3, seed=7)
    assert len(out.rows) == 15 and all(r["status"] == "optimal" for r in out.rows)
    for i, r in enumerate(out.rows):
        b = budgets[i // 3]
        assert b.fits(r["bitops"], r["size_bits"])
        assert set(r["w_bits"]) | set(r["a_bits"]) <= set(cands)
        assert _slots_maximal(costs, b, r["w_bits"], r["a_bits"], cands)
        assert (r["bitops_budget"], r["size_budget"]) == (b.bitops, b.size_bits)
    assert out.rows[-1]["w_bits"] == [6] * n  # no budget: everything at the top candidate
    # draws differ between indices of one budget (it is random), and replay exactly from the seed
    assert len({tuple(r["w_bits"] + r["a_bits"]) for r in out.rows[3:6]}) > 1
    again = random_policies(costs, budgets, list(reversed(cands)), per_budget=3, seed=7)
    assert [r["policy_id"] for r in again.rows] == [r["policy_id"] for r in out.rows]
    assert [r["point_id"] for r in again.rows] == [r["point_id"] for r in out.rows]
    # a policy does not depend on which other budgets were drawn alongside it
    alone = random_policies(costs, budgets[1:2], cands, per_budget=3, seed=7)
    assert [r["policy_id"] for r in alone.rows] == [r["policy_id"] for r in out.rows[3:6]]
    other = random_policies(costs, budgets, cands, per_budget=3, seed=8)
    assert [r["policy_id"] for r in other.rows] != [r["policy_id"] for r in out.rows]


def test_random_policy_below_the_lowest_policy_is_infeasible(trained):
    _, costs = trained
    lowest = float(costs.uniform_bitops(2, 2))
    rng = np.random.default_rng(0)
    assert random_policy(costs, Budget(bitops=lowest - 1), [2, 4], rng) is None
    # exactly the lowest policy's cost fits, and nothing can be raised
    w, a = random_policy(costs, Budget(bitops=lowest), [2, 4], rng)
    assert w == a == [2] * len(costs.layers)
    out = random_policies(costs, [Budget(bitops=lowest - 1),
                                  Budget(size_bits=costs.size_bits([2] * len(costs.layers)) - 1)],
                          [2, 3, 4], seed=0)
    assert [r["status"] for r in out.rows] == ["infeasible", "infeasible"]
    assert all(r["policy_id"] is None and r["bitops"] is None and r["reason"] for r in out.rows)
    assert out.policies == {}
    rows_to_table(out.rows)  # nulls fit the schema


def test_budgets_from_rows_and_run_baselines(trained):
    _, costs = trained
    rows = [{"searcher": "limpq", "status": "optimal", "bitops_budget": float(b), "size_budget": None,
             "compression_ratio_budget": None} for b in (300, 100, 200, 200, 500, 400)]
    rows += [{"searcher": "limpq", "status": "infeasible", "bitops_budget": 1.0, "size_budget": None},
             {"searcher": "mixquant", "status": "optimal", "bitops_budget": None, "size_budget": None}]
    assert [b.bitops for b in budgets_from_rows(rows, 10)] == [100, 200, 300, 400, 500]
    assert [b.bitops for b in budgets_from_rows(rows, 3)] == [100, 300, 500]
    assert budgets_from_rows(rows, 0) == []
    ref = [{"searcher": "limpq", "status": "optimal", "bitops_budget": float(costs.uniform_bitops(w, w)),
            "size_budget": None} for w in (3, 4, 5)]
    out = run_baselines(costs, BaselinesCfg(uniform=[[4, 4]], random_per_budget=2, max_random_budgets=2),
                        [6, 5, 4, 3, 2], ref, seed=1)
    assert [r["searcher"] for r in out.rows] == ["uniform"] + ["random"] * 4
    assert [r["bitops_budget"] for r in out.rows[1:]] == [ref[0]["bitops_budget"]] * 2 + [ref[2]["bitops_budget"]] * 2
    assert all(r["bitops"] <= r["bitops_budget"] for r in out.rows[1:])
    assert not math.isnan(rows_to_table(out.rows).column("bitops").to_pylist()[0])
