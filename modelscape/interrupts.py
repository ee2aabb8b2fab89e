"""Telling a Ctrl-C from the terminal apart from an exit raised inside user code.

``SystemExit`` or ``KeyboardInterrupt`` raised by a batch function, a model or a grab (a stray
``sys.exit()``, an ``input()`` interrupted in a notebook) ends only that job, as a failed
record. A Ctrl-C from the terminal still stops the whole sweep: while a sweep trains in this
process, ``terminal_interrupts()`` notes that the SIGINT arrived, and ``from_terminal`` asks.
Worker processes run in their own session, so a KeyboardInterrupt there is always user code.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

_TERMINAL = threading.Event()  # a SIGINT arrived while a sweep trained in this process
_WATCHING = threading.Event()  # terminal_interrupts() is noting SIGINTs
_IN_WORKER = threading.Event()  # this is a worker process, which no terminal reaches


class UserCodeExit(RuntimeError):
    """``SystemExit`` or ``KeyboardInterrupt`` raised inside user code while a job trained."""

    @classmethod
    def of(cls, err: BaseException) -> UserCodeExit:
        return cls(
            f"{type(err).__name__}({', '.join(repr(a) for a in err.args)}) was raised inside "
            "your code (the batch function, the model or a grab); it ends this job only. "
            "Raise an exception instead of calling sys.exit() in code a sweep runs."
        )


def mark_worker_process() -> None:
    """Called once by a worker process: every exit raised there comes from user code."""
    _IN_WORKER.set()


@contextlib.contextmanager
def terminal_interrupts() -> Iterator[None]:
    """Note a SIGINT that arrives while the block runs (in the main thread, default handler)."""
    default = signal.getsignal(signal.SIGINT) is signal.default_int_handler
    if threading.current_thread() is not threading.main_thread() or not default:
        yield
        return
    _TERMINAL.clear()

    def on_sigint(signum: int, frame: object) -> None:
        _TERMINAL.set()
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, on_sigint)
    _WATCHING.set()
    try:
        yield
    finally:
        _WATCHING.clear()
        signal.signal(signal.SIGINT, signal.default_int_handler)


def from_terminal(err: BaseException) -> bool:
    """Whether ``err`` is the terminal's Ctrl-C (True) rather than an exit in user code."""
    if not isinstance(err, KeyboardInterrupt) or _IN_WORKER.is_set():
        return False
    # unwatched (a custom SIGINT handler, a thread): stop the sweep, as a Ctrl-C would
    return _TERMINAL.is_set() if _WATCHING.is_set() else True
