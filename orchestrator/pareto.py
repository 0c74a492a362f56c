"""Pareto frontiers of a study and the plots that compare its searchers.

* ``pareto_front``: the non-dominated rows for "less x is better" and a y to maximise or minimise.
* ``frontier_table``: the frontier policies the report lists. With results: per searcher, top-1 vs
  BitOps over that searcher's evaluated policies, using its ``finetune`` results when it has any and
  its ``ptq`` results otherwise (one stage per searcher, so a frontier never mixes finetuned and
  PTQ accuracies); each result row is merged with its policy's search row (w_bits, a_bits, objective,
  alpha, qem, budgets). Without results: LIMPQ's objective vs BitOps frontier, one per α.
* ``plot_pareto``: PNGs (matplotlib, Agg) — top-1 vs BitOps and top-1 vs size when results exist;
  for the search alone, objective vs BitOps (LIMPQ per α and MixQuant's mean QE per activation
  width, each in its own panel since the objectives are not comparable) and size vs BitOps of every
  searcher's policies — plus ``pareto.html``: the same charts as inline SVG with per-point hover
  details and clickable legends, self-contained (no script or style fetched from anywhere).

Rows are plain dicts in the search-table and results-table schemas.
"""
from __future__ import annotations

import html
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .atomic import atomic_path
from .results import chosen_results

HTML_NAME = "pareto.html"
# Searchers in display order (others follow alphabetically); colours follow this order.
SEARCHER_ORDER = ("limpq", "mixquant", "uniform", "random")
_COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#7f7f7f",
           "#bcbd22", "#17becf")


def _num(v) -> float | None:
    if v is None or isinstance(v, bool):
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(f) else f


def _tie_key(row: Mapping) -> tuple:
    """Deterministic order among points with equal coordinates, independent of input order."""
    return (str(row.get("policy_id") or ""), str(row.get("point_id") or ""), str(row.get("searcher") or ""),
            json.dumps(row, sort_keys=True, default=str))


def pareto_front(rows: Iterable[Mapping], x: str, y: str, *, maximize_y: bool) -> list[dict]:
    """Rows not dominated by another row, ascending in ``x``: a row is dominated when another has
    x' <= x and y' at least as good with one of them strictly better. Rows whose x or y is missing or
    NaN are ignored. Of several rows at the same (x, y) exactly one is kept: the first by
    (policy_id, point_id, searcher, content), whatever the input order."""
    pts = [(_num(r.get(x)), _num(r.get(y)), r) for r in rows]
    pts = [(px, py, r) for px, py, r in pts if px is not None and py is not None]
    sign = -1.0 if maximize_y else 1.0
    # x ascending, then the best y first, then the tie key: a sweep keeps a row iff its y beats
    # every row before it (all of which have x' <= x).
    pts.sort(key=lambda t: (t[0], sign * t[1], _tie_key(t[2])))
    front, best = [], math.inf
    for _px, py, r in pts:
        if sign * py < best:
            front.append(dict(r))
            best = sign * py
    return front


def _searcher_sort_key(name: str) -> tuple:
    return (SEARCHER_ORDER.index(name), "") if name in SEARCHER_ORDER else (len(SEARCHER_ORDER), name or "")


def _search_by_policy(search_rows: Iterable[Mapping]) -> dict[str, list[dict]]:
    """Optimal search rows with a policy, by policy id, in a deterministic order."""
    out: dict[str, list[dict]] = {}
    for r in search_rows:
        if r.get("status") == "optimal" and r.get("policy_id"):
            out.setdefault(r["policy_id"], []).append(dict(r))
    for rows in out.values():
        rows.sort(key=lambda r: (_searcher_sort_key(r.get("searcher") or ""),
                                 *(math.inf if _num(r.get(k)) is None else _num(r.get(k))
                                   for k in ("alpha", "qem", "bitops_budget", "size_budget")),
                                 str(r.get("point_id") or "")))
    return out


