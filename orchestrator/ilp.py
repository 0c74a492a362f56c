"""LIMPQ's bit-width assignment ILP, solved to proven optimality with pulp's bundled CBC.

One binary x[l, bw, ba] per searchable layer and allowed (weight bits, activation bits) pair, exactly
one per layer; minimise Σ (A_l[ba] + α·W_l[bw])·x subject to any of

* BitOps: FIXED_BITOPS + Σ MACs_l·bw·ba·x ≤ bitops budget
* size:   FIXED_SIZE   + Σ params_l·bw·x    ≤ size budget (bits) = 32·(all params)/compression ratio
* latency: Σ cost_l(bw, ba)·x ≤ latency budget (costs from a CSV table)

and at least one of them. Every figure here is a whole-model figure, the convention LIMPQ's search.py
prints: the fixed layers (first conv, last fc) count at W8A8, so FIXED_BITOPS = 64·Σ MACs_fixed and
FIXED_SIZE = 8·Σ params_fixed; "all params" includes them. On the reference
(../shared/reference/limpq_resnet50.json, ``macs_column="limpq_macs"``) the published policy gives
bitops 56 034 590 720 (= 56.035 G with G = 1e9), size 66 876 768 bits (= 7.972 MB with
MB = 2^20·8 bits) and compression ratio 32·25 502 912/66 876 768 = 12.203. A "uniform WxAy" BitOps
budget is 64·Σ MACs_fixed + Σ MACs_searchable·x·y, which makes the constraint on the searchable layers
read Σ MACs·bw·ba·x ≤ Σ MACs·x·y, LIMPQ's own.

Before solving, LIMPQ's outlier rule forbids, per layer and separately for weights and activations,
the lower of two adjacent candidate bits whose indicator is smaller than the higher one's (for
candidates 6,5,4,3,2 that is "b-1 is forbidden if value[b-1] < value[b]"). The forbidden set is decided
from the raw table first and applied afterwards, so there is no cascade. Forbidden choices get no
variable (LIMPQ gives them a 1e8 objective instead, the same thing whenever a policy exists at all).

Why it is fast (``LimpqIlp`` is built once per indicators/α/bits/bounds and solves many budgets):

* Exact dominance pruning: a choice is dropped when another allowed choice of the same layer is no
  worse in the objective and in every resource the point constrains (strictly better in one, or
  equal everywhere and earlier in a fixed order). Any optimal policy using the dropped choice stays
  optimal after swapping in its dominator, so the optimum is unchanged. Pruning is cached per set of
  active constraints.
* The pulp model is built once per active-constraint set; a new point only rewrites right-hand sides.
  The resource rows are divided by the gcd of their integer coefficients, so CBC sees small exact
  integers and the integer right-hand side floor(budget/gcd) (the same feasible set, no tolerance
  games). The MPS text is rendered once and only the RHS section is re-rendered per solve.
* ``solve_many`` orders a batch from the loosest budgets to the tightest and reuses proofs: if the
  optimum of a point whose feasible set contains this point's is feasible here, it is optimal here
  (min over a superset attained inside the subset); if that superset point was infeasible, so is this
  one. Any other known feasible policy is handed to CBC as a MIP start (an upper bound only). Every
  other point is solved by CBC (PULP_CBC_CMD, gapRel 0) to proven optimality.

Every returned policy is checked in exact integer arithmetic against its budgets.
"""
from __future__ import annotations

import csv
import math
import os
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from functools import reduce
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import pulp

from workloads.quant.policy import Policy

from .errors import UserError
from .indicators import Indicators

FIXED_W_BITS = 8
FIXED_A_BITS = 8
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
    def from_dict(cls, d: Mapping, where: str) -> "LayerBounds":
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
    def load(cls, path: str | os.PathLike) -> "LatencyTable":
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

    def within(self, other: "Budgets") -> bool:
        """True when every policy meeting self also meets other (self's feasible set ⊆ other's)."""
        for mine, theirs in ((self.bitops, other.bitops), (self.size_bits, other.size_bits),
                             (self.latency, other.latency)):
            if theirs is not None and (mine is None or mine > theirs):
                return False
        return True


