"""A soft time limit for pure-Python work: SIGALRM raises :class:`TimeLimitExceeded`.

The grader uses it around every sympy comparison, so that a slow ``simplify`` ends as
"not equal" instead of holding up training.  It is *soft*:

* the signal is handled between Python bytecodes, so one long C call (say a huge integer
  power) still runs to its end - the parser's size bounds keep those short, and the grading
  pool's parent kills a worker that overruns anyway (the hard bound);
* only the main thread of a process receives signals, so elsewhere (a trainer's helper
  thread) the limit is skipped and only the size bounds apply.  The grading pool's workers run
  their tasks in their main thread, so there it always applies.

Limits nest: an outer timer (a pytest-timeout alarm, an enclosing limit) is re-armed on exit
with the time it has left, and fires at once if that ran out meanwhile.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager


class TimeLimitExceeded(BaseException):
    """The limit ran out.

    A BaseException on purpose: sympy (and the original grader) wrap work in ``except
    Exception`` blocks that would otherwise swallow the timeout and carry on.
    """


def can_limit_time() -> bool:
    """True where :func:`time_limit` is enforced: the main thread, on a platform with SIGALRM."""
    return hasattr(signal, "setitimer") and threading.current_thread() is threading.main_thread()


def _raise_time_limit(signum, frame) -> None:
    raise TimeLimitExceeded()


@contextmanager
def time_limit(seconds: float | None) -> Iterator[None]:
    """Raise :class:`TimeLimitExceeded` in the body after ``seconds`` (None or <= 0: no limit)."""
    if seconds is None or seconds <= 0 or not can_limit_time():
        yield
        return
    start = time.monotonic()
    previous_handler = signal.signal(signal.SIGALRM, _raise_time_limit)
    outer_delay, outer_interval = signal.getitimer(signal.ITIMER_REAL)
    # An outer timer due sooner fires first; it is re-armed (already due) below.
    signal.setitimer(signal.ITIMER_REAL, min(seconds, outer_delay) if outer_delay > 0 else seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous_handler)
        if outer_delay > 0:
            remaining = outer_delay - (time.monotonic() - start)
            signal.setitimer(signal.ITIMER_REAL, max(remaining, 1e-6), outer_interval)
