"""Baseline policies in the search table: uniform WxAy and random policies matched to budgets.

* ``uniform`` (``baselines.uniform``, e.g. [[2, 2], [4, 4]]): every searchable layer at WxAy, fixed
  layers at W8A8; ``bits`` is the label "w4a4"; no budget, no objective.
* ``random``: for a BitOps and/or size budget (those of the LIMPQ points, ``budgets_from_rows``), a
  policy drawn from the candidate bits that fits the budget and uses as much of it as a random policy
  reasonably can. Method, per (seed, budget, index) with its own generator (so a policy does not depend
  on which other budgets are drawn):
  1. draw every layer's weight and activation bits uniformly from the candidates;
  2. repair: while a budget is exceeded, lower one randomly chosen slot (a layer's w or a; only w
     slots when size is exceeded, since activations do not count in size) by one candidate step;
  3. fill: in random order, raise slots one candidate step whenever the result still fits, and repeat
     passes until no single raise fits. The result is maximal: no layer can go one step up.
  A budget below the all-lowest-bits policy gives an ``infeasible`` row (no policy). Rows carry the
  budgets they were matched to; ``status`` ``optimal`` means "a policy was found" (the table's
  vocabulary), not optimality; ``objective`` is null.
"""
from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from .config import BaselinesCfg
from .errors import UserError
from .search_rows import ModelCosts, SearchOutput, point_id, policy_row


@dataclass(frozen=True)
class Budget:
    """Whole-model budgets of one point; None = not constrained. ``compression_ratio`` is carried
    into the row only (``size_bits`` is what is enforced)."""

    bitops: float | None = None
    size_bits: float | None = None
    compression_ratio: float | None = None

    def fits(self, bitops: float, size_bits: float) -> bool:
        return ((self.bitops is None or bitops <= self.bitops)
                and (self.size_bits is None or size_bits <= self.size_bits))


