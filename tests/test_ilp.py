"""LIMPQ's ILP (orchestrator.ilp): the published ResNet-50 policy, optimality against an independent
solver (HiGHS through scipy) with exact MACs from our cost model, equality with brute force on
random small instances (outlier rule, bounds, latency tables, infeasible points) through every
solving path (enumeration with and without the Lagrangian bound, CBC on the full model, CBC as the
fallback), batches equal to single solves, and one-line errors for bad input. Real CBC, no mocks."""
from __future__ import annotations

import json
import math
import random
from pathlib import Path

import numpy as np
import pytest

import orchestrator.ilp as ilp_mod
from orchestrator.errors import UserError
from orchestrator.ilp import Budgets, LatencyTable, LayerBounds, LimpqIlp, outlier_forbidden
from orchestrator.indicators import FixedLayer, Indicators, LayerIndicators

REF = Path(__file__).resolve().parents[2] / "shared" / "reference" / "limpq_resnet50.json"
needs_ref = pytest.mark.skipif(not REF.exists(), reason="../shared/reference not present")


def _reference(macs_column: str = "limpq_macs") -> tuple[dict, Indicators]:
    return json.loads(REF.read_text()), Indicators.load(REF, macs_column)


def _all_params(ind: Indicators) -> int:
    return sum(l.params for l in ind.layers) + sum(f.params for f in ind.fixed)


def _key(r) -> tuple:
    return (r.objective, r.bitops, r.size_bits, r.latency or 0.0, tuple(r.w_bits), tuple(r.a_bits))


# ------------------------------------------------------------------------ LIMPQ's published case
@needs_ref
def test_readme_case_returns_limpqs_published_policy():
    d, ind = _reference("limpq_macs")
    case = d["readme_case"]
    assert case["constraints"]["macs_column"] == "limpq_macs"
    ilp = LimpqIlp(ind, alpha=d["alpha"])
    w, a = case["constraints"]["bitops_as_uniform_wa"]
    size_budget = 32 * _all_params(ind) / case["constraints"]["compression_ratio"]
    r = ilp.solve(bitops=ilp.uniform_bitops(w, a), size_bits=size_budget)
    exp = case["expected"]
    assert r.status == "optimal" and r.reason == "" and r.solve_seconds > 0
    # the published figures (LIMPQ prints them rounded to 3 decimals)
    assert round(r.compression_ratio, 3) == exp["compression_ratio"] == 12.203
    assert round(r.size_mb, 3) == exp["size_mb"] == 7.972
    assert round(r.gbitops, 3) == exp["gbitops"] == 56.035
    published = ilp.evaluate(exp["w_bits"], exp["a_bits"])
    assert published["objective"] == pytest.approx(4.6174392, abs=1e-7)
    # The criterion: the published policy, or (CBC's tolerance can flip a few activation bits
    # at a 1e-5 objective difference) one with the same figures within 2e-5 of its objective ...
    assert abs(r.objective - published["objective"]) <= 2e-5
    assert ((r.w_bits, r.a_bits) == (exp["w_bits"], exp["a_bits"])
            or (r.bitops, r.size_bits) == (published["bitops"], published["size_bits"]))
    # ... and, stricter, since this search is exact: the published policy itself
    assert (r.w_bits, r.a_bits) == (exp["w_bits"], exp["a_bits"])
    assert r.objective == published["objective"]
    assert r.bitops == published["bitops"] <= ilp.uniform_bitops(w, a)
    assert r.size_bits == published["size_bits"] <= size_budget
    # fixed layers at W8A8 are counted in the totals
    assert ilp.fixed_bitops == 64 * sum(f.macs for f in ind.fixed)
    assert ilp.fixed_size == 8 * sum(f.params for f in ind.fixed)
    assert r.bitops == ilp.fixed_bitops + sum(l.macs * wb * ab for l, wb, ab in zip(ind.layers, r.w_bits, r.a_bits))


