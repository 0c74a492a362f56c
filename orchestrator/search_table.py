"""The search table: one Parquet schema for every searcher's rows, streamed as a dataset directory.

A LIMPQ grid writes its rows while it runs, one part file per finished batch of points, each written
to a hidden temporary name and renamed into place (``part-<seq>-<uuid>.parquet``), so an interrupted
sweep keeps every finished point and a reader never sees a half-written file (pyarrow datasets skip
names starting with "." or "_"). ``read_search_table`` reads such a directory (or one ``.parquet``
file) back into rows; when a point id appears in several parts the row from the part written last
wins (a point that ended in ``error`` is solved again on resume and its new row supersedes the old).

Columns (``SCHEMA``; a searcher leaves the columns it does not use null):

=========================  ================  ========================================================
point_id                   string            stable id of the point (``search_rows.point_id``)
searcher                   string            "limpq" | "mixquant" | "uniform" | "random"
bitops_budget              float64           whole-model BitOps budget (fixed layers at W8A8); null =
                                             unconstrained
bitops_label               string            how the BitOps budget was given: "w4a4" (uniform
                                             equivalent, fractional bits allowed, e.g. "w3.5a3.5")
                                             or the number as written ("5.6e+10"); null when none
size_budget                float64           whole-model size budget in bits = 32·(all params)/CR
compression_ratio_budget   float64           the compression ratio the size budget came from
latency_budget             float64           budget on Σ latency-table cost; null = unconstrained
alpha                      float64           LIMPQ's α (weight term factor)
qem                        float64           MixQuant's quantization-error multiplier
bits                       string            candidate bits "6,5,4,3,2" (LIMPQ, random), the QE bits
                                             (MixQuant) or "w4a4" (uniform baselines)
status                     string            "optimal" | "infeasible" | "error"
reason                     string            why a point is infeasible / failed ("" when optimal)
objective                  float64           the searcher's objective (LIMPQ: Σ A[ba] + α·W[bw])
bitops                     float64           achieved whole-model BitOps
size_bits                  float64           achieved whole-model size in bits
size_mb                    float64           size_bits / (2^20·8), LIMPQ's "MB"
compression_ratio          float64           achieved 32·(all params)/size_bits
latency                    float64           achieved Σ latency-table cost (latency tables only)
w_bits                     list<int32>       per searchable layer, in the indicator table's order
a_bits                     list<int32>       per searchable layer
solve_seconds              float64           time spent on this point (0 when a looser point's proof
                                             settled it)
policy_id                  string            ``Policy.policy_id`` (hash of layers and bits)
=========================  ================  ========================================================

The policies table (``POLICY_SCHEMA``, one row per distinct policy of a search table) carries
policy_id, the layer names, w_bits, a_bits, the achieved figures and ``n_points``, the number of rows
that chose the policy.
"""
from __future__ import annotations

import os
import uuid
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from .atomic import write_parquet
from .console import CONSOLE
from .errors import UserError
from .torn_state import set_aside

SCHEMA = pa.schema([
    ("point_id", pa.string()),
    ("searcher", pa.string()),
    ("bitops_budget", pa.float64()),
    ("bitops_label", pa.string()),
    ("size_budget", pa.float64()),
    ("compression_ratio_budget", pa.float64()),
    ("latency_budget", pa.float64()),
    ("alpha", pa.float64()),
    ("qem", pa.float64()),
    ("bits", pa.string()),
    ("status", pa.string()),
    ("reason", pa.string()),
    ("objective", pa.float64()),
    ("bitops", pa.float64()),
    ("size_bits", pa.float64()),
    ("size_mb", pa.float64()),
    ("compression_ratio", pa.float64()),
    ("latency", pa.float64()),
    ("w_bits", pa.list_(pa.int32())),
    ("a_bits", pa.list_(pa.int32())),
    ("solve_seconds", pa.float64()),
    ("policy_id", pa.string()),
])

POLICY_SCHEMA = pa.schema([
    ("policy_id", pa.string()),
    ("searcher", pa.string()),
    ("layers", pa.list_(pa.string())),
    ("w_bits", pa.list_(pa.int32())),
    ("a_bits", pa.list_(pa.int32())),
    ("bitops", pa.float64()),
    ("size_bits", pa.float64()),
    ("compression_ratio", pa.float64()),
    ("n_points", pa.int64()),
])

PART_PREFIX = "part-"


def rows_to_table(rows: Iterable[Mapping], schema: pa.Schema = SCHEMA) -> pa.Table:
    """Rows (dicts; missing keys are null, extra keys ignored) as a table of ``schema``."""
    return pa.Table.from_pylist([{k: r.get(k) for k in schema.names} for r in rows], schema=schema)


