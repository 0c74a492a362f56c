"""`mpqsweep status STUDY_DIR`: which stages are done, running or pending, grid points solved, trials
finished, the last error. Works while a study runs, after it finished and after it was killed."""
from __future__ import annotations

import json


def register(sub) -> None:
    p = sub.add_parser("status", help="where a study stands: stages done/running/pending, points, trials, last error")
    p.add_argument("study_dir")
    p.add_argument("--json", action="store_true", help="print the status as JSON")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..status import format_status, study_status

    s = study_status(args.study_dir)
    if args.json:
        print(json.dumps(s, indent=1))
    else:
        print("\n".join(format_status(s)))
    return 0
