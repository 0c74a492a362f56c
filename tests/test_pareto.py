"""Pareto fronts, the report's frontier table and the comparison plots (pure unit tests, no Ray)."""
import itertools
import math
import re
from xml.etree import ElementTree

from orchestrator.pareto import HTML_NAME, frontier_table, pareto_front, plot_pareto

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _pt(pid, x, y):
    return {"policy_id": pid, "x": x, "y": y}


def test_front_on_hand_made_points_maximize():
    pts = [_pt("a", 1, 0.50), _pt("b", 2, 0.70), _pt("c", 2, 0.60),   # c: same x, worse y
           _pt("d", 3, 0.70),                                           # d: same y as b, more x
           _pt("e", 4, 0.90), _pt("f", 5, 0.85), _pt("g", 0.5, 0.10),
           _pt("h", None, 0.99), _pt("i", 6, math.nan), _pt("j", 7, None)]  # ignored
    front = pareto_front(pts, "x", "y", maximize_y=True)
    assert [p["policy_id"] for p in front] == ["g", "a", "b", "e"]
    assert front[0] is not pts[6]  # copies, the input is not handed back


def test_front_minimize_and_single_point():
    pts = [_pt("a", 1, 9.0), _pt("b", 2, 5.0), _pt("c", 3, 6.0), _pt("d", 4, 1.0), _pt("e", 4, 1.5)]
    assert [p["policy_id"] for p in pareto_front(pts, "x", "y", maximize_y=False)] == ["a", "b", "d"]
    assert [p["policy_id"] for p in pareto_front(pts, "x", "y", maximize_y=True)] == ["a"]  # a dominates all
    assert pareto_front([], "x", "y", maximize_y=True) == []
    assert pareto_front([_pt("z", 3, 3)], "x", "y", maximize_y=False) == [_pt("z", 3, 3)]


def test_front_ties_are_deterministic_whatever_the_input_order():
    pts = [_pt("p2", 1, 0.8), _pt("p1", 1, 0.8), _pt("p3", 1, 0.8), _pt("q", 2, 0.9), _pt("r", 2, 0.9)]
    fronts = {tuple(p["policy_id"] for p in pareto_front(list(order), "x", "y", maximize_y=True))
              for order in itertools.permutations(pts)}
    assert fronts == {("p1", "q")}


# ---------------------------------------------------------------------------- frontier table
def _search(searcher, pid, bitops, size, *, objective=None, alpha=None, qem=None, status="optimal", w=4, a=4,
            point=None, budget=None):
    return {"point_id": point or f"{searcher}-{pid}-{alpha}-{budget}", "searcher": searcher, "status": status,
            "bitops": bitops, "size_bits": size, "objective": objective, "alpha": alpha, "qem": qem,
            "policy_id": pid if status == "optimal" else None, "w_bits": [w, w], "a_bits": [a, a],
            "bitops_budget": budget, "size_budget": None}


def _result(pid, searcher, stage, top1, *, lr=None, bitops=None, size=None, val=None, status="complete"):
    return {"policy_id": pid, "searcher": searcher, "stage": stage, "lr": lr, "epochs": 0 if stage == "ptq" else 2,
            "status": status, "val_top1": val, "top1": top1, "top5": 1.0, "loss": 1 - top1, "bitops": bitops,
            "size_bits": size, "mlflow_run_id": None, "seconds": 1.0}


SEARCH = [
    # LIMPQ: L1 found at two budgets and two alphas; L4 is infeasible-free but never evaluated
    _search("limpq", "L1", 100.0, 10.0, objective=5.0, alpha=1.0, budget=110.0, w=3),
    _search("limpq", "L1", 100.0, 10.0, objective=6.0, alpha=2.0, budget=120.0, w=3),
    _search("limpq", "L2", 200.0, 20.0, objective=3.0, alpha=1.0, budget=210.0, w=5),
    _search("limpq", "L3", 300.0, 30.0, objective=2.0, alpha=1.0, budget=310.0, w=6),
    _search("limpq", "L4", 250.0, 25.0, objective=4.0, alpha=1.0, budget=260.0, w=4),
    _search("limpq", None, None, None, alpha=1.0, budget=10.0, status="infeasible"),
    _search("limpq", "L5", 150.0, 15.0, objective=4.5, alpha=2.0, budget=160.0, w=4),
    _search("limpq", "L6", 300.0, 30.0, objective=1.0, alpha=2.0, budget=320.0, w=6),
    _search("uniform", "U2", 80.0, 8.0, w=2, a=2),
    _search("uniform", "U4", 160.0, 16.0, w=4, a=4),
    _search("uniform", "U6", 240.0, 24.0, w=6, a=6),
    _search("mixquant", "M1", 120.0, 12.0, objective=0.01, qem=4.0, a=8),
    _search("mixquant", "M2", 220.0, 22.0, objective=1e-5, qem=1.0, a=8),   # QE spans decades: log axis
]

