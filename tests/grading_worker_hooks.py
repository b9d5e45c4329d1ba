"""Hooks the grading pool's tests run inside worker processes (GradingPool(worker_hook=...)).

Kept apart from the test modules so that a worker imports only this (a test module would pull
in conftest and torch: seconds per worker start).

- inject_faults: crash, hang or raise on tasks carrying a marker number (digits survive the
  grader's normalisation, and no real answer holds them).
- forbid_code_execution: an audit hook that kills the worker (so its item reads "crashed") if
  grading ever starts a process or compiles text holding EXECUTION_MARKER - i.e. if an injected
  payload, which the tests write around that marker, reached eval/exec.
"""

from __future__ import annotations

import os
import signal
import sys
import time

CRASH_MARKER = "31337"  # the worker dies at once, as on a segfault or the OOM killer
SLEEP_MARKER = "27182"  # the worker sleeps in Python: the worker's own SIGALRM limit ends it
STUCK_MARKER = "16180"  # sleeps with SIGALRM blocked, like one long C call: only a kill ends it
RAISE_MARKER = "14142"  # the grader raises, as a bug would

EXECUTION_MARKER = "dsr_pwned"
EXECUTION_EXIT_CODE = 86
CONTROL_MARKER = "99991"  # forbid_code_execution evals the marker itself: proves the guard fires
_PROCESS_EVENTS = ("os.system", "os.exec", "os.spawn", "os.posix_spawn", "os.fork", "subprocess.Popen", "pty.spawn")


def inject_faults(task) -> None:
    text = repr(task)
    if CRASH_MARKER in text:
        os._exit(3)
    if SLEEP_MARKER in text:
        time.sleep(600)
    if STUCK_MARKER in text:
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
        time.sleep(600)
    if RAISE_MARKER in text:
        raise RuntimeError("injected grader failure")


def _audit(event: str, args: tuple) -> None:
    if event.startswith(_PROCESS_EVENTS):
        os._exit(EXECUTION_EXIT_CODE)
    if event in ("compile", "exec") and args:
        source = args[0]
        if isinstance(source, bytes):
            source = source.decode("utf-8", errors="replace")
        if isinstance(source, str) and EXECUTION_MARKER in source:
            os._exit(EXECUTION_EXIT_CODE)


_guard_installed = False


def forbid_code_execution(task) -> None:
    global _guard_installed
    if not _guard_installed:
        sys.addaudithook(_audit)  # cannot be removed: fine, the worker lives for the test only
        _guard_installed = True
    if CONTROL_MARKER in repr(task):
        eval(repr(EXECUTION_MARKER))  # what a grader that evals model text would do


class _Unimportable:
    """Pickles as a reference to a module that the worker cannot import: start-up fails."""

    def __reduce__(self):
        return (__import__, ("dsr_fast_no_such_module_for_tests",))

    def __call__(self, task) -> None:
        pass


UNIMPORTABLE_HOOK = _Unimportable()
