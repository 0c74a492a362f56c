"""MixQuant: one QEM vs ten QEMs, end to end, measured side by side in one run.

What is timed, per call, fresh every time (no cache): the QE table of every searchable layer
(asymmetric per-tensor quantization at 8..2 bits, plus the weights fingerprint the cache is keyed
by) followed by the QEM sweep into search-table rows (``orchestrator.mixquant``). The cost model
(``ModelCosts``, one forward pass) is built once per model beforehand: every searcher shares it.

Models: torchvision resnet18 / resnet50 with random-init weights (no download here). The QE table
does the same arithmetic on any weights of the same shapes, so its cost is the pretrained one's.
Target: ten QEMs cost at most 1.2x one QEM (the table dominates; each QEM is a lookup).

    flock /tmp/mpq-cpu.lock .venv/bin/python bench/bench_mixquant.py [--repeats 5] [--threads 2]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torchvision

from orchestrator.mixquant import load_or_compute_qe_table, mixquant_sweep
from orchestrator.search_rows import ModelCosts

ONE = [8.0]
TEN = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0]


def end_to_end(model, costs: ModelCosts, qems) -> tuple[float, float, int]:
    """(total seconds, sweep-only seconds, rows) of one fresh QE table + sweep."""
    t0 = time.perf_counter()
    table = load_or_compute_qe_table(model, costs.layers, None)
    t1 = time.perf_counter()
    out = mixquant_sweep(table, costs, qems, act_bits=8)
    t2 = time.perf_counter()
    return t2 - t0, t2 - t1, len(out.rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["resnet18", "resnet50"])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, repeats {args.repeats} "
          f"(medians; one/ten calls alternate)")
    for name in args.models:
        model = getattr(torchvision.models, name)(weights=None).eval()
        costs = ModelCosts.from_model(model, (3, 224, 224))
        params = sum(costs.params)
        end_to_end(model, costs, ONE)  # warm-up: first-touch allocations
        one, ten, sweep_one, sweep_ten = [], [], [], []
        for _ in range(args.repeats):
            t, s, n = end_to_end(model, costs, ONE)
            assert n == 1
            one.append(t)
            sweep_one.append(s)
            t, s, n = end_to_end(model, costs, TEN)
            assert n == 10
            ten.append(t)
            sweep_ten.append(s)
        m1, m10 = statistics.median(one), statistics.median(ten)
        print(f"{name}: {len(costs.layers)} searchable layers, {params / 1e6:.1f} M weights | "
              f"1 QEM {m1:.3f} s (sweep {statistics.median(sweep_one) * 1e3:.2f} ms) | "
              f"10 QEMs {m10:.3f} s (sweep {statistics.median(sweep_ten) * 1e3:.2f} ms) | "
              f"ratio ten/one = {m10 / m1:.3f} (target <= 1.2: {'met' if m10 / m1 <= 1.2 else 'MISSED'})")


if __name__ == "__main__":
    main()