def budgets_from_rows(rows: Iterable[Mapping], max_budgets: int, searcher: str = "limpq") -> list[Budget]:
    """The distinct budgets of ``searcher``'s optimal rows; when there are more than ``max_budgets``,
    an evenly spaced subset of them ordered by (BitOps, size) budget, ends included."""
    seen: dict[tuple, Budget] = {}
    for r in rows:
        if r.get("searcher") != searcher or r.get("status") != "optimal":
            continue
        b, s = r.get("bitops_budget"), r.get("size_budget")
        if b is None and s is None:
            continue
        seen.setdefault((b, s), Budget(b, s, r.get("compression_ratio_budget")))
    ordered = [seen[k] for k in sorted(seen, key=lambda k: tuple(math.inf if v is None else v for v in k))]
    if max_budgets <= 0:
        return []
    if len(ordered) <= max_budgets:
        return ordered
    if max_budgets == 1:
        return [ordered[len(ordered) // 2]]
    idx = sorted({round(i * (len(ordered) - 1) / (max_budgets - 1)) for i in range(max_budgets)})
    return [ordered[i] for i in idx]


# --------------------------------------------------------------------------------- uniform
def uniform_policies(costs: ModelCosts, pairs: Sequence[Sequence[int]]) -> SearchOutput:
    out = SearchOutput()
    n = len(costs.layers)
    for pair in pairs:
        if len(pair) != 2:
            raise UserError(f"uniform baseline {list(pair)} must be [w_bits, a_bits]")
        w, a = int(pair[0]), int(pair[1])
        pid = point_id("uniform", w=w, a=a)
        if any(r["point_id"] == pid for r in out.rows):
            continue
        policy = costs.policy([w] * n, [a] * n)
        out.add(policy_row(costs, "uniform", pid, policy, bits=f"w{w}a{a}"), policy)
    return out


# ---------------------------------------------------------------------------------- random
def _generator(seed: int, budget: Budget, index: int, cands: Sequence[int]) -> np.random.Generator:
    blob = json.dumps([seed, budget.bitops, budget.size_bits, index, list(cands)])
    return np.random.default_rng(int(hashlib.sha1(blob.encode()).hexdigest()[:16], 16))


def random_policy(costs: ModelCosts, budget: Budget, candidates: Sequence[int],
                  rng: np.random.Generator) -> tuple[list[int], list[int]] | None:
    """(w_bits, a_bits) fitting ``budget`` (draw, repair, fill; see the module docstring), or None when
    even the lowest candidate everywhere does not fit."""
    c = sorted({int(b) for b in candidates})
    if not c:
        raise UserError("random baseline: the candidate bit list is empty")
    n = len(costs.layers)
    lo = [c[0]] * n
    if not budget.fits(costs.bitops(lo, lo), costs.size_bits(lo)):
        return None
    idx = {"w": [int(i) for i in rng.integers(0, len(c), n)], "a": [int(i) for i in rng.integers(0, len(c), n)]}
    macs, params = costs.macs, costs.params
    bitops = costs.bitops([c[i] for i in idx["w"]], [c[i] for i in idx["a"]])
    size = costs.size_bits([c[i] for i in idx["w"]])

    def delta(kind: str, l: int, step: int) -> tuple[int, int]:
        """Change in (bitops, size) when slot (kind, l) moves ``step`` candidate positions."""
        iw, ia = idx["w"][l], idx["a"][l]
        nw, na = (iw + step, ia) if kind == "w" else (iw, ia + step)
        db = macs[l] * (c[nw] * c[na] - c[iw] * c[ia])
        ds = params[l] * (c[nw] - c[iw])
        return db, ds

    # Repair: lower random slots until every budget holds (the lowest policy fits, so this ends).
    while not budget.fits(bitops, size):
        size_over = budget.size_bits is not None and size > budget.size_bits
        kinds = ("w",) if size_over else ("w", "a")
        slots = [(k, l) for k in kinds for l in range(n) if idx[k][l] > 0]
        k, l = slots[int(rng.integers(len(slots)))]
        db, ds = delta(k, l, -1)
        idx[k][l] -= 1
        bitops, size = bitops + db, size + ds

    # Fill: random single-step raises while they fit, until a whole pass raises nothing.
    raised = True
    while raised:
        raised = False
        slots = [(k, l) for k in ("w", "a") for l in range(n) if idx[k][l] < len(c) - 1]
        for j in rng.permutation(len(slots)):
            k, l = slots[int(j)]
            db, ds = delta(k, l, +1)
            if budget.fits(bitops + db, size + ds):
                idx[k][l] += 1
                bitops, size = bitops + db, size + ds
                raised = True
    return [c[i] for i in idx["w"]], [c[i] for i in idx["a"]]


def random_policies(costs: ModelCosts, budgets: Sequence[Budget], candidates: Sequence[int],
                    per_budget: int = 1, seed: int = 0) -> SearchOutput:
    """``per_budget`` random policies per budget, reproducible from ``seed``."""
    cands = sorted({int(b) for b in candidates}, reverse=True)
    label = ",".join(str(b) for b in cands)
    out = SearchOutput()
    for budget in budgets:
        for i in range(per_budget):
            t0 = time.perf_counter()
            pid = point_id("random", seed=seed, index=i, bitops_budget=budget.bitops,
                           size_budget=budget.size_bits, bits=label)
            picked = random_policy(costs, budget, cands, _generator(seed, budget, i, cands))
            extra = dict(bitops_budget=budget.bitops, size_budget=budget.size_bits,
                         compression_ratio_budget=budget.compression_ratio, bits=label)
            if picked is None:
                out.add(policy_row(costs, "random", pid, None, status="infeasible",
                                   reason="budget is below the policy with the lowest candidate bits everywhere",
                                   solve_seconds=time.perf_counter() - t0, **extra), None)
                continue
            policy = costs.policy(*picked)
            out.add(policy_row(costs, "random", pid, policy, solve_seconds=time.perf_counter() - t0, **extra),
                    policy)
    return out


def run_baselines(costs: ModelCosts, cfg: BaselinesCfg, candidates: Sequence[int],
                  reference_rows: Iterable[Mapping] = (), seed: int = 0) -> SearchOutput:
    """Uniform baselines plus random ones matched to the budgets of ``reference_rows`` (LIMPQ's)."""
    out = uniform_policies(costs, cfg.uniform)
    if cfg.random_per_budget > 0:
        budgets = budgets_from_rows(reference_rows, cfg.max_random_budgets)
        out.extend(random_policies(costs, budgets, candidates, cfg.random_per_budget, seed))
    return out
