"""The LIMPQ search grid: the cartesian grid of points and its fan-out on Ray.

A grid is the product BitOps budgets × compression-ratio budgets × latency budgets × α × candidate
bit lists (``SearchCfg``; no bit list → the indicator table's bits). Every point has a stable id, a
hash of its parameters and of the inputs that fix its answer (indicators, bounds, latency table), so
the same point is never solved twice and a changed indicator table never reuses stale answers.

Budget specs and their grammar: ``budget_specs``.

Fan-out (``run_grid``): the points not yet in the table are grouped by (α, bits), sorted from the
loosest budgets to the tightest and cut into batches, so ``LimpqIlp.solve_many`` inside a task can
settle tight points with the proofs of looser ones. The batch size is ``SearchCfg.batch_size`` or
chosen from the point count and the cluster's CPUs (about ``TASKS_PER_CPU`` tasks per CPU, between
``MIN_BATCH`` and ``MAX_BATCH`` points: enough tasks to balance the load, few enough that the per-task
cost — building the ILP, the lost proof reuse — stays small). The inputs go to the object store once
(``ray.put`` of plain dicts/lists, never a pickle of our own classes); at most a few tasks per CPU are
in flight; every finished batch is written at once as one part of the table directory (see
``search_table``), so an interrupted sweep keeps its finished points and a rerun solves only the rest.
A task whose worker dies is retried (``MAX_RETRIES``); a batch that still fails is recorded as
``error`` rows (solved again on the next run). ``use_ray=False`` runs the same batches in-process.

Output directory: ``points/`` (the search table, one row per point), ``policies.parquet`` (one row per
distinct policy of this grid).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .budget_specs import Uniform, check_search_cfg, parse_specs
from .config import SearchCfg
from .console import CONSOLE
from .errors import UserError
from .indicators import Indicators
from .search_rows import ModelCosts, point_id
from .search_table import SCHEMA, compact, read_search_table, write_part, write_policies

SEARCHER = "limpq"
POINTS_DIR = "points"
POLICIES_FILE = "policies.parquet"
TASKS_PER_CPU = 8
MIN_BATCH = 4
MAX_BATCH = 512
MAX_RETRIES = 3
# Test-only fault injection: a path; the first task to create this file kills its own worker process.
KILL_ENV = "MPQ_GRID_TEST_KILL_ONCE"

_FINISHED = ("optimal", "infeasible")
_RESULT_KEYS = ("status", "reason", "objective", "bitops", "size_bits", "size_mb", "compression_ratio", "latency",
                "w_bits", "a_bits", "solve_seconds", "policy_id")


def check_search_files(search: SearchCfg) -> None:
    """The bounds and latency files parse (their layers are checked against the indicators later).
    Separate from ``check_search_cfg``: workers rebuild the config and need not see these files."""
    from .ilp import LatencyTable

    _load_bounds(search.bounds)
    if search.latency_table:
        LatencyTable.load(search.latency_table)


# ----------------------------------------------------------------------------------- the grid
@dataclass(frozen=True)
class GridPoint:
    point_id: str
    alpha: float
    bits: tuple[int, ...]
    bitops_budget: float | None
    bitops_label: str | None
    size_budget: float | None
    compression_ratio_budget: float | None
    latency_budget: float | None

    @property
    def bits_label(self) -> str:
        return ",".join(str(b) for b in self.bits)

    def looseness(self) -> tuple:
        # Loosest first: unconstrained (None) counts as +inf, larger budgets before smaller ones.
        return tuple(-(math.inf if v is None else v)
                     for v in (self.bitops_budget, self.size_budget, self.latency_budget))

    def base_row(self) -> dict:
        row = dict.fromkeys(SCHEMA.names)
        row.update(point_id=self.point_id, searcher=SEARCHER, bitops_budget=self.bitops_budget,
                   bitops_label=self.bitops_label, size_budget=self.size_budget,
                   compression_ratio_budget=self.compression_ratio_budget, latency_budget=self.latency_budget,
                   alpha=self.alpha, bits=self.bits_label)
        return row


@dataclass
class Batch:
    alpha: float
    bits: tuple[int, ...]
    points: list[GridPoint]

    def payload(self) -> list[list]:
        return [[p.point_id, p.bitops_budget, p.size_budget, p.latency_budget] for p in self.points]


@dataclass
class Grid:
    points: list[GridPoint]
    layers: tuple[str, ...]
    context_id: str
    inputs: dict                     # plain data every task needs: indicators, bounds, latency rows

    def batches(self, points: Sequence[GridPoint], batch_size: int) -> list[Batch]:
        groups: dict[tuple, list[GridPoint]] = {}
        for p in points:
            groups.setdefault((p.alpha, p.bits), []).append(p)
        out = []
        for (alpha, bits), pts in groups.items():
            pts = sorted(pts, key=GridPoint.looseness)
            out += [Batch(alpha, bits, pts[i:i + batch_size]) for i in range(0, len(pts), batch_size)]
        return out


def _load_bounds(path: str | None) -> dict:
    if not path:
        return {}
    p = Path(path)
    if not p.is_file():
        raise UserError(f"bounds file {p} does not exist")
    try:
        d = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"bounds file {p} is not valid JSON: {e}") from None
    if not isinstance(d, dict) or not all(isinstance(v, dict) for v in d.values()):
        raise UserError(f"bounds file {p} must map layer names to {{w_min, w_max, a_min, a_max}}")
    return d


def build_grid(indicators: Indicators, search: SearchCfg) -> Grid:
    """All points of the grid, validated against the indicator table (bad input → ``UserError``)."""
    from .ilp import LatencyTable, LimpqIlp

    check_search_cfg(search)
    bounds = _load_bounds(search.bounds)
    latency = LatencyTable.load(search.latency_table) if search.latency_table else None
    bit_lists = [tuple(sorted((int(b) for b in bl), reverse=True)) for bl in search.bits] or \
        [tuple(sorted(indicators.bits, reverse=True))]
    bit_lists = list(dict.fromkeys(bit_lists))
    alphas = list(dict.fromkeys(float(a) for a in search.alpha))
    # Building the ILP checks α, the bit lists, the bounds and the latency table's coverage on the
    # driver, so bad input is one clear error here and never a failed task.
    for a in alphas:
        for bl in bit_lists:
            LimpqIlp(indicators, alpha=a, bits=bl, bounds=bounds, latency_table=latency)

    costs = ModelCosts.from_indicators(indicators)
    inputs = {"indicators": indicators.to_json_dict(), "bounds": bounds,
              "latency": latency.fingerprint() if latency is not None else None}
    context_id = hashlib.sha1(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:16]

    def bitops_value(v) -> tuple[float | None, str | None]:
        if v is None:
            return None, None
        if isinstance(v, Uniform):
            if float(v.w).is_integer() and float(v.a).is_integer():  # exact integer arithmetic
                return float(costs.uniform_bitops(int(v.w), int(v.a))), v.label
            return float(costs.fixed_bitops + sum(costs.macs) * v.w * v.a), v.label
        return float(v), f"{v:.6g}"

    bitops = [bitops_value(v) for v in parse_specs(search.bitops, "BitOps budget", True)] or [(None, None)]
    ratios = parse_specs(search.compression_ratio, "compression-ratio budget", False) or [None]
    lats = parse_specs(search.latency, "latency budget", False) or [None]

    points: dict[str, GridPoint] = {}
    for a in alphas:
        for bl in bit_lists:
            label = ",".join(str(b) for b in bl)
            for b, blabel in bitops:
                for cr in ratios:
                    size = None if cr is None else costs.size_budget(cr)
                    for lat in lats:
                        if b is None and size is None and lat is None:
                            continue  # "none" everywhere is no point (e.g. bitops [none, w4a4] x cr [none, 8])
                        pid = point_id(SEARCHER, alpha=a, bits=label, bitops_budget=b, size_budget=size,
                                       latency_budget=lat, context=context_id)
                        points.setdefault(pid, GridPoint(pid, a, bl, b, blabel, size, cr, lat))
    if not points:
        raise UserError("the search grid has no point with a budget (every budget spec is 'none'); give a "
                        "BitOps, compression-ratio or latency budget")
    return Grid(list(points.values()), costs.layers, context_id, inputs)


def auto_batch_size(n_points: int, n_cpus: float) -> int:
    """About ``TASKS_PER_CPU`` tasks per CPU, clamped to [MIN_BATCH, MAX_BATCH] points."""
    per = math.ceil(max(n_points, 1) / (max(int(n_cpus), 1) * TASKS_PER_CPU))
    return max(MIN_BATCH, min(MAX_BATCH, per))


# ---------------------------------------------------------------------------------- one task
def solve_batch(inputs: Mapping, alpha: float, bits: Sequence[int], points: Sequence[Sequence],
                kill_marker: str | None = None) -> dict:
    """Solve one batch of points of one (α, bits): the body of a Ray task, also called in-process.
    ``points``: [point_id, bitops, size_bits, latency] lists. Returns plain data: one result dict per
    point (in order) and the task's own wall time."""
    t0 = time.perf_counter()
    if kill_marker:
        _kill_once(kill_marker)
    from .ilp import Budgets, LatencyTable, LimpqIlp

    ind = Indicators.from_json_dict(inputs["indicators"], where="grid inputs")
    lat = inputs.get("latency")
    table = LatencyTable({(l, int(w), int(a)): float(c) for l, w, a, c in lat}, "grid inputs") if lat else None
    ilp = LimpqIlp(ind, alpha=alpha, bits=list(bits), bounds=inputs.get("bounds") or None, latency_table=table)
    results = ilp.solve_many([Budgets(b, s, l) for _, b, s, l in points])
    out = []
    for (pid, *_), r in zip(points, results):
        out.append({"point_id": pid, "status": r.status, "reason": r.reason or "",
                    "objective": r.objective, "bitops": _f(r.bitops), "size_bits": _f(r.size_bits),
                    "size_mb": r.size_mb, "compression_ratio": r.compression_ratio, "latency": r.latency,
                    "w_bits": list(r.w_bits) if r.status == "optimal" else None,
                    "a_bits": list(r.a_bits) if r.status == "optimal" else None,
                    "solve_seconds": float(r.solve_seconds), "policy_id": r.policy_id})
    return {"results": out, "task_seconds": time.perf_counter() - t0, "pid": os.getpid(), "node": _node_id()}


