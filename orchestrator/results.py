"""The results table: measured accuracy of evaluated policies (finetune and PTQ), one Parquet file
keyed by (policy_id, stage, lr). Upserts rewrite the file atomically, so a resumed study never
holds duplicate rows."""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

import pyarrow as pa
import pyarrow.parquet as pq

from .atomic import write_parquet

SCHEMA = pa.schema([
    ("policy_id", pa.string()),
    ("searcher", pa.string()),
    ("stage", pa.string()),          # "finetune" | "ptq"
    ("lr", pa.float64()),            # null for ptq
    ("epochs", pa.int32()),
    ("top1", pa.float64()),
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
