"""`mpqsweep run CONFIG [key=value ...]`: run (or resume) a whole study."""
from __future__ import annotations

import logging


def register(sub) -> None:
    p = sub.add_parser("run", help="run or resume a study: pretrain? -> indicators -> search -> select -> "
                                   "finetune/ptq -> report")
    p.add_argument("config", help="study YAML (see configs/)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. indicators.epochs=1")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..config import load_config
    from ..study import Study

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    cfg = load_config(args.config, args.overrides)  # validated before any work starts
    return Study(cfg).run()
