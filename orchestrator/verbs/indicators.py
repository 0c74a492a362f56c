"""`mpqsweep indicators CONFIG [key=value ...]`: pretrain (if no weights are given) and the LIMPQ
indicator stage only; prints where the table went and a short per-layer summary."""
from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("indicators", help="pretrain (if needed) and learn the LIMPQ importance indicators only")
    p.add_argument("config", help="study YAML (see configs/)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. indicators.epochs=1")
    p.add_argument("-v", "--verbose", action="store_true",
                   help="also show Ray and Train output (always kept in STUDY/logs/)")
    p.add_argument("--wait", action="store_true",
                   help="when another run holds the study directory, wait for it instead of exiting 2")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..config import load_config
    from ..console import CONSOLE
    from ..paths import StudyPaths
    from ..preflight import claim_study

    cfg = load_config(args.config, args.overrides)  # validated before any work starts
    paths = StudyPaths(cfg.study_dir)
    lock, _ = claim_study(cfg, paths.root, "mpqsweep indicators", args.wait, CONSOLE.echo)
    try:
        CONSOLE.start(paths.root / "logs", verbose=args.verbose)
        return _indicators(cfg, paths)
    finally:
        lock.release()


def _indicators(cfg, paths) -> int:
    from ..console import CONSOLE
    from ..ray_session import ray_session, require_resources
    from ..training import run_indicators, run_pretrain

    with ray_session(cfg.resources.address, cfg.resources.num_cpus, paths):
        require_resources(cfg.resources)
        fp = None
        if not cfg.indicators.import_path:
            pre = run_pretrain(cfg, paths)
            if not pre.skipped:
                last = pre.history[-1] if pre.history else {}
                CONSOLE.echo(f"[pretrain] {pre.checkpoint}: top-1 {last.get('top1', float('nan')):.4f} after "
                      f"{len(pre.history)} epoch(s), {pre.wall_seconds:.1f}s")
            fp = pre.checkpoint
        res = run_indicators(cfg, paths, fp)
    ind = res.indicators
    how = "imported" if res.imported else ("existing, skipped" if res.skipped else
                                           f"trained {len(res.history)} epoch(s) in {res.wall_seconds:.1f}s")
    CONSOLE.echo(f"[indicators] {how}: {len(ind.layers)} searchable layers x bits {ind.bits}, "
          f"{len(ind.fixed)} fixed (W8A8)")
    CONSOLE.echo(f"  table: {res.parquet}")
    CONSOLE.echo(f"  json:  {res.json}")
    if res.model_path:
        CONSOLE.echo(f"  multi-bit model: {res.model_path}")
    grow = total = 0
    for layer in ind.layers:
        for values in (layer.weight, layer.act):
            for hi, lo in zip(ind.bits, ind.bits[1:]):
                if hi > lo:
                    total += 1
                    grow += values[lo] > values[hi]
    if total:
        CONSOLE.echo(f"  indicators growing as bits fall: {grow}/{total} ({100 * grow / total:.0f}%)")
    return 0
