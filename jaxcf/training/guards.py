"""What guards a running loop: SIGINT and SIGTERM turned into a checkpoint and a clean stop
(:class:`StopFlag`), and the watchdog that ends an epoch which makes no progress (:class:`Watchdog`).

What does not live here: the loop that arms them (``jaxcf.training.loop``), the run's folder
(``jaxcf.training.workdir``).
"""

from __future__ import annotations

import ctypes
import faulthandler
import os
import signal
import sys
import threading
import time
from typing import Any

from jaxcf.core.errors import TrainingStalled

# --------------------------------------------------------------------------------- signals


class StopFlag:
    """Turns the first SIGINT or SIGTERM into a flag checked between epochs; a second one aborts at once.

    ``signal_number`` is the signal that raised it (the CLI exits with 128 + it: 130, 143).
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signal_number: int | None = None
        self._previous: dict[int, Any] = {}

    @property
    def raised(self) -> bool:
        return self.signal_number is not None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for number in self.SIGNALS:
                self._previous[number] = signal.signal(number, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.raised:
            raise KeyboardInterrupt
        self.signal_number = signum

    def __exit__(self, *exc):
        for number, previous in self._previous.items():
            signal.signal(number, previous)
        self._previous.clear()


# --------------------------------------------------------------------------------- watchdog

STALL_EXIT = 3


class Watchdog:
    """Ends an epoch that makes no progress, instead of letting it wait forever.

    :meth:`arm` before each epoch starts a deadline of ``max(seconds, 10 x the slowest epoch so
    far)``; :meth:`disarm` after it cancels it. When a deadline passes, a thread of its own acts, as
    ``on_stall`` says:

    - ``"raise"`` (the library, ``jaxcf.fit``): it raises :class:`jaxcf.core.errors.TrainingStalled` in the
      thread that armed it, which sees it as soon as it runs Python again (between the epoch's compiled
      calls, or when a slow call returns); the caller's interpreter is never ended. A call that never
      returns to Python (a kernel hung inside XLA) cannot be interrupted this way: it stays blocked, and
      a run that may hang belongs in the CLI or a subprocess.
    - ``"exit"`` (the CLIs): it writes one line to stderr, dumps every thread's Python stack
      (``faulthandler``) and ends the process with exit status 3. This works while the main thread is
      blocked in native code, because that releases the GIL.

    ``seconds = 0`` turns it off.
    """

    def __init__(self, seconds: float, what: str = "epoch", stream=None, on_stall: str = "raise"):
        if on_stall not in ("raise", "exit"):
            raise ValueError(f"on_stall must be 'raise' or 'exit'; got {on_stall!r}")
        self.seconds = seconds
        self.what = what
        self.on_stall = on_stall
        self.stream = stream if stream is not None else sys.stderr
        self.slowest = 0.0
        self._deadline: float | None = None
        self._label = ""
        self._started = 0.0
        self._target = threading.get_ident()
        self._wake = threading.Event()
        self._closed = False
        self._thread: threading.Thread | None = None

    def __enter__(self):
        if self.seconds > 0:
            self._thread = threading.Thread(target=self._watch, name="jaxcf-watchdog", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        self._closed = True
        self._deadline = None
        self._wake.set()

    def arm(self, label: str) -> None:
        self._label = label
        self._target = threading.get_ident()
        self._started = time.monotonic()
        self._deadline = self._started + max(self.seconds, 10 * self.slowest)
        self._wake.set()

    def disarm(self) -> None:
        if self._deadline is not None:
            self.slowest = max(self.slowest, time.monotonic() - self._started)
        self._deadline = None

    def message(self, waited: float) -> str:
        return (f"{self._label} made no progress for {waited:.0f} s (train.stall_seconds {self.seconds:g}); "
                "stopped: the last checkpoint is kept, continue with --resume")

    def _watch(self) -> None:
        while not self._closed:
            deadline = self._deadline
            wait = None if deadline is None else max(0.0, deadline - time.monotonic())
            self._wake.wait(timeout=wait)
            self._wake.clear()
            if self._closed:
                return
            deadline = self._deadline
            if deadline is None or time.monotonic() < deadline:
                continue
            waited = time.monotonic() - self._started
            if self.on_stall == "raise":
                self._deadline = None  # once: the exception ends the epoch
                _raise_stall(self._target, self.message(waited))
                continue
            print(f"error: {self.message(waited)}; every thread's stack follows", file=self.stream, flush=True)
            try:
                faulthandler.dump_traceback(file=self.stream, all_threads=True)
            except (ValueError, OSError):  # a stream without a file descriptor
                faulthandler.dump_traceback(all_threads=True)
            self.stream.flush()
            os._exit(STALL_EXIT)


_PENDING_STALLS: dict[int, str] = {}


class _Stalled(TrainingStalled):
    """Raised asynchronously in the stalled thread; carries the message the watchdog wrote."""

    def __init__(self):
        super().__init__(_PENDING_STALLS.pop(threading.get_ident(), "the epoch made no progress"))


def _raise_stall(thread_id: int, message: str) -> None:
    """Raises TrainingStalled(message) in another thread when it next runs Python (CPython's
    ``PyThreadState_SetAsyncExc``, which takes an exception class: the message waits in a table)."""
    _PENDING_STALLS[thread_id] = message
    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread_id), ctypes.py_object(_Stalled))
