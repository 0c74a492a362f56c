"""`mpqsweep`: the command line. Each verb lives in its own module and registers itself here.

A verb module exposes ``register(subparsers)`` which adds its parser and sets ``func`` (a callable
taking the parsed namespace and returning an exit code). Bad input anywhere raises ``UserError``,
which becomes one line on stderr and exit code 2; any other error is one line and exit code 1, its
traceback in ``logs/error.log``.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

from workloads.errors import InputError

# Order here is the order `mpqsweep --help` lists them.
VERB_MODULES = [
    "orchestrator.verbs.run",
    "orchestrator.verbs.indicators",
    "orchestrator.verbs.search",
    "orchestrator.verbs.status",
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
        importlib.import_module(name).register(sub)
    return parser


def _error_log(text: str) -> Path:
    """Where the traceback of an unexpected error goes: the command's logs/ (a study's, a search's
    --out), else the system temp dir."""
    from .console import CONSOLE

    d = CONSOLE.log_dir or Path(tempfile.gettempdir()) / "mpqsweep"
    try:
        d.mkdir(parents=True, exist_ok=True)
        path = d / "error.log"
        with path.open("a") as fh:
            fh.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} mpqsweep {' '.join(sys.argv[1:])}\n{text}\n")
        return path
    except OSError:
        fd, name = tempfile.mkstemp(prefix="mpqsweep-error.", suffix=".log")
        os.write(fd, text.encode())
        os.close(fd)
        return Path(name)


def main(argv: list[str] | None = None) -> int:
    from . import interrupts
    from .console import CONSOLE
    from .diskspace import DiskFull, as_disk_full

    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    interrupts.install()
    try:
        return int(args.func(args) or 0)
    except InputError as e:
        CONSOLE.error(f"error: {e}")
        return 2
    except DiskFull as e:
        CONSOLE.error(f"error: {e}")
        return e.exit_code
    except KeyboardInterrupt as e:
        CONSOLE.error(getattr(e, "message", "") or "interrupted; run the same command to resume")
        return 128 + (interrupts.received() or getattr(e, "signum", 2))
    except Exception as e:  # a bug or an unforeseen fault: one line here, the traceback in a file
        full = as_disk_full(e, CONSOLE.log_dir.parent if CONSOLE.log_dir else None)
        if full is not None:
            CONSOLE.error(f"error: {full}")
            return full.exit_code
        path = _error_log(traceback.format_exc())
        first = (str(e).strip().splitlines() or [""])[0][:300]
        CONSOLE.error(f"error: {type(e).__name__}: {first} (details in {path})")
        return 1
    finally:
        CONSOLE.stop()
        interrupts.reset()


if __name__ == "__main__":
    sys.exit(main())