RESULTS = [
    _result("L1", "limpq", "finetune", 0.80, lr=0.01, val=0.70),
    _result("L1", "limpq", "finetune", 0.85, lr=0.04, val=0.72),  # best held-out score: L1's lr
    _result("L1", "limpq", "finetune", 0.88, lr=0.10, val=0.71),  # best on the eval split: never looked at
    _result("L2", "limpq", "finetune", 0.84, lr=0.01),      # more BitOps, worse than L1: dominated
    _result("L3", "limpq", "finetune", 0.90, lr=0.01),
    _result("L3", "limpq", "finetune", 0.99, lr=0.04, val=0.99, status="stopped"),  # early-stopped: never chosen
    _result("L3", "limpq", "ptq", 0.99),                    # ptq of a finetuned searcher: ignored
    _result("L4", "limpq", "ptq", 0.95),                    # only ptq while limpq has finetunes: ignored
    _result("U2", "uniform", "ptq", 0.30, bitops=80.0, size=8.0),
    _result("U4", "uniform", "ptq", 0.70, bitops=160.0, size=16.0),
    _result("U6", "uniform", "ptq", 0.65, bitops=240.0, size=24.0),   # dominated by U4
    _result("M1", None, "ptq", 0.60),                       # searcher taken from the search row
    _result("M2", "mixquant", "ptq", 0.75),
    _result("ZZ", "limpq", "finetune", 0.99, lr=0.01),      # no search row: cannot be shown
]


def test_frontier_table_with_results_picks_stage_and_best_lr():
    front = frontier_table(SEARCH, RESULTS)
    got = [(r["searcher"], r["policy_id"], r["stage"], r["top1"]) for r in front]
    assert got == [("limpq", "L1", "finetune", 0.85), ("limpq", "L3", "finetune", 0.90),
                   ("mixquant", "M1", "ptq", 0.60), ("mixquant", "M2", "ptq", 0.75),
                   ("uniform", "U2", "ptq", 0.30), ("uniform", "U4", "ptq", 0.70)]
    l1 = front[0]
    assert l1["lr"] == 0.04 and l1["w_bits"] == [3, 3] and l1["a_bits"] == [4, 4]
    assert (l1["bitops"], l1["size_bits"]) == (100.0, 10.0)    # filled from the search row
    assert (l1["alpha"], l1["objective"]) == (1.0, 5.0)        # the lowest-alpha search row of L1
    m1 = front[2]
    assert (m1["qem"], m1["objective"], m1["a_bits"]) == (4.0, 0.01, [8, 8])


def test_frontier_table_ptq_when_a_searcher_has_no_finetune():
    res = [_result("L4", "limpq", "ptq", 0.95), _result("L2", "limpq", "ptq", 0.50),
           _result("L1", "limpq", "ptq", 0.60)]
    front = frontier_table(SEARCH, res)
    assert [(r["policy_id"], r["stage"]) for r in front] == [("L1", "ptq"), ("L4", "ptq")]


def test_frontier_table_without_results_is_limpq_objective_per_alpha():
    front = frontier_table(SEARCH, [])
    got = [(r["alpha"], r["policy_id"]) for r in front]
    # alpha 1: L1 (100, 5) L2 (200, 3) L4 (250, 4: dominated by L2) L3 (300, 2)
    # alpha 2: L1 (100, 6) L5 (150, 4.5) L6 (300, 1)
    assert got == [(1.0, "L1"), (1.0, "L2"), (1.0, "L3"), (2.0, "L1"), (2.0, "L5"), (2.0, "L6")]
    assert all(r["stage"] is None and r["top1"] is None and r["searcher"] == "limpq" for r in front)
    assert frontier_table([r for r in SEARCH if r["searcher"] != "limpq"], []) == []


# ---------------------------------------------------------------------------------- plots
def test_plots_with_results(tmp_path):
    paths = plot_pareto(SEARCH, RESULTS, tmp_path / "report")
    names = [p.name for p in paths]
    assert names == ["pareto_top1_vs_bitops.png", "pareto_top1_vs_size.png", "search_objective_vs_bitops.png",
                     "search_size_vs_bitops.png"]
    for p in paths:
        data = p.read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5000
    page = (tmp_path / "report" / HTML_NAME).read_text()
    assert page.count("<svg") == 5 and "<script" in page and "http" not in page.replace(
        'xmlns="http://www.w3.org/2000/svg"', "")
    assert "L1" in page and "limpq (finetune)" in page and "uniform (ptq)" in page
    for svg in re.findall(r"<svg.*?</svg>", page, flags=re.S):
        ElementTree.fromstring(svg)  # well-formed
    assert "1e-4" in page  # the MixQuant QE panel has a log axis
    assert not list((tmp_path / "report").glob(".*.tmp"))  # atomic writes left nothing behind


def test_plots_for_the_search_alone_and_empty(tmp_path):
    paths = plot_pareto(SEARCH, [], tmp_path)
    assert [p.name for p in paths] == ["search_objective_vs_bitops.png", "search_size_vs_bitops.png"]
    assert all(p.stat().st_size > 5000 for p in paths)
    assert "limpq α=2" in (tmp_path / HTML_NAME).read_text()
    empty = tmp_path / "empty"
    assert plot_pareto([], [], empty) == [] and not (empty / HTML_NAME).exists()


def test_report_builds_from_study_tables(tmp_path):
    """report.build_report (the caller) runs on these rows end to end."""
    from orchestrator.report import build_report
    from orchestrator.results import upsert_results
    from orchestrator.search_rows import write_search_rows

    write_search_rows(tmp_path / "search" / "search.parquet", SEARCH)
    upsert_results(tmp_path / "results" / "results.parquet", [r for r in RESULTS if r["policy_id"] != "ZZ"])
    out = build_report(tmp_path)
    md = (out / "report.md").read_text()
    assert "pareto_top1_vs_bitops" in md and "| limpq | finetune |" in md
    assert (out / "bits_heatmap.png").read_bytes().startswith(PNG_MAGIC)
