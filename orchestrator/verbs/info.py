"""`mpqsweep info`: versions of the pieces a study depends on (for bug reports and regressions)."""
from __future__ import annotations

import platform


def register(sub) -> None:
    p = sub.add_parser("info", help="print versions of torch, torchvision, ray, pulp, mlflow, pyarrow")
    p.set_defaults(func=run)


def run(args) -> int:
    import importlib.metadata as md

    print(f"python {platform.python_version()}")
    for dist in ("mpq-sweep", "torch", "torchvision", "ray", "pulp", "mlflow", "pyarrow"):
        try:
            print(f"{dist} {md.version(dist)}")
        except md.PackageNotFoundError:
            print(f"{dist} (not installed)")
    return 0
