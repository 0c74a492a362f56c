"""LIMPQ's bit-width assignment ILP, solved to proven optimality.

The model (DESIGN.md): one binary x[l, bw, ba] per searchable layer l and allowed (weight bits,
activation bits) pair, Σ x = 1 per layer; minimise Σ (A_l[ba] + α·W_l[bw])·x subject to any of

* BitOps:  FIXED_BITOPS + Σ MACs_l·bw·ba·x ≤ bitops budget
* size:    FIXED_SIZE   + Σ params_l·bw·x    ≤ size budget (bits) = 32·(all params)/compression ratio
* latency: Σ cost_l(bw, ba)·x ≤ latency budget (costs from a CSV table layer,w_bits,a_bits,cost)

and at least one of them. Every figure here is a whole-model figure, the convention LIMPQ's search.py
prints: the fixed layers (first conv, last fc) count at W8A8, so FIXED_BITOPS = 64·Σ MACs_fixed and
FIXED_SIZE = 8·Σ params_fixed; "all params" includes them. On the reference
(../shared/reference/limpq_resnet50.json, ``macs_column="limpq_macs"``) the published policy gives
bitops 56 034 590 720 (= 56.035 G with G = 1e9), size 66 876 928 bits (= 7.972 MB with
MB = 2^20·8 bits), compression ratio 32·25 502 912/66 876 928 = 12.203 and objective 4.6174392. A
"uniform WxAy" BitOps budget is 64·Σ MACs_fixed + Σ MACs_searchable·x·y, which makes the constraint
on the searchable layers read Σ MACs·bw·ba·x ≤ Σ MACs·x·y, LIMPQ's own.

Before solving, LIMPQ's outlier rule forbids, per layer and separately for weights and activations,
the lower of two adjacent candidate bits whose indicator is smaller than the higher one's (for
candidates 6,5,4,3,2 that is "b-1 is forbidden if value[b-1] < value[b]"; for a list with gaps the
neighbour in the list plays b-1's part). The forbidden set is decided from the raw table first and
applied afterwards, so there is no cascade. Forbidden choices get no variable (LIMPQ gives them a 1e8
objective instead, the same thing whenever a policy exists at all).

How a point is solved (``LimpqIlp`` is built once per indicators/α/bits/bounds and solves many
budgets; every step below is exact, none is a heuristic that could lose the optimum):

1. Exact dominance pruning (``prune=True``): a choice is dropped when another choice of the same layer
   has a strictly smaller objective term and no larger active resource, or an equal term and no
   larger resource of any kind. Swapping the dominator in never makes a policy worse or infeasible.
2. A Lagrangian bound. For multipliers λ ≥ 0 on the (budget-normalised) resource rows,
   L(λ) = Σ_l min_c (cost_c + λ·r_c) − λ·b is a lower bound on the optimum, and every feasible policy
   x satisfies obj(x) ≥ L(λ) + Σ_l red_l(x_l), where red is the choice's Lagrangian reduced cost
   (cost + λ·r minus its layer's minimum; ≥ 0). λ (the LP relaxation's duals) is maximised one
   multiplier inside the other, each by cutting planes on the concave piecewise-linear function with
   a bisection safeguard, at most ``DUAL_EVALS`` evaluations; any λ ≥ 0 gives a valid bound, a
   better one only prunes more. Rounding is covered by padding T below by 1e-9 of the objective's
   scale (enumerate to T + pad, accept up to T + pad/2).
3. Bounded enumeration. All policies with Σ red ≤ T that can still meet the budgets (running sums plus
   the cheapest completion, exact integers) are enumerated breadth-first in numpy. If the best
   feasible one found has objective ≤ L + T it is optimal: any policy left out has Σ red > T and so
   objective > L + T. Otherwise T grows (by ``T_GROWTH``, capped at U − L where U is the best
   objective known: a policy of another point that is feasible here, a feasible Lagrangian policy,
   or an earlier round's best, each polished by a local search over one- and two-layer changes) and
   the enumeration repeats. Instances with at most ``SMALL_COMBOS`` policies skip the bound and
   enumerate everything. If the enumeration would store more than ``enum_limit`` states, the point
   goes to CBC instead (step 4) on the choices whose reduced cost can still reach U.
4. CBC (the binary pulp bundles, ``pulp.apis.PULP_CBC_CMD().path``), called directly on an MPS file we
   write: ``-ratioGap 0`` and a tiny ``-increment`` (CBC's default cutoff increment of 1e-5 silently
   skips better solutions: on the reference case it returns 4.6174492 instead of 4.6174392), rows
   divided by the gcd of their integer coefficients so CBC sees small exact integers and the integer
   right-hand side floor(budget/gcd), objective normalised to terms of order 1, a known feasible
   policy as MIP start. With ``prune=False`` every point is solved this way on the full model; its
   MPS text (everything but the RHS section) is rendered once per set of active budgets and only the
   RHS section is rendered per point.

Among optimal policies with the same objective the enumeration returns the smallest in (objective,
BitOps, size, latency, w_bits, a_bits); the objective is ``math.fsum`` of the terms, so it does not
depend on summation order. That order is what makes batches and single solves agree (below). CBC,
where it decides, returns an optimal policy but not necessarily that one among exact ties.

``solve_many`` orders a batch from the loosest budgets to the tightest and reuses proofs: if the
optimum of a point whose feasible set contains this point's is feasible here, it is optimal here
(min over a superset attained inside the subset); if that superset point was infeasible, so is this
one. Policies of other points that are feasible here bound T (step 3) and start CBC (step 4).

Every returned policy is checked against its budgets in exact arithmetic (integers; latency as a
correctly rounded ``math.fsum``) before it is reported; ``ilp.stats`` counts how the points of this
instance were settled.
"""
from __future__ import annotations

import csv
import math
import os
import subprocess
import tempfile
import time
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import reduce
from pathlib import Path

import numpy as np
import pulp

from workloads.quant.policy import Policy

from .errors import UserError
from .indicators import Indicators

FP_BITS = 32
MB_BITS = 1024 * 1024 * 8   # LIMPQ's "MB": 2^20 bytes of 8 bits
GIGA = 1e9                  # LIMPQ's "GBitOPs"