@needs_ref
@pytest.mark.parametrize("how", ["cbc-full-model", "cbc-fallback"])
def test_readme_case_through_cbc(how):
    """CBC (called directly on our MPS, gcd-scaled rows, tiny cutoff increment) proves the same."""
    d, ind = _reference()
    ilp = LimpqIlp(ind, alpha=2.0, prune=how != "cbc-full-model")
    ilp.enum_limit = 0  # the enumeration gives up at once: CBC decides
    r = ilp.solve(bitops=ilp.uniform_bitops(3, 4), size_bits=32 * _all_params(ind) / 12.2)
    exp = d["readme_case"]["expected"]
    assert r.status == "optimal" and ilp.stats["cbc"] == 1
    assert (r.w_bits, r.a_bits) == (exp["w_bits"], exp["a_bits"])


@needs_ref
def test_full_model_mps_is_rendered_once_and_only_the_rhs_per_point():
    _, ind = _reference()
    ilp = LimpqIlp(ind, alpha=2.0, prune=False)
    pts = [Budgets(ilp.uniform_bitops(4, 4), None), Budgets(ilp.uniform_bitops(6, 6) * 0.6, None)]
    ilp.solve_many(pts, reuse=False)
    (model,) = ilp._full_cbc.values()  # one model for the one set of active budgets
    head = model.head
    ilp.solve_many(pts[:1], reuse=False)
    assert ilp._full_cbc[(True, False, False)] is model and model.head is head
    assert model.rhs(pts[0]) != model.rhs(pts[1]) and model.rhs(pts[0]).count("\n") == 1


# ----------------------------------------------------------- exact MACs from our own cost model
def _highs(ind: Indicators, alpha: float, bits, bitops: float | None, size: float | None):
    """An independent solve: the plain one-hot model with raw integer coefficients in HiGHS."""
    from scipy.optimize import Bounds, LinearConstraint, milp

    desc = sorted(bits, reverse=True)
    cols, cost, rows_b, rows_s = [], [], [], []
    for i, l in enumerate(ind.layers):
        fw = {lo for hi, lo in zip(desc, desc[1:]) if l.weight[lo] < l.weight[hi]}
        fa = {lo for hi, lo in zip(desc, desc[1:]) if l.act[lo] < l.act[hi]}
        for bw in bits:
            for ba in bits:
                if bw in fw or ba in fa:
                    continue
                cols.append((i, bw, ba))
                cost.append(l.act[ba] + alpha * l.weight[bw])
                rows_b.append(l.macs * bw * ba)
                rows_s.append(l.params * bw)
    n = len(ind.layers)
    a = np.zeros((n, len(cols)))
    for k, (i, _, _) in enumerate(cols):
        a[i, k] = 1
    mats, lo, hi = [a], [np.ones(n)], [np.ones(n)]
    fixed_b = sum(f.macs * 64 for f in ind.fixed)
    fixed_s = sum(f.params * 8 for f in ind.fixed)
    if bitops is not None:
        mats.append(np.array([rows_b], float)), lo.append([-np.inf]), hi.append([bitops - fixed_b])
    if size is not None:
        mats.append(np.array([rows_s], float)), lo.append([-np.inf]), hi.append([size - fixed_s])
    res = milp(np.array(cost), integrality=np.ones(len(cols)), bounds=Bounds(0, 1),
               constraints=LinearConstraint(np.vstack(mats), np.concatenate(lo), np.concatenate(hi)),
               options={"mip_rel_gap": 0})
    assert res.status == 0, res.message
    return res.fun


@needs_ref
def test_exact_macs_from_our_cost_model_are_solved_to_optimality():
    from workloads.cost import layer_costs
    from workloads.models import build_model

    d, _ = _reference()
    costs = {c.name: c for c in layer_costs(build_model("resnet50", 1000, 3), (3, 224, 224))}
    for l in d["layers"]:
        l["macs"], l["params"] = costs[l["name"]].macs, costs[l["name"]].params
    for name, f in d["fixed_layers"].items():
        f["macs"], f["params"] = costs[name].macs, costs[name].params
    ind = Indicators.from_json_dict(d, "macs")
    assert [l.macs for l in ind.layers] != [l["limpq_macs"] for l in d["layers"]]  # really different MACs
    ilp = LimpqIlp(ind, alpha=2.0)
    fp = 32 * _all_params(ind)
    points = [Budgets(ilp.uniform_bitops(3, 4), fp / 12.2), Budgets(ilp.uniform_bitops(4, 4), fp / 10),
              Budgets(ilp.uniform_bitops(3, 3), None), Budgets(None, fp / 11.5)]
    for b, r in zip(points, ilp.solve_many(points)):
        assert r.status == "optimal"
        assert r.bitops <= (b.bitops or math.inf) and r.size_bits <= (b.size_bits or math.inf)
        assert r.objective == pytest.approx(_highs(ind, 2.0, ind.bits, b.bitops, b.size_bits), abs=1e-6)


