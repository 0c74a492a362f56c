"""`mpqsweep run CONFIG [key=value ...]`: run (or resume) a whole study."""
from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("run", help="run or resume a study: pretrain? -> indicators -> search -> select -> "
                                   "finetune/ptq -> report")
    p.add_argument("config", help="study YAML (see configs/)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. indicators.epochs=1")
    p.add_argument("-v", "--verbose", action="store_true",
                   help="also show Ray, Tune, Train and MLflow output (always kept in STUDY/logs/)")
    p.add_argument("--wait", action="store_true",
                   help="when another run holds the study directory, wait for it instead of exiting 2")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..config import load_config
    from ..console import CONSOLE
    from ..study import Study

    cfg = load_config(args.config, args.overrides)  # validated before any work starts
    study = Study(cfg)
    # Inputs, study directory, its lock, MLflow: all before anything starts.
    study.preflight(wait=args.wait, command="mpqsweep run")
    try:
        CONSOLE.start(study.paths.root / "logs", verbose=args.verbose)
        return study.run()
    finally:
        study.release()