# ---------------------------------------------------------------------------------- the model
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
    number of budgets with ``solve`` / ``solve_many``."""

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
        self.solver_options = list(solver_options)
        self.warm = warm
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
        self._models: dict[tuple[bool, bool, bool], _Model] = {}

    # ------------------------------------------------------------------------------- figures
    def evaluate(self, w_bits: Sequence[int], a_bits: Sequence[int]) -> dict:
        """Objective and whole-model figures of a policy (no feasibility check)."""
        obj = 0.0
        bitops = self.fixed_bitops
        size = self.fixed_size
        lat = 0.0
        for l, bw, ba in zip(self.ind.layers, w_bits, a_bits):
            obj += l.act[ba] + self.alpha * l.weight[bw]
            bitops += l.macs * bw * ba
            size += l.params * bw
            if self.latency_table is not None:
                lat += self.latency_table.costs.get((l.name, bw, ba), math.nan)
        return {"objective": obj, "bitops": bitops, "size_bits": size, "size_mb": size / MB_BITS,
                "compression_ratio": self.fp_size_bits / size if size else math.inf,
                "latency": lat if self.latency_table is not None else None}

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
        order = sorted(range(len(points)), key=lambda i: _looseness_key(points[i]))
        done: list[tuple[Budgets, IlpResult]] = []
        out: list[IlpResult | None] = [None] * len(points)
        for i in order:
            t0 = time.perf_counter()
            b = points[i]
            res = self._precheck(b)
            if res is None and reuse:
                res = self._reuse(b, done)
            if res is None:
                start = self._mip_start(b, done) if reuse else None
                res = self._solve_cbc(b, start)
            res.solve_seconds = time.perf_counter() - t0
            out[i] = res
            done.append((b, res))
        return out  # type: ignore[return-value]

    def _precheck(self, b: Budgets) -> IlpResult | None:
        if not any(b.active()):
            raise UserError("a search point needs at least one budget (BitOps, size or latency)")
        if b.latency is not None and self.latency_table is None:
            raise UserError("a latency budget needs a latency table")
        for v, name in ((b.bitops, "BitOps"), (b.size_bits, "size"), (b.latency, "latency")):
            if v is not None and (not math.isfinite(v) or v < 0):
                raise UserError(f"{name} budget must be a finite number >= 0, got {v}")
        if self.empty_reason:
            return IlpResult("infeasible", self.empty_reason, layers=self.layers)
        for what, budget, label, fmt in (("bitops", b.bitops, "BitOps budget", "{:.4g}"),
                                         ("size_bits", b.size_bits, "size budget", "{:.4g} bits"),
                                         ("latency", b.latency, "latency budget", "{:.4g}")):
            if budget is None:
                continue
            lo = self.minimum(what)
            if budget < lo:
                return IlpResult("infeasible", f"{label} {fmt.format(budget)} is below the minimum "
                                 f"{fmt.format(lo)} reachable with the allowed bits", layers=self.layers)
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

    def _mip_start(self, b: Budgets, done) -> IlpResult | None:
        best = None
        for _, pres in done:
            if pres.status == "optimal" and self._feasible(pres, b):
                if best is None or pres.objective < best.objective:
                    best = pres
        return best

    def _feasible(self, r: IlpResult, b: Budgets) -> bool:
        return ((b.bitops is None or r.bitops <= b.bitops)
                and (b.size_bits is None or r.size_bits <= b.size_bits)
                and (b.latency is None or r.latency <= b.latency))

    def _model(self, active: tuple[bool, bool, bool]) -> "_Model":
        if active not in self._models:
            self._models[active] = _Model(self, active)
        return self._models[active]

    def _solve_cbc(self, b: Budgets, start: IlpResult | None) -> IlpResult:
        model = self._model(b.active())
        try:
            picked, status = model.solve(b, start)
        except (pulp.PulpSolverError, OSError) as e:
            return IlpResult("error", f"CBC failed: {e}", layers=self.layers)
        if status == "infeasible":
            names = [n for n, v in zip(("BitOps", "size", "latency"), b.active()) if v]
            return IlpResult("infeasible", f"no policy meets the {' and '.join(names)} budgets together "
                             "(CBC proved infeasibility)", layers=self.layers)
        if status != "optimal":
            return IlpResult("error", f"CBC returned status {status!r}", layers=self.layers)
        w = [c.bw for c in picked]
        a = [c.ba for c in picked]
        res = IlpResult("optimal", "", w_bits=w, a_bits=a, layers=self.layers, **self.evaluate(w, a))
        if not self._feasible(res, b):
            return IlpResult("error", f"CBC's policy breaks the budgets (bitops {res.bitops}, size "
                             f"{res.size_bits} bits)", layers=self.layers)
        return res


def _copy_result(r: IlpResult) -> IlpResult:
    return IlpResult(r.status, r.reason, r.objective, r.bitops, r.size_bits, r.size_mb, r.compression_ratio,
                     r.latency, list(r.w_bits), list(r.a_bits), 0.0, r.layers)


def _looseness_key(b: Budgets):
    # Unconstrained (None) sorts as loosest; larger budgets first.
    return tuple(-(math.inf if v is None else v) for v in (b.bitops, b.size_bits, b.latency))


class _Model:
    """The pulp problem for one set of active constraints, built once; solves rewrite only the RHS."""

    def __init__(self, ilp: LimpqIlp, active: tuple[bool, bool, bool]) -> None:
        self.ilp = ilp
        self.active = active
        use_b, use_s, use_l = active
        self.kept: list[list[_Choice]] = [
            _prune(opts, active) if ilp.prune else list(opts) for opts in ilp.choices]
        prob = pulp.LpProblem("limpq", pulp.LpMinimize)
        self.vars: list[list[pulp.LpVariable]] = []
        for i, opts in enumerate(self.kept):
            self.vars.append([pulp.LpVariable(f"x_{i}_{c.bw}_{c.ba}", cat=pulp.LpBinary) for c in opts])
        prob += pulp.lpSum(c.cost * v for opts, vs in zip(self.kept, self.vars) for c, v in zip(opts, vs))
        for i, vs in enumerate(self.vars):
            prob += (pulp.lpSum(vs) == 1, f"one_{i}")
        self.rows: dict[str, tuple[pulp.LpConstraint, int]] = {}
        if use_b:
            g = _gcd(c.bitops for opts in self.kept for c in opts)
            prob += (pulp.lpSum((c.bitops // g) * v for opts, vs in zip(self.kept, self.vars)
                                for c, v in zip(opts, vs)) <= 0, "bitops")
            self.rows["bitops"] = (prob.constraints["bitops"], g)
        if use_s:
            g = _gcd(c.size for opts in self.kept for c in opts)
            prob += (pulp.lpSum((c.size // g) * v for opts, vs in zip(self.kept, self.vars)
                                for c, v in zip(opts, vs)) <= 0, "size")
            self.rows["size"] = (prob.constraints["size"], g)
        if use_l:
            prob += (pulp.lpSum(c.latency * v for opts, vs in zip(self.kept, self.vars)
                                for c, v in zip(opts, vs)) <= 0, "latency")
            self.rows["latency"] = (prob.constraints["latency"], 1)
        self.prob = prob
        self.solver = _CachedCbc(prob, self.vars, options=ilp.solver_options, warm=ilp.warm)

    @property
    def n_vars(self) -> int:
        return sum(len(v) for v in self.vars)

    def rhs(self, b: Budgets) -> dict[str, float]:
        ilp = self.ilp
        out = {}
        if "bitops" in self.rows:
            g = self.rows["bitops"][1]
            out["bitops"] = float(math.floor((b.bitops - ilp.fixed_bitops) / g))
        if "size" in self.rows:
            g = self.rows["size"][1]
            out["size"] = float(math.floor((b.size_bits - ilp.fixed_size) / g))
        if "latency" in self.rows:
            out["latency"] = float(b.latency)
        return out

    def solve(self, b: Budgets, start: IlpResult | None) -> tuple[list[_Choice], str]:
        rhs = self.rhs(b)
        start_idx = None
        if start is not None:
            start_idx = []
            for opts, bw, ba in zip(self.kept, start.w_bits, start.a_bits):
                j = next((j for j, c in enumerate(opts) if c.bw == bw and c.ba == ba), None)
                if j is None:  # start uses a pruned choice: swap in its dominator (no worse anywhere)
                    j = _dominator_index(opts, bw, ba, self.ilp, self.active)
                start_idx.append(j)
        status, chosen = self.solver.solve(rhs, start_idx)
        if status != "optimal":
            return [], status
        return [opts[j] for opts, j in zip(self.kept, chosen)], status


def _gcd(values: Iterable[int]) -> int:
    g = reduce(math.gcd, (int(v) for v in values), 0)
    return g or 1


def _prune(opts: list[_Choice], active: tuple[bool, bool, bool]) -> list[_Choice]:
    """Drop choices dominated within the layer w.r.t. the objective and the active resources.

    Ties in every compared criterion keep the choice that is smallest in (inactive resources, then
    bits), a fixed total order, so which twin survives never depends on anything else."""
    def crit(c: _Choice) -> tuple:
        return (c.cost,) + tuple(v for v, on in zip((c.bitops, c.size, c.latency), active) if on)

    def order(c: _Choice) -> tuple:
        return crit(c) + (c.bitops, c.size, c.latency, c.bw, c.ba)

    kept = []
    for c in opts:
        cc = crit(c)
        dominated = False
        for d in opts:
            if d is c:
                continue
            dc = crit(d)
            if all(x <= y for x, y in zip(dc, cc)) and (dc != cc or order(d) < order(c)):
                dominated = True
                break
        if not dominated:
            kept.append(c)
    return kept


def _dominator_index(opts: list[_Choice], bw: int, ba: int, ilp: LimpqIlp, active) -> int:
    layer_opts = None
    for full in ilp.choices:
        if full and any(c.bw == bw and c.ba == ba for c in full) and any(c in full for c in opts):
            layer_opts = full
            break
    c = next(c for c in layer_opts if c.bw == bw and c.ba == ba)
    res = [c.cost, c.bitops, c.size, c.latency]
    best = None
    for j, d in enumerate(opts):
        if d.cost <= res[0] and all(x <= y for x, y, on in zip((d.bitops, d.size, d.latency), res[1:], active) if on):
            if best is None or d.cost < opts[best].cost:
                best = j
    return best if best is not None else 0


# ------------------------------------------------------------------------------ CBC via pulp
class _CachedCbc:
    """Simple path for measurement: pulp writes the MPS every time."""

    def __init__(self, prob: pulp.LpProblem, vars_, options: Sequence[str] = (), warm: bool = True) -> None:
        self.prob = prob
        self.vars = vars_
        self.warm = warm
        self.cmd = pulp.PULP_CBC_CMD(msg=False, gapRel=0, options=list(options), warmStart=warm)

    def solve(self, rhs: Mapping[str, float], start_idx: Sequence[int] | None) -> tuple[str, list[int]]:
        for name, v in rhs.items():
            self.prob.constraints[name].constant = -v
        if self.warm:
            for i, vs in enumerate(self.vars):
                for j, v in enumerate(vs):
                    v.setInitialValue(1 if start_idx is not None and start_idx[i] == j else 0)
        self.prob.solve(self.cmd)
        st = pulp.LpStatus[self.prob.status]
        if st == "Infeasible":
            return "infeasible", []
        if st != "Optimal":
            return st, []
        chosen = []
        for vs in self.vars:
            vals = [v.value() or 0 for v in vs]
            chosen.append(max(range(len(vs)), key=lambda j: vals[j]))
        return "optimal", chosen


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
