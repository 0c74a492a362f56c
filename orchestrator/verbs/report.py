"""`mpqsweep report STUDY_DIR`: rebuild a study's report from its Parquet tables."""
from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("report", help="rebuild the Pareto plots and frontier tables of a study directory")
    p.add_argument("study_dir")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..report import build_report

    out = build_report(args.study_dir)
    print(f"report written to {out / 'index.html'} and {out / 'report.md'}")
    return 0