_SEARCH_FIELDS = ("point_id", "w_bits", "a_bits", "objective", "alpha", "qem", "bits", "bitops_budget",
                  "size_budget", "compression_ratio_budget")


def accuracy_points(search_rows: Iterable[Mapping], results_rows: Iterable[Mapping]) -> dict[str, list[dict]]:
    """Per searcher, one merged row per evaluated policy at the searcher's stage (``finetune`` if the
    searcher has any finetune result, else ``ptq``): the result ``results.chosen_results`` picks (LR
    chosen on the held-out split, full-budget trials only), with the search row's fields added.
    Results whose policy has no optimal search row are left out (there are no per-layer bits to show
    for them)."""
    by_policy = _search_by_policy(search_rows)
    grouped: dict[str, list[dict]] = {}
    for r in chosen_results(results_rows):
        if not r.get("policy_id") or r["policy_id"] not in by_policy:
            continue
        searcher = r.get("searcher") or by_policy[r["policy_id"]][0].get("searcher")
        grouped.setdefault(searcher, []).append(dict(r, searcher=searcher))
    out: dict[str, list[dict]] = {}
    for searcher in sorted(grouped, key=_searcher_sort_key):
        rows = grouped[searcher]
        stage = "finetune" if any(r.get("stage") == "finetune" for r in rows) else "ptq"
        merged = []
        for r in sorted((r for r in rows if r.get("stage") == stage), key=_tie_key):
            pid = r["policy_id"]
            cands = by_policy[pid]
            s = next((c for c in cands if c.get("searcher") == searcher), cands[0])
            m = dict(r)
            for k in _SEARCH_FIELDS:
                m[k] = s.get(k)
            for k in ("bitops", "size_bits"):
                if _num(m.get(k)) is None:
                    m[k] = s.get(k)
            merged.append(m)
        if merged:
            out[searcher] = sorted(merged, key=lambda r: (_num(r.get("bitops")) or 0.0, _tie_key(r)))
    return out


def _limpq_by_alpha(search_rows: Iterable[Mapping]) -> dict[float | None, list[dict]]:
    out: dict[float | None, list[dict]] = {}
    for r in search_rows:
        if r.get("searcher") == "limpq" and r.get("status") == "optimal" and r.get("policy_id"):
            out.setdefault(_num(r.get("alpha")), []).append(dict(r))
    return {a: out[a] for a in sorted(out, key=lambda a: math.inf if a is None else a)}


def frontier_table(search_rows: Sequence[Mapping], results_rows: Sequence[Mapping]) -> list[dict]:
    """The frontier policies for the report, ordered by searcher then BitOps (see the module
    docstring). Every row has searcher, stage, policy_id, bitops, size_bits, w_bits, a_bits,
    objective; with results also top1/top5/loss/lr/epochs; without, stage/top1 are None."""
    search_rows, results_rows = list(search_rows), list(results_rows)
    points = accuracy_points(search_rows, results_rows)
    out: list[dict] = []
    if points:
        for rows in points.values():
            out += pareto_front(rows, "bitops", "top1", maximize_y=True)
        return out
    for rows in _limpq_by_alpha(search_rows).values():
        for r in pareto_front(rows, "bitops", "objective", maximize_y=False):
            r.update(stage=None, top1=None, top5=None, loss=None)
            out.append(r)
    return out


# ------------------------------------------------------------------------------------ charts
@dataclass
class _Series:
    label: str
    color: str
    points: list[dict]             # every point (drawn faint)
    front: list[dict]              # its frontier (drawn as a step line)


@dataclass
class _Chart:
    name: str                      # file stem
    title: str
    x: str
    y: str
    xlabel: str
    ylabel: str
    maximize_y: bool
    y_scale: float = 1.0           # e.g. 100 to show top-1 in percent
    y_log: bool = False            # log y axis (quantization errors span decades)
    series: list[_Series] = field(default_factory=list)


def _color(searcher: str, names: list[str]) -> str:
    return _COLORS[names.index(searcher) % len(_COLORS)] if searcher in names else _COLORS[-1]


