"""`mpqsweep search`: solve a grid of LIMPQ budgets for an indicator table, outside a study.

    mpqsweep search --indicators FILE [--macs-column limpq_macs] --bitops SPEC... --cr SPEC...
                    --alpha A... [--bits 6,5,4,3,2 ...] [--latency-table CSV --latency SPEC...]
                    [--bounds JSON] --out DIR [--no-ray] [--address ADDR] [--num-cpus N]

Budget specs are those of ``orchestrator.grid`` ("w4a4", "5.6e10", "w2a2..w6a6:25", "12.2",
"4..16:7", "none"). The table streams into DIR/points (Parquet parts) and DIR/policies.parquet; a
rerun with the same DIR solves only the points not finished yet. Prints a summary and the optimal
policy of every budget. Exit 0; 1 when some point ended in a solver/task error (rerun to retry it);
2 on bad input (one ``error:`` line).
"""
from __future__ import annotations

import math
import time

from ..console import CONSOLE
from ..errors import UserError


def register(sub) -> None:
    p = sub.add_parser("search", help="solve a LIMPQ grid of budgets for an indicator table (Ray, resumable)",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("--indicators", required=True, metavar="FILE", help="indicator table (.json or .parquet)")
    p.add_argument("--macs-column", default="macs", help="MACs column of a JSON table (limpq_macs for LIMPQ's)")
    p.add_argument("--bitops", nargs="+", action="extend", default=[], metavar="SPEC",
                   help='BitOps budgets: "5.6e10", "w4a4", "w2a2..w6a6:25", "1e9..5e9:5", "none"')
    p.add_argument("--cr", nargs="+", action="extend", default=[], metavar="SPEC",
                   help='compression-ratio budgets: "12.2", "4..16:7", "none"')
    p.add_argument("--alpha", nargs="+", action="extend", default=[], metavar="A", help="LIMPQ alpha(s) (default 2.0)")
    p.add_argument("--bits", nargs="+", action="extend", default=[], metavar="LIST",
                   help="candidate bit list(s) like 6,5,4,3,2 (default: the table's bits)")
    p.add_argument("--latency-table", metavar="CSV", help="per-layer cost table: layer,w_bits,a_bits,cost")
    p.add_argument("--latency", nargs="+", action="extend", default=[], metavar="SPEC", help="latency budgets")
    p.add_argument("--bounds", metavar="JSON", help="per-layer bit bounds {layer: {w_min, w_max, a_min, a_max}}")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory (resumed when it exists)")
    p.add_argument("--max-points", type=int, default=1_000_000,
                   help="refuse grids with more points than this (default 1000000)")
    p.add_argument("--no-ray", action="store_true", help="solve in this process instead of Ray tasks")
    p.add_argument("--address", help="Ray cluster address (default: start a local Ray)")
    p.add_argument("--num-cpus", type=int, help="CPUs of a local Ray (default: all)")
    p.add_argument("--batch-size", type=int, help="points per Ray task (default: automatic)")
    p.add_argument("--show", type=int, default=30, help="budget lines to print (default 30)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("-v", "--verbose", action="store_true", help="also show Ray's output (always kept in DIR/logs/)")
    p.set_defaults(func=run)


def _floats(values: list[str], what: str) -> list[float]:
    out = []
    for v in values:
        try:
            out.append(float(v))
        except ValueError:
            raise UserError(f"{what} {v!r} is not a number") from None
    return out


def _bit_lists(values: list[str]) -> list[list[int]]:
    out = []
    for v in values:
        try:
            bl = [int(b) for b in v.replace(" ", "").split(",") if b]
        except ValueError:
            raise UserError(f"--bits {v!r} must be a comma-separated list of integers like 6,5,4,3,2") from None
        if not bl:
            raise UserError(f"--bits {v!r} is empty")
        out.append(bl)
    return out


def run(args) -> int:
    from ..budget_specs import check_search_cfg
    from ..config import SearchCfg
    from ..grid import build_grid, run_grid
    from ..indicators import Indicators
    from ..paths import StudyPaths
    from ..preflight import writable_tree
    from ..ray_session import ray_session

    cfg = SearchCfg(alpha=_floats(args.alpha, "--alpha") or [2.0], bitops=list(args.bitops),
                    compression_ratio=list(args.cr), bits=_bit_lists(args.bits), batch_size=args.batch_size,
                    latency=list(args.latency), latency_table=args.latency_table, bounds=args.bounds,
                    max_points=args.max_points)
    check_search_cfg(cfg)
    if args.num_cpus is not None and args.num_cpus < 1:
        raise UserError(f"--num-cpus must be >= 1, got {args.num_cpus}")
    if args.show < 0:
        raise UserError(f"--show must be >= 0, got {args.show}")
    ind = Indicators.load(args.indicators, args.macs_column)
    grid = build_grid(ind, cfg)  # bits, bounds and latency rows against the table, before Ray starts
    out = writable_tree(args.out, "--out")
    CONSOLE.start(out / "logs", verbose=args.verbose)
    t0 = time.perf_counter()
    if args.no_ray:
        res = run_grid(ind, cfg, out, use_ray=False, progress=not args.no_progress, grid=grid)
        where = "in-process"
    else:
        with ray_session(args.address, args.num_cpus, StudyPaths(out)):
            import ray

            cpus = ray.cluster_resources().get("CPU", 0)
            res = run_grid(ind, cfg, out, use_ray=True, progress=not args.no_progress, grid=grid)
        where = f"on Ray ({cpus:g} CPUs)"
    wall = time.perf_counter() - t0
    _summary(res, where, wall, args.show)
    return 1 if res.count("error") else 0


def _summary(res, where: str, wall: float, show: int) -> None:
    from ..grid import POINTS_DIR, POLICIES_FILE

    CONSOLE.echo(f"search: {res.n_points} points: {res.count('optimal')} optimal, "
          f"{res.count('infeasible')} infeasible, {res.count('error')} error; {res.n_policies} distinct policies")
    CONSOLE.echo(f"  {res.n_solved} solved now, {res.n_resumed} resumed from the table; "
          f"{res.n_batches} batch(es) of <= {res.batch_size} points {where}; wall {wall:.1f} s "
          f"(grid {res.wall_seconds:.1f} s, Σ solve {res.solve_seconds:.1f} s)")
    CONSOLE.echo(f"  table: {res.out_dir / POINTS_DIR}  policies: {res.out_dir / POLICIES_FILE}")
    if show == 0 or not res.rows:
        return
    CONSOLE.echo("optimal policy per budget (budget, alpha, bits):")
    head = f"  {'bitops':>12} {'cr':>6} {'latency':>8} {'alpha':>5} {'bits':>11}  {'status':<10} " \
           f"{'objective':>10} {'GBitOps':>9} {'MB':>7} {'CR':>6}  policy"
    CONSOLE.echo(head)
    rows = sorted(res.rows, key=lambda r: (_key(r["bitops_budget"]), _key(r["compression_ratio_budget"]),
                                           _key(r["latency_budget"]), r["alpha"], r["bits"]))
    for r in rows[:show]:
        ok = r["status"] == "optimal"
        CONSOLE.echo(f"  {r['bitops_label'] or '-':>12} {_fmt(r['compression_ratio_budget'], '.4g'):>6} "
              f"{_fmt(r['latency_budget'], '.4g'):>8} {r['alpha']:>5g} {r['bits']:>11}  {r['status']:<10} "
              f"{_fmt(r['objective'], '.4f'):>10} {_fmt(r['bitops'] and r['bitops'] / 1e9, '.3f'):>9} "
              f"{_fmt(r['size_mb'], '.3f'):>7} {_fmt(r['compression_ratio'], '.2f'):>6}  "
              + (r["policy_id"] if ok else (r["reason"] or "")[:90]))
    if len(rows) > show:
        CONSOLE.echo(f"  ... {len(rows) - show} more in the table")


def _key(v) -> float:
    return math.inf if v is None else v


def _fmt(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)