# ------------------------------------------------------------------ brute force, small instances
def _random_indicators(rng: random.Random, n: int, bits, outlier_p: float) -> Indicators:
    layers = []
    for i in range(n):
        def values(base):
            v, x = {}, base
            for b in sorted(bits, reverse=True):  # grows as bits fall, as learned step sizes do
                v[b] = x
                x *= rng.uniform(1.1, 2.0)
            for b in bits:  # LIMPQ's outliers: a lower bit whose value dips below a higher one's
                if rng.random() < outlier_p:
                    v[b] *= rng.uniform(0.2, 0.95)
            return v
        layers.append(LayerIndicators(f"l{i}", params=64 * rng.randint(1, 40), macs=3136 * rng.randint(1, 60),
                                      weight=values(rng.uniform(0.01, 0.1)), act=values(rng.uniform(0.05, 0.3))))
    fixed = [FixedLayer("first", 432, 21952), FixedLayer("fc", 640, 640)]
    return Indicators(bits=list(bits), layers=layers, fixed=fixed)


def _brute(ind, alpha, bits, bounds, lat, b: Budgets):
    """The canonical optimum by enumerating every policy (independent of orchestrator.ilp's code):
    smallest (objective, BitOps, size, latency, w_bits, a_bits) among the feasible policies."""
    desc = sorted(bits, reverse=True)
    objs, bops, sizes, lats = np.zeros(1), np.zeros(1, np.int64), np.zeros(1, np.int64), np.zeros(1)
    picks, options = [], []  # per layer so far: the option index of every combination; its options
    for l in ind.layers:
        fw = {lo for hi, lo in zip(desc, desc[1:]) if l.weight[lo] < l.weight[hi]}
        fa = {lo for hi, lo in zip(desc, desc[1:]) if l.act[lo] < l.act[hi]}
        lb = bounds.get(l.name, {})
        opts = [(bw, ba) for bw in bits for ba in bits if bw not in fw and ba not in fa
                and lb.get("w_min", 0) <= bw <= lb.get("w_max", 99) and lb.get("a_min", 0) <= ba <= lb.get("a_max", 99)]
        if not opts:
            return None
        k, n = len(opts), len(objs)
        objs = (objs[:, None] + np.array([l.act[ba] + alpha * l.weight[bw] for bw, ba in opts])).ravel()
        bops = (bops[:, None] + np.array([l.macs * bw * ba for bw, ba in opts])).ravel()
        sizes = (sizes[:, None] + np.array([l.params * bw for bw, _ in opts])).ravel()
        lats = (lats[:, None] + np.array([lat[(l.name, bw, ba)] if lat else 0.0 for bw, ba in opts])).ravel()
        picks = [np.repeat(p, k) for p in picks] + [np.tile(np.arange(k), n)]
        options.append(opts)
    fixed_b = sum(f.macs * 64 for f in ind.fixed)
    fixed_s = sum(f.params * 8 for f in ind.fixed)
    ok = np.ones(len(objs), bool)
    if b.bitops is not None:
        ok &= bops + fixed_b <= b.bitops
    if b.size_bits is not None:
        ok &= sizes + fixed_s <= b.size_bits
    if b.latency is not None:
        ok &= lats <= b.latency * (1 + 1e-12) + 1e-12  # exact check below
    if not ok.any():
        return None
    best = None
    for s in np.flatnonzero(ok & (objs <= objs[ok].min() + 1e-9)):
        w = [opts[p[s]][0] for p, opts in zip(picks, options)]
        a = [opts[p[s]][1] for p, opts in zip(picks, options)]
        lt = math.fsum(lat[(l.name, wb, ab)] for l, wb, ab in zip(ind.layers, w, a)) if lat else 0.0
        if b.latency is not None and lt > b.latency:
            continue
        obj = math.fsum(l.act[ab] + alpha * l.weight[wb] for l, wb, ab in zip(ind.layers, w, a))
        key = (obj, int(bops[s]) + fixed_b, int(sizes[s]) + fixed_s, lt, tuple(w), tuple(a))
        if best is None or key < best:
            best = key
    return best