def _charts(search_rows: list[dict], results_rows: list[dict]) -> list[list[_Chart]]:
    """Figures to draw, each a list of panels."""
    names = sorted({r.get("searcher") or "" for r in search_rows} | {r.get("searcher") or "" for r in results_rows},
                   key=_searcher_sort_key)
    figures: list[list[_Chart]] = []
    points = accuracy_points(search_rows, results_rows)
    for x, xlabel, stem in (("bitops", "BitOps", "pareto_top1_vs_bitops"), ("size_bits", "model size (bits)",
                                                                            "pareto_top1_vs_size")):
        if not points:
            break
        chart = _Chart(stem, f"top-1 vs {xlabel}", x, "top1", xlabel, "top-1 (%)", True, 100.0)
        for s, rows in points.items():
            stage = rows[0].get("stage")
            chart.series.append(_Series(f"{s} ({stage})", _color(s, names), rows,
                                        pareto_front(rows, x, "top1", maximize_y=True)))
        figures.append([chart])

    panels = []
    limpq = _limpq_by_alpha(search_rows)
    if limpq:
        chart = _Chart("objective_limpq", "LIMPQ: objective vs BitOps", "bitops", "objective", "BitOps",
                       "Σ importance (lower is better)", False)
        for i, (alpha, rows) in enumerate(limpq.items()):
            chart.series.append(_Series(f"limpq α={alpha:g}" if alpha is not None else "limpq",
                                        _COLORS[i % len(_COLORS)], rows,
                                        pareto_front(rows, "bitops", "objective", maximize_y=False)))
        panels.append(chart)
    mq: dict[int, list[dict]] = {}
    for r in search_rows:
        if r.get("searcher") == "mixquant" and r.get("status") == "optimal" and _num(r.get("objective")) is not None:
            a = r.get("a_bits") or [None]
            mq.setdefault(a[0], []).append(dict(r))
    if mq:
        chart = _Chart("objective_mixquant", "MixQuant: mean weight QE vs BitOps", "bitops", "objective", "BitOps",
                       "mean QE of chosen bits (lower is better)", False)
        for i, (a, rows) in enumerate(sorted(mq.items(), key=lambda t: t[0] or 0)):
            chart.series.append(_Series(f"mixquant A{a}", _COLORS[(i + 1) % len(_COLORS)], rows,
                                        pareto_front(rows, "bitops", "objective", maximize_y=False)))
        ys = [_num(r.get("objective")) for rows in mq.values() for r in rows]
        chart.y_log = min(ys) > 0 and max(ys) > 100 * min(ys)
        panels.append(chart)
    if panels:
        figures.append(panels)

    by_searcher: dict[str, dict[str, dict]] = {}
    for r in search_rows:
        if r.get("status") == "optimal" and r.get("policy_id") and _num(r.get("bitops")) is not None:
            by_searcher.setdefault(r.get("searcher") or "", {}).setdefault(r["policy_id"], dict(r))
    if by_searcher:
        chart = _Chart("search_size_vs_bitops", "searched policies: size vs BitOps", "bitops", "size_bits",
                       "BitOps", "model size (bits)", False)
        for s in sorted(by_searcher, key=_searcher_sort_key):
            rows = sorted(by_searcher[s].values(), key=lambda r: (_num(r["bitops"]), _tie_key(r)))
            chart.series.append(_Series(s, _color(s, names), rows,
                                        pareto_front(rows, "bitops", "size_bits", maximize_y=False)))
        figures.append([chart])
    return figures


def _xy(rows: list[dict], c: _Chart) -> tuple[list[float], list[float]]:
    pts = [(_num(r.get(c.x)), _num(r.get(c.y))) for r in rows]
    pts = [(x, y * c.y_scale) for x, y in pts if x is not None and y is not None]
    return [p[0] for p in pts], [p[1] for p in pts]