# --------------------------------------------------------------------------------------- inputs
@dataclass(frozen=True)
class LayerBounds:
    """Inclusive per-layer limits on weight and activation bits; None = unbounded."""

    w_min: int | None = None
    w_max: int | None = None
    a_min: int | None = None
    a_max: int | None = None

    def allows(self, bw: int, ba: int) -> bool:
        return ((self.w_min is None or bw >= self.w_min) and (self.w_max is None or bw <= self.w_max)
                and (self.a_min is None or ba >= self.a_min) and (self.a_max is None or ba <= self.a_max))

    @classmethod
    def from_dict(cls, d: Mapping, where: str) -> LayerBounds:
        unknown = set(d) - {"w_min", "w_max", "a_min", "a_max"}
        if unknown:
            raise UserError(f"{where}: unknown bound key(s) {sorted(unknown)} (use w_min, w_max, a_min, a_max)")
        try:
            vals = {k: (None if d.get(k) is None else int(d[k])) for k in ("w_min", "w_max", "a_min", "a_max")}
        except (TypeError, ValueError):
            raise UserError(f"{where}: bit bounds must be integers, got {dict(d)}") from None
        return cls(**vals)

    def as_dict(self) -> dict:
        return {k: getattr(self, k) for k in ("w_min", "w_max", "a_min", "a_max") if getattr(self, k) is not None}


@dataclass(frozen=True)
class LatencyTable:
    """Per-layer cost of each (w_bits, a_bits) pair, e.g. measured latency; read from a CSV with
    columns layer,w_bits,a_bits,cost."""

    costs: Mapping[tuple[str, int, int], float]
    source: str = ""

    @classmethod
    def load(cls, path: str | os.PathLike) -> LatencyTable:
        path = Path(path)
        if not path.is_file():
            raise UserError(f"latency table {path} does not exist")
        costs: dict[tuple[str, int, int], float] = {}
        with path.open(newline="") as f:
            reader = csv.DictReader(f)
            need = {"layer", "w_bits", "a_bits", "cost"}
            if reader.fieldnames is None or not need <= set(reader.fieldnames):
                raise UserError(f"{path}: latency table needs columns layer,w_bits,a_bits,cost")
            for i, row in enumerate(reader, start=2):
                try:
                    key = (row["layer"], int(row["w_bits"]), int(row["a_bits"]))
                    cost = float(row["cost"])
                except (TypeError, ValueError):
                    raise UserError(f"{path}:{i}: bad latency row {row}") from None
                if not math.isfinite(cost) or cost < 0:
                    raise UserError(f"{path}:{i}: latency cost must be finite and >= 0, got {row['cost']}")
                costs[key] = cost
        return cls(costs, str(path))

    def fingerprint(self) -> list:
        return sorted([k[0], k[1], k[2], v] for k, v in self.costs.items())


# -------------------------------------------------------------------------------------- result
@dataclass
class IlpResult:
    status: str                      # "optimal" | "infeasible" | "error"
    reason: str = ""
    objective: float | None = None
    bitops: int | None = None        # whole model, fixed layers at W8A8
    size_bits: int | None = None     # whole model, fixed layers at 8 bits
    size_mb: float | None = None     # size_bits / (2^20·8)
    compression_ratio: float | None = None  # 32·(all params) / size_bits
    latency: float | None = None     # Σ table cost, when a latency table is given
    w_bits: list[int] = field(default_factory=list)
    a_bits: list[int] = field(default_factory=list)
    solve_seconds: float = 0.0
    layers: tuple[str, ...] = ()

    @property
    def gbitops(self) -> float | None:
        return None if self.bitops is None else self.bitops / GIGA

    def policy(self) -> Policy | None:
        if self.status != "optimal":
            return None
        return Policy(self.layers, tuple(self.w_bits), tuple(self.a_bits))

    @property
    def policy_id(self) -> str | None:
        p = self.policy()
        return None if p is None else p.policy_id


@dataclass(frozen=True)
class Budgets:
    """Resolved budgets of one point, whole-model units; None = not constrained."""

    bitops: float | None = None
    size_bits: float | None = None
    latency: float | None = None

    def active(self) -> tuple[bool, bool, bool]:
        return (self.bitops is not None, self.size_bits is not None, self.latency is not None)

    def within(self, other: Budgets) -> bool:
        """True when every policy meeting self also meets other (self's feasible set ⊆ other's)."""
        for mine, theirs in ((self.bitops, other.bitops), (self.size_bits, other.size_bits),
                             (self.latency, other.latency)):
            if theirs is not None and (mine is None or mine > theirs):
                return False
        return True


# ---------------------------------------------------------------------------------- the model
# Tuning of the exact search (none of these changes a result, only how it is proven):
SMALL_COMBOS = 20_000      # at most this many policies: enumerate them all, no Lagrangian bound
ENUM_LIMIT = 8_000_000     # more enumeration states (all stages, ~5 bytes each) than this: use CBC
T_START = 2e-4             # first enumeration threshold, relative to the objective's scale
T_GROWTH = 4.0             # threshold growth per round
BISECT_RTOL = 1e-6         # relative precision of each multiplier
DUAL_EVALS = 2_000         # evaluations of L(λ) per point at most (three budgets nest three deep)
CBC_INCREMENT = "1e-9"     # on the normalised objective; CBC's default 1e-5 skips better policies


@dataclass
class _Choice:
    bw: int
    ba: int
    cost: float
    bitops: int      # MACs·bw·ba
    size: int        # params·bw
    latency: float   # 0.0 without a latency table


def outlier_forbidden(values: Mapping[int, float], bits: Sequence[int]) -> set[int]:
    """LIMPQ's outlier rule for one layer's weight (or act) indicators: with candidates sorted from
    high to low, the lower of two neighbours is forbidden if its value is smaller than the higher's.
    Decided on the raw values, no cascade."""
    desc = sorted(bits, reverse=True)
    return {lo for hi, lo in zip(desc, desc[1:]) if values[lo] < values[hi]}