def part_files(directory: str | os.PathLike) -> list[Path]:
    """The finished part files of a table directory, in the order they were written."""
    d = Path(directory)
    if not d.is_dir():
        return []
    return sorted(p for p in d.iterdir() if p.name.startswith(PART_PREFIX) and p.suffix == ".parquet")


def _next_seq(directory: Path) -> int:
    seqs = []
    for p in part_files(directory):
        try:
            seqs.append(int(p.name[len(PART_PREFIX):].split("-", 1)[0]))
        except ValueError:
            continue
    return max(seqs, default=-1) + 1


def write_part(directory: str | os.PathLike, rows: Sequence[Mapping]) -> Path | None:
    """Append ``rows`` to the table directory as one new part file (write-then-rename). The sequence
    number orders parts for "last write wins"; the random suffix keeps two writers from colliding."""
    if not rows:
        return None
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    path = d / f"{PART_PREFIX}{_next_seq(d):06d}-{uuid.uuid4().hex[:8]}.parquet"
    write_parquet(path, rows_to_table(rows))
    return path


def read_search_table(path: str | os.PathLike) -> list[dict]:
    """All rows of a search table directory (parts in write order, one row per point id, the last
    written winning) or of one Parquet file (rows as stored). A missing directory is an empty table."""
    p = Path(path)
    if p.is_file():
        try:
            return pq.read_table(p).to_pylist()
        except (pa.ArrowException, OSError) as e:
            raise UserError(f"{p}: unreadable search table ({type(e).__name__}: {e})") from None
    by_id: dict[str, dict] = {}
    for f in part_files(p):  # file order = write order
        try:
            # An explicit schema lets parts written before a column was added read with that column null.
            rows = ds.dataset(str(f), schema=SCHEMA, format="parquet").to_table().to_pylist()
        except (pa.ArrowException, OSError) as e:
            # Torn (a full disk, a crash before the rename reached the disk): its points are solved again.
            set_aside(f, f"{type(e).__name__}", CONSOLE.echo)
            continue
        for row in rows:
            by_id.pop(row["point_id"], None)  # re-insert so the dict keeps the latest write's order
            by_id[row["point_id"]] = row
    return list(by_id.values())


def compact(directory: str | os.PathLike) -> Path | None:
    """Rewrite a table directory as one part (after a sweep finishes, so reruns open one file).
    Safe to interrupt: the new part is complete before old ones are removed, and readers keep the
    last write of each point id, which is the same row in the new part."""
    d = Path(directory)
    old = part_files(d)
    if len(old) <= 1:
        return old[0] if old else None
    new = write_part(d, read_search_table(d))
    for f in old:
        f.unlink(missing_ok=True)
    return new


def write_search_table(path: str | os.PathLike, rows: Iterable[Mapping]) -> None:
    """One Parquet file of ``rows`` (atomic)."""
    write_parquet(path, rows_to_table(rows))


def policies_table(rows: Iterable[Mapping], layers: Sequence[str]) -> pa.Table:
    """One row per distinct policy among the optimal rows, first occurrence kept, ``n_points`` the
    number of rows naming it. ``layers``: the searchable layers the bit lists refer to."""
    first: dict[str, dict] = {}
    count: dict[str, int] = {}
    for r in rows:
        pid = r.get("policy_id")
        if r.get("status") != "optimal" or not pid:
            continue
        count[pid] = count.get(pid, 0) + 1
        first.setdefault(pid, {"policy_id": pid, "searcher": r.get("searcher"), "layers": list(layers),
                               "w_bits": r.get("w_bits"), "a_bits": r.get("a_bits"), "bitops": r.get("bitops"),
                               "size_bits": r.get("size_bits"), "compression_ratio": r.get("compression_ratio")})
    out = [dict(v, n_points=count[k]) for k, v in first.items()]
    return rows_to_table(out, POLICY_SCHEMA)


def write_policies(path: str | os.PathLike, rows: Iterable[Mapping], layers: Sequence[str]) -> pa.Table:
    table = policies_table(rows, layers)
    write_parquet(path, table)
    return table


def read_policies(path: str | os.PathLike) -> list[dict]:
    p = Path(path)
    if not p.is_file():
        return []
    return pq.read_table(p).to_pylist()


__all__ = ["SCHEMA", "POLICY_SCHEMA", "rows_to_table", "part_files", "write_part", "read_search_table",
           "compact", "write_search_table", "policies_table", "write_policies", "read_policies"]
