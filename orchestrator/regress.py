"""Nightly regression: compare a candidate study with a baseline and say, with tolerances, whether it
got worse.

What is compared (each a check that passes, fails, or is skipped when neither side has the data):

- **frontier accuracy at matched budgets** — per (stage, searcher) and per cost axis (BitOps, size), the
  accuracy frontier is the step function "best top-1 of any evaluated policy costing at most B" (per
  policy the learning rate chosen on the held-out split, full-budget trials only: ``chosen_results``).
  It is evaluated at the baseline's frontier costs, where a drop is largest; the candidate may spend
  ``budget_rtol`` more. A drop above ``top1_drop`` (top-1 is a fraction: 0.005 = half a point) or no
  candidate policy within a budget fails.
- **search points** — rows matched by ``point_id``: a point the baseline had that the candidate lacks,
  or that was solved in the baseline and is not in the candidate (infeasible, failed), fails.
- **search objective** — matched points solved on both sides whose objective differs by more than
  ``objective_rtol`` (relative) fail.
- **policies** — matched points whose chosen policy differs; more than ``policy_change_fraction`` of
  them fails (default 0: with the same indicators the ILP's optimum is the same policy).
- **timings** — each stage in ``timings.json`` (and the summed ILP solve time per searcher): slower by
  more than ``timing_ratio`` times *and* by more than ``timing_min_seconds`` fails.
- config differences are listed for information only.

Sources: a study directory, or an MLflow study run (the parent run tagged ``mpq.key=study``, whose
``tables/`` artifacts hold the same files) given as ``mlflow:RUN_ID`` or ``mlflow:tag:KEY=VALUE[,...]``
(the newest finished study run carrying those tags).
"""
from __future__ import annotations

import dataclasses
import difflib
import html
import json
import math
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import yaml

from .atomic import atomic_path, write_json
from .errors import UserError
from .results import chosen_results

STUDY_KEY = "mpq.key"
SOLVED = ("optimal",)          # search statuses that carry a policy and an objective
AXES = (("bitops", "BitOps"), ("size_bits", "size (bits)"))


# ------------------------------------------------------------------------------ tolerances
@dataclass
class Tolerances:
    top1_drop: float = 0.005              # absolute top-1 (fraction) a frontier point may lose
    budget_rtol: float = 0.01             # a candidate policy may cost this much more than the matched budget
    objective_rtol: float = 1e-6          # relative change of a point's ILP objective
    policy_change_fraction: float = 0.0   # share of matched solved points whose policy may change
    timing_ratio: float = 1.5             # candidate / baseline seconds per stage ...
    timing_min_seconds: float = 30.0      # ... and at least this many seconds slower, to fail
    allow_missing_points: bool = False    # baseline search points the candidate lacks

    @classmethod
    def load(cls, path: str | None, overrides: dict[str, Any]) -> Tolerances:
        data: dict[str, Any] = {}
        if path:
            p = Path(path)
            if not p.is_file():
                raise UserError(f"--tolerances {path} does not exist")
            try:
                data = yaml.safe_load(p.read_text()) or {}
            except yaml.YAMLError as e:
                raise UserError(f"--tolerances {path} is not valid YAML: {str(e).splitlines()[0]}") from None
            if not isinstance(data, dict):
                raise UserError(f"--tolerances {path} must hold a mapping")
        data.update({k: v for k, v in overrides.items() if v is not None})
        names = [f.name for f in dataclasses.fields(cls)]
        kwargs = {}
        for key, value in data.items():
            if key not in names:
                close = difflib.get_close_matches(str(key), names, n=1)
                raise UserError(f"tolerances: unknown key {key}" + (f" (did you mean {close[0]!r}?)" if close
                                                                     else f"; known: {', '.join(names)}"))
            if key == "allow_missing_points":
                if not isinstance(value, bool):
                    raise UserError(f"tolerances: {key} must be true or false, got {value!r}")
            else:
                try:
                    value = float(value)
                except (TypeError, ValueError):
                    raise UserError(f"tolerances: {key} must be a number, got {value!r}") from None
                if not math.isfinite(value) or value < 0:
                    raise UserError(f"tolerances: {key} must be a finite number >= 0, got {value!r}")
            kwargs[key] = value
        tol = cls(**kwargs)
        if tol.timing_ratio < 1:
            raise UserError(f"tolerances: timing_ratio must be >= 1, got {tol.timing_ratio}")
        if tol.policy_change_fraction > 1:
            raise UserError(f"tolerances: policy_change_fraction must be in [0, 1], got {tol.policy_change_fraction}")
        return tol