class LimpqIlp:
    """The ILP for one (indicators, α, candidate bits, bounds, latency table); solve it for any
    number of budgets with ``solve`` / ``solve_many``.

    ``prune``: exact reductions (dominance, Lagrangian bound, bounded enumeration; CBC only when the
    enumeration would be too large); False solves every point with CBC on the full model.
    ``solver_options``: extra CBC command-line options, pulp style (``"threads 1"`` → ``-threads 1``).
    ``warm``: hand CBC a known feasible policy as MIP start."""

    def __init__(self, indicators: Indicators, *, alpha: float = 2.0, bits: Sequence[int] | None = None,
                 bounds: Mapping[str, LayerBounds | Mapping] | None = None,
                 latency_table: LatencyTable | None = None, prune: bool = True,
                 solver_options: Sequence[str] = (), warm: bool = True) -> None:
        self.ind = indicators
        self.alpha = _check_alpha(alpha)
        self.bits = _check_bits(indicators, bits)
        self.bounds = _check_bounds(indicators, bounds)
        self.latency_table = latency_table
        self.prune = prune
        self.solver_options = [str(o) for o in solver_options]
        self.warm = warm
        self.enum_limit = ENUM_LIMIT
        self.stats: Counter = Counter()
        self.layers = tuple(indicators.names)
        for l in indicators.layers:  # Indicators validates its own bits; candidates may be a subset
            for kind, table in (("weight", l.weight), ("act", l.act)):
                bad = [b for b in self.bits if not math.isfinite(table[b])]
                if bad:
                    raise UserError(f"layer {l.name!r}: {kind} indicator is NaN/inf at bits {bad}")

        fixed = indicators.fixed
        self.fixed_bitops = sum(f.macs * f.w_bits * f.a_bits for f in fixed)
        self.fixed_size = sum(f.params * f.w_bits for f in fixed)
        self.fp_size_bits = FP_BITS * (sum(l.params for l in indicators.layers) + sum(f.params for f in fixed))

        self.choices: list[list[_Choice]] = []
        self.empty_reason = ""
        for l in indicators.layers:
            fw = outlier_forbidden(l.weight, self.bits)
            fa = outlier_forbidden(l.act, self.bits)
            lb = self.bounds.get(l.name, LayerBounds())
            opts = []
            for bw in self.bits:
                for ba in self.bits:
                    if bw in fw or ba in fa or not lb.allows(bw, ba):
                        continue
                    lat = 0.0
                    if latency_table is not None:
                        key = (l.name, bw, ba)
                        if key not in latency_table.costs:
                            raise UserError(f"latency table {latency_table.source} has no cost for layer "
                                            f"{l.name!r} at w{bw}a{ba}")
                        lat = latency_table.costs[key]
                    opts.append(_Choice(bw, ba, l.act[ba] + self.alpha * l.weight[bw],
                                        l.macs * bw * ba, l.params * bw, lat))
            if not opts and not self.empty_reason:
                self.empty_reason = (f"layer {l.name!r} has no allowed (w, a) bits: the outlier rule forbids "
                                     f"w{sorted(fw)} a{sorted(fa)} and its bounds are {lb.as_dict() or 'none'}")
            self.choices.append(opts)
        self._spaces: dict[tuple[bool, bool, bool], _Space] = {}
        self._full_cbc: dict[tuple[bool, bool, bool], _CbcModel] = {}

    # ------------------------------------------------------------------------------- figures
    def evaluate(self, w_bits: Sequence[int], a_bits: Sequence[int]) -> dict:
        """Objective and whole-model figures of a policy (no feasibility check). Sums are exact
        (integers, ``math.fsum``), so they do not depend on the order of the layers."""
        terms = []
        bitops = self.fixed_bitops
        size = self.fixed_size
        lats = []
        for l, bw, ba in zip(self.ind.layers, w_bits, a_bits):
            terms.append(l.act[ba] + self.alpha * l.weight[bw])
            bitops += l.macs * bw * ba
            size += l.params * bw
            if self.latency_table is not None:
                lats.append(self.latency_table.costs.get((l.name, bw, ba), math.nan))
        return {"objective": math.fsum(terms), "bitops": bitops, "size_bits": size, "size_mb": size / MB_BITS,
                "compression_ratio": self.fp_size_bits / size if size else math.inf,
                "latency": math.fsum(lats) if self.latency_table is not None else None}

    def minimum(self, what: str) -> float:
        """Smallest whole-model BitOps / size bits / latency reachable with the allowed bits."""
        if self.empty_reason:
            return math.inf
        base = {"bitops": self.fixed_bitops, "size_bits": self.fixed_size, "latency": 0.0}[what]
        attr = {"bitops": "bitops", "size_bits": "size", "latency": "latency"}[what]
        return base + sum(min(getattr(c, attr) for c in opts) for opts in self.choices)

    def uniform_bitops(self, w: int, a: int) -> int:
        """Whole-model BitOps of the uniform WxAy policy (LIMPQ's budget convention)."""
        return self.fixed_bitops + sum(l.macs * w * a for l in self.ind.layers)

    # --------------------------------------------------------------------------------- solve
    def solve(self, bitops: float | None = None, size_bits: float | None = None,
              latency: float | None = None) -> IlpResult:
        return self.solve_many([Budgets(bitops, size_bits, latency)])[0]

    def solve_many(self, points: Sequence[Budgets], reuse: bool = True) -> list[IlpResult]:
        """Solve every point; results in the order given. With ``reuse`` a point may be settled by
        the proof of a looser point of the same batch (see the module docstring)."""
        for b in points:
            self._validate(b)
        order = sorted(range(len(points)), key=lambda i: _looseness_key(points[i]))
        done: list[tuple[Budgets, IlpResult]] = []
        out: list[IlpResult | None] = [None] * len(points)
        for i in order:
            t0 = time.perf_counter()
            b = points[i]
            res = self._precheck(b)
            if res is not None:
                self.stats["precheck"] += 1
            if res is None and reuse:
                res = self._reuse(b, done)
                if res is not None:
                    self.stats["reused"] += 1
            if res is None:
                res = self._solve_point(b, [r for _, r in done] if reuse else [])
            res.solve_seconds = time.perf_counter() - t0
            out[i] = res
            done.append((b, res))
        return out  # type: ignore[return-value]

    def _validate(self, b: Budgets) -> None:
        if not isinstance(b, Budgets):
            raise UserError(f"a search point must be Budgets(bitops, size_bits, latency), got {b!r}")
        if not any(b.active()):
            raise UserError("a search point needs at least one budget (BitOps, size or latency)")
        if b.latency is not None and self.latency_table is None:
            raise UserError("a latency budget needs a latency table")
        for v, name in ((b.bitops, "BitOps"), (b.size_bits, "size"), (b.latency, "latency")):
            if v is None:
                continue
            try:
                ok = math.isfinite(v) and v >= 0
            except TypeError:
                ok = False
            if not ok:
                raise UserError(f"{name} budget must be a finite number >= 0, got {v!r}")

    def _precheck(self, b: Budgets) -> IlpResult | None:
        if self.empty_reason:
            return IlpResult("infeasible", self.empty_reason, layers=self.layers)
        for what, budget, label, fmt in (("bitops", b.bitops, "BitOps budget", "{:.6g}"),
                                         ("size_bits", b.size_bits, "size budget", "{:.6g} bits"),
                                         ("latency", b.latency, "latency budget", "{:.6g}")):
            if budget is None:
                continue
            lo = self.minimum(what)
            if budget < lo:
                return IlpResult("infeasible", f"{label} {fmt.format(budget)} is below the minimum "
                                 f"{fmt.format(lo)} reachable with the allowed bits (every layer at its "
                                 "cheapest allowed choice)", layers=self.layers)
        return None

    def _reuse(self, b: Budgets, done: list[tuple[Budgets, IlpResult]]) -> IlpResult | None:
        for pb, pres in done:
            if not b.within(pb):
                continue
            if pres.status == "infeasible":
                return IlpResult("infeasible", pres.reason, layers=self.layers)
            if pres.status == "optimal" and self._feasible(pres, b):
                return _copy_result(pres)
        return None

    def _feasible(self, r: IlpResult, b: Budgets) -> bool:
        return ((b.bitops is None or r.bitops <= b.bitops)
                and (b.size_bits is None or r.size_bits <= b.size_bits)
                and (b.latency is None or r.latency <= b.latency))

    def _space(self, active: tuple[bool, bool, bool]) -> _Space:
        if active not in self._spaces:
            self._spaces[active] = _Space(self, active)
        return self._spaces[active]

    def _result(self, w: Sequence[int], a: Sequence[int], b: Budgets) -> IlpResult:
        res = IlpResult("optimal", "", w_bits=list(w), a_bits=list(a), layers=self.layers, **self.evaluate(w, a))
        if not self._feasible(res, b):
            return IlpResult("error", f"solver's policy breaks the budgets (bitops {res.bitops}, size "
                             f"{res.size_bits} bits, latency {res.latency})", layers=self.layers)
        return res

    def _infeasible(self, b: Budgets, how: str) -> IlpResult:
        names = [n for n, v in zip(("BitOps", "size", "latency"), b.active()) if v]
        return IlpResult("infeasible", f"no policy meets the {' and '.join(names)} budgets together ({how})",
                         layers=self.layers)

    def _solve_point(self, b: Budgets, known: Sequence[IlpResult]) -> IlpResult:
        feasible = [r for r in known if r.status == "optimal" and self._feasible(r, b)]
        incumbent = min(feasible, key=_canonical_key, default=None)
        if not self.prune:
            model = self._full_cbc.get(b.active())
            if model is None:
                model = self._full_cbc[b.active()] = _CbcModel(self, self.choices, b.active())
            return self._solve_cbc(model, b, incumbent)
        return _ExactSearch(self, self._space(b.active()), b, incumbent).run()

    def _solve_cbc(self, model: _CbcModel, b: Budgets, start: IlpResult | None) -> IlpResult:
        self.stats["cbc"] += 1
        try:
            status, chosen = model.solve(b, start if self.warm else None)
        except (OSError, subprocess.SubprocessError, ValueError) as e:
            return IlpResult("error", f"CBC failed: {e}", layers=self.layers)
        if status == "infeasible":
            return self._infeasible(b, "CBC proved infeasibility")
        if status != "optimal":
            return IlpResult("error", f"CBC returned status {status!r}", layers=self.layers)
        return self._result([c.bw for c in chosen], [c.ba for c in chosen], b)


