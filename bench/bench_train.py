"""LIMPQ joint training cost, measured side by side in one run (the embedded default's model and data).

1. One joint step (Algorithm 1: n key policies + 1 random policy, summed gradients, one SGD step) vs
   one single-policy QAT step (the finetune of a searched policy: single-bit model, W4A4) at the same
   batch, in-process, same thread budget; medians over interleaved blocks. Target: ratio <= 1.1 x (n+1).
2. Indicator-stage throughput (training samples/s of the last epoch, evaluation excluded) with 1 vs 2
   Ray Train workers at a fixed total thread budget (1 worker x T threads vs 2 workers x T/2), each in
   a fresh subprocess with its own local Ray, through the product path (``run_indicators``).
3. The trainer's fixed start-up cost in those runs: ``trainer.fit()`` called -> first optimizer step
   (controller, placement group, worker processes, process group, imports, data and model set-up),
   plus ``ray.init`` itself.

FP weights are random-init (the step cost does not depend on their values), so no pretraining runs.

    flock /tmp/mpq-cpu.lock .venv/bin/python bench/bench_train.py [--threads 2] [--batch 64]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from workloads.data import load_data  # noqa: E402
from workloads.models import build_model  # noqa: E402
from workloads.quant import Policy, draw_random_policies, quantize_model, searchable_names  # noqa: E402
from workloads.train import joint_step, make_loader, sgd, single_step  # noqa: E402

BITS = [6, 5, 4, 3, 2]
DEFAULT = ROOT / "configs" / "default.yaml"


# ----------------------------------------------------------------------------- 1. step cost
def step_cost(threads: int, batch: int, rounds: int) -> dict:
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    data = load_data("mnist5k")
    x, y = next(iter(make_loader(data.train, batch, True, seed=0)))
    crit = nn.CrossEntropyLoss(label_smoothing=0.1)

    joint_model = quantize_model(build_model("small_cnn", 10), bits=BITS).train()
    joint_opt = sgd(joint_model, 0.01)
    gen = torch.Generator().manual_seed(1)
    fp = build_model("small_cnn", 10)
    names = searchable_names(quantize_model(build_model("small_cnn", 10), bits=BITS))
    single_model = quantize_model(fp, policy=Policy.uniform(names, 4)).train()
    single_opt = sgd(single_model, 0.01)

    def joint() -> None:
        (rand,) = draw_random_policies(names, BITS, gen)
        joint_step(joint_model, x, y, BITS, joint_opt, crit, rand)

    def single() -> None:
        single_step(single_model, x, y, single_opt, crit, clip=1.0)

    for _ in range(3):  # warm-up: lazy step-size init, allocator, oneDNN primitives
        joint()
        for _ in range(3):
            single()
    per_joint, per_single = [], []
    for _ in range(rounds):  # interleaved, so drifts in machine load hit both alike
        t = time.perf_counter()
        for _ in range(3):
            joint()
        per_joint.append((time.perf_counter() - t) / 3)
        t = time.perf_counter()
        for _ in range(10):
            single()
        per_single.append((time.perf_counter() - t) / 10)
    j, s = statistics.median(per_joint), statistics.median(per_single)
    return {"joint_s": j, "single_s": s, "ratio": j / s, "n": len(BITS)}


# ----------------------------------------------------------------------------- 2+3. Ray Train runs
def train_run(workers: int, threads_total: int, epochs: int, fraction: float, batch: int) -> dict:
    """One indicator stage on a fresh local Ray; runs inside its own subprocess."""
    import ray

    from orchestrator.config import load_config
    from orchestrator.paths import StudyPaths
    from orchestrator.training import run_indicators

    with tempfile.TemporaryDirectory(prefix="bench_train_") as tmp:
        d = Path(tmp)
        torch.manual_seed(0)
        fp = d / "fp.pt"
        torch.save({"model": build_model("small_cnn", 10).state_dict()}, fp)
        cfg = load_config(DEFAULT, [f"study.dir={d / 'study'}", f"resources.num_workers={workers}",
                                    f"resources.cpus_per_worker={threads_total // workers}",
                                    f"indicators.epochs={epochs}", f"data.indicator_fraction={fraction}",
                                    f"data.batch_size={batch}", "resources.max_failures=0"])
        t = time.perf_counter()
        ray.init(num_cpus=threads_total, include_dashboard=False, log_to_driver=False)
        init_s = time.perf_counter() - t
        try:
            res = run_indicators(cfg, StudyPaths(cfg.study_dir), fp)
        finally:
            ray.shutdown()
    last = res.history[-1]
    return {"workers": workers, "threads_per_worker": threads_total // workers, "ray_init_s": init_s,
            "startup_s": res.startup_seconds, "wall_s": res.wall_seconds, "steps": res.steps,
            "samples_per_s": [h["samples_per_s"] for h in res.history], "last_epoch_s": last["epoch_seconds"]}


def train_run_subprocess(workers: int, args) -> dict:
    cmd = [sys.executable, __file__, "--_train-run", str(workers), "--threads", str(args.threads),
           "--epochs", str(args.epochs), "--fraction", str(args.fraction), "--batch", str(args.batch)]
    env = {**os.environ, "RAY_DEDUP_LOGS": "1"}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if out.returncode != 0:
        sys.exit(f"train run with {workers} worker(s) failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2, help="total thread budget (= local Ray CPUs)")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=7, help="interleaved timing blocks for the step cost")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--fraction", type=float, default=0.5, help="data.indicator_fraction of the Ray runs")
    ap.add_argument("--_train-run", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._train_run:
        print(json.dumps(train_run(args._train_run, args.threads, args.epochs, args.fraction, args.batch)))
        return

    t0 = time.perf_counter()
    print(f"torch {torch.__version__}, small_cnn on mnist5k, bits {BITS}, batch {args.batch}, "
          f"thread budget {args.threads}")
    sc = step_cost(args.threads, args.batch, args.rounds)
    n = sc["n"]
    target = 1.1 * (n + 1)
    print("\n1. one joint step vs one single-policy QAT step (W4A4, single-bit model), same batch/threads")
    print(f"   joint {sc['joint_s'] * 1e3:.1f} ms | single {sc['single_s'] * 1e3:.1f} ms | "
          f"ratio {sc['ratio']:.2f} = {sc['ratio'] / (n + 1):.2f} x (n+1) with n={n}  "
          f"[target <= {target:.1f}: {'met' if sc['ratio'] <= target else 'MISSED'}]")

    runs = [train_run_subprocess(w, args) for w in (1, 2)]
    print(f"\n2+3. indicator stage via Ray Train, {args.epochs} epochs on {args.fraction:g} of the train set, "
          f"{args.threads} threads in total")
    print("   workers x threads | samples/s (last epoch) | ray.init | trainer start-up | stage wall | steps")
    for r in runs:
        print(f"   {r['workers']} x {r['threads_per_worker']:<14} | {r['samples_per_s'][-1]:>22.0f} | "
              f"{r['ray_init_s']:>7.1f}s | {r['startup_s']:>15.1f}s | {r['wall_s']:>9.1f}s | {r['steps']:>5}")
    one, two = runs[0]["samples_per_s"][-1], runs[1]["samples_per_s"][-1]
    print(f"   2 workers / 1 worker throughput at the same thread budget: {two / one:.2f}x")
    print(f"\ntotal bench wall {time.perf_counter() - t0:.0f}s")


if __name__ == "__main__":
    main()