# ---------------------------------------------------------------------------------- sources
@dataclass
class StudyTables:
    """What a regression reads from one side: rows of the search and results tables, timings, config."""

    spec: str
    origin: str
    search: list[dict] | None
    results: list[dict] | None
    timings: dict
    config: dict
    run_id: str | None = None


def _read_rows(path: Path, what: str) -> list[dict] | None:
    if not path.exists():
        return None
    try:
        return pq.read_table(path).to_pylist()  # a file or a dataset directory
    except Exception as e:  # noqa: BLE001 - pyarrow raises several types for a broken file
        raise UserError(f"{what} {path} is not a readable Parquet table ({str(e).splitlines()[0][:200]})") from None


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except ValueError:
        raise UserError(f"{path} is not valid JSON") from None
    return data if isinstance(data, dict) else {}


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError:
        raise UserError(f"{path} is not valid YAML") from None
    return data if isinstance(data, dict) else {}


def _read_search(path: Path) -> list[dict] | None:
    """The search table's rows: a dataset directory of parts (one row per point id, the last written
    winning, as ``search_table.read_search_table`` defines it) or one Parquet file."""
    if not path.exists():
        return None
    from .search_table import read_search_table

    return read_search_table(path)


def _from_files(spec: str, origin: str, search: Path, results: Path, timings: Path, config: Path,
                run_id: str | None = None) -> StudyTables:
    t = StudyTables(spec, origin, _read_search(search), _read_rows(results, "results table"),
                    _read_json(timings), _read_yaml(config), run_id)
    if t.search is None and t.results is None:
        raise UserError(f"{spec}: {origin} has neither a search table nor a results table")
    return t


def load_study_dir(spec: str, path: Path) -> StudyTables:
    root = path.expanduser().resolve()
    return _from_files(spec, f"study directory {root}", root / "search" / "search.parquet",
                       root / "results" / "results.parquet", root / "timings.json", root / "config.yaml")


def _parse_tags(text: str) -> dict[str, str]:
    tags = {}
    for item in text.split(","):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f"mlflow:tag:{text}: each tag must be KEY=VALUE")
        tags[key.strip()] = value.strip()
    return tags