def _canonical_key(r: IlpResult) -> tuple:
    """The order among optimal policies: objective, then BitOps, size, latency, then the bits."""
    return (r.objective, r.bitops, r.size_bits, r.latency or 0.0, tuple(r.w_bits), tuple(r.a_bits))


def _copy_result(r: IlpResult) -> IlpResult:
    return IlpResult(r.status, r.reason, r.objective, r.bitops, r.size_bits, r.size_mb, r.compression_ratio,
                     r.latency, list(r.w_bits), list(r.a_bits), 0.0, r.layers)


def _looseness_key(b: Budgets):
    # Unconstrained (None) sorts as loosest; larger budgets first.
    return tuple(-(math.inf if v is None else v) for v in (b.bitops, b.size_bits, b.latency))


def _gcd(values: Iterable[int]) -> int:
    g = reduce(math.gcd, (int(v) for v in values), 0)
    return g or 1


def _prune(opts: list[_Choice], active: tuple[bool, bool, bool]) -> list[_Choice]:
    """Drop choices dominated within the layer: another choice has a strictly smaller objective term
    and no larger active resource, or the same term and no larger resource of any kind (then the
    smaller bits win a full tie). Swapping the dominator into any policy keeps it feasible and makes
    it strictly better, or equal in objective and not larger anywhere; the optimum is unchanged."""
    if len(opts) < 2:
        return list(opts)
    cost = np.array([c.cost for c in opts])
    cols = (np.array([c.bitops for c in opts], np.int64), np.array([c.size for c in opts], np.int64),
            np.array([c.latency for c in opts]))
    le_all = np.ones((len(opts), len(opts)), bool)   # [d, c]: d's resource <= c's, every resource
    le_act = np.ones_like(le_all)                    # the same over the active resources only
    eq_all = np.ones_like(le_all)
    for col, on in zip(cols, active):
        le = col[:, None] <= col[None, :]
        le_all &= le
        eq_all &= col[:, None] == col[None, :]
        if on:
            le_act &= le
    bits = np.array([c.bw * 4096 + c.ba for c in opts])
    order = bits[:, None] < bits[None, :]
    better = (cost[:, None] < cost[None, :]) & le_act
    tie = (cost[:, None] == cost[None, :]) & le_all & (~eq_all | order)
    dominated = (better | tie).any(axis=0)
    return [c for c, dom in zip(opts, dominated) if not dom]


