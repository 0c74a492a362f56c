"""Ctrl-C and SIGTERM. The first signal raises ``Interrupted`` in the main thread: every stage unwinds
through its ``finally`` (Ray shut down, the study's lock released, nothing partial recorded as done;
epoch checkpoints stay for the rerun). A second signal exits at once, after stopping our local Ray."""
from __future__ import annotations

import os
import signal
import threading

SIGNALS = (signal.SIGINT, signal.SIGTERM)
_received: list[int] = []


class Interrupted(KeyboardInterrupt):
    """A signal stopped the command; exit code 128 + signal number (130 for SIGINT, 143 for SIGTERM)."""

    def __init__(self, signum: int, message: str = ""):
        super().__init__(message)
        self.signum = signum
        self.message = message

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def _handler(signum, frame) -> None:
    if _received:
        _exit_now(signum)
    _received.append(signum)
    raise Interrupted(signum)


STOP = signal.SIGUSR2   # to this process from itself: a watchdog stops the main thread (Tune takes SIGUSR1)


def _stop_handler(signum, frame) -> None:
    raise Interrupted(signum)


def stop_main() -> None:
    """From any thread: stop the main thread as an interrupt does, without counting as the user's
    first Ctrl-C. The caller records why; whoever catches the interrupt asks it."""
    if signal.getsignal(STOP) is _stop_handler:
        os.kill(os.getpid(), STOP)  # a real signal also wakes a main thread blocked in a system call
    else:  # not under the CLI (a library caller): SIGUSR2's default action would kill the process
        import _thread

        _thread.interrupt_main()


def _exit_now(signum: int) -> None:
    from .console import CONSOLE
    from .ray_session import stop_local_ray

    stop_local_ray()
    try:
        CONSOLE.error(f"interrupted again ({signal.Signals(signum).name}): stopped at once")
    finally:
        os._exit(128 + signum)


def install() -> None:
    """Take SIGINT and SIGTERM (main thread only). Ray Tune's own SIGINT handler would swallow the first
    Ctrl-C and return as if the sweep had ended, so it is turned off."""
    if threading.current_thread() is not threading.main_thread():
        return
    os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"
    _installed.append(True)
    for sig in SIGNALS:
        signal.signal(sig, _handler)
    signal.signal(STOP, _stop_handler)


_installed: list[bool] = []


def reinstall() -> None:
    """After library code that installs handlers of its own (``ray.init``: SIGTERM; Ray Train's
    ``fit``: a SIGINT handler that it never removes and that exits 0 once its run is gone)."""
    if _installed and threading.current_thread() is threading.main_thread():
        for sig in SIGNALS:
            signal.signal(sig, _handler)


def received() -> int | None:
    return _received[0] if _received else None


def reset() -> None:
    """For commands run in-process one after another (tests): forget earlier signals, restore defaults."""
    _received.clear()
    _installed.clear()
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(STOP, signal.SIG_DFL)