def _quote(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def find_study_run(client, tags: dict[str, str]):
    """The newest finished study parent run carrying ``tags`` (in any experiment), or None."""
    exp_ids = [e.experiment_id for e in client.search_experiments(max_results=1000)]
    if not exp_ids:
        return None
    conds = [f"tags.`{STUDY_KEY}` = 'study'", "attributes.status = 'FINISHED'"]
    conds += [f"tags.`{k}` = {_quote(v)}" for k, v in tags.items()]
    runs = client.search_runs(exp_ids, filter_string=" and ".join(conds), max_results=1,
                              order_by=["attributes.start_time DESC"])
    return runs[0] if runs else None


def load_mlflow(spec: str, ref: str, tracking_uri: str | None, workdir: Path) -> StudyTables:
    import os

    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        raise UserError(f"{spec}: an MLflow source needs --tracking-uri or $MLFLOW_TRACKING_URI")
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from .tracking import check_reachable

    check_reachable(uri)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # keep the CLI's output readable
    client = MlflowClient(tracking_uri=uri)
    try:
        if ref.startswith("tag:"):
            tags = _parse_tags(ref[len("tag:"):])
            run = find_study_run(client, tags)
            if run is None:
                raise UserError(f"{spec}: no finished study run in MLflow at {uri} has tags "
                                + ", ".join(f"{k}={v}" for k, v in tags.items()))
        else:
            run_id = ref[len("runs:/"):].strip("/") if ref.startswith("runs:/") else ref
            try:
                run = client.get_run(run_id)
            except MlflowException:
                raise UserError(f"{spec}: MLflow at {uri} has no run {run_id}") from None
        if run.data.tags.get(STUDY_KEY) != "study":
            raise UserError(f"{spec}: MLflow run {run.info.run_id} is not a study's parent run "
                            f"(tag {STUDY_KEY}={run.data.tags.get(STUDY_KEY)!r}, expected 'study')")
        names = {a.path for a in client.list_artifacts(run.info.run_id, "tables")}
        if not names:
            raise UserError(f"{spec}: MLflow run {run.info.run_id} has no tables/ artifacts (did the study finish?)")
        dst = workdir / run.info.run_id
        dst.mkdir(parents=True, exist_ok=True)
        local = Path(client.download_artifacts(run.info.run_id, "tables", str(dst)))
    except MlflowException as e:
        raise UserError(f"{spec}: MLflow at {uri} failed: {str(e).splitlines()[0][:200]}") from None
    origin = f"MLflow run {run.info.run_id} ({run.data.tags.get('mpq.study', '?')}) at {uri}"
    return _from_files(spec, origin, local / "search.parquet", local / "results.parquet", local / "timings.json",
                       local / "config.yaml", run_id=run.info.run_id)


def load_source(spec: str, tracking_uri: str | None, workdir: Path) -> StudyTables:
    """A study directory, ``mlflow:RUN_ID``, ``mlflow:runs:/RUN_ID`` or ``mlflow:tag:KEY=VALUE[,...]``."""
    if spec.startswith("mlflow:"):
        ref = spec[len("mlflow:"):]
        if not ref:
            raise UserError(f"{spec}: give mlflow:RUN_ID or mlflow:tag:KEY=VALUE")
        return load_mlflow(spec, ref, tracking_uri, workdir)
    path = Path(spec)
    if not path.is_dir():
        raise UserError(f"{spec} is neither a study directory nor mlflow:RUN_ID / mlflow:tag:KEY=VALUE")
    return load_study_dir(spec, path)


# ------------------------------------------------------------------------------- comparison
@dataclass
class Check:
    name: str
    ok: bool | None            # None: skipped (no data on either side)
    summary: str


@dataclass
class Comparison:
    baseline: StudyTables
    candidate: StudyTables
    tol: Tolerances
    checks: list[Check] = field(default_factory=list)
    frontier: list[dict] = field(default_factory=list)
    points: list[dict] = field(default_factory=list)       # matched points that changed (status/objective/policy)
    timings: list[dict] = field(default_factory=list)
    config_diff: list[tuple[str, Any, Any]] = field(default_factory=list)

    @property
    def regressed(self) -> bool:
        return any(c.ok is False for c in self.checks)


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def best_per_policy(results: Iterable[dict]) -> dict[tuple[str, str], dict[str, dict]]:
    """(stage, searcher) -> {policy_id: the row ``results.chosen_results`` reports for it}."""
    out: dict[tuple[str, str], dict[str, dict]] = {}
    for r in chosen_results(results):
        if _finite(r.get("top1")):
            out.setdefault((str(r.get("stage")), str(r.get("searcher"))), {})[r.get("policy_id")] = r
    return out


def frontier_points(rows: Sequence[dict], axis: str) -> list[tuple[float, float]]:
    """(cost, top1) of the rows that beat every cheaper row: where the step function rises."""
    pts = sorted(((float(r[axis]), float(r["top1"])) for r in rows if _finite(r.get(axis))),
                 key=lambda p: (p[0], -p[1]))
    out: list[tuple[float, float]] = []
    best = -math.inf
    for cost, top1 in pts:
        if top1 > best:
            out.append((cost, top1))
            best = top1
    return out


def best_within(rows: Sequence[dict], axis: str, budget: float) -> float | None:
    vals = [float(r["top1"]) for r in rows if _finite(r.get(axis)) and float(r[axis]) <= budget]
    return max(vals) if vals else None


def compare_frontier(cmp: Comparison) -> None:
    base, cand, tol = cmp.baseline.results, cmp.candidate.results, cmp.tol
    if not base:
        cmp.checks.append(Check("frontier accuracy", None, "the baseline has no evaluated policies"))
        return
    b_groups = best_per_policy(base)
    c_groups = best_per_policy(cand or [])
    worst = 0.0
    failures = 0
    for (stage, searcher), b_rows in sorted(b_groups.items()):
        c_rows = list(c_groups.get((stage, searcher), {}).values())
        for axis, _ in AXES:
            for budget, b_top1 in frontier_points(list(b_rows.values()), axis):
                c_top1 = best_within(c_rows, axis, budget * (1 + tol.budget_rtol))
                drop = None if c_top1 is None else b_top1 - c_top1
                ok = drop is not None and drop <= tol.top1_drop + 1e-12
                failures += not ok
                if drop is not None:
                    worst = max(worst, drop)
                cmp.frontier.append({"stage": stage, "searcher": searcher, "axis": axis, "budget": budget,
                                     "baseline": b_top1, "candidate": c_top1, "drop": drop, "ok": ok})
    n = len(cmp.frontier)
    if failures:
        missing = sum(1 for f in cmp.frontier if f["candidate"] is None)
        detail = f"{failures} of {n} matched budgets regressed (largest drop {worst * 100:.2f} points"
        detail += f", {missing} with no candidate policy within budget)" if missing else ")"
        cmp.checks.append(Check("frontier accuracy", False, detail))
    else:
        cmp.checks.append(Check("frontier accuracy", True, f"{n} matched budgets, largest drop "
                                f"{max(worst, 0.0) * 100:.2f} points (tolerance {tol.top1_drop * 100:.2f})"))


def _point_key(r: dict) -> Any:
    if r.get("point_id"):
        return r["point_id"]
    return tuple(r.get(k) for k in ("searcher", "bitops_budget", "size_budget", "compression_ratio_budget",
                                    "alpha", "qem"))


def _policy_of(r: dict) -> tuple | None:
    if r.get("status") not in SOLVED:
        return None
    return r.get("policy_id") or (tuple(r.get("w_bits") or ()), tuple(r.get("a_bits") or ()))


def _layers_changed(b: dict, c: dict) -> int | None:
    bw, ba, cw, ca = (b.get("w_bits"), b.get("a_bits"), c.get("w_bits"), c.get("a_bits"))
    if not (bw and ba and cw and ca) or len(bw) != len(cw):
        return None
    return sum(1 for x in zip(bw, ba, cw, ca) if (x[0], x[1]) != (x[2], x[3]))


def compare_search(cmp: Comparison) -> None:
    base, cand, tol = cmp.baseline.search, cmp.candidate.search, cmp.tol
    if not base:
        for name in ("search points", "search objective", "policies"):
            cmp.checks.append(Check(name, None, "the baseline has no search table"))
        return
    b = {_point_key(r): r for r in base}
    c = {_point_key(r): r for r in (cand or [])}
    missing = [k for k in b if k not in c]
    new = [k for k in c if k not in b]
    matched = [k for k in b if k in c]
    lost = [k for k in matched if b[k].get("status") in SOLVED and c[k].get("status") not in SOLVED]
    gained = [k for k in matched if b[k].get("status") not in SOLVED and c[k].get("status") in SOLVED]
    bad = len(lost) + (0 if tol.allow_missing_points else len(missing))
    detail = f"{len(matched)} matched, {len(missing)} missing from the candidate, {len(new)} new; " \
             f"{len(lost)} no longer solved, {len(gained)} newly solved"
    cmp.checks.append(Check("search points", not bad, detail))

    obj_changed, pol_changed, solved_both = [], [], []
    for k in matched:
        br, cr = b[k], c[k]
        both = br.get("status") in SOLVED and cr.get("status") in SOLVED
        rel, obj_flag, pol_flag = None, False, False
        if both:
            solved_both.append(k)
            bo, co = br.get("objective"), cr.get("objective")
            if _finite(bo) and _finite(co):
                rel = abs(co - bo) / max(abs(bo), 1e-12)
                obj_flag = rel > tol.objective_rtol
            pol_flag = _policy_of(br) != _policy_of(cr)
            obj_changed += [k] if obj_flag else []
            pol_changed += [k] if pol_flag else []
        status_changed = br.get("status") != cr.get("status")
        if status_changed or obj_flag or pol_flag:
            cmp.points.append({
                "point": str(br.get("point_id") or k)[:16], "searcher": br.get("searcher"),
                "bitops_budget": br.get("bitops_budget"),
                "compression_ratio_budget": br.get("compression_ratio_budget"),
                "alpha": br.get("alpha"), "qem": br.get("qem"),
                "status": f"{br.get('status')} -> {cr.get('status')}" if status_changed else br.get("status"),
                "objective": (br.get("objective"), cr.get("objective")), "objective_rel": rel,
                "policy": (str(br.get("policy_id") or "")[:10], str(cr.get("policy_id") or "")[:10]),
                "layers_changed": _layers_changed(br, cr) if both else None,
            })
    for k in missing[:50]:
        br = b[k]
        cmp.points.append({"point": str(br.get("point_id") or k)[:16], "searcher": br.get("searcher"),
                           "bitops_budget": br.get("bitops_budget"),
                           "compression_ratio_budget": br.get("compression_ratio_budget"), "alpha": br.get("alpha"),
                           "qem": br.get("qem"), "status": f"{br.get('status')} -> missing",
                           "objective": (br.get("objective"), None), "objective_rel": None,
                           "policy": (str(br.get("policy_id") or "")[:10], ""), "layers_changed": None})
    worst = max((abs(c[k]["objective"] - b[k]["objective"]) / max(abs(b[k]["objective"]), 1e-12)
                 for k in solved_both if _finite(b[k].get("objective")) and _finite(c[k].get("objective"))),
                default=0.0)
    cmp.checks.append(Check("search objective", not obj_changed,
                            f"{len(obj_changed)} of {len(solved_both)} points solved on both sides changed by more "
                            f"than {tol.objective_rtol:g} (largest relative change {worst:.3g})"))
    frac = len(pol_changed) / len(solved_both) if solved_both else 0.0
    cmp.checks.append(Check("policies", frac <= tol.policy_change_fraction + 1e-12,
                            f"{len(pol_changed)} of {len(solved_both)} solved points chose a different policy "
                            f"({frac:.1%}; tolerance {tol.policy_change_fraction:.1%})"))


def _timing_entries(t: StudyTables) -> dict[str, float]:
    out = {f"stage {k}": float(v) for k, v in (t.timings.get("stages") or {}).items() if _finite(v)}
    if _finite(t.timings.get("total_seconds")):
        out["total"] = float(t.timings["total_seconds"])
    sums: dict[str, float] = {}
    for r in t.search or []:
        if _finite(r.get("solve_seconds")):
            sums[str(r.get("searcher"))] = sums.get(str(r.get("searcher")), 0.0) + float(r["solve_seconds"])
    out.update({f"solve time {k} (sum)": v for k, v in sums.items()})
    return out


def compare_timings(cmp: Comparison) -> None:
    b, c, tol = _timing_entries(cmp.baseline), _timing_entries(cmp.candidate), cmp.tol
    names = [n for n in b if n in c]
    if not names:
        cmp.checks.append(Check("timings", None, "no timing present on both sides"))
        return
    slow = []
    for n in names:
        ratio = c[n] / b[n] if b[n] > 0 else (math.inf if c[n] > 0 else 1.0)
        bad = ratio > tol.timing_ratio and c[n] - b[n] > tol.timing_min_seconds
        slow += [n] if bad else []
        cmp.timings.append({"name": n, "baseline": b[n], "candidate": c[n], "ratio": ratio, "ok": not bad})
    cmp.checks.append(Check("timings", not slow, (f"slower: {', '.join(slow)}" if slow else f"{len(names)} timings")
                            + f" (fails above x{tol.timing_ratio:g} and +{tol.timing_min_seconds:g} s)"))


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix.rstrip("."): d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def compare_config(cmp: Comparison) -> None:
    b, c = _flatten(cmp.baseline.config), _flatten(cmp.candidate.config)
    ignore = {"study.name", "study.dir", "tracking.uri", "resources.address", "resources.storage_path"}
    cmp.config_diff = [(k, b.get(k), c.get(k)) for k in sorted(set(b) | set(c))
                       if k not in ignore and b.get(k) != c.get(k)]


def compare(baseline: StudyTables, candidate: StudyTables, tol: Tolerances) -> Comparison:
    cmp = Comparison(baseline, candidate, tol)
    compare_frontier(cmp)
    compare_search(cmp)
    compare_timings(cmp)
    compare_config(cmp)
    return cmp


# ---------------------------------------------------------------------------------- report
def _pct(x: float | None) -> str:
    return "—" if x is None else f"{x * 100:.2f}"


def _num(x: Any) -> str:
    if x is None:
        return "—"
    if isinstance(x, float):
        return f"{x:.4g}"
    return str(x)


def _verdict(ok: bool | None) -> str:
    return {True: "pass", False: "FAIL", None: "skipped"}[ok]


def report_sections(cmp: Comparison, max_rows: int = 40) -> list[tuple[str, list[str], list[list[str]]]]:
    """(title, header, rows) per table; shared by the Markdown and HTML writers."""
    sections = [("Summary", ["check", "result", "detail"], [[c.name, _verdict(c.ok), c.summary] for c in cmp.checks])]
    fr = sorted(cmp.frontier, key=lambda f: (f["ok"], -(f["drop"] if f["drop"] is not None else math.inf)))
    sections.append(("Frontier accuracy at matched budgets (top-1 %)",
                     ["stage", "searcher", "axis", "budget", "baseline", "candidate", "drop", "result"],
                     [[f["stage"], f["searcher"], f["axis"], _num(f["budget"]), _pct(f["baseline"]),
                       _pct(f["candidate"]), _pct(f["drop"]), "pass" if f["ok"] else "FAIL"] for f in fr[:max_rows]]))
    sections.append(("Changed search points",
                     ["point", "searcher", "bitops budget", "CR budget", "alpha/qem", "status",
                      "objective (base → cand)", "rel. change", "policy (base → cand)", "layers changed"],
                     [[p["point"], str(p["searcher"]), _num(p["bitops_budget"]), _num(p["compression_ratio_budget"]),
                       _num(p["alpha"] if p["alpha"] is not None else p["qem"]), str(p["status"]),
                       f"{_num(p['objective'][0])} → {_num(p['objective'][1])}", _num(p["objective_rel"]),
                       f"{p['policy'][0] or '—'} → {p['policy'][1] or '—'}", _num(p["layers_changed"])]
                      for p in cmp.points[:max_rows]]))
    sections.append(("Timings (seconds)", ["what", "baseline", "candidate", "ratio", "result"],
                     [[t["name"], f"{t['baseline']:.1f}", f"{t['candidate']:.1f}", f"{t['ratio']:.2f}",
                       "pass" if t["ok"] else "FAIL"] for t in cmp.timings]))
    sections.append(("Config differences (information)", ["key", "baseline", "candidate"],
                     [[k, json.dumps(b), json.dumps(c)] for k, b, c in cmp.config_diff[:max_rows]]))
    return sections


def _header_lines(cmp: Comparison) -> list[str]:
    tol = ", ".join(f"{f.name}={getattr(cmp.tol, f.name)}" for f in dataclasses.fields(cmp.tol))
    return [f"baseline: `{cmp.baseline.spec}` — {cmp.baseline.origin}",
            f"candidate: `{cmp.candidate.spec}` — {cmp.candidate.origin}", f"tolerances: {tol}"]


def to_markdown(cmp: Comparison) -> str:
    def cell(s: str) -> str:
        return str(s).replace("|", "\\|").replace("\n", " ")

    lines = [f"# Regression report: {'REGRESSION' if cmp.regressed else 'PASS'}", ""]
    lines += [f"- {h}" for h in _header_lines(cmp)] + [""]
    for title, header, rows in report_sections(cmp):
        lines += [f"## {title}", ""]
        if not rows:
            lines += ["(none)", ""]
            continue
        lines.append("| " + " | ".join(header) + " |")
        lines.append("|" + "---|" * len(header))
        lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
        lines.append("")
    return "\n".join(lines)


def to_html(cmp: Comparison) -> str:
    e = html.escape
    verdict = "REGRESSION" if cmp.regressed else "PASS"
    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>Regression report</title>",
             "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;margin-bottom:1.5em}"
             "td,th{border:1px solid #ccc;padding:3px 8px;font-size:13px}th{background:#eee}"
             ".FAIL{color:#b00;font-weight:bold}.pass{color:#070}</style></head><body>",
             f"<h1>Regression report: <span class='{'FAIL' if cmp.regressed else 'pass'}'>{verdict}</span></h1><ul>"]
    parts += [f"<li>{e(h)}</li>" for h in _header_lines(cmp)] + ["</ul>"]
    for title, header, rows in report_sections(cmp):
        parts.append(f"<h2>{e(title)}</h2>")
        if not rows:
            parts.append("<p>(none)</p>")
            continue
        parts.append("<table><tr>" + "".join(f"<th>{e(h)}</th>" for h in header) + "</tr>")
        for row in rows:
            parts.append("<tr>" + "".join(f"<td class='{e(str(c))}'>{e(str(c))}</td>" if c in ("pass", "FAIL")
                                          else f"<td>{e(str(c))}</td>" for c in row) + "</tr>")
        parts.append("</table>")
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(cmp: Comparison, out_dir: Path) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"markdown": out_dir / "regression.md", "html": out_dir / "regression.html",
             "json": out_dir / "regression.json"}
    with atomic_path(paths["markdown"]) as tmp:
        tmp.write_text(to_markdown(cmp))
    with atomic_path(paths["html"]) as tmp:
        tmp.write_text(to_html(cmp))
    write_json(paths["json"], {
        "regressed": cmp.regressed,
        "baseline": {"spec": cmp.baseline.spec, "origin": cmp.baseline.origin, "mlflow_run_id": cmp.baseline.run_id},
        "candidate": {"spec": cmp.candidate.spec, "origin": cmp.candidate.origin,
                      "mlflow_run_id": cmp.candidate.run_id},
        "tolerances": dataclasses.asdict(cmp.tol),
        "checks": [dataclasses.asdict(c) for c in cmp.checks],
        "frontier": cmp.frontier, "timings": cmp.timings,
        "config_diff": [{"key": k, "baseline": b, "candidate": c} for k, b, c in cmp.config_diff],
    })
    return paths


def run_regression(baseline: str, candidate: str, tol: Tolerances, out_dir: Path,
                   tracking_uri: str | None = None) -> tuple[Comparison, dict[str, Path]]:
    with tempfile.TemporaryDirectory(prefix="mpq-regress-") as tmp:
        b = load_source(baseline, tracking_uri, Path(tmp) / "baseline")
        c = load_source(candidate, tracking_uri, Path(tmp) / "candidate")
    cmp = compare(b, c, tol)
    return cmp, write_report(cmp, out_dir)