class _Space:
    """The choices of every layer for one set of active budgets (after dominance pruning) as padded
    numpy arrays: row l holds layer l's choices, padding has an infinite cost."""

    def __init__(self, ilp: LimpqIlp, active: tuple[bool, bool, bool]) -> None:
        self.active = active
        self.kept = [_prune(o, active) if ilp.prune else list(o) for o in ilp.choices]
        n, k = len(self.kept), max(len(o) for o in self.kept)
        self.cost = np.full((n, k), np.inf)
        self.bitops = np.zeros((n, k), np.int64)
        self.size = np.zeros((n, k), np.int64)
        self.latency = np.zeros((n, k))
        for i, opts in enumerate(self.kept):
            for j, c in enumerate(opts):
                self.cost[i, j], self.bitops[i, j], self.size[i, j], self.latency[i, j] = \
                    c.cost, c.bitops, c.size, c.latency
        self.valid = np.isfinite(self.cost)
        self.n_opts = [len(o) for o in self.kept]
        self.combos = math.prod(self.n_opts)
        finite = np.where(self.valid, self.cost, np.nan)
        self.min_cost = np.nanmin(finite, axis=1)
        self.max_cost = np.nanmax(finite, axis=1)
        # The objective's scale: tolerances and the first multiplier bracket are relative to it.
        self.scale = max(float(np.abs(finite[self.valid]).max()), 1e-300) * n
        self.lam_scale = max(float((self.max_cost - self.min_cost).sum()), self.scale * 1e-6)
        self.eps = 1e-9 * self.scale