def _instance(seed: int):
    """A seeded random instance: 6 layers x 3 candidate bits (9 pairs), LIMPQ-like indicators with
    outliers, sometimes bit bounds, sometimes a latency table (sometimes rising as bits fall, so that
    BitOps/size and latency budgets can contradict each other), and budgets across the whole range,
    some below the all-lowest-bit minimum."""
    rng = random.Random(seed)
    bits = rng.choice([(4, 3, 2), (6, 5, 4), (8, 4, 2)])
    ind = _random_indicators(rng, 6, bits, outlier_p=rng.choice([0.0, 0.15, 0.4]))
    alpha = rng.choice([0.5, 2.0, 3.0])
    bounds = {}
    if seed % 4 == 1:
        l = rng.choice(ind.layers).name
        bounds[l] = {"w_min": bits[1]} if seed % 8 == 1 else {"a_max": bits[1], "w_max": bits[0]}
    lat = None
    if seed % 3 == 0:
        falling = seed % 2 == 0
        lat = {(l.name, bw, ba): rng.uniform(0.5, 1.5) * (1.0 / (bw * ba) if falling else bw * ba)
               for l in ind.layers for bw in bits for ba in bits}
    ilp = LimpqIlp(ind, alpha=alpha, bounds=bounds or None, latency_table=LatencyTable(lat) if lat else None)
    lo_b, hi_b = ilp.minimum("bitops"), ilp.uniform_bitops(bits[0], bits[0])
    lo_s, hi_s = ilp.minimum("size_bits"), ilp.fixed_size + sum(l.params * bits[0] for l in ind.layers)
    points = []
    for _ in range(6):
        bo = rng.uniform(0.97 * lo_b, hi_b) if rng.random() < 0.8 else None
        sz = rng.uniform(0.97 * lo_s, hi_s) if (bo is None or rng.random() < 0.7) else None
        la = None
        if lat and rng.random() < 0.7:
            m = ilp.minimum("latency")
            la = rng.uniform(0.99 * m, 3 * m)
        points.append(Budgets(bo, sz, la))
    return ind, alpha, bits, bounds, lat, points


def _check(ilp: LimpqIlp, ind, alpha, bits, bounds, lat, points, results):
    for b, r in zip(points, results):
        want = _brute(ind, alpha, bits, bounds, lat, b)
        if want is None:
            assert r.status == "infeasible" and r.reason, (b, r)
        else:
            assert r.status == "optimal", (b, r)
            assert _key(r) == want, (b, r)
            assert r.objective == ilp.evaluate(r.w_bits, r.a_bits)["objective"]


@pytest.mark.parametrize("path", ["default", "lagrangian", "exhaustive"])
def test_equals_brute_force_on_random_instances(path, monkeypatch):
    if path == "lagrangian":  # never skip the bound, even on instances small enough to enumerate
        monkeypatch.setattr(ilp_mod, "SMALL_COMBOS", 0)
    if path == "exhaustive":
        monkeypatch.setattr(ilp_mod, "SMALL_COMBOS", 10**9)
    n_infeasible = n_optimal = n_enumerated = 0
    for seed in range(40):
        ind, alpha, bits, bounds, lat, points = _instance(seed)
        ilp = LimpqIlp(ind, alpha=alpha, bounds=bounds or None, latency_table=LatencyTable(lat) if lat else None)
        results = ilp.solve_many(points)
        n_enumerated += ilp.stats["enumerated"]
        _check(ilp, ind, alpha, bits, bounds, lat, points, results)
        # a batch (proof reuse, starts) returns exactly what each point alone returns
        alone = [ilp.solve_many([b], reuse=False)[0] for b in points]
        assert [(r.status, _key(r) if r.status == "optimal" else None) for r in alone] == \
            [(r.status, _key(r) if r.status == "optimal" else None) for r in results]
        n_infeasible += sum(r.status == "infeasible" for r in results)
        n_optimal += sum(r.status == "optimal" for r in results)
    assert n_infeasible >= 10 and n_optimal >= 150  # both kinds really exercised
    assert n_enumerated >= 100  # the exact search, not only proof reuse, decided many points