def _node_id() -> str:
    """The Ray node this runs on ("local" outside Ray), so a run can tell how its work spread."""
    import sys

    if "ray" in sys.modules:
        import ray

        if ray.is_initialized():
            return ray.get_runtime_context().get_node_id()
    return "local"


def _f(v) -> float | None:
    return None if v is None else float(v)


def _kill_once(marker: str) -> None:
    """Test hook: the first task to create ``marker`` dies with its worker process (as a node loss
    or OOM kill would), so the test can check that Ray retries it."""
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return
    os.close(fd)
    os._exit(1)


# ------------------------------------------------------------------------------------ driver
@dataclass
class GridRun:
    """What a grid run did: every row of the grid and the figures the CLI and benchmark print."""

    rows: list[dict]
    out_dir: Path
    n_points: int = 0
    n_resumed: int = 0               # finished earlier, read from the table
    n_solved: int = 0                # solved by this run
    n_batches: int = 0
    batch_size: int = 0
    wall_seconds: float = 0.0        # this run's fan-out, from the first submit to the last write
    task_seconds: float = 0.0        # Σ in-task wall time of this run's batches (ILP build + solves)
    solve_seconds: float = 0.0       # Σ per-point solve time of this run's points
    n_policies: int = 0
    workers: set = field(default_factory=set)   # worker pids that solved batches
    nodes: set = field(default_factory=set)     # Ray node ids they ran on

    def count(self, status: str) -> int:
        return sum(r["status"] == status for r in self.rows)