class _ExactSearch:
    """One point: Lagrangian bound, then bounded enumeration (or CBC); see the module docstring."""

    def __init__(self, ilp: LimpqIlp, space: _Space, b: Budgets, incumbent: IlpResult | None) -> None:
        self.ilp, self.sp, self.b, self.incumbent = ilp, space, b, incumbent
        # Integer right-hand sides on the searchable layers: Σ r ≤ floor(budget) - fixed part.
        self.int_rows: list[tuple[np.ndarray, int]] = []
        if b.bitops is not None:
            self.int_rows.append((space.bitops, math.floor(b.bitops) - ilp.fixed_bitops))
        if b.size_bits is not None:
            self.int_rows.append((space.size, math.floor(b.size_bits) - ilp.fixed_size))
        self.lat_rhs = b.latency
        self.ub = incumbent.objective if incumbent is not None else math.inf
        self.ub_idx: np.ndarray | None = None   # a feasible policy (choice index per layer) reaching ub

    # ------------------------------------------------------------------- Lagrangian bound
    def _rows_normalised(self) -> list[tuple[np.ndarray, float]]:
        rows = [(r.astype(np.float64), float(rhs)) for r, rhs in self.int_rows]
        if self.lat_rhs is not None:
            rows.append((self.sp.latency, float(self.lat_rhs)))
        out = []
        for r, rhs in rows:
            s = rhs if rhs > 0 else 1.0
            out.append((r / s, rhs / s))
        return out

    def _feasible_idx(self, j: np.ndarray) -> bool:
        rows = np.arange(len(j))
        for r, rhs in self.int_rows:
            if int(r[rows, j].sum()) > rhs:
                return False
        if self.lat_rhs is not None and math.fsum(self.sp.latency[rows, j].tolist()) > self.lat_rhs:
            return False
        return True

    def dual(self) -> tuple[float, np.ndarray]:
        """Maximise L(λ) one multiplier inside the other (each a concave piecewise-linear function of
        its multiplier, maximised by cutting planes); returns (bound, reduced costs)."""
        sp = self.sp
        rows = self._rows_normalised()
        idx = np.arange(sp.cost.shape[0])
        best = [-math.inf, None]
        tol = 1e-12 * sp.scale
        evals = [0]

        def ev(lams: list[float]) -> tuple[float, list[float]]:
            evals[0] += 1
            v = sp.cost.copy()
            for lam, (r, _) in zip(lams, rows):
                if lam:
                    v += lam * r
            j = v.argmin(axis=1)
            val = float(v[idx, j].sum()) - sum(lam * rhs for lam, (_, rhs) in zip(lams, rows))
            g = [float(r[idx, j].sum()) - rhs for r, rhs in rows]
            if val > best[0]:
                best[0], best[1] = val, list(lams)
            if all(x <= 0 for x in g):  # the Lagrangian policy may be feasible: a free upper bound
                obj = float(sp.cost[idx, j].sum())
                if obj < self.ub and self._feasible_idx(j):
                    self.ub, self.ub_idx = obj, j.copy()
            return val, g

        def maximise(prefix: list[float], d: int) -> tuple[float, list[float]]:
            """max over rows d.. given the multipliers before d: (value, subgradient there)."""
            if d == len(rows):
                return ev(prefix)

            def at(x: float) -> tuple[float, list[float]]:
                return maximise(prefix + [x], d + 1)

            v0, g0 = at(0.0)
            if g0[d] <= 0:
                return v0, g0
            lo, v_lo, g_lo = 0.0, v0, g0
            hi = sp.lam_scale
            v_hi, g_hi = at(hi)
            while g_hi[d] > 0:
                lo, v_lo, g_lo = hi, v_hi, g_hi
                hi *= 4
                if hi > sp.lam_scale * 4.0 ** 30 or evals[0] > DUAL_EVALS:  # unbounded, or enough
                    return v_hi, g_hi
                v_hi, g_hi = at(hi)
            top = (v_hi, g_hi) if v_hi >= v_lo else (v_lo, g_lo)
            for _ in range(60):
                # The two supporting lines meet at x; the function cannot exceed their value there.
                s_lo, s_hi = g_lo[d], g_hi[d]
                x = (v_hi - v_lo + s_lo * lo - s_hi * hi) / (s_lo - s_hi)
                ceiling = v_lo + s_lo * (x - lo)
                if not lo < x < hi:
                    x = (lo + hi) / 2
                v, g = at(x)
                if v > top[0]:
                    top = (v, g)
                if ceiling - top[0] <= tol or hi - lo <= BISECT_RTOL * hi or evals[0] > DUAL_EVALS:
                    break
                if g[d] > 0:
                    lo, v_lo, g_lo = x, v, g
                elif g[d] < 0:
                    hi, v_hi, g_hi = x, v, g
                else:
                    break
            return top

        maximise([], 0)
        lams = best[1]
        v = sp.cost.copy()
        for lam, (r, _) in zip(lams, rows):
            if lam:
                v += lam * r
        red = v - v.min(axis=1, keepdims=True)
        return best[0], red

    # ------------------------------------------------------------------- upper bound
    def improve(self, j: np.ndarray, red: np.ndarray, lower: float) -> None:
        """Local search from the feasible policy j: apply the best improving change of one layer's
        choice or of two layers' choices together that keeps every budget, until none is left.
        Only choices that can still lead below the best known objective are tried. Updates ub."""
        sp = self.sp
        n = len(j)
        idx = np.arange(n)
        j = j.copy()
        lat = self.lat_rhs is not None
        for _ in range(100):
            cap = self.ub - lower + sp.eps
            ls, js = np.nonzero((red <= cap) & sp.valid)
            moved = js != j[ls]
            ls, js = ls[moved], js[moved]
            if len(ls) > 300:  # keep the pair matrix small: the most promising choices
                keep = np.argsort(red[ls, js], kind="stable")[:300]
                ls, js = ls[keep], js[keep]
            if not len(ls):
                return
            dc = sp.cost[ls, js] - sp.cost[ls, j[ls]]
            drs, slacks = [], []
            for r, rhs in self.int_rows:
                drs.append(r[ls, js] - r[ls, j[ls]])
                slacks.append(rhs - int(r[idx, j].sum()))
            if lat:
                drs.append(sp.latency[ls, js] - sp.latency[ls, j[ls]])
                slacks.append(self.lat_rhs - float(sp.latency[idx, j].sum()))
            ok1 = np.ones(len(ls), bool)
            for dr, sl in zip(drs, slacks):
                ok1 &= dr <= sl
            gain1 = np.where(ok1, dc, np.inf)
            pair = dc[:, None] + dc[None, :]
            ok2 = ls[:, None] != ls[None, :]
            for dr, sl in zip(drs, slacks):
                ok2 &= dr[:, None] + dr[None, :] <= sl
            gain2 = np.where(ok2, pair, np.inf)
            b1 = int(gain1.argmin())
            b2 = int(gain2.argmin())
            g1, g2 = gain1[b1], gain2.flat[b2]
            if min(g1, g2) >= -1e-15 * sp.scale:
                break
            if g1 <= g2:
                j[ls[b1]] = js[b1]
            else:
                a, c = divmod(b2, len(ls))
                j[ls[a]] = js[a]
                j[ls[c]] = js[c]
            if not self._feasible_idx(j):  # latency rounding: never keep an infeasible policy
                return
            obj = self._key(j)[0]
            if obj < self.ub:
                self.ub, self.ub_idx = obj, j.copy()

    # ------------------------------------------------------------------- enumeration
    def enumerate(self, red: np.ndarray, t: float):
        """All policies with Σ red ≤ t that meet the budgets; returns the best one's choice indices
        and objective, None if there is none, or "limit" when there are too many states."""
        sp = self.sp
        n = red.shape[0]
        surv = red <= t
        opts = [np.flatnonzero(surv[l]) for l in range(n)]
        free = [l for l in range(n) if len(opts[l]) > 1]
        fixed_j = np.array([opts[l][0] if len(opts[l]) == 1 else 0 for l in range(n)])
        is_fixed = np.array([len(opts[l]) == 1 for l in range(n)])
        rows_idx = np.arange(n)
        base_red = float(red[rows_idx, fixed_j][is_fixed].sum())
        base_obj = float(sp.cost[rows_idx, fixed_j][is_fixed].sum())
        int_rows = []
        for r, rhs in self.int_rows:
            base = int(r[rows_idx, fixed_j][is_fixed].sum())
            mins = [int(r[l, opts[l]].min()) for l in free]
            suffix = np.cumsum([0] + mins[::-1])[::-1]  # suffix[k] = Σ mins of free[k:]
            int_rows.append((r, base, suffix, rhs))
        lat = None
        if self.lat_rhs is not None:
            mins = [float(sp.latency[l, opts[l]].min()) for l in free]
            suffix = np.cumsum([0.0] + mins[::-1])[::-1]
            slack = 1e-12 * max(abs(self.lat_rhs), 1.0)  # exact check comes last; never lose a policy
            lat = (float(sp.latency[rows_idx, fixed_j][is_fixed].sum()), suffix, self.lat_rhs + slack)

        s_red = np.array([base_red])
        s_obj = np.array([base_obj])
        s_int = [np.array([base], np.int64) for _, base, _, _ in int_rows]
        s_lat = np.array([lat[0]]) if lat else None
        for (_r, base, suffix, rhs), _s in zip(int_rows, s_int):
            if base + suffix[0] > rhs:
                return None
        if lat and lat[0] + lat[1][0] > lat[2]:
            return None
        stages = []
        choice_type = np.uint8 if sp.cost.shape[1] <= 256 else np.int32
        stored = 0
        for k, l in enumerate(free):
            parts = []
            for j in opts[l]:
                nr = s_red + red[l, j]
                m = nr <= t
                ni = []
                for (r, _, suffix, rhs), s in zip(int_rows, s_int):
                    v = s + r[l, j]
                    m &= v + suffix[k + 1] <= rhs
                    ni.append(v)
                nl = None
                if lat:
                    nl = s_lat + sp.latency[l, j]
                    m &= nl + lat[1][k + 1] <= lat[2]
                keep = np.flatnonzero(m)
                if len(keep):
                    parts.append((keep, j, nr[keep], s_obj[keep] + sp.cost[l, j], [v[keep] for v in ni],
                                  nl[keep] if nl is not None else None))
            if not parts:
                return None
            stored += sum(len(p[0]) for p in parts)
            if stored > self.ilp.enum_limit:
                return "limit"
            stages.append((np.concatenate([p[0] for p in parts]).astype(np.int32),
                           np.concatenate([np.full(len(p[0]), p[1], choice_type) for p in parts])))
            s_red = np.concatenate([p[2] for p in parts])
            s_obj = np.concatenate([p[3] for p in parts])
            s_int = [np.concatenate([p[4][i] for p in parts]) for i in range(len(int_rows))]
            if lat:
                s_lat = np.concatenate([p[5] for p in parts])

        # Near-ties of the running (order-dependent) sums are compared on exact figures.
        near = np.flatnonzero(s_obj <= s_obj.min() + 1e-6 * sp.eps + 1e-12 * sp.scale)
        near = near[np.argsort(s_obj[near], kind="stable")][:1024]
        best = None
        for s in near:
            j = fixed_j.copy()
            for (parent, choice), l in zip(reversed(stages), reversed(free)):
                j[l] = choice[s]
                s = parent[s]
            if self.lat_rhs is not None and not self._feasible_idx(j):
                continue
            key = self._key(j)
            if best is None or key < best[0]:
                best = (key, j)
        if best is None:
            return None
        return best[1], best[0][0]

    def _key(self, j: np.ndarray) -> tuple:
        kept = self.sp.kept
        w = [kept[l][c].bw for l, c in enumerate(j)]
        a = [kept[l][c].ba for l, c in enumerate(j)]
        e = self.ilp.evaluate(w, a)
        return (e["objective"], e["bitops"], e["size_bits"], e["latency"] or 0.0, tuple(w), tuple(a))

    # ------------------------------------------------------------------- the search
    def run(self) -> IlpResult:
        ilp, sp, b = self.ilp, self.sp, self.b
        if sp.combos <= SMALL_COMBOS:
            lower, red = float(sp.min_cost.sum()), sp.cost - sp.min_cost[:, None]
            t = math.inf
        else:
            lower, red = self.dual()
            if lower > float(sp.max_cost.sum()) + sp.eps:  # above every policy's objective
                ilp.stats["lagrangian-infeasible"] += 1
                return ilp._infeasible(b, "the Lagrangian bound exceeds every policy's objective")
            t = T_START * max(abs(lower), sp.scale / len(sp.kept))
        t_all = float(np.where(sp.valid, red, 0.0).max(axis=1).sum())  # Σ red ≤ t_all: every policy
        pad = sp.eps  # enumerate up to t + pad, accept up to t + pad/2: rounding never loses a policy
        if math.isfinite(t):
            start = self._index_of(self.incumbent) if self.incumbent is not None else None
            for j in (start, self.ub_idx):
                if j is not None:  # exact objective of the Lagrangian policy; polish both
                    self.ub = min(self.ub, self._key(j)[0])
                    self.improve(j, red, lower)
        rounds = 0
        while True:
            cap = min(self.ub - lower, t_all)
            t = min(t, cap)
            found = self.enumerate(red, t + pad)
            rounds += 1
            if isinstance(found, str):
                ilp.stats["cbc-fallback"] += 1
                return self._cbc(red, lower)
            if found is not None:
                j, obj = found
                if obj <= lower + t + pad / 2:
                    ilp.stats["enumerated"] += 1
                    ilp.stats["enumeration-rounds"] += rounds
                    kept = sp.kept
                    return ilp._result([kept[l][c].bw for l, c in enumerate(j)],
                                       [kept[l][c].ba for l, c in enumerate(j)], b)
                if obj < self.ub:
                    self.ub, self.ub_idx = obj, j
                self.improve(j, red, lower)
            elif t >= t_all:
                ilp.stats["enumerated"] += 1
                return ilp._infeasible(b, "exhaustive bounded enumeration")
            if t >= cap:
                # Everything that could beat the best known policy was enumerated and none was found
                # (floating point at the edge of the bound): let CBC decide.
                ilp.stats["cbc-fallback"] += 1
                return self._cbc(red, lower)
            t = t * T_GROWTH

    def _index_of(self, r: IlpResult) -> np.ndarray | None:
        """A policy as choice indices of this space; None if it uses a pruned choice."""
        out = []
        for opts, bw, ba in zip(self.sp.kept, r.w_bits, r.a_bits):
            j = next((j for j, c in enumerate(opts) if c.bw == bw and c.ba == ba), None)
            if j is None:
                return None
            out.append(j)
        return np.array(out)

    def _cbc(self, red: np.ndarray, lower: float) -> IlpResult:
        """CBC on the choices that can still reach the best known objective."""
        sp = self.sp
        limit = self.ub - lower + sp.eps if math.isfinite(self.ub) else math.inf
        opts = [[c for c, r in zip(sp.kept[l], red[l]) if r <= limit] for l in range(len(sp.kept))]
        start = self.incumbent
        if self.ub_idx is not None:
            kept = sp.kept
            w = [kept[l][c].bw for l, c in enumerate(self.ub_idx)]
            a = [kept[l][c].ba for l, c in enumerate(self.ub_idx)]
            start = IlpResult("optimal", w_bits=w, a_bits=a)
        return self.ilp._solve_cbc(_CbcModel(self.ilp, opts, self.b.active()), self.b, start)