@pytest.mark.parametrize("prune", [False, True])
def test_cbc_paths_equal_brute_force(prune):
    """CBC on the full model (prune=False), and CBC as the enumeration's fallback (limit 0)."""
    for seed in range(0, 40, 5):
        ind, alpha, bits, bounds, lat, points = _instance(seed)
        ilp = LimpqIlp(ind, alpha=alpha, bounds=bounds or None, latency_table=LatencyTable(lat) if lat else None,
                       prune=prune)
        ilp.enum_limit = 0
        _check(ilp, ind, alpha, bits, bounds, lat, points, ilp.solve_many(points, reuse=False))


def test_contradicting_budgets_are_proven_infeasible():
    """Latency that rises as bits fall against a BitOps budget: each budget alone is reachable, the
    two together are not, so the minimum precheck cannot tell; the search must prove it."""
    rng = random.Random(7)
    ind = _random_indicators(rng, 6, (4, 3, 2), outlier_p=0.0)
    lat = {(l.name, bw, ba): 1.0 / (bw * ba) for l in ind.layers for bw in (4, 3, 2) for ba in (4, 3, 2)}
    for prune in (True, False):
        ilp = LimpqIlp(ind, alpha=2.0, latency_table=LatencyTable(lat), prune=prune)
        b = Budgets(ilp.uniform_bitops(2, 2) * 1.01, None, ilp.minimum("latency") * 1.01)
        assert b.bitops >= ilp.minimum("bitops") and b.latency >= ilp.minimum("latency")
        r = ilp.solve_many([b])[0]
        assert r.status == "infeasible" and "together" in r.reason
        assert _brute(ind, 2.0, (4, 3, 2), {}, lat, b) is None


# ----------------------------------------------------------------------------- the outlier rule
def test_outlier_rule_decides_on_raw_values_without_cascade():
    bits = [6, 5, 4, 3, 2]
    # 5 dips below 6 (forbidden); 4 is compared with the raw 5 (0.8 >= 0.5): allowed, although it is
    # below 6's value; a cascading rule (erase 5, then compare 4 with 6) would forbid 4 as well
    v = {6: 1.0, 5: 0.5, 4: 0.8, 3: 2.0, 2: 1.9}
    assert outlier_forbidden(v, bits) == {5, 2}
    assert outlier_forbidden({6: 1, 5: 2, 4: 3, 3: 4, 2: 5}, bits) == set()
    layer = LayerIndicators("conv", 64, 6272, weight=v, act={6: 1.0, 5: 1.1, 4: 1.0, 3: 1.5, 2: 2.0})
    ind = Indicators(bits=bits, layers=[layer])
    ilp = LimpqIlp(ind, alpha=2.0)
    pairs = {(c.bw, c.ba) for c in ilp.choices[0]}
    assert pairs == {(bw, ba) for bw in (6, 4, 3) for ba in (6, 5, 3, 2)}  # forbidden ones not created
    # bounds narrow the choices further
    ilp = LimpqIlp(ind, alpha=2.0, bounds={"conv": {"w_min": 4, "a_max": 5}})
    assert {(c.bw, c.ba) for c in ilp.choices[0]} == {(bw, ba) for bw in (6, 4) for ba in (5, 3, 2)}
    ilp = LimpqIlp(ind, alpha=2.0, bounds={"conv": LayerBounds(w_min=5, w_max=5)})
    r = ilp.solve(bitops=10**12)
    assert r.status == "infeasible" and "outlier rule" in r.reason


