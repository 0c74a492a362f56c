"""The results table: measured accuracy of evaluated policies (finetune and PTQ), one Parquet file
keyed by (policy_id, stage, lr). Upserts rewrite the file atomically, so a resumed study never
holds duplicate rows."""
from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from .atomic import write_parquet

SCHEMA = pa.schema([
    ("policy_id", pa.string()),
    ("searcher", pa.string()),
    ("stage", pa.string()),          # "finetune" | "ptq"
    ("lr", pa.float64()),            # null for ptq
    ("epochs", pa.int32()),          # epochs actually trained
    ("budget_epochs", pa.int32()),   # epochs the recipe asked for (finetune.epochs)
    ("status", pa.string()),         # "complete" | "stopped" (early-stopped by ASHA: never on a frontier)
    ("val_top1", pa.float64()),      # on the held-out part of the train split: what LR choice looks at
    ("val_loss", pa.float64()),
    ("val_split", pa.string()),      # how that holdout was carved (fraction, size, seed)
    ("top1", pa.float64()),          # on the evaluation split, measured once per finished trial
    ("top5", pa.float64()),
    ("loss", pa.float64()),
    ("bitops", pa.float64()),
    ("size_bits", pa.float64()),
    ("mlflow_run_id", pa.string()),
    ("seconds", pa.float64()),
])


def _key(row: dict) -> tuple:
    lr = row.get("lr")
    return row["policy_id"], row["stage"], None if lr is None else round(float(lr), 12)


def read_results(path: Path) -> list[dict]:
    if not Path(path).exists():
        return []
    return pq.read_table(path).to_pylist()


def upsert_results(path: Path, rows: Iterable[dict]) -> list[dict]:
    """Insert or replace rows by (policy_id, stage, lr); returns the whole table as rows."""
    merged = {_key(r): r for r in read_results(path)}
    for r in rows:
        merged[_key(r)] = {name: r.get(name) for name in SCHEMA.names}
    out = sorted(merged.values(), key=lambda r: (r["stage"], r["searcher"] or "", r["bitops"] or 0.0, r["policy_id"]))
    write_parquet(path, pa.Table.from_pylist(out, schema=SCHEMA))
    return out


def is_complete(row: dict) -> bool:
    """Trained to its full budget (or a PTQ evaluation). Rows written before ``status`` existed count
    as complete, as they were recorded."""
    return row.get("status") in (None, "complete")


def chosen_results(rows: Iterable[dict]) -> list[dict]:
    """One row per (stage, searcher, policy): for a finetune, the learning rate whose trial scored the
    best held-out ``val_top1`` among trials trained to the full budget (ties: the smaller LR); its
    ``top1`` is then reported as measured on the evaluation split, which played no part in the choice.
    Early-stopped trials and rows without an accuracy are never chosen."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if is_complete(r) and _number(r.get("top1")) is not None:
            groups.setdefault((r.get("stage"), r.get("searcher"), r.get("policy_id")), []).append(r)

    def key(r: dict) -> tuple:
        val = _number(r.get("val_top1"))
        return (-(val if val is not None else float("-inf")), _number(r.get("lr")) or 0.0)

    return [min(g, key=key) for g in groups.values()]


def _number(v) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and v == v else None