# ------------------------------------------------------------------------------ CBC, directly
_CBC_PATH: str | None = None


def _cbc_path() -> str:
    """The CBC binary pulp bundles (what PULP_CBC_CMD runs)."""
    global _CBC_PATH
    if _CBC_PATH is None:
        _CBC_PATH = pulp.apis.PULP_CBC_CMD().path
    return _CBC_PATH


class _CbcModel:
    """An MPS file of the model on a given choice set, solved by pulp's bundled CBC binary. The text
    up to the RHS section is rendered once; a solve renders only the resource right-hand sides."""

    def __init__(self, ilp: LimpqIlp, opts: Sequence[Sequence[_Choice]], active: tuple[bool, bool, bool]) -> None:
        self.ilp = ilp
        self.opts = [list(o) for o in opts]
        use_b, use_s, use_l = active
        self.g_bitops = _gcd(c.bitops for o in self.opts for c in o) if use_b else 1
        self.g_size = _gcd(c.size for o in self.opts for c in o) if use_s else 1
        costs = [abs(c.cost) for o in self.opts for c in o]
        # Objective normalised to terms of order 1 so CBC's absolute tolerances mean the same for any
        # indicator scale; the reported objective is recomputed from the raw values.
        self.obj_scale = max(costs) if costs and max(costs) > 0 else 1.0
        self.names: list[tuple[int, int]] = []
        rows = ["NAME limpq", "ROWS", " N obj"] + [f" E one{i}" for i in range(len(self.opts))]
        rows += [f" L {r}" for r, on in zip(("bitops", "size", "latency"), active) if on]
        cols = ["COLUMNS", "    MARKER 'MARKER' 'INTORG'"]
        bounds = ["BOUNDS"]
        for i, o in enumerate(self.opts):
            for j, c in enumerate(o):
                name = f"x{len(self.names)}"
                self.names.append((i, j))
                cols.append(f"    {name} obj {c.cost / self.obj_scale!r} one{i} 1")
                if use_b:
                    cols.append(f"    {name} bitops {c.bitops // self.g_bitops}")
                if use_s:
                    cols.append(f"    {name} size {c.size // self.g_size}")
                if use_l:
                    cols.append(f"    {name} latency {float(c.latency)!r}")
                bounds.append(f" BV BND {name}")
        cols.append("    MARKER 'MARKER' 'INTEND'")
        self.head = "\n".join(rows + cols) + "\nRHS\n" + "".join(f"    RHS one{i} 1\n" for i in range(len(self.opts)))
        self.tail = "\n".join(bounds + ["ENDATA"]) + "\n"

    def rhs(self, b: Budgets) -> str:
        ilp = self.ilp
        lines = []
        if b.bitops is not None:
            lines.append(f"    RHS bitops {(math.floor(b.bitops) - ilp.fixed_bitops) // self.g_bitops}")
        if b.size_bits is not None:
            lines.append(f"    RHS size {(math.floor(b.size_bits) - ilp.fixed_size) // self.g_size}")
        if b.latency is not None:
            lines.append(f"    RHS latency {float(b.latency)!r}")
        return "".join(line + "\n" for line in lines)

    def solve(self, b: Budgets, start: IlpResult | None) -> tuple[str, list[_Choice]]:
        if any(not o for o in self.opts):
            return "infeasible", []
        with tempfile.TemporaryDirectory(prefix="limpq-cbc-") as d:
            mps, sol, mst = (os.path.join(d, f) for f in ("model.mps", "model.sol", "start.sol"))
            with open(mps, "w") as f:
                f.write(self.head)
                f.write(self.rhs(b))
                f.write(self.tail)
            args = [_cbc_path(), mps, "-ratioGap", "0", "-increment", CBC_INCREMENT]
            for opt in self.ilp.solver_options:
                args += ("-" + opt).split()
            if start is not None:
                on = {(i, j) for i, o in enumerate(self.opts) for j, c in enumerate(o)
                      if (c.bw, c.ba) == (start.w_bits[i], start.a_bits[i])}
                if len(on) == len(self.opts):  # the start is a policy of this choice set
                    with open(mst, "w") as f:
                        f.write("Stopped on time - objective value 0\n")
                        for k, ij in enumerate(self.names):
                            f.write(f"{k:>7} x{k} {1 if ij in on else 0:>15} {0:>23}\n")
                    args += ["-mips", mst]
            args += ["-solve", "-solution", sol]
            proc = subprocess.run(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                  stdin=subprocess.DEVNULL)
            if proc.returncode != 0 or not os.path.exists(sol):
                tail = " | ".join(proc.stdout.strip().splitlines()[-3:])
                raise OSError(f"cbc exited with {proc.returncode}: {tail}")
            with open(sol) as f:
                lines = f.read().splitlines()
        head = lines[0].split() if lines else [""]
        if head[0] in ("Infeasible", "Integer"):  # "Integer infeasible"
            return "infeasible", []
        if head[0] != "Optimal":
            return " ".join(head[:2]) or "no solution file", []
        picked: dict[int, int] = {}
        for line in lines[1:]:
            parts = line.split()
            if parts and parts[0] == "**":
                parts = parts[1:]
            if len(parts) >= 3 and parts[1].startswith("x") and float(parts[2]) > 0.5:
                i, j = self.names[int(parts[1][1:])]
                picked[i] = j
        if len(picked) != len(self.opts):
            return "a solution without one choice per layer", []
        return "optimal", [self.opts[i][picked[i]] for i in range(len(self.opts))]


