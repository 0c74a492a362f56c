"""What a person sees while a command runs: our one line per stage and live progress bars. Ray, Tune,
Train, MLflow, urllib3 and the Ray workers' own output go to files in ``<dir>/logs/`` instead (all of
it reaches the console too with ``--verbose``).

Workers report progress by printing one tagged JSON line (``ProgressTicker``); Ray streams workers'
output to the driver, where the console turns those lines into progress bars and files the rest.
"""
from __future__ import annotations

import json
import logging
import logging.handlers
import os
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

TAG = "mpq-progress "
# Source loggers -> their file in logs/ (several loggers may share one file).
LOG_FILES = {"ray": "ray.log", "mlflow": "mlflow.log", "alembic": "mlflow.log", "sqlalchemy": "mlflow.log",
             "urllib3": "http.log", "requests": "http.log", "filelock": "ray.log", "py.warnings": "output.log"}
OURS = ("orchestrator", "workloads")
# Warnings that are by design here, not news to the user (we keep Ray's token auth on on purpose).
EXPECTED_WARNINGS = ("Token authentication is enabled",)
ROTATE = {"maxBytes": 20 << 20, "backupCount": 3}
PLAIN_EVERY_S = 30.0     # plain (non-terminal) progress: a line per quarter, or after this long


class ProgressTicker:
    """Worker side (rank 0 only): one tagged line at most every ``interval`` seconds and at each epoch's
    last step. It prints host-side counters only: no device sync."""

    def __init__(self, stage: str, epochs: int, steps: int, rank: int, interval: float = 2.0):
        self.stage, self.epochs, self.steps, self.rank, self.interval = stage, epochs, steps, rank, interval
        self.last = 0.0

    def __call__(self, epoch: int, step_in_epoch: int) -> None:
        if self.rank != 0:
            return
        now = time.monotonic()
        if step_in_epoch < self.steps and now - self.last < self.interval:
            return
        self.last = now
        print(TAG + json.dumps({"stage": self.stage, "epoch": epoch, "epochs": self.epochs,
                                "step": step_in_epoch, "steps": self.steps}), flush=True)


class Bar:
    """A live bar (tqdm) on a terminal; elsewhere (CI, ``ray job submit``) a plain line per quarter of
    the total, or every ``PLAIN_EVERY_S`` seconds, and one at the end."""

    def __init__(self, console: Console, key: str, desc: str, total: int, unit: str):
        self.console, self.key, self.desc, self.total, self.unit = console, key, desc, max(0, int(total)), unit
        self.n, self.postfix, self.closed = 0, "", False
        self._quarter, self._last_line = 0, time.monotonic()
        self._tqdm = None
        if console.tty:
            from tqdm import tqdm

            self._tqdm = tqdm(total=self.total, desc=desc, unit=unit, file=console.out, dynamic_ncols=True,
                              leave=False, mininterval=0.2)

    def update_to(self, n: int, total: int | None = None, desc: str | None = None, postfix: str | None = None) -> None:
        with self.console.lock:
            if self.closed:
                return
            if total is not None and total != self.total:
                self.total = int(total)
                if self._tqdm is not None:
                    self._tqdm.total = self.total
            self.n = min(int(n), self.total) if self.total else int(n)
            self.desc = desc or self.desc
            self.postfix = postfix if postfix is not None else self.postfix
            if self._tqdm is not None:
                self._tqdm.set_description_str(self.desc, refresh=False)
                self._tqdm.set_postfix_str(self.postfix, refresh=False)
                self._tqdm.update(self.n - self._tqdm.n)
            else:
                quarter = 4 * self.n // self.total if self.total else 0
                now = time.monotonic()
                if quarter > self._quarter or now - self._last_line >= PLAIN_EVERY_S:
                    self._quarter, self._last_line = quarter, now
                    if self.n < self.total:
                        self.console._write(self.line())
            self.console._progress(self)

    def line(self) -> str:
        pct = f" ({100 * self.n / self.total:.0f}%)" if self.total else ""
        return f"  {self.desc}: {self.n}/{self.total} {self.unit}{pct}" + (f", {self.postfix}" if self.postfix else "")

    def close(self) -> None:
        with self.console.lock:
            if self.closed:
                return
            self.closed = True
            if self._tqdm is not None:
                self._tqdm.close()
            self.console.bars.pop(self.key, None)


