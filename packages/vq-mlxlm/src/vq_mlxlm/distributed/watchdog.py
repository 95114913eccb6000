"""Bounded waits on other ranks: a watchdog thread, and clear errors for lost peers.

MLX's collectives block until every rank takes part. A rank that dies closes its sockets,
and MLX's ring backend then fails the pending operation ("connection to a peer was lost"):
:func:`collective` turns that into a :class:`RankError` naming this rank and the step. A
rank that hangs (stopped, deadlocked, or on a host that vanished without closing its
connections) fails nothing, so :class:`Watchdog` bounds the wait: each completed step calls
:meth:`Watchdog.beat`; when ``timeout`` seconds pass without one, the watchdog thread writes
one line to stderr and ends the process with status :data:`EXIT_TIMEOUT` (MLX releases the
GIL while it waits, so the thread runs while the main thread is blocked in a collective).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from typing import TypeVar

from vq_core import VQError

EXIT_TIMEOUT = 3
T = TypeVar("T")


class RankError(VQError):
    """Another rank failed: its connection was lost, or it never answered in time."""


class Watchdog:
    """Ends this process when no :meth:`beat` comes for ``timeout`` seconds.

    Use as a context manager around the distributed part of a run; ``beat(what)`` marks
    progress and names what the rank waits for next (it appears in the message).
    """

    def __init__(self, timeout: float, rank: int, prog: str = "vq"):
        if not isinstance(timeout, (int, float)) or isinstance(timeout, bool) or timeout <= 0:
            raise ValueError(f"timeout={timeout!r} must be a number of seconds > 0")
        self.timeout, self.rank, self.prog = float(timeout), rank, prog
        self._deadline = time.monotonic() + self.timeout
        self._what = "starting"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="vq-rank-watchdog", daemon=True)

    def beat(self, what: str) -> None:
        self._what = what
        self._deadline = time.monotonic() + self.timeout

    def __enter__(self) -> Watchdog:
        self.beat(self._what)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _watch(self) -> None:
        while not self._stop.wait(min(0.2, self.timeout / 10)):
            if time.monotonic() > self._deadline:
                message = (
                    f"{self.prog}: error: rank {self.rank}: no progress for {self.timeout:g} s "
                    f"while {self._what}: another rank died, hangs or cannot be reached; "
                    "stopping this rank (--rank-timeout sets the wait)\n"
                )
                os.write(2, message.encode())
                os._exit(EXIT_TIMEOUT)


def collective(what: str, rank: int, fn: Callable[[], T]) -> T:
    """``fn()``, with a peer's lost connection as a :class:`RankError` naming ``what``."""
    try:
        return fn()
    except RuntimeError as e:
        text = str(e)
        if "[ring]" in text or "peer" in text or "NCCL" in text or "MPI" in text:
            raise RankError(
                f"rank {rank}: lost the connection to another rank while {what} ({text}): "
                "it died or was killed"
            ) from None
        raise