def run_limpq_grid(indicators: Indicators, search_cfg: SearchCfg, out_dir: Path, *, use_ray: bool = True,
                   progress: bool = True) -> list[dict]:
    """Every row of the LIMPQ grid of ``search_cfg`` (finished earlier or now), in grid order; the
    table streams into ``out_dir/points`` and the distinct policies go to ``out_dir/policies.parquet``.
    With ``use_ray`` Ray must already be initialised (the caller owns the session)."""
    return run_grid(indicators, search_cfg, out_dir, use_ray=use_ray, progress=progress).rows


def run_grid(indicators: Indicators, search_cfg: SearchCfg, out_dir: str | os.PathLike, *, use_ray: bool = True,
             progress: bool = True, batch_size: int | None = None, grid: Grid | None = None) -> GridRun:
    """``run_limpq_grid`` with its statistics. ``batch_size`` overrides ``search_cfg.batch_size``;
    ``grid``: ``build_grid(indicators, search_cfg)`` when the caller built it already (to check it early)."""
    out = Path(out_dir)
    points_dir = out / POINTS_DIR
    grid = grid or build_grid(indicators, search_cfg)
    by_id = {p.point_id: p for p in grid.points}
    done = {r["point_id"]: r for r in read_search_table(points_dir)
            if r["point_id"] in by_id and r["status"] in _FINISHED}
    todo = [p for p in grid.points if p.point_id not in done]
    run = GridRun(rows=[], out_dir=out, n_points=len(grid.points), n_resumed=len(done))

    if use_ray:
        import ray

        if not ray.is_initialized():
            raise RuntimeError("run_grid(use_ray=True) needs an initialised Ray (use ray_session)")
        cpus = ray.cluster_resources().get("CPU", 1)
    else:
        cpus = 1
    size = batch_size or search_cfg.batch_size or auto_batch_size(len(todo), cpus)
    batches = grid.batches(todo, size)
    run.batch_size, run.n_batches = size, len(batches)
    new: dict[str, dict] = {}

    bar = CONSOLE.bar("search", "limpq grid", len(grid.points), "points") if progress else None
    if bar is not None:
        bar.update_to(len(done))
    counts = {s: sum(r["status"] == s for r in done.values()) for s in ("optimal", "infeasible", "error")}

    def finish(batch: Batch, out_: dict) -> None:
        rows = []
        for p, res in zip(batch.points, out_["results"]):
            row = p.base_row()
            row.update({k: res.get(k) for k in _RESULT_KEYS})
            rows.append(row)
            counts[row["status"]] = counts.get(row["status"], 0) + 1
        write_part(points_dir, rows)  # streamed: a finished batch survives any later interruption
        new.update((r["point_id"], r) for r in rows)
        run.task_seconds += out_.get("task_seconds", 0.0)
        run.solve_seconds += sum(r["solve_seconds"] or 0.0 for r in rows)
        if "pid" in out_:
            run.workers.add(out_["pid"])
            run.nodes.add(out_.get("node", "local"))
        if bar is not None:
            bar.update_to(len(done) + len(new), postfix=", ".join(f"{v} {k}" for k, v in counts.items() if v))

    t0 = time.perf_counter()
    try:
        if use_ray:
            _fan_out(grid, batches, cpus, finish)
        else:
            for b in batches:  # the kill hook is for Ray workers only, never the caller's process
                finish(b, solve_batch(grid.inputs, b.alpha, b.bits, b.payload()))
    finally:
        if bar is not None:
            bar.close()
    run.wall_seconds = time.perf_counter() - t0
    run.n_solved = len(new)

    if batches:
        compact(points_dir)
    rows = []
    for p in grid.points:
        rows.append(new.get(p.point_id) or done[p.point_id])
    run.rows = rows
    # Always rewritten (cheap, derived from the rows) so it describes exactly this grid.
    run.n_policies = write_policies(out / POLICIES_FILE, rows, grid.layers).num_rows
    return run