class Console:
    """The process's console (``CONSOLE``). Until ``start`` it only prints; ``start(log_dir)`` routes
    foreign output to ``log_dir`` until ``stop``."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self._out = None   # the real console while foreign output is redirected; else sys.stdout/err
        self._err = None
        self.log_dir: Path | None = None
        self.verbose = True
        self.bars: dict[str, Bar] = {}
        self.warnings: Counter = Counter()
        self.on_progress: Callable[[Bar], None] | None = None
        self._saved: list = []
        self._handlers: list[tuple[logging.Logger, logging.Handler]] = []
        self._propagate: dict[str, bool] = {}
        self._stripped: list[tuple[logging.Logger, logging.Handler]] = []
        self._ray_handler = None
        self._worker_log: logging.Logger | None = None
        self._sources: dict[str, logging.Handler] = {}
        self._counter: logging.Handler | None = None

    # ------------------------------------------------------------------ output
    @property
    def out(self):
        return self._out or sys.stdout

    @property
    def err(self):
        return self._err or sys.stderr

    @property
    def tty(self) -> bool:
        try:
            return self.out.isatty()
        except (AttributeError, ValueError):
            return False

    def _write(self, msg: str, err: bool = False) -> None:
        stream = self.err if err else self.out
        if self.tty and self.bars:
            from tqdm import tqdm

            tqdm.write(msg, file=stream)
        else:
            print(msg, file=stream, flush=True)

    def echo(self, msg: str) -> None:
        with self.lock:
            self._write(msg)

    def error(self, msg: str) -> None:
        with self.lock:
            self._write(msg, err=True)

    def bar(self, key: str, desc: str, total: int, unit: str) -> Bar:
        with self.lock:
            old = self.bars.pop(key, None)
            if old is not None:
                old.close()
            b = self.bars[key] = Bar(self, key, desc, total, unit)
            return b

    def close_bars(self) -> None:
        for b in list(self.bars.values()):
            b.close()

    def _progress(self, bar: Bar) -> None:
        if self.on_progress is not None:
            try:
                self.on_progress(bar)
            except OSError:
                pass  # a status file that cannot be written must not stop the work

    # ------------------------------------------------------------- routing
    def start(self, log_dir: str | os.PathLike, verbose: bool = False) -> None:
        """Route Ray/Tune/Train/MLflow/urllib3 logging to per-source files in ``log_dir`` (rotated) and,
        unless ``verbose``, everything else written to this process's stdout/stderr to
        ``log_dir/output.log``; our own lines keep the real console."""
        if self.log_dir is not None:
            return
        log_dir = Path(log_dir)
        log_dir.mkdir(parents=True, exist_ok=True)
        self.log_dir, self.verbose = log_dir, verbose
        os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
        logging.captureWarnings(True)
        files: dict[str, logging.Handler] = {}
        fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
        for fname in dict.fromkeys(LOG_FILES.values()):
            files[fname] = logging.handlers.RotatingFileHandler(log_dir / fname, **ROTATE)
            files[fname].setFormatter(fmt)
        self._sources = {name: files[fname] for name, fname in LOG_FILES.items()}
        self._counter = _Counter(self.warnings)
        self.reroute()
        ours = logging.StreamHandler(self.err)
        ours.setLevel(logging.WARNING)
        ours.setFormatter(logging.Formatter("warning: %(message)s"))
        for name in OURS:
            self._add(logging.getLogger(name), ours)
            self._propagate[name] = logging.getLogger(name).propagate
            logging.getLogger(name).propagate = False
        wl = logging.getLogger("mpq.workers")
        wl.propagate = False
        wh = logging.handlers.RotatingFileHandler(log_dir / "workers.log", **ROTATE)
        wh.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
        self._add(wl, wh)
        wl.setLevel(logging.INFO)
        self._worker_log = wl
        if not verbose:
            self._strip_stream_handlers()
            self._redirect_fds(log_dir / "output.log")

    def reroute(self) -> None:
        """(Re)attach the source loggers to their files. Libraries that configure their loggers when
        imported (MLflow's dictConfig replaces handlers) are imported lazily: call this after."""
        if self.log_dir is None:
            return
        with self.lock:
            for name, h in self._sources.items():
                lg = logging.getLogger(name)
                for mine in (h, self._counter):
                    if mine not in lg.handlers:
                        self._add(lg, mine)
                if not self.verbose:
                    self._propagate.setdefault(name, lg.propagate)
                    lg.propagate = False
            if not self.verbose:
                self._strip_stream_handlers()

    def _add(self, lg: logging.Logger, h: logging.Handler) -> None:
        lg.addHandler(h)
        self._handlers.append((lg, h))

    def _strip_stream_handlers(self) -> None:
        """Source loggers that print to the terminal themselves (Ray configures its own at import)."""
        for name in LOG_FILES:
            lg = logging.getLogger(name)
            mine = {id(x) for _, x in self._handlers}
            for h in list(lg.handlers):
                if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler) \
                        and id(h) not in mine:
                    lg.removeHandler(h)
                    self._stripped.append((lg, h))

    def _redirect_fds(self, path: Path) -> None:
        for s in (sys.stdout, sys.stderr):
            try:
                s.flush()
            except (AttributeError, ValueError, OSError):
                pass
        try:
            out_fd, err_fd = sys.stdout.fileno(), sys.stderr.fileno()
        except (AttributeError, ValueError, OSError):
            return  # not real files (an embedding host): leave them alone
        saved_out, saved_err = os.dup(out_fd), os.dup(err_fd)
        enc = getattr(sys.stdout, "encoding", None) or "utf-8"
        self._out = os.fdopen(os.dup(saved_out), "w", buffering=1, encoding=enc, errors="replace")
        self._err = os.fdopen(os.dup(saved_err), "w", buffering=1, encoding=enc, errors="replace")
        log_fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(log_fd, out_fd)
        os.dup2(log_fd, err_fd)
        os.close(log_fd)
        self._saved = [(out_fd, saved_out), (err_fd, saved_err)]
        for _lg, h in self._handlers:  # handlers made before the swap hold the old stream objects
            if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler):
                h.setStream(self.err)

    def stop(self) -> None:
        """Undo ``start``: fds, handlers and Ray's output handler as they were."""
        self.close_bars()
        if self.log_dir is None:
            return
        for s in (sys.stdout, sys.stderr):
            try:
                s.flush()
            except (AttributeError, ValueError, OSError):
                pass
        for fd, saved in self._saved:
            os.dup2(saved, fd)
            os.close(saved)
        if self._saved:
            for s in (self._out, self._err):
                s.close()
        self._saved = []
        self._out = self._err = None
        for lg, h in self._handlers:
            lg.removeHandler(h)
            if isinstance(h, logging.FileHandler):
                h.close()
        self._sources = {}
        for lg, h in self._stripped:
            lg.addHandler(h)
        for name, prop in self._propagate.items():
            logging.getLogger(name).propagate = prop
        self._handlers, self._stripped, self._propagate = [], [], {}
        self.detach_ray()
        self.log_dir, self.verbose, self.on_progress = None, True, None
        self.warnings.clear()

    def warnings_line(self) -> str | None:
        if not self.warnings or self.log_dir is None:
            return None
        parts = ", ".join(f"{n} from {src}" for src, n in self.warnings.most_common())
        return f"[logs] warnings: {parts}; see {self.log_dir}"

    # ----------------------------------------------------------------- Ray
    def attach_ray(self) -> None:
        """Take over the driver's stream of Ray workers' output (after ``ray.init``): progress lines
        become bars, the rest goes to logs/workers.log (and, with ``verbose``, to Ray's printer)."""
        if self.log_dir is None or self._ray_handler is not None:
            return
        try:
            from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
        except ImportError:  # a Ray without this (private) hook: its own printing stays
            return
        original = next((h for name, h in dispatcher.handlers if name == "ray_print_logs"), None)
        dispatcher.remove_handler("ray_print_logs")
        self._ray_handler = (dispatcher, original)
        dispatcher.add_handler("mpq_console", lambda data: self._worker_output(data, original))
        if not self.verbose:
            self._strip_stream_handlers()

    def detach_ray(self) -> None:
        if self._ray_handler is None:
            return
        dispatcher, original = self._ray_handler
        dispatcher.remove_handler("mpq_console")
        if original is not None:
            dispatcher.add_handler("ray_print_logs", original)
        self._ray_handler = None

    def _worker_output(self, data: dict, original: Callable | None) -> None:
        lines, rest = data.get("lines") or [], []
        who = f"({data.get('actor_name') or data.get('task_name') or 'worker'} pid={data.get('pid')})"
        for line in lines:
            if line.startswith(TAG):
                try:
                    self._worker_progress(json.loads(line[len(TAG):]))
                except (ValueError, KeyError, TypeError, ZeroDivisionError):
                    pass
                continue
            rest.append(line)
            if self._worker_log is not None:
                self._worker_log.info("%s%s %s", who, " [stderr]" if data.get("is_err") else "", line)
        if self.verbose and original is not None and rest:
            original({**data, "lines": rest})

    def _worker_progress(self, d: dict) -> None:
        stage, epochs, steps = str(d["stage"]), int(d["epochs"]), int(d["steps"])
        epoch, step = int(d["epoch"]), int(d["step"])
        with self.lock:
            bar = self.bars.get(stage) or self.bar(stage, stage, epochs * steps, "step")
            bar.update_to(epoch * steps + step, total=epochs * steps, desc=f"{stage} epoch {epoch + 1}/{epochs}")


class _Counter(logging.Handler):
    """Counts warnings and errors per source logger (for the one summary line)."""

    def __init__(self, counts: Counter):
        super().__init__(level=logging.WARNING)
        self.counts = counts

    def emit(self, record: logging.LogRecord) -> None:
        if not any(w in str(record.msg) for w in EXPECTED_WARNINGS):
            self.counts[record.name.split(".")[0]] += 1


CONSOLE = Console()
