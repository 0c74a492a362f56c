"""The importance-indicator table: what the indicator stage writes and every search reads.

In memory: ``Indicators`` (candidate bits, searchable layers with per-bit weight/act values, MACs and
params, and the fixed layers). On disk: Parquet with one row per (layer, kind, bits) — the schema in
the README — or JSON in the layout of LIMPQ's published ResNet-50 indicators
(../shared/reference/limpq_resnet50.json). Never pickle.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from .atomic import write_json, write_parquet
from .errors import UserError

SCHEMA = pa.schema([
    ("layer", pa.string()),
    ("kind", pa.string()),       # "weight" | "act" | "fixed" (fixed: first/last layer, W8A8)
    ("bits", pa.int32()),
    ("value", pa.float64()),     # learned LSQ step size; null for fixed rows
    ("macs", pa.int64()),
    ("params", pa.int64()),
])


@dataclass
class LayerIndicators:
    name: str
    params: int
    macs: int
    weight: dict[int, float]
    act: dict[int, float]


@dataclass
class FixedLayer:
    name: str
    params: int
    macs: int
    w_bits: int = 8
    a_bits: int = 8


@dataclass
class Indicators:
    bits: list[int]
    layers: list[LayerIndicators]
    fixed: list[FixedLayer] = field(default_factory=list)
    model: str = ""

    def __post_init__(self) -> None:
        self.validate()

    @property
    def names(self) -> list[str]:
        return [l.name for l in self.layers]

    def validate(self) -> None:
        if not self.layers:
            raise UserError("indicator table holds no searchable layer")
        if len(set(self.bits)) != len(self.bits) or any(not 1 <= b <= 16 for b in self.bits):
            raise UserError(f"indicator table has invalid candidate bits {self.bits}")
        seen = set()
        for l in self.layers:
            if l.name in seen:
                raise UserError(f"indicator table lists layer {l.name!r} twice")
            seen.add(l.name)
            for kind, table in (("weight", l.weight), ("act", l.act)):
                missing = [b for b in self.bits if b not in table]
                if missing:
                    raise UserError(f"indicator table: layer {l.name!r} has no {kind} value for bits {missing}")
                bad = [b for b in self.bits if not math.isfinite(table[b])]
                if bad:
                    raise UserError(f"indicator table: layer {l.name!r} {kind} value is NaN/inf at bits {bad}")
            if l.macs < 0 or l.params < 0:
                raise UserError(f"indicator table: layer {l.name!r} has negative MACs or params")

    # ---------------------------------------------------------------- Parquet
    def to_table(self) -> pa.Table:
        rows = {k: [] for k in SCHEMA.names}

        def add(layer, kind, bits, value, macs, params):
            for k, v in zip(SCHEMA.names, (layer, kind, bits, value, macs, params)):
                rows[k].append(v)

        for l in self.layers:
            for kind, table in (("weight", l.weight), ("act", l.act)):
                for b in self.bits:
                    add(l.name, kind, b, float(table[b]), l.macs, l.params)
        for f in self.fixed:
            add(f.name, "fixed", f.w_bits, None, f.macs, f.params)
        meta = {b"mpq.bits": json.dumps(self.bits).encode(), b"mpq.model": self.model.encode()}
        return pa.Table.from_pydict(rows, schema=SCHEMA.with_metadata(meta))

    def to_parquet(self, path: str | Path) -> None:
        write_parquet(path, self.to_table())

    @classmethod
    def from_table(cls, table: pa.Table, where: str = "table") -> Indicators:
        missing = [c for c in SCHEMA.names if c not in table.column_names]
        if missing:
            raise UserError(f"{where}: indicator table lacks column(s) {missing}")
        meta = table.schema.metadata or {}
        d = table.to_pydict()
        order: list[str] = []
        layers: dict[str, LayerIndicators] = {}
        fixed: list[FixedLayer] = []
        bits_seen: list[int] = []
        for layer, kind, bits, value, macs, params in zip(*(d[c] for c in SCHEMA.names)):
            if kind == "fixed":
                fixed.append(FixedLayer(layer, int(params), int(macs), int(bits), int(bits)))
                continue
            if kind not in ("weight", "act"):
                raise UserError(f"{where}: unknown indicator kind {kind!r} for layer {layer!r}")
            if layer not in layers:
                layers[layer] = LayerIndicators(layer, int(params), int(macs), {}, {})
                order.append(layer)
            if value is None:
                raise UserError(f"{where}: layer {layer!r} {kind} value at {bits} bits is null")
            getattr(layers[layer], kind)[int(bits)] = float(value)
            if int(bits) not in bits_seen:
                bits_seen.append(int(bits))
        bits = json.loads(meta[b"mpq.bits"]) if b"mpq.bits" in meta else bits_seen
        model = meta.get(b"mpq.model", b"").decode()
        return cls(bits=[int(b) for b in bits], layers=[layers[n] for n in order], fixed=fixed, model=model)

    # ------------------------------------------------------------------- JSON
    def to_json_dict(self) -> dict:
        return {
            "model": self.model,
            "bits": self.bits,
            "fixed_layers": {f.name: {"params": f.params, "macs": f.macs, "w_bits": f.w_bits,
                                      "a_bits": f.a_bits} for f in self.fixed},
            "layers": [{"name": l.name, "params": l.params, "macs": l.macs,
                        "weight": {str(b): l.weight[b] for b in self.bits},
                        "act": {str(b): l.act[b] for b in self.bits}} for l in self.layers],
        }

    @classmethod
    def from_json_dict(cls, d: dict, macs_column: str = "macs", where: str = "json") -> Indicators:
        if macs_column != "macs" and isinstance(d, dict):
            entries = [l for l in d.get("layers") or [] if isinstance(l, dict)] + \
                [{"name": k, **f} for k, f in (d.get("fixed_layers") or {}).items() if isinstance(f, dict)]
            # A layer without the column falls back to "macs" (LIMPQ's table counts fc alike in both);
            # a column no layer has is a typo.
            if not any(macs_column in l for l in entries):
                cols = sorted({k for l in entries for k in l if "macs" in k}) or ["macs"]
                raise UserError(f"{where}: no MACs column {macs_column!r}; the table has {', '.join(cols)}")
        try:
            bits = [int(b) for b in d["bits"]]
            layers = [
                LayerIndicators(
                    name=l["name"], params=int(l["params"]), macs=int(l.get(macs_column, l["macs"])),
                    weight={int(b): _num(v) for b, v in l["weight"].items()},
                    act={int(b): _num(v) for b, v in l["act"].items()},
                )
                for l in d["layers"]
            ]
            fixed = [
                FixedLayer(name, int(f["params"]), int(f.get(macs_column, f["macs"])),
                           int(f.get("w_bits", 8)), int(f.get("a_bits", 8)))
                for name, f in (d.get("fixed_layers") or {}).items()
            ]
        except (KeyError, TypeError, ValueError) as e:
            raise UserError(f"{where}: not an indicator file ({type(e).__name__}: {e})") from None
        return cls(bits=bits, layers=layers, fixed=fixed, model=str(d.get("model", "")))

    def to_json(self, path: str | Path) -> None:
        write_json(path, self.to_json_dict())

    # ------------------------------------------------------------ either one
    @classmethod
    def load(cls, path: str | Path, macs_column: str = "macs") -> Indicators:
        """Read a .parquet or .json indicator file; any problem is a UserError naming the file."""
        path = Path(path)
        if not path.is_file():
            raise UserError(f"indicator file {path} does not exist")
        try:
            if path.suffix == ".json":
                return cls.from_json_dict(json.loads(path.read_text()), macs_column, where=str(path))
            if macs_column != "macs":
                raise UserError(f"{path}: a MACs column ({macs_column!r}) can be chosen only for a JSON table; "
                                "a Parquet table has one 'macs' column")
            return cls.from_table(pq.read_table(path), where=str(path))
        except UserError:
            raise
        except (json.JSONDecodeError, pa.ArrowException, OSError, UnicodeDecodeError) as e:
            raise UserError(f"{path}: unreadable indicator file ({type(e).__name__}: {e})") from None

def _num(v) -> float:
    return float("nan") if v is None else float(v)
