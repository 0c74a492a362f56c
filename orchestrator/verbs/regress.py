"""`mpqsweep regress --baseline A --candidate B`: did the candidate study regress against the baseline?

A and B are study directories or MLflow study runs (``mlflow:RUN_ID``, ``mlflow:tag:KEY=VALUE[,...]``:
the newest finished study run with those tags). Compares frontier accuracy at matched budgets, search
objectives and chosen policies, and timings, within tolerances (``--tolerances FILE`` and the flags
below; see ``orchestrator/regress.py``). Writes regression.md, regression.html and regression.json.

Exit code: 0 no regression, 1 regression, 2 bad input.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path


def register(sub) -> None:
    p = sub.add_parser("regress", help="compare a candidate study with a baseline; exit 1 on regression")
    p.add_argument("--baseline", required=True, metavar="STUDY_OR_RUN",
                   help="study directory, mlflow:RUN_ID or mlflow:tag:KEY=VALUE[,KEY=VALUE]")
    p.add_argument("--candidate", required=True, metavar="STUDY_OR_RUN", help="same forms as --baseline")
    p.add_argument("--tolerances", metavar="YAML", help="tolerances file (keys as the flags, with underscores)")
    p.add_argument("--top1-drop", type=float, help="top-1 a matched frontier budget may lose, as a fraction "
                                                   "(default 0.005 = 0.5 points)")
    p.add_argument("--budget-rtol", type=float, help="extra cost a candidate policy may use at a matched budget "
                                                     "(default 0.01)")
    p.add_argument("--objective-rtol", type=float, help="relative ILP objective change allowed (default 1e-6)")
    p.add_argument("--policy-change-fraction", type=float,
                   help="share of solved points whose policy may change (default 0)")
    p.add_argument("--timing-ratio", type=float, help="slowdown factor allowed per stage (default 1.5) ...")
    p.add_argument("--timing-min-seconds", type=float, help="... unless slower by fewer seconds (default 30)")
    p.add_argument("--allow-missing-points", action="store_true", default=None,
                   help="baseline search points absent from the candidate are not a regression")
    p.add_argument("--out", metavar="DIR", help="report directory (default: CANDIDATE/regress for a study "
                                                "directory, else ./regress-report)")
    p.add_argument("--tracking-uri", default=None,
                   help="MLflow tracking URI for mlflow: sources (default: $MLFLOW_TRACKING_URI)")
    p.add_argument("--tag-pass", metavar="KEY=VALUE", action="append", default=[],
                   help="on no regression, set this tag on the candidate's MLflow study run (e.g. "
                        "mpq.nightly=good, the next night's baseline: mlflow:tag:mpq.nightly=good)")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..errors import UserError
    from ..regress import Tolerances, run_regression

    tol = Tolerances.load(args.tolerances, {
        "top1_drop": args.top1_drop, "budget_rtol": args.budget_rtol, "objective_rtol": args.objective_rtol,
        "policy_change_fraction": args.policy_change_fraction, "timing_ratio": args.timing_ratio,
        "timing_min_seconds": args.timing_min_seconds, "allow_missing_points": args.allow_missing_points})
    tags = {}
    for item in args.tag_pass:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UserError(f"--tag-pass {item!r} is not KEY=VALUE")
        tags[key] = value
    if tags and not args.candidate.startswith("mlflow:"):
        raise UserError("--tag-pass needs an MLflow candidate (mlflow:RUN_ID or mlflow:tag:KEY=VALUE)")
    if args.out:
        out = Path(args.out)
    elif not args.candidate.startswith("mlflow:") and Path(args.candidate).is_dir():
        out = Path(args.candidate) / "regress"
    else:
        out = Path("regress-report")

    cmp, paths = run_regression(args.baseline, args.candidate, tol, out, args.tracking_uri)
    for c in cmp.checks:
        mark = {True: "pass", False: "FAIL", None: "skip"}[c.ok]
        print(f"{mark:4}  {c.name}: {c.summary}")
    verdict = "REGRESSION" if cmp.regressed else "no regression"
    print(f"{verdict}; report: {paths['markdown']} {paths['html']}")
    if tags and not cmp.regressed:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI"))
        for k, v in tags.items():
            client.set_tag(cmp.candidate.run_id, k, v)
        print(f"tagged MLflow run {cmp.candidate.run_id}: " + ", ".join(f"{k}={v}" for k, v in tags.items()),
              file=sys.stderr)
    return 1 if cmp.regressed else 0