# ------------------------------------------------------------------------------- latency table
def test_latency_table_from_csv(tmp_path):
    rng = random.Random(3)
    ind = _random_indicators(rng, 4, (4, 3, 2), outlier_p=0.2)
    rows = ["layer,w_bits,a_bits,cost"]
    lat = {}
    for l in ind.layers:
        for bw in (4, 3, 2):
            for ba in (4, 3, 2):
                lat[(l.name, bw, ba)] = round(rng.uniform(0.1, 1.0) * bw * ba, 3)
                rows.append(f"{l.name},{bw},{ba},{lat[(l.name, bw, ba)]}")
    path = tmp_path / "latency.csv"
    path.write_text("\n".join(rows) + "\n")
    table = LatencyTable.load(path)
    ilp = LimpqIlp(ind, alpha=2.0, latency_table=table)
    m = ilp.minimum("latency")
    points = [Budgets(None, None, m * f) for f in (1.0, 1.3, 2.0)] + [Budgets(ilp.uniform_bitops(3, 3), None, m * 1.5)]
    _check(ilp, ind, 2.0, (4, 3, 2), {}, lat, points, ilp.solve_many(points))
    path.write_text("\n".join(rows[:-1]) + "\n")  # one (layer, w, a) missing
    with pytest.raises(UserError, match="no cost for layer"):
        LimpqIlp(ind, alpha=2.0, latency_table=LatencyTable.load(path))
    path.write_text("layer,bits,cost\n")
    with pytest.raises(UserError, match="columns"):
        LatencyTable.load(path)


# --------------------------------------------------------------------------------- bad input
def _small() -> Indicators:
    return _random_indicators(random.Random(1), 3, (6, 5, 4, 3, 2), outlier_p=0.0)


def test_budget_below_the_all_lowest_bits_minimum_is_infeasible_with_a_reason():
    ilp = LimpqIlp(_small(), alpha=2.0)
    r = ilp.solve(bitops=ilp.uniform_bitops(2, 2) - 1)
    assert r.status == "infeasible" and "BitOps budget" in r.reason and "below the minimum" in r.reason
    assert r.policy() is None and r.policy_id is None and r.w_bits == []
    r = ilp.solve(size_bits=ilp.minimum("size_bits") * 0.999)
    assert r.status == "infeasible" and "size budget" in r.reason
    r = ilp.solve(bitops=ilp.uniform_bitops(2, 2))  # exactly the minimum: every layer at w2a2
    assert r.status == "optimal" and set(r.w_bits) == set(r.a_bits) == {2}


@pytest.mark.parametrize("make,match", [
    (lambda ind: LimpqIlp(ind, alpha=-1.0), "alpha"),
    (lambda ind: LimpqIlp(ind, alpha=float("nan")), "alpha"),
    (lambda ind: LimpqIlp(ind, alpha="x"), "alpha"),
    (lambda ind: LimpqIlp(ind, bits=[]), "empty"),
    (lambda ind: LimpqIlp(ind, bits=[8, 4]), "no indicators"),
    (lambda ind: LimpqIlp(ind, bits=[4, 4]), "repeat"),
    (lambda ind: LimpqIlp(ind, bounds={"nope": {"w_min": 2}}), "unknown layer"),
    (lambda ind: LimpqIlp(ind, bounds={"l0": {"w_low": 2}}), "unknown bound key"),
    (lambda ind: LimpqIlp(ind, bounds={"l0": {"w_min": 5, "w_max": 3}}), "w_min 5 > w_max 3"),
    (lambda ind: LimpqIlp(ind).solve(), "at least one budget"),
    (lambda ind: LimpqIlp(ind).solve(bitops=-5), "finite number >= 0"),
    (lambda ind: LimpqIlp(ind).solve(size_bits=float("inf")), "finite number >= 0"),
    (lambda ind: LimpqIlp(ind).solve(latency=3.0), "latency table"),
])
def test_bad_input_is_one_user_error(make, match):
    with pytest.raises(UserError, match=match) as e:
        make(_small())
    assert "\n" not in str(e.value)


def test_nan_indicator_is_one_user_error():
    ind = _small()
    ind.layers[1].act[3] = float("nan")  # after loading, e.g. a table edited in memory
    with pytest.raises(UserError, match="NaN") as e:
        LimpqIlp(ind, alpha=2.0)
    assert "\n" not in str(e.value) and "l1" in str(e.value)
    d = _small().to_json_dict()
    d["layers"][0]["weight"]["4"] = None  # NaN in a file
    with pytest.raises(UserError, match="NaN"):
        Indicators.from_json_dict(d)