def _png(panels: list[_Chart], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import EngFormatter

    fig, axes = plt.subplots(1, len(panels), figsize=(6.4 * len(panels), 4.4), squeeze=False)
    for ax, c in zip(axes[0], panels):
        for s in c.series:
            xs, ys = _xy(s.points, c)
            ax.scatter(xs, ys, s=12, color=s.color, alpha=0.3, linewidths=0)
            fx, fy = _xy(s.front, c)
            ax.plot(fx, fy, "-o", ms=4, color=s.color, label=s.label, drawstyle="steps-post")
        ax.set_title(c.title)
        ax.set_xlabel(c.xlabel)
        ax.set_ylabel(c.ylabel)
        ax.xaxis.set_major_formatter(EngFormatter())
        if c.y_log:
            ax.set_yscale("log")
        elif c.y in ("size_bits", "bitops"):
            ax.yaxis.set_major_formatter(EngFormatter())
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------------- HTML
_W, _H, _ML, _MR, _MT, _MB = 640, 400, 70, 20, 30, 50


def _fmt(v: float) -> str:
    from matplotlib.ticker import EngFormatter

    return EngFormatter()(v) if abs(v) >= 1e3 else f"{v:.4g}"


def _tooltip(r: Mapping, c: _Chart) -> str:
    parts = [f"{r.get('searcher')} {str(r.get('policy_id') or '')[:10]}"]
    for k in ("stage", "alpha", "qem", "bitops", "size_bits", "top1", "objective", "lr"):
        v = r.get(k)
        if v is not None:
            parts.append(f"{k}={_fmt(float(v)) if isinstance(v, (int, float)) else v}")
    if r.get("w_bits"):
        parts.append("W " + ",".join(str(b) for b in r["w_bits"]))
        parts.append("A " + ",".join(str(b) for b in r["a_bits"]))
    return "\n".join(parts)


def _svg(c: _Chart, series_ids: dict[str, int]) -> str:
    from matplotlib.ticker import MaxNLocator

    def ty(v):  # the plotted y coordinate
        return math.log10(v) if c.y_log else v

    allx, ally = [], []
    for s in c.series:
        xs, ys = _xy(s.points, c)
        allx += xs
        ally += [ty(y) for y in ys]
    if not allx:
        return ""
    x0, x1, y0, y1 = min(allx), max(allx), min(ally), max(ally)
    if x0 == x1:
        x0, x1 = x0 - 1, x1 + 1
    if y0 == y1:
        y0, y1 = y0 - 1, y1 + 1
    padx, pady = 0.04 * (x1 - x0), 0.04 * (y1 - y0)  # keep edge points off the frame
    x0, x1, y0, y1 = x0 - padx, x1 + padx, y0 - pady, y1 + pady
    xt = [t for t in MaxNLocator(6).tick_values(x0, x1) if x0 <= t <= x1]
    yt = [t for t in MaxNLocator(6, integer=c.y_log).tick_values(y0, y1) if y0 <= t <= y1]
    pw, ph = _W - _ML - _MR, _H - _MT - _MB

    def sx(v):
        return _ML + (v - x0) / (x1 - x0) * pw

    def sy(v):
        return _MT + ph - (v - y0) / (y1 - y0) * ph

    e = html.escape
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{_W}" height="{_H}" viewBox="0 0 {_W} {_H}">',
           f'<text x="{_W / 2}" y="18" text-anchor="middle" font-weight="bold">{e(c.title)}</text>',
           f'<rect x="{_ML}" y="{_MT}" width="{pw}" height="{ph}" fill="none" stroke="#888"/>']
    for t in xt:
        out.append(f'<line x1="{sx(t):.1f}" x2="{sx(t):.1f}" y1="{_MT}" y2="{_MT + ph}" stroke="#eee"/>'
                   f'<text x="{sx(t):.1f}" y="{_MT + ph + 16}" text-anchor="middle" font-size="11">{e(_fmt(t))}</text>')
    for t in yt:
        out.append(f'<line x1="{_ML}" x2="{_ML + pw}" y1="{sy(t):.1f}" y2="{sy(t):.1f}" stroke="#eee"/>'
                   f'<text x="{_ML - 6}" y="{sy(t) + 4:.1f}" text-anchor="end" font-size="11">'
                   f'{e(f"1e{t:g}" if c.y_log else _fmt(t))}</text>')
    out.append(f'<text x="{_ML + pw / 2}" y="{_H - 10}" text-anchor="middle" font-size="12">{e(c.xlabel)}</text>')
    out.append(f'<text transform="translate(14,{_MT + ph / 2}) rotate(-90)" text-anchor="middle" '
               f'font-size="12">{e(c.ylabel)}</text>')
    for s in c.series:
        sid = series_ids.setdefault(s.label, len(series_ids))
        out.append(f'<g class="s{sid}">')
        fx, fy = _xy(s.front, c)
        if fx:
            d = [f"M{sx(fx[0]):.1f},{sy(ty(fy[0])):.1f}"]
            for i in range(1, len(fx)):  # steps-post: hold y until the next frontier x
                d.append(f"H{sx(fx[i]):.1f}V{sy(ty(fy[i])):.1f}")
            out.append(f'<path d="{"".join(d)}" fill="none" stroke="{s.color}" stroke-width="1.5"/>')
        front_ids = {id(r) for r in s.front}
        for r in s.points + s.front:
            px, py = _num(r.get(c.x)), _num(r.get(c.y))
            if px is None or py is None:
                continue
            on = id(r) in front_ids
            out.append(f'<circle cx="{sx(px):.1f}" cy="{sy(ty(py * c.y_scale)):.1f}" r="{4 if on else 2.5}" '
                       f'fill="{s.color}" fill-opacity="{1 if on else 0.3}">'
                       f'<title>{e(_tooltip(r, c))}</title></circle>')
        out.append("</g>")
    ly = _MT + 8
    for s in c.series:
        sid = series_ids[s.label]
        out.append(f'<g class="legend" data-s="{sid}" style="cursor:pointer">'
                   f'<rect x="{_ML + pw - 150}" y="{ly}" width="10" height="10" fill="{s.color}"/>'
                   f'<text x="{_ML + pw - 135}" y="{ly + 9}" font-size="11">{e(s.label)}</text></g>')
        ly += 15
    out.append("</svg>")
    return "".join(out)


