"""MixQuant search: per-layer weight bits from a quantization-error (QE) table and a sweep of QE
multipliers (QEM).

The QE table (``workloads.quant.ptq.qe_table``: MSE between each searchable layer's weight and its
asymmetric per-tensor quantization at 8..2 bits) is the only work that touches the model. It is
computed once per model and cached as Parquet in the study's search directory, keyed by a fingerprint
of the searchable weights, so a rerun (or a second sweep) loads it instead of recomputing. Each QEM is
then a table lookup (``mixquant_bits``: per layer the smallest b with QE_b ≤ QEM·QE_8); activations
stay at one fixed width (``mixquant.act_bits``) on every searchable layer.

Rows (searcher ``mixquant``): ``qem`` set, budgets and ``alpha`` null, ``bits`` the QE bits
("8,7,6,5,4,3,2"), ``status`` always ``optimal`` (every QEM yields a policy), ``objective`` the mean
over searchable layers of the chosen bit's QE (a weight MSE, lower is better; comparable between
MixQuant points only, not with LIMPQ's objective), ``solve_seconds`` the lookup time of that QEM
(the table's compute time is in ``QeTable.seconds``).
"""
from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch import nn

from workloads.quant.ptq import QE_BITS, mixquant_bits, qe_table

from .atomic import write_parquet
from .config import MixQuantCfg
from .errors import UserError
from .search_rows import ModelCosts, SearchOutput, point_id, policy_row

SEARCHER = "mixquant"
CACHE_NAME = "mixquant_qe.parquet"

_QE_SCHEMA = pa.schema([("layer", pa.string()), ("bits", pa.int32()), ("qe", pa.float64())])


@dataclass
class QeTable:
    qe: dict[str, dict[int, float]]   # layer -> bits -> QE, layers in policy order
    bits: tuple[int, ...]
    fingerprint: str
    seconds: float                    # time it took to compute (also when loaded from the cache)
    from_cache: bool = False

    @property
    def layers(self) -> list[str]:
        return list(self.qe)


def weights_fingerprint(model: nn.Module, layers: Sequence[str]) -> str:
    """Hash of the named layers' weight bytes, shapes and names: a cache written for other weights,
    another layer set or another model never matches."""
    mods = dict(model.named_modules())
    h = hashlib.sha1()
    for name in layers:
        if name not in mods or not isinstance(getattr(mods[name], "weight", None), torch.Tensor):
            raise UserError(f"MixQuant: the model has no weighted layer {name!r}")
        w = mods[name].weight.detach().to("cpu", torch.float32).contiguous()
        h.update(json.dumps([name, list(w.shape)]).encode())
        h.update(w.numpy().tobytes())
    return h.hexdigest()


def _read_cache(path: Path, fingerprint: str, bits: tuple[int, ...]) -> QeTable | None:
    try:
        t = pq.read_table(path)
    except (OSError, pa.ArrowException):
        return None  # unreadable cache: recompute and overwrite it
    meta = t.schema.metadata or {}
    if meta.get(b"mpq.fingerprint", b"").decode() != fingerprint:
        return None
    if tuple(json.loads(meta.get(b"mpq.bits", b"[]"))) != bits:
        return None
    qe: dict[str, dict[int, float]] = {}
    d = t.to_pydict()
    for layer, b, v in zip(d["layer"], d["bits"], d["qe"]):
        qe.setdefault(layer, {})[int(b)] = float(v)
    return QeTable(qe, bits, fingerprint, float(meta.get(b"mpq.seconds", b"0")), from_cache=True)


def _write_cache(path: Path, table: QeTable) -> None:
    rows = [(layer, b, v) for layer, per in table.qe.items() for b, v in per.items()]
    meta = {b"mpq.fingerprint": table.fingerprint.encode(), b"mpq.bits": json.dumps(list(table.bits)).encode(),
            b"mpq.seconds": repr(table.seconds).encode()}
    cols = list(zip(*rows)) if rows else ([], [], [])
    write_parquet(path, pa.Table.from_arrays([pa.array(c, type=f.type) for c, f in zip(cols, _QE_SCHEMA)],
                                             schema=_QE_SCHEMA.with_metadata(meta)))


def load_or_compute_qe_table(model: nn.Module, layers: Sequence[str], cache_path: str | Path | None,
                             bits: Sequence[int] = QE_BITS) -> QeTable:
    """The QE table of ``layers``, from ``cache_path`` when it holds this model's table, else computed
    (and written there atomically). ``cache_path=None`` computes without caching."""
    bits = tuple(int(b) for b in bits)
    if 8 not in bits:
        raise UserError(f"MixQuant: QE bits {list(bits)} must include 8 (the reference error QE_8)")
    layers = list(layers)
    fp = weights_fingerprint(model, layers)
    path = Path(cache_path) if cache_path is not None else None
    if path is not None and path.exists():
        cached = _read_cache(path, fp, bits)
        if cached is not None and cached.layers == layers:
            return cached
    t0 = time.perf_counter()
    qe = qe_table(model, layers, bits)
    table = QeTable({n: dict(qe[n]) for n in layers}, bits, fp, time.perf_counter() - t0)
    if path is not None:
        _write_cache(path, table)
    return table


def mixquant_sweep(table: QeTable, costs: ModelCosts, qems: Sequence[float], act_bits: int) -> SearchOutput:
    """One row and policy per QEM, by lookup in ``table`` only (the model is not touched).
    A repeated QEM yields one row."""
    if table.layers != list(costs.layers):
        raise UserError("MixQuant: the QE table's layers differ from the searchable layers of the cost model")
    bits_label = ",".join(str(b) for b in table.bits)
    out = SearchOutput()
    seen: set[str] = set()
    for q in qems:
        q = float(q)
        if not q > 0:
            raise UserError(f"MixQuant: QEM must be positive, got {q}")
        pid = point_id(SEARCHER, qem=q, act_bits=act_bits, bits=bits_label)
        if pid in seen:
            continue
        seen.add(pid)
        t0 = time.perf_counter()
        chosen = mixquant_bits(table.qe, q)
        w = [chosen[n] for n in costs.layers]
        objective = sum(table.qe[n][b] for n, b in zip(costs.layers, w)) / len(w)
        policy = costs.policy(w, [act_bits] * len(w))
        out.add(policy_row(costs, SEARCHER, pid, policy, bits=bits_label, objective=objective, qem=q,
                           solve_seconds=time.perf_counter() - t0), policy)
    return out


@dataclass
class MixQuantOutput(SearchOutput):
    qe_table: QeTable | None = None


def run_mixquant(fp_model: nn.Module, costs: ModelCosts, cfg: MixQuantCfg | Mapping,
                 search_dir: str | Path | None) -> MixQuantOutput:
    """The MixQuant search of a study: QE table (cached in ``search_dir``) + QEM sweep.
    ``cfg`` is ``MixQuantCfg`` or a dict with ``qem`` and ``act_bits``."""
    qems = cfg["qem"] if isinstance(cfg, Mapping) else cfg.qem
    act_bits = int(cfg["act_bits"] if isinstance(cfg, Mapping) else cfg.act_bits)
    cache = Path(search_dir) / CACHE_NAME if search_dir is not None else None
    table = load_or_compute_qe_table(fp_model, costs.layers, cache)
    sweep = mixquant_sweep(table, costs, qems, act_bits)
    return MixQuantOutput(rows=sweep.rows, policies=sweep.policies, qe_table=table)
