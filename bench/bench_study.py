"""Wall time of the embedded default study (configs/default.yaml) and the share of it spent
orchestrating (Ray start, MLflow, Parquet I/O, process start, scheduling) rather than computing (training
epochs with their validation passes, ILP solves, PTQ evaluation), as the study records it in timings.json.

    python bench/bench_study.py [--dir /tmp/bench-study] [key=value ...]

The study directory is wiped first so every stage runs. Target: orchestration <= 25 % of wall time.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", default="/tmp/mpq-bench-study")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    d = Path(args.dir)
    shutil.rmtree(d, ignore_errors=True)
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "orchestrator.cli", "run", str(ROOT / "configs" / "default.yaml"),
                    f"study.dir={d}", *args.overrides], cwd=ROOT, check=True)
    wall = time.perf_counter() - t0
    t = json.loads((d / "timings.json").read_text())
    inv = t["invocations"][-1]
    compute = sum(inv["compute_seconds"].values())
    print(f"\ndefault study: {wall:.1f}s wall for the command ({inv['wall_seconds']:.1f}s inside the study)")
    print("stage seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in t["stages"].items()))
    print("compute seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in inv["compute_seconds"].items()))
    print(f"ray start {inv['ray_start_seconds']:.1f}s, mlflow {inv['mlflow_seconds']:.1f}s, "
          f"compute {compute:.1f}s")
    print(f"orchestration share: {100 * inv['orchestration_share']:.1f}% (target <= 25%)")
    print(f"process start + config + interpreter outside the study: {wall - inv['wall_seconds']:.1f}s")


if __name__ == "__main__":
    main()
