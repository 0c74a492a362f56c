"""Whole-model cost figures of a policy and search-table rows, shared by the searchers that are not
the ILP (MixQuant, uniform and random baselines), so their rows line up with LIMPQ's.

Cost convention (LIMPQ's, the same as ``orchestrator.ilp``): every figure is whole-model; the fixed
layers (first conv, last fc by default) count at W8A8, so
``bitops = 64·Σ MACs_fixed + Σ MACs_l·w_l·a_l`` and ``size_bits = 8·Σ params_fixed + Σ params_l·w_l``;
a compression ratio is ``32·(all params) / size_bits``.

Rows are plain dicts in the search table's schema (``orchestrator.search_table.SCHEMA``); any column a
searcher does not fill is null.
"""
from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from workloads.quant.policy import Policy

from . import search_table
from .indicators import Indicators

if TYPE_CHECKING:
    from torch import nn

FIXED_BITS = 8
FP_BITS = 32

# One schema for every searcher's rows: the search table's (``orchestrator.search_table``).
rows_to_table = search_table.rows_to_table
write_search_rows = search_table.write_search_table


def point_id(searcher: str, **params) -> str:
    """Stable id of a search point: a hash of its searcher and parameters (floats normalised, so
    ``qem=2`` and ``qem=2.0`` are the same point)."""
    norm = {k: (float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v)
            for k, v in params.items()}
    blob = json.dumps({"searcher": searcher, **norm}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha1(blob.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class ModelCosts:
    """MACs and params of the searchable layers (in policy order) and the fixed layers' share."""

    layers: tuple[str, ...]
    macs: tuple[int, ...]
    params: tuple[int, ...]
    fixed_bitops: int      # fixed layers at W8A8
    fixed_size: int        # fixed layers' weights at 8 bits
    fp_size_bits: int      # 32 · every weight, fixed layers included

    @classmethod
    def from_indicators(cls, ind: Indicators) -> ModelCosts:
        return cls(tuple(l.name for l in ind.layers), tuple(l.macs for l in ind.layers),
                   tuple(l.params for l in ind.layers),
                   sum(f.macs * f.w_bits * f.a_bits for f in ind.fixed), sum(f.params * f.w_bits for f in ind.fixed),
                   FP_BITS * (sum(l.params for l in ind.layers) + sum(f.params for f in ind.fixed)))

    @classmethod
    def from_model(cls, model: nn.Module, input_shape: Sequence[int],
                   fixed_layers: Sequence[str] | None = None) -> ModelCosts:
        """From the cost model (one forward pass). Searchable layers in registration order, as the
        indicator stage lists them; fixed layers default to first conv + last linear."""
        from torch import nn  # here, not at the top: search workers should not import torch

        from workloads.cost import layer_costs
        from workloads.quant.swap import default_fixed_layers

        costs = {c.name: c for c in layer_costs(model, input_shape)}
        fixed = list(default_fixed_layers(model) if fixed_layers is None else fixed_layers)
        unknown = [f for f in fixed if f not in costs]
        if unknown:
            raise ValueError(f"fixed layer(s) {unknown} are not Conv2d/Linear layers of the model")
        names = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear)) and n not in fixed]
        return cls(tuple(names), tuple(costs[n].macs for n in names), tuple(costs[n].params for n in names),
                   sum(costs[f].macs * FIXED_BITS * FIXED_BITS for f in fixed),
                   sum(costs[f].params * FIXED_BITS for f in fixed),
                   FP_BITS * sum(c.params for c in costs.values()))

    def bitops(self, w_bits: Sequence[int], a_bits: Sequence[int]) -> int:
        return self.fixed_bitops + sum(m * w * a for m, w, a in zip(self.macs, w_bits, a_bits, strict=True))

    def size_bits(self, w_bits: Sequence[int]) -> int:
        return self.fixed_size + sum(p * w for p, w in zip(self.params, w_bits, strict=True))

    def uniform_bitops(self, w: int, a: int) -> int:
        """LIMPQ's "uniform WxAy" budget: searchable layers at WxAy, fixed layers at W8A8."""
        return self.fixed_bitops + sum(self.macs) * w * a

    def size_budget(self, compression_ratio: float) -> float:
        return self.fp_size_bits / compression_ratio

    def compression_ratio(self, size_bits: float) -> float:
        return self.fp_size_bits / size_bits if size_bits else math.inf

    def policy(self, w_bits: Sequence[int], a_bits: Sequence[int]) -> Policy:
        return Policy(self.layers, tuple(w_bits), tuple(a_bits))


@dataclass
class SearchOutput:
    """A searcher's rows (search-table schema) and the distinct policies they name."""

    rows: list[dict] = field(default_factory=list)
    policies: dict[str, Policy] = field(default_factory=dict)

    def add(self, row: dict, policy: Policy | None) -> None:
        self.rows.append(row)
        if policy is not None:
            self.policies.setdefault(policy.policy_id, policy)

    def extend(self, other: SearchOutput) -> SearchOutput:
        for r in other.rows:
            self.rows.append(r)
        for k, p in other.policies.items():
            self.policies.setdefault(k, p)
        return self


def policy_row(costs: ModelCosts, searcher: str, pid: str, policy: Policy | None, *, status: str = "optimal",
               reason: str = "", bits: str = "", objective: float | None = None, solve_seconds: float = 0.0,
               **extra) -> dict:
    """One search-table row; whole-model BitOps/size from ``costs`` (null when there is no policy)."""
    row = {"point_id": pid, "searcher": searcher, "status": status, "reason": reason, "bits": bits,
           "objective": objective, "solve_seconds": float(solve_seconds), "bitops_budget": None,
           "size_budget": None, "compression_ratio_budget": None, "alpha": None, "qem": None,
           "bitops": None, "size_bits": None, "w_bits": None, "a_bits": None, "policy_id": None}
    row.update(extra)
    if policy is not None:
        if policy.layers != costs.layers:
            raise ValueError("policy layers differ from the cost model's searchable layers")
        row.update(bitops=float(costs.bitops(policy.w_bits, policy.a_bits)),
                   size_bits=float(costs.size_bits(policy.w_bits)),
                   w_bits=list(policy.w_bits), a_bits=list(policy.a_bits), policy_id=policy.policy_id)
    return row
