"""The study report: Pareto plots (accuracy vs BitOps and vs size, every searcher), a table of
frontier policies with a per-layer bit heat-map, written as Markdown and HTML into ``report/``.

Everything is derived from the study's Parquet tables, so ``mpqsweep report STUDY_DIR`` can rebuild it
at any time (also for a study copied off a cluster).
"""
from __future__ import annotations

import html
import json
from pathlib import Path

import pyarrow.parquet as pq

from .atomic import atomic_path
from .errors import UserError
from .paths import StudyPaths
from .results import read_results


def _heatmap(rows: list[dict], layers: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    if not rows:
        return
    w = np.array([r["w_bits"] for r in rows], dtype=float)
    a = np.array([r["a_bits"] for r in rows], dtype=float)
    labels = [f"{r['searcher']} {r['policy_id'][:6]} ({r['bitops'] / 1e6:.1f} MBitOps)" for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(max(8, 0.35 * len(layers) * 2), 1.2 + 0.35 * len(rows)),
                             squeeze=False)
    for ax, mat, title in ((axes[0, 0], w, "weight bits"), (axes[0, 1], a, "activation bits")):
        im = ax.imshow(mat, cmap="viridis", vmin=2, vmax=8, aspect="auto")
        ax.set_title(title)
        ax.set_xticks(range(len(layers)))
        ax.set_xticklabels(layers, rotation=90, fontsize=7)
        ax.set_yticks(range(len(rows)))
        ax.set_yticklabels(labels if ax is axes[0, 0] else [], fontsize=7)
        for i in range(mat.shape[0]):
            for j in range(mat.shape[1]):
                ax.text(j, i, int(mat[i, j]), ha="center", va="center", fontsize=6, color="white")
    fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.8)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)


def _fmt(v, digits=4) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.{digits}g}"
    return str(v)


def build_report(study_dir: str | Path) -> Path:
    """Write report/report.md, report/index.html and the PNGs; return the report directory."""
    from .pareto import frontier_table, plot_pareto

    paths = StudyPaths(study_dir)
    search_path = paths.root / "search" / "search.parquet"
    if not search_path.exists():
        raise UserError(f"{paths.root} holds no search table (search/search.parquet); run the study first")
    search = pq.read_table(search_path).to_pylist()
    results = read_results(paths.root / "results" / "results.parquet")
    out = paths.report_dir
    layers = json.loads((paths.root / "search" / "layers.json").read_text()) \
        if (paths.root / "search" / "layers.json").exists() else []

    plots = plot_pareto(search, results, out)
    front = frontier_table(search, results)
    _heatmap(front, layers, out / "bits_heatmap.png")

    cols = ["searcher", "stage", "policy_id", "bitops", "size_bits", "top1", "top5", "objective"]
    md = [f"# mpq-sweep report: {paths.root.name}", ""]
    ok = [r for r in search if r["status"] == "optimal"]
    md.append(f"Search points: {len(search)} ({len(ok)} optimal, "
              f"{sum(r['status'] == 'infeasible' for r in search)} infeasible), "
              f"distinct policies: {len({r['policy_id'] for r in ok})}; evaluated results: {len(results)}.")
    md.append("")
    for p in plots:
        md.append(f"![{p.stem}]({p.name})")
    interactive = (out / "pareto.html").exists()
    if interactive:
        md.append("\n[interactive charts](pareto.html)")
    md += ["", "## Frontier policies", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in front:
        md.append("| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |")
    md += ["", "![per-layer bits](bits_heatmap.png)", ""]
    if layers:
        md += ["## Per-layer bits (W/A)", "", "| policy | " + " | ".join(layers) + " |",
               "|" + "---|" * (len(layers) + 1)]
        for r in front:
            md.append(f"| {r['searcher']} {r['policy_id'][:8]} | " +
                      " | ".join(f"{w}/{a}" for w, a in zip(r["w_bits"], r["a_bits"])) + " |")
    with atomic_path(out / "report.md") as tmp:
        tmp.write_text("\n".join(md) + "\n")

    head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(r.get(c)))}</td>" for c in cols) + "</tr>" for r in front)
    imgs = "".join(f'<figure><img src="{p.name}" style="max-width:48%"></figure>' for p in plots)
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>mpq-sweep: {html.escape(paths.root.name)}</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse}}\
td,th{{border:1px solid #ccc;padding:2px 6px;font-size:13px}}</style>
</head><body><h1>mpq-sweep report: {html.escape(paths.root.name)}</h1><p>{html.escape(md[2])}</p>{imgs}
{'<p><a href="pareto.html">interactive charts</a></p>' if interactive else ''}
<h2>Frontier policies</h2><table><tr>{head}</tr>{body}</table>
<h2>Per-layer bits</h2><img src="bits_heatmap.png" style="max-width:100%"></body></html>"""
    with atomic_path(out / "index.html") as tmp:
        tmp.write_text(page)
    return out
