"""The budget grammar of a search grid and the checks of a ``SearchCfg`` that need no file (one
``UserError`` naming the problem). Config validation and the grid both use it; it depends on neither.

Budget specs (``SearchCfg.bitops`` / ``compression_ratio`` / ``latency``, or the CLI flags); a list of
specs is the union of what each gives, in order, duplicates dropped:

* BitOps: an absolute whole-model number ``"5.6e10"``; a uniform equivalent ``"w4a4"`` =
  64·ΣMACs_fixed + ΣMACs_searchable·4·4 (``ModelCosts.uniform_bitops``, LIMPQ's convention; fractional
  bits such as ``"w3.5a4"`` are allowed); a range ``"w2a2..w6a6:25"`` (25 points; the w and a
  equivalents are interpolated linearly, so with 25 points every uniform W3A3..W6A6 is on the grid)
  or ``"1e9..5e9:5"``; ``"none"`` (no BitOps constraint at that point).
* compression ratio: ``"12.2"``, ``"4..16:7"``, ``"none"``; the size budget is 32·(all params)/CR bits.
* latency (needs a latency table): ``"1.5"``, ``"1..3:5"``, ``"none"``.

A combination whose specs are all "none" is no point (so ``bitops: [none, w4a4]`` × ``cr: [none, 8]``
gives BitOps-only, size-only and joint points); a grid left empty, or a malformed spec, is a
``UserError`` naming it. A
budget below what the all-lowest-bits policy needs is not an error: the point is recorded
``infeasible`` with the reason, like any other infeasible point, and the sweep goes on.
"""
from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .errors import UserError

if TYPE_CHECKING:
    from .config import SearchCfg


@dataclass(frozen=True)
class Uniform:
    """A BitOps budget given as a uniform WxAy equivalent (bits may be fractional)."""

    w: float
    a: float

    @property
    def label(self) -> str:
        return f"w{self.w:.4g}a{self.a:.4g}"


_UNIFORM = re.compile(r"^w(\d+(?:\.\d*)?|\.\d+)a(\d+(?:\.\d*)?|\.\d+)$", re.IGNORECASE)
_RANGE = re.compile(r"^(.+?)\.\.(.+):(.*)$")


def _term(text: str, what: str, spec: str, uniform: bool) -> float | Uniform:
    t = text.strip()
    m = _UNIFORM.match(t) if uniform else None
    if m:
        w, a = float(m.group(1)), float(m.group(2))
        if not (0 < w <= 32 and 0 < a <= 32):
            raise UserError(f"{what} spec {spec!r}: uniform bits must be in (0, 32], got {t!r}")
        return Uniform(w, a)
    try:
        v = float(t)
    except ValueError:
        form = '"5.6e10", "w4a4", "w2a2..w6a6:25", "1e9..5e9:5" or "none"' if uniform else \
               '"12.2", "4..16:7" or "none"'
        raise UserError(f"{what} spec {spec!r} is not understood (use {form})") from None
    if not math.isfinite(v) or v <= 0:
        raise UserError(f"{what} spec {spec!r}: values must be finite and > 0, got {t!r}")
    return v


def _interp(lo: float, hi: float, i: int, n: int) -> float:
    # (lo·(n-1-i) + hi·i)/(n-1) is exact whenever the true value is representable (w4 from w2..w6:25).
    return (lo * (n - 1 - i) + hi * i) / (n - 1)


def parse_spec(spec, what: str = "BitOps budget", uniform: bool = True) -> list[float | Uniform | None]:
    """One budget spec → its values (numbers, ``Uniform`` equivalents, or None for "none")."""
    if isinstance(spec, (int, float)) and not isinstance(spec, bool):
        spec = repr(spec)
    if not isinstance(spec, str) or not spec.strip():
        raise UserError(f"{what} spec {spec!r} is empty or not a string")
    s = spec.strip()
    if s.lower() == "none":
        return [None]
    m = _RANGE.match(s)
    if not m:
        if ".." in s:
            raise UserError(f"{what} spec {spec!r}: a range needs a point count, e.g. 'lo..hi:5'")
        return [_term(s, what, spec, uniform)]
    lo, hi = _term(m.group(1), what, spec, uniform), _term(m.group(2), what, spec, uniform)
    try:
        n = int(m.group(3))
    except ValueError:
        raise UserError(f"{what} spec {spec!r}: the point count after ':' must be an integer") from None
    if n < 2:
        raise UserError(f"{what} spec {spec!r}: a range needs at least 2 points, got {n}")
    if isinstance(lo, Uniform) != isinstance(hi, Uniform):
        raise UserError(f"{what} spec {spec!r}: both ends must be uniform (wXaY) or both numbers")
    if isinstance(lo, Uniform):
        return [Uniform(_interp(lo.w, hi.w, i, n), _interp(lo.a, hi.a, i, n)) for i in range(n)]
    return [_interp(lo, hi, i, n) for i in range(n)]


def parse_specs(specs: Iterable, what: str, uniform: bool) -> list[float | Uniform | None]:
    out: list = []
    for spec in specs:
        for v in parse_spec(spec, what, uniform):
            if v not in out:
                out.append(v)
    return out


def spec_size(spec) -> int:
    """How many values a spec makes, read from its text (a range's point count) without building them."""
    m = _RANGE.match(spec.strip()) if isinstance(spec, str) else None
    if m and m.group(3).strip().lstrip("+").isdigit():
        return int(m.group(3))
    return 1  # one value, or a malformed range that parse_spec reports


def _check_size(search: SearchCfg) -> None:
    """Refuse a grid above ``search.max_points`` from the specs' text, before building any of it."""
    if search.max_points < 1:
        raise UserError(f"search.max_points must be >= 1, got {search.max_points}")
    parts = {"BitOps": search.bitops, "compression ratio": search.compression_ratio, "latency": search.latency}
    sizes = {k: sum(spec_size(s) for s in v) for k, v in parts.items() if v}
    sizes |= {"alpha": len(search.alpha), "bit list": max(1, len(search.bits))}
    n = math.prod(sizes.values())
    if n > search.max_points:
        how = " x ".join(f"{v:,} {k}" for k, v in sizes.items())
        raise UserError(f"the search grid would have {n:,} points ({how}), more than search.max_points="
                        f"{search.max_points:,}; use fewer points per range or raise search.max_points")


def check_search_cfg(search: SearchCfg) -> None:
    """Everything about a ``SearchCfg`` that can be checked without the indicator table or files (specs,
    grid size, α, batch size); one ``UserError`` naming the problem."""
    if not search.alpha:
        raise UserError("search needs at least one alpha")
    _check_size(search)
    for a in search.alpha:
        if not isinstance(a, (int, float)) or isinstance(a, bool) or not math.isfinite(a) or a < 0:
            raise UserError(f"alpha must be a finite number >= 0, got {a}")
    if not (search.bitops or search.compression_ratio or search.latency):
        raise UserError("the search grid is empty: give at least one BitOps, compression-ratio or latency budget")
    parse_specs(search.bitops, "BitOps budget", True)
    parse_specs(search.compression_ratio, "compression-ratio budget", False)
    parse_specs(search.latency, "latency budget", False)
    if search.latency and not search.latency_table:
        raise UserError("latency budgets need a latency table (search.latency_table / --latency-table)")
    for bl in search.bits:
        if not bl:
            raise UserError("a candidate bit list is empty")
    if search.batch_size is not None and search.batch_size < 1:
        raise UserError(f"batch size must be >= 1, got {search.batch_size}")
