"""One run per study directory. ``STUDY/.lock`` names its owner (host, pid, start time) and carries a
heartbeat a thread refreshes; it is created with O_EXCL and replaced by rename, never ``flock`` (not
reliable over NFS). A lock whose owner is gone (a dead pid on this host, or a heartbeat older than
``stale_after`` seconds from another host) is taken over with a one-line note."""
from __future__ import annotations

import json
import os
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

from .atomic import write_json
from .errors import UserError
from .status import process_alive, process_start_time

LOCK_FILE = ".lock"
HEARTBEAT_S = 10.0


def read_lock(root: Path) -> dict | None:
    try:
        return json.loads((Path(root) / LOCK_FILE).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}  # torn or unreadable: nobody can be shown to own it


def owner_alive(owner: dict, stale_after: float) -> bool:
    """The lock's owner still runs: on this host, by pid and start time; elsewhere, by a fresh heartbeat."""
    if not owner:
        return False
    here = process_alive(owner)
    if here is not None:
        return here
    return time.time() - float(owner.get("heartbeat", 0)) < stale_after


def describe(owner: dict) -> str:
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(owner.get("started_at", 0)))
    beat = time.time() - float(owner.get("heartbeat", 0))
    return f"pid {owner.get('pid')} on {owner.get('host')} ({owner.get('command', '?')}) since {since}, " \
           f"heartbeat {beat:.0f} s ago"


class StudyLock:
    """Held for a run's life: ``acquire`` (or wait), a heartbeat thread, ``release``."""

    def __init__(self, root: str | os.PathLike, command: str, stale_after: float = 120.0,
                 echo: Callable[[str], None] = print):
        self.root, self.path = Path(root), Path(root) / LOCK_FILE
        self.stale_after, self.echo = stale_after, echo
        pid = os.getpid()
        self.me = {"host": socket.gethostname(), "pid": pid, "pid_start": process_start_time(pid),
                   "started_at": time.time(), "heartbeat": time.time(), "command": command}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _mine(self) -> bool:
        got = read_lock(self.root) or {}
        return got.get("pid") == self.me["pid"] and got.get("host") == self.me["host"] and \
            got.get("started_at") == self.me["started_at"]

    def _try(self) -> dict | None:
        """Take the lock; None on success, else the live owner."""
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            owner = read_lock(self.root)
            if owner is None:
                return self._try()  # released meanwhile
            if owner_alive(owner, self.stale_after):
                return owner
            self.echo("[lock] taking over the lock of a run that is gone "
                      f"({describe(owner) if owner else 'unreadable lock'})")
            write_json(self.path, self.me)
        else:
            with os.fdopen(fd, "w") as fh:
                fh.write(json.dumps(self.me))
        time.sleep(0.05)  # two takers of a stale lock both rename; the last one wins: check who
        if not self._mine():
            return read_lock(self.root) or {}
        return None

    def acquire(self, wait: bool = False, poll_s: float = 2.0) -> None:
        owner = self._try()
        if owner is not None and wait:
            self.echo(f"[lock] waiting for the run that holds {self.root}: {describe(owner)}")
            while owner is not None:
                time.sleep(poll_s)
                owner = self._try()
        if owner is not None:
            raise UserError(f"study {self.root} is being run by {describe(owner)}; wait for it to finish "
                            "(--wait waits), or use another study.dir")
        self._thread = threading.Thread(target=self._beat, name="study-lock-heartbeat", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            if not self._mine():
                return  # taken over (we were presumed dead): never write over the new owner
            self.me["heartbeat"] = time.time()
            try:
                write_json(self.path, self.me)
            except OSError:
                pass  # a full disk must not kill the run from this thread; the owner stays recognisable

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self._mine():
            self.path.unlink(missing_ok=True)
