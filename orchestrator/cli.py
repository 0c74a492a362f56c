"""`mpqsweep`: the command line. Each verb lives in its own module and registers itself here.

A verb module exposes ``register(subparsers)`` which adds its parser and sets ``func`` (a callable
taking the parsed namespace and returning an exit code). Bad input anywhere raises ``UserError``,
which becomes one line on stderr and exit code 2.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from workloads.errors import InputError

# Order here is the order `mpqsweep --help` lists them.
VERB_MODULES = [
    "orchestrator.verbs.run",
    "orchestrator.verbs.indicators",
    "orchestrator.verbs.search",
    "orchestrator.verbs.report",
    "orchestrator.verbs.submit",
    "orchestrator.verbs.regress",
    "orchestrator.verbs.info",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mpqsweep",
        description="Mixed-precision quantization sweeps (LIMPQ, MixQuant) on Ray.",
    )
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    for name in VERB_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name == name:  # verb not built yet
                continue
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