# -------------------------------------------------------------------------------- validation
def _check_alpha(alpha) -> float:
    try:
        a = float(alpha)
    except (TypeError, ValueError):
        raise UserError(f"alpha must be a number, got {alpha!r}") from None
    if not math.isfinite(a) or a < 0:
        raise UserError(f"alpha must be a finite number >= 0, got {alpha}")
    return a


def _check_bits(ind: Indicators, bits: Sequence[int] | None) -> tuple[int, ...]:
    if bits is None:
        bits = ind.bits
    try:
        out = tuple(int(b) for b in bits)
    except (TypeError, ValueError):
        raise UserError(f"candidate bits must be integers, got {bits!r}") from None
    if not out:
        raise UserError("candidate bit list is empty")
    if len(set(out)) != len(out):
        raise UserError(f"candidate bits {list(out)} repeat a value")
    unknown = [b for b in out if b not in ind.bits]
    if unknown:
        raise UserError(f"candidate bits {unknown} have no indicators (the table covers {ind.bits})")
    return tuple(sorted(out, reverse=True))


def _check_bounds(ind: Indicators, bounds) -> dict[str, LayerBounds]:
    if not bounds:
        return {}
    names = set(ind.names)
    unknown = sorted(set(bounds) - names)
    if unknown:
        raise UserError(f"bit bounds name unknown layer(s) {unknown}")
    out = {}
    for name, b in bounds.items():
        lb = b if isinstance(b, LayerBounds) else LayerBounds.from_dict(b, f"bounds for {name!r}")
        if lb.w_min is not None and lb.w_max is not None and lb.w_min > lb.w_max:
            raise UserError(f"bounds for {name!r}: w_min {lb.w_min} > w_max {lb.w_max}")
        if lb.a_min is not None and lb.a_max is not None and lb.a_min > lb.a_max:
            raise UserError(f"bounds for {name!r}: a_min {lb.a_min} > a_max {lb.a_max}")
        out[name] = lb
    return out
