"""The ``select`` stage: which searched policies get evaluated, and how.

From the search table we pick

* LIMPQ: up to ``select.max_policies`` distinct policies of one α (``select.alpha``, default the first
  of ``search.alpha``). Budgets that equal a uniform baseline's BitOps come first, so every uniform
  WxAy has a LIMPQ policy at exactly its budget to be compared with after equal finetuning; among the
  points of one BitOps budget the one with no (or the loosest) size budget is taken. Remaining slots go
  to the objective-vs-BitOps Pareto frontier, evenly spaced along BitOps. A LIMPQ policy identical to a
  uniform one (e.g. every layer at the top bit) is skipped: it would only be a second copy.
* uniform and random baselines when ``select.include_uniform`` / ``include_random``;
* every distinct MixQuant policy (PTQ only: MixQuant is a post-training method).

Each selection says which evaluations it gets: ``finetune`` (single-bit LSQ QAT) and/or ``ptq``.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

from workloads.quant.policy import Policy

from .config import Config
from .search_rows import ModelCosts


def _ok(rows: Iterable[Mapping], searcher: str) -> list[Mapping]:
    return [r for r in rows if r.get("searcher") == searcher and r.get("status") == "optimal"
            and r.get("policy_id")]


def _selection(row: Mapping, layers: Sequence[str], evaluate: list[str]) -> dict:
    keep = ("point_id", "searcher", "policy_id", "bitops_budget", "size_budget", "compression_ratio_budget",
            "alpha", "qem", "bits", "objective", "bitops", "size_bits")
    sel = {k: row.get(k) for k in keep}
    sel["policy"] = Policy(tuple(layers), tuple(row["w_bits"]), tuple(row["a_bits"])).to_json()
    sel["evaluate"] = evaluate
    return sel


def _frontier(rows: list[Mapping]) -> list[Mapping]:
    """Rows not dominated in (BitOps, objective), both lower-better; one per policy, by BitOps."""
    best: list[Mapping] = []
    for r in sorted(rows, key=lambda r: (r["bitops"], r["objective"], r["policy_id"])):
        if not best or r["objective"] < best[-1]["objective"]:
            best.append(r)
    return best


def _evenly(rows: list[Mapping], k: int) -> list[Mapping]:
    if k <= 0 or not rows:
        return []
    if len(rows) <= k:
        return list(rows)
    if k == 1:
        return [rows[len(rows) // 2]]
    return [rows[round(i * (len(rows) - 1) / (k - 1))] for i in range(k)]


def select_policies(rows: Sequence[Mapping], cfg: Config, costs: ModelCosts) -> list[dict]:
    """The selections (dicts with the search row's fields, ``policy`` JSON and ``evaluate``)."""
    layers = costs.layers
    alpha = cfg.select.alpha if cfg.select.alpha is not None else cfg.search.alpha[0]
    out: list[dict] = []
    seen: set[str] = set()

    uniform = _ok(rows, "uniform")
    uniform_ids = {r["policy_id"] for r in uniform}
    limpq = [r for r in _ok(rows, "limpq") if r.get("alpha") is not None and math.isclose(r["alpha"], alpha)]
    picked: list[Mapping] = []

    def take(r: Mapping) -> None:
        if r["policy_id"] not in uniform_ids and r["policy_id"] not in {p["policy_id"] for p in picked}:
            picked.append(r)

    # 1. LIMPQ at exactly the uniform baselines' BitOps budgets (middle budgets first: the extremes
    #    tend to coincide with the uniform policy itself)
    pairs = sorted({(int(w), int(a)) for w, a in cfg.baselines.uniform}, key=lambda p: p[0] * p[1])
    mid = sorted(range(len(pairs)), key=lambda i: abs(i - (len(pairs) - 1) / 2))
    for i in mid:
        target = costs.uniform_bitops(*pairs[i])
        at = [r for r in limpq if r.get("bitops_budget") is not None and math.isclose(r["bitops_budget"], target)]
        if at:
            at.sort(key=lambda r: (r.get("size_budget") is not None, -(r.get("size_budget") or 0.0)))
            take(at[0])
        if len(picked) >= cfg.select.max_policies:
            break
    # 2. the rest along the frontier
    rest = [r for r in _frontier(limpq) if r["policy_id"] not in uniform_ids
            and r["policy_id"] not in {p["policy_id"] for p in picked}]
    for r in _evenly(rest, cfg.select.max_policies - len(picked)):
        take(r)
    picked = picked[: cfg.select.max_policies]
    for r in sorted(picked, key=lambda r: r["bitops"]):
        out.append(_selection(r, layers, ["finetune", "ptq"]))
        seen.add(r["policy_id"])

    for searcher, on in (("uniform", cfg.select.include_uniform), ("random", cfg.select.include_random)):
        for r in sorted(_ok(rows, searcher), key=lambda r: r["bitops"]):
            if r["policy_id"] not in seen:
                out.append(_selection(r, layers, (["finetune"] if on else []) + ["ptq"]))
                seen.add(r["policy_id"])
    if cfg.mixquant.enabled:
        for r in sorted(_ok(rows, "mixquant"), key=lambda r: r["bitops"]):
            if r["policy_id"] not in seen:
                out.append(_selection(r, layers, ["ptq"]))
                seen.add(r["policy_id"])
    return out