def _fan_out(grid: Grid, batches: list[Batch], cpus: float, finish) -> None:
    """Ray tasks, a bounded number in flight, results handled as they finish (ray.wait)."""
    import ray
    from ray.exceptions import RayError

    remote = ray.remote(num_cpus=1, max_retries=MAX_RETRIES)(solve_batch)
    inputs_ref = ray.put(grid.inputs)  # once; every task reads it from the object store
    kill = os.environ.get(KILL_ENV) or None
    window = max(2, 2 * int(cpus))     # enough queued that no CPU idles between batches
    queue = iter(batches)
    pending: dict = {}

    def submit() -> None:
        b = next(queue, None)
        if b is not None:
            pending[remote.remote(inputs_ref, b.alpha, list(b.bits), b.payload(), kill)] = b

    for _ in range(window):
        submit()
    try:
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            for ref in ready:
                b = pending.pop(ref)
                submit()
                try:
                    res = ray.get(ref)
                except RayError as e:  # retries exhausted or the task raised: record, go on
                    res = _failed(b, e)
                finish(b, res)
    finally:
        for ref in pending:  # interrupted: do not leave solves running for nobody
            ray.cancel(ref, force=True)


def _failed(batch: Batch, err: BaseException) -> dict:
    cause = getattr(err, "cause", None) or err
    msg = (str(cause).strip().splitlines() or [type(cause).__name__])[-1]
    reason = f"task failed: {type(cause).__name__}: {msg}"[:500]
    return {"results": [{"point_id": p.point_id, "status": "error", "reason": reason, "solve_seconds": 0.0}
                        for p in batch.points], "task_seconds": 0.0}
