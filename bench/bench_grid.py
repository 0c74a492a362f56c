"""Benchmark: the LIMPQ grid fan-out on Ray, 1 vs 2 workers, on LIMPQ's ResNet-50 indicators.

    flock /tmp/mpq-cpu.lock .venv/bin/python bench/bench_grid.py            # 1,000 points, 1 vs 2 CPUs

A 1,000-point grid (50 BitOps budgets w2a2..w6a6 × 5 compression ratios × 4 alphas) is solved twice,
each time in a fresh subprocess with its own local Ray (``ray.init(num_cpus=1)`` then ``num_cpus=2``),
the same points in the same batches (the batch size the 2-CPU auto rule picks), into a fresh output
directory. Each subprocess first warms its workers (one task per CPU importing the solver: a cold
worker spends seconds importing torch through ``workloads``), timed separately; the grid timing
starts at the first submit and ends when the last batch is written. Printed side by side:

* parallel efficiency = T(1) / (2·T(2)) on the grid wall time (target ≥ 0.9), also with warm-up;
* driver overhead share = (wall − Σ in-task solve seconds / workers) / wall: the part of the wall
  time in which the workers were not solving (target ≤ 10 %); also the same with the whole in-task
  time (ILP construction included), which isolates the driver and Ray from the tasks' own set-up.

Both runs must produce the same table (checked: a digest of point id, status and policy id).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REF = ROOT.parent / "shared" / "reference" / "limpq_resnet50.json"


def grid_cfg(n_bitops: int):
    from orchestrator.config import SearchCfg

    return SearchCfg(alpha=[1.0, 2.0, 3.0, 4.0], bitops=[f"w2a2..w6a6:{n_bitops}"],
                     compression_ratio=["none", "6", "8", "10", "12"])


def child(args) -> None:
    import ray

    sys.path.insert(0, str(ROOT))
    from orchestrator.grid import run_grid
    from orchestrator.indicators import Indicators

    ind = Indicators.load(REF, "limpq_macs")
    ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
    try:
        @ray.remote(num_cpus=1)
        def warm() -> int:
            import orchestrator.grid  # noqa: F401  (the import a cold worker pays once)
            import orchestrator.ilp  # noqa: F401
            time.sleep(0.5)  # hold the CPU so each warm-up task lands on its own worker
            return os.getpid()

        t0 = time.perf_counter()
        pids = set(ray.get([warm.remote() for _ in range(args.cpus)]))
        warm_s = time.perf_counter() - t0
        res = run_grid(ind, grid_cfg(args.n_bitops), args.out, use_ray=True, progress=False,
                       batch_size=args.batch_size)
    finally:
        ray.shutdown()
    digest = hashlib.sha1(json.dumps(sorted((r["point_id"], r["status"], r["policy_id"] or "") for r in res.rows))
                          .encode()).hexdigest()[:12]
    print(json.dumps({"cpus": args.cpus, "warm_s": warm_s, "warm_workers": len(pids), "wall_s": res.wall_seconds,
                      "task_s": res.task_seconds, "solve_s": res.solve_seconds, "points": res.n_points,
                      "solved": res.n_solved, "batches": res.n_batches, "batch_size": res.batch_size,
                      "workers": len(res.workers), "optimal": res.count("optimal"),
                      "infeasible": res.count("infeasible"), "policies": res.n_policies, "digest": digest}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n-bitops", type=int, default=50, help="BitOps budgets (x 5 ratios x 4 alphas points)")
    p.add_argument("--batch-size", type=int, default=None, help="default: the auto rule for 2 CPUs")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--cpus", type=int, default=2, help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args)
        return

    sys.path.insert(0, str(ROOT))
    from orchestrator.grid import auto_batch_size

    n = args.n_bitops * 5 * 4
    batch = args.batch_size or auto_batch_size(n, 2)
    runs = {}
    with tempfile.TemporaryDirectory(prefix="bench_grid_") as tmp:
        for cpus in (1, 2):
            cmd = [sys.executable, __file__, "--child", "--cpus", str(cpus), "--n-bitops", str(args.n_bitops),
                   "--batch-size", str(batch), "--out", str(Path(tmp) / f"cpus{cpus}")]
            env = dict(os.environ, PYTHONPATH=str(ROOT), RAY_DEDUP_LOGS="0")
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
            if proc.returncode != 0:
                sys.exit(f"child with {cpus} CPU(s) failed:\n{proc.stderr[-3000:]}")
            runs[cpus] = json.loads(proc.stdout.strip().splitlines()[-1])
            runs[cpus]["process_s"] = time.perf_counter() - t0

    r1, r2 = runs[1], runs[2]
    print(f"LIMPQ grid on the ResNet-50 reference: {r1['points']} points ({args.n_bitops} BitOps x 5 CR x 4 alpha), "
          f"{r1['batches']} batches of <= {batch} points; {r1['optimal']} optimal, {r1['infeasible']} infeasible, "
          f"{r1['policies']} distinct policies")
    print(f"{'workers':>7} {'warm-up s':>9} {'grid wall s':>11} {'Σ task s':>9} {'Σ solve s':>9} "
          f"{'overhead (solve)':>16} {'overhead (task)':>15} {'workers used':>12}")
    for c, r in runs.items():
        r["ovh_solve"] = (r["wall_s"] - r["solve_s"] / c) / r["wall_s"]
        r["ovh_task"] = (r["wall_s"] - r["task_s"] / c) / r["wall_s"]
        print(f"{c:>7} {r['warm_s']:>9.2f} {r['wall_s']:>11.2f} {r['task_s']:>9.2f} {r['solve_s']:>9.2f} "
              f"{r['ovh_solve']:>16.1%} {r['ovh_task']:>15.1%} {r['workers']:>12}")
    eff = r1["wall_s"] / (2 * r2["wall_s"])
    eff_cold = (r1["wall_s"] + r1["warm_s"]) / (2 * (r2["wall_s"] + r2["warm_s"]))
    work = r2["solve_s"] / r1["solve_s"]
    print(f"parallel efficiency T1/(2*T2): {eff:.3f} on grid wall (target >= 0.9); {eff_cold:.3f} including "
          f"worker warm-up; speed-up {r1['wall_s'] / r2['wall_s']:.2f}x")
    print(f"driver overhead share at 2 workers: {r2['ovh_solve']:.1%} (wall minus Σ solve/2, over wall; target "
          f"<= 10%), {r2['ovh_task']:.1%} counting whole tasks; at 1 worker {r1['ovh_solve']:.1%}")
    print(f"Σ solve seconds 2 workers / 1 worker: {work:.2f} (same points, same batches: >1 means the two "
          f"workers slowed each other down, e.g. sharing 2 cores with the driver and Ray)")
    print(f"results identical across the two runs: {r1['digest'] == r2['digest']}")


if __name__ == "__main__":
    main()