def _html(figures: list[list[_Chart]], path: Path) -> None:
    ids: dict[str, int] = {}
    svgs = [_svg(c, ids) for panels in figures for c in panels]
    body = "".join(f"<div>{s}</div>" for s in svgs if s)
    page = ("<!doctype html><html><head><meta charset=\"utf-8\"><title>mpq-sweep Pareto frontiers</title>"
            "<style>body{font-family:sans-serif;margin:1em}div{display:inline-block;margin:6px}"
            ".off{opacity:0.08}</style></head><body><h1>Pareto frontiers</h1>"
            "<p>Hover a point for its policy; click a legend entry to hide or show that series. "
            "Large dots are on the frontier (step line).</p>" + body +
            "<script>document.querySelectorAll('.legend').forEach(function(g){g.addEventListener('click',"
            "function(){var c='s'+g.dataset.s;document.querySelectorAll('.'+c).forEach(function(n){"
            "n.classList.toggle('off')});});});</script></body></html>")
    with atomic_path(path) as tmp:
        tmp.write_text(page)


def plot_pareto(search_rows: Sequence[Mapping], results_rows: Sequence[Mapping], out_dir: str | Path) -> list[Path]:
    """Write the PNG charts (see the module docstring) and ``pareto.html`` into ``out_dir``; return the
    PNG paths (the HTML, ``out_dir / HTML_NAME``, is written whenever there is a chart but is not in
    the list, since callers embed the returned files as images)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    figures = _charts([dict(r) for r in search_rows], [dict(r) for r in results_rows])
    paths = []
    for panels in figures:
        stem = panels[0].name if len(panels) == 1 else "search_objective_vs_bitops"
        path = out_dir / f"{stem}.png"
        _png(panels, path)
        paths.append(path)
    if figures:
        _html(figures, out_dir / HTML_NAME)
    return paths
