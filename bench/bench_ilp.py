"""LIMPQ's ILP over a grid of budgets: one fresh pulp model per point (LIMPQ's search.py style) against
``LimpqIlp.solve_many``, side by side in one run on LIMPQ's published ResNet-50 indicators.

    python bench/bench_ilp.py                      # 41 BitOps budgets (w2a2..w6a6) x 5 compression ratios
    python bench/bench_ilp.py --bitops 11 --cr 3   # a smaller grid

(a) LIMPQ style, per point: build the full pulp model (every (w, a) pair of every layer, the outlier
    rule as a 1e8 objective on forbidden bits, integer rows with raw coefficients), solve it with
    PULP_CBC_CMD (gapRel 0), read the policy back.
(b) ``LimpqIlp(...).solve_many(points)``: one object for the whole grid (what a grid task does).

Both must agree: the same status at every point, and objectives equal to within --tol, except that
(a) may be worse where CBC's default cutoff increment (1e-5) stops it short of the optimum; such
points are counted and printed, and (b) is never allowed to be worse than (a). Prints per-point
times (mean, median, max) and the ratio of the amortised per-point times.

Run it alone on the machine (on shared machines under the CPU lock:
``flock /tmp/mpq-cpu.lock python bench/bench_ilp.py``) so the timings are not disturbed.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pulp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from orchestrator.ilp import Budgets, LimpqIlp  # noqa: E402
from orchestrator.indicators import Indicators  # noqa: E402

REF = ROOT.parent / "shared" / "reference" / "limpq_resnet50.json"
FORBIDDEN = 1e8  # LIMPQ's C for "wired points"


def limpq_style(ind: Indicators, alpha: float, bits: list[int], fixed_bitops: int, fixed_size: int,
                b: Budgets) -> tuple[str, list[int], list[int]]:
    """One point the way LIMPQ's quantization_search/search.py solves it (one-shot pulp model)."""
    def erase(table: dict[int, float]) -> dict[int, float]:
        out = dict(table)
        wired = [bw - 1 for bw in bits[:-1] if table[bw - 1] < table[bw]]
        for w in wired:  # decided first, applied afterwards: no cascade
            out[w] = FORBIDDEN
        return out

    weight = [erase(l.weight) for l in ind.layers]
    act = [erase(l.act) for l in ind.layers]
    n = len(ind.layers)
    with warnings.catch_warnings():  # LIMPQ's problem name has a space; pulp warns and converts it
        warnings.simplefilter("ignore")
        prob = pulp.LpProblem("Bit-width allocation", pulp.LpMinimize)
    x = {}
    for i in range(n):
        for j in range(len(bits)):
            for k in range(len(bits)):
                x[i, j, k] = pulp.LpVariable(f"l{i}_w{j}_a{k}", 0, 1, cat=pulp.LpInteger)
    for i in range(n):
        prob += pulp.lpSum(x[i, j, k] for j in range(len(bits)) for k in range(len(bits))) == 1
    prob += pulp.lpSum((act[i][bits[k]] + alpha * weight[i][bits[j]]) * x[i, j, k] for (i, j, k) in x)
    if b.bitops is not None:
        prob += pulp.lpSum(ind.layers[i].macs * bits[j] * bits[k] * x[i, j, k] for (i, j, k) in x) \
            <= b.bitops - fixed_bitops
    if b.size_bits is not None:
        prob += fixed_size + pulp.lpSum(x[i, j, k] * bits[j] * ind.layers[i].params for (i, j, k) in x) \
            <= b.size_bits
    prob.solve(pulp.PULP_CBC_CMD(msg=False, gapRel=0))
    if pulp.LpStatus[prob.status] != "Optimal":
        return "infeasible", [], []
    w_bits, a_bits = [0] * n, [0] * n
    for (i, j, k), v in x.items():
        if (v.value() or 0) > 0.5:
            w_bits[i], a_bits[i] = bits[j], bits[k]
    return "optimal", w_bits, a_bits


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--indicators", default=str(REF), help="indicator JSON (default: LIMPQ's ResNet-50)")
    ap.add_argument("--macs-column", default="limpq_macs")
    ap.add_argument("--alpha", type=float, default=2.0)
    ap.add_argument("--bitops", type=int, default=41, help="BitOps budgets, uniform w2a2..w6a6 (w·a evenly spaced)")
    ap.add_argument("--cr", type=int, default=5, help="compression ratios, evenly spaced in [--cr-min, --cr-max]")
    ap.add_argument("--cr-min", type=float, default=6.0)
    ap.add_argument("--cr-max", type=float, default=12.5)
    ap.add_argument("--tol", type=float, default=1e-4, help="objectives within this count as the same")
    ap.add_argument("--per-point", action="store_true", help="print every point's budgets, objective and times")
    args = ap.parse_args(argv)

    ind = Indicators.load(args.indicators, args.macs_column)
    bits = sorted(ind.bits, reverse=True)
    ilp0 = LimpqIlp(ind, alpha=args.alpha)
    macs = sum(l.macs for l in ind.layers)
    all_params = sum(l.params for l in ind.layers) + sum(f.params for f in ind.fixed)
    points = [Budgets(ilp0.fixed_bitops + macs * wa, 32 * all_params / cr)
              for wa in np.linspace(4, 36, args.bitops) for cr in np.linspace(args.cr_min, args.cr_max, args.cr)]
    print(f"{len(points)} points: {args.bitops} BitOps budgets (uniform w2a2..w6a6) x {args.cr} compression "
          f"ratios ({args.cr_min}..{args.cr_max}); {len(ind.layers)} searchable layers, bits {bits}, "
          f"alpha {args.alpha}; pulp {pulp.__version__}", flush=True)

    # (a) LIMPQ style
    a_res, a_times = [], []
    t_a = time.perf_counter()
    for b in points:
        t0 = time.perf_counter()
        a_res.append(limpq_style(ind, args.alpha, bits, ilp0.fixed_bitops, ilp0.fixed_size, b))
        a_times.append(time.perf_counter() - t0)
    t_a = time.perf_counter() - t_a

    # (b) LimpqIlp.solve_many, built inside the timing
    t_b = time.perf_counter()
    ilp = LimpqIlp(ind, alpha=args.alpha)
    b_res = ilp.solve_many(points)
    t_b = time.perf_counter() - t_b
    b_times = [r.solve_seconds for r in b_res]

    # agreement
    bad, a_worse, worst = [], 0, 0.0
    for b, (st, w, a), r in zip(points, a_res, b_res):
        if st != r.status:
            bad.append(f"status {st} vs {r.status} at {b}")
            continue
        if st != "optimal":
            continue
        obj_a = ilp.evaluate(w, a)["objective"]
        diff = obj_a - r.objective
        worst = max(worst, abs(diff))
        if diff < -1e-9:
            bad.append(f"LimpqIlp is worse by {-diff:.3g} at {b}")
        elif diff > 1e-9:
            a_worse += 1
        if abs(diff) > args.tol:
            bad.append(f"objectives differ by {diff:.3g} at {b}")
    statuses = {s: sum(r.status == s for r in b_res) for s in ("optimal", "infeasible", "error")}

    def stats(ts):
        return (f"mean {1e3 * statistics.mean(ts):7.1f} ms  median {1e3 * statistics.median(ts):7.1f} ms  "
                f"max {1e3 * max(ts):7.1f} ms")

    n = len(points)
    if args.per_point:
        print(f"{'w·a':>6} {'CR':>6} {'status':>10} {'objective':>12} {'(a) ms':>8} {'(b) ms':>8}")
        for b, r, ta, tb in zip(points, b_res, a_times, b_times):
            wa = (b.bitops - ilp.fixed_bitops) / macs
            obj = f"{r.objective:.7f}" if r.objective is not None else "-"
            print(f"{wa:6.2f} {ilp.fp_size_bits / b.size_bits:6.2f} {r.status:>10} {obj:>12} "
                  f"{1e3 * ta:8.1f} {1e3 * tb:8.1f}")
    print(f"statuses: {statuses}")
    print(f"(a) LIMPQ style, fresh pulp model per point: total {t_a:7.2f} s   per point {stats(a_times)}")
    print(f"(b) LimpqIlp.solve_many:                     total {t_b:7.2f} s   per point {stats(b_times)}")
    print(f"    how (b) settled its points: {dict(sorted(ilp.stats.items()))}")
    print(f"amortised per point: (a) {1e3 * t_a / n:.1f} ms, (b) {1e3 * t_b / n:.1f} ms; "
          f"ratio (b)/(a) = {t_b / t_a:.4f}  (speed-up {t_a / t_b:.1f}x)")
    print(f"objectives: max |difference| {worst:.3g}; (a) worse than (b) by more than 1e-9 at {a_worse} point(s) "
          f"(CBC's default cutoff increment); (b) never worse: {not any('worse' in m for m in bad)}")
    if bad:
        print("DISAGREEMENT:\n  " + "\n  ".join(bad[:20]))
        return 1
    print(f"agreement: same status everywhere, objectives equal within {args.tol:g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
