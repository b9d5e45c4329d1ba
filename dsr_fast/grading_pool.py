"""A persistent pool of grading processes with per-item timeouts that survives crashes and hangs.

Why processes: sympy holds the GIL, so threads do not add cores, and a thread stuck in one C
call cannot be stopped; a process can be killed.  Why not ``concurrent.futures`` or
``multiprocessing.Pool``: the first breaks for good when one worker dies, and neither can kill
the one worker that hangs and keep the rest.

How an item is graded (:meth:`GradingPool.submit`):

1. In the caller's thread, cheaply: extract the boxed answer and run the grader's first stage
   (:func:`dsr_fast.reward.plan_grade`: normalisers, string/tuple checks, integer literals).
   Most responses end here: no answer, a string match, a cheap mismatch.  Answers longer than
   :data:`FAST_PATH_MAX_CHARS` skip this and go to a worker whole, so the caller's share of the
   work stays small and bounded whatever the model writes.
2. What is left - a :class:`dsr_fast.reward.SympyCheck`, or a whole long answer - becomes a
   task.  Identical tasks are graded once (groups of samples often agree), and finished
   verdicts are cached.
3. A dispatcher thread hands tasks to workers in chunks (one message per chunk, topped up
   before a worker runs dry), and a worker answers each task as soon as it is graded.  One
   round trip per task would leave the workers waiting on the parent, whose thread shares the
   GIL with the caller's planning (up to a 5 ms switch interval per hand-over).  Workers grade
   a chunk's tasks in order, so the parent always knows which task a worker is on: the first
   one not yet answered.  A worker grades under a soft SIGALRM limit of
   ``SOFT_LIMIT_FRACTION * timeout_s`` (a slow ``simplify`` ends, the worker lives on).  If no
   answer comes within ``timeout_s`` of the task's start (stuck in C code, signals blocked),
   the dispatcher kills the worker; if a worker dies, the task it was on fails.  Either way that
   item scores 0, its status says why, a new worker is started, the tasks queued behind it go
   back to the front of the queue, and the rest go on.

Workers are ``python -c`` subprocesses importing only the grader (~0.7 s to start), not
``multiprocessing`` children: those re-import the parent's ``__main__`` (the trainer, with
torch) in every worker, and forking a process that has CUDA or OpenMP threads is unsafe.  A
worker exits when the parent closes it, or when the parent dies (its pipe closes).
"""

from __future__ import annotations

import atexit
import collections
import os
import pickle
import signal
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from multiprocessing import Pipe
from multiprocessing.connection import Connection, wait

from dsr_fast.reward import (
    DEFAULT_TIMEOUT_S,
    MAX_ANSWER_CHARS,
    GroundTruth,
    SympyCheck,
    extract_answer,
    ground_truth_items,
    plan_grade,
    sympy_check_verdict,
)
from dsr_fast.time_limit import TimeLimitExceeded, time_limit

# Answers (or ground-truth items) longer than this are graded whole in a worker rather than
# normalised in the caller: normalising costs up to ~40 us per char on adversarial text, so
# this caps the caller at a few ms per response.  Real answers are far shorter (the longest
# gold answer in the five test sets has 204 chars, 99% have under 70).
FAST_PATH_MAX_CHARS = 256
# submit() plans and queues this many items at a time.
SUBMIT_CHUNK = 64
# Most tasks one message hands a worker; smaller chunks near the end of the queue keep the
# workers' loads even.
MAX_TASKS_PER_MESSAGE = 16
# Pickled bytes per message, well under a socket buffer (~200 KB on Linux): a message then
# never blocks the dispatcher on a worker that is stuck on its current task.  A single larger
# task goes only to an idle worker, which is blocked in recv() and takes it at once.
MAX_MESSAGE_BYTES = 32_768
# A worker's own (soft, SIGALRM) limit, as a fraction of timeout_s: it should end a slow task
# before the parent's hard limit kills the worker, which costs a restart.
SOFT_LIMIT_FRACTION = 0.8
# A worker that has not started within this many seconds is killed and counts as failing.
STARTUP_TIMEOUT_S = 120.0
# This many start-up failures in a row (no worker became ready in between) break the pool.
MAX_STARTUP_FAILURES = 3

# Item statuses, per response.
GRADED = "graded"  # a verdict was reached (in the caller or a worker)
TIMEOUT = "timeout"  # the soft or hard time limit ran out: score 0
CRASHED = "crashed"  # the worker died on it (or was killed for it): score 0
ERROR = "error"  # the grader raised (a bug; the worker printed the traceback): score 0


@dataclass(frozen=True)
class WholeAnswer:
    """A task for answers too long for the caller's fast path: all of the grading."""

    pred: str
    golds: tuple[str, ...]


Task = SympyCheck | WholeAnswer
WorkerHook = Callable[[Task], None]


def plan_item(response: str, ground_truth: GroundTruth, *, fast_path: bool = True) -> float | Task:
    """A score if one can be given cheaply in this process, else the task that settles it."""
    pred = extract_answer(response)
    if pred is None or not pred.strip() or len(pred) > MAX_ANSWER_CHARS:
        return 0.0
    golds = tuple(ground_truth_items(ground_truth))
    if not fast_path or len(pred) > FAST_PATH_MAX_CHARS or any(len(gold) > FAST_PATH_MAX_CHARS for gold in golds):
        return WholeAnswer(pred, golds)
    planned = plan_grade(pred, golds)
    if isinstance(planned, bool):
        return float(planned)
    return planned


def run_task(task: Task) -> bool:
    """The verdict of one task; raises TimeLimitExceeded if an enclosing time limit runs out."""
    if isinstance(task, WholeAnswer):
        planned = plan_grade(task.pred, task.golds)
        if isinstance(planned, bool):
            return planned
        task = planned
    return sympy_check_verdict(task, timeout_s=None)


# ---------------------------------------------------------------------------
# Jobs: what submit() returns
# ---------------------------------------------------------------------------


class GradingJob:
    """The scores of one :meth:`GradingPool.submit` call, filled in as tasks finish."""

    def __init__(self, size: int) -> None:
        self._scores = [0.0] * size
        self._statuses = [GRADED] * size
        self._remaining = size
        self._finished = threading.Event()
        self._error: BaseException | None = None
        if size == 0:
            self._finished.set()

    def done(self) -> bool:
        """True when every item has a score (never blocks)."""
        return self._finished.is_set()

    def result(self, timeout: float | None = None) -> list[float]:
        """The scores, in submission order; waits up to ``timeout`` seconds (None: no limit).

        Raises TimeoutError if they are not all in by then, RuntimeError if the pool broke or
        was closed first.
        """
        if not self._finished.wait(timeout):
            raise TimeoutError(f"grading job not finished after {timeout} s ({self._remaining} items left)")
        if self._error is not None:
            raise RuntimeError(f"grading failed: {self._error}") from self._error
        return list(self._scores)

    @property
    def statuses(self) -> list[str]:
        """Per item: ``graded``, ``timeout``, ``crashed`` or ``error`` (valid once done)."""
        return list(self._statuses)

    def _set(self, index: int, score: float, status: str) -> None:
        self._scores[index] = score
        self._statuses[index] = status
        self._remaining -= 1
        if self._remaining == 0:
            self._finished.set()

    def _fail(self, error: BaseException) -> None:
        if not self._finished.is_set():
            self._error = error
            self._finished.set()


@dataclass
class _PendingTask:
    task: Task
    waiters: list[tuple[GradingJob, int]]  # every (job, item) graded by this task


# ---------------------------------------------------------------------------
# Workers (parent side)
# ---------------------------------------------------------------------------

# Runs in a fresh interpreter: take the parent's import path first (the hook's module and
# dsr_fast itself may only be importable through it), then serve.
_WORKER_BOOTSTRAP = (
    "import sys\n"
    "from multiprocessing.connection import Connection\n"
    "connection = Connection(int(sys.argv[1]))\n"
    "sys.path[:] = connection.recv()\n"
    "from dsr_fast.grading_pool import serve\n"
    "serve(connection)\n"
)


class _Worker:
    """One worker process and its tasks: those handed over and not yet answered, in order."""

    def __init__(self, settings: tuple[WorkerHook | None, float]) -> None:
        parent_end, child_end = Pipe(duplex=True)
        self.process = subprocess.Popen(
            [sys.executable, "-c", _WORKER_BOOTSTRAP, str(child_end.fileno())],
            pass_fds=(child_end.fileno(),),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,  # the grader prints nothing; stderr stays for tracebacks
        )
        child_end.close()
        self.connection = parent_end
        self.ready = False
        self.tasks: collections.deque[_PendingTask] = collections.deque()  # tasks[0]: the one it is on
        self.unread_messages = 0  # sent but not yet taken by the worker (none answered yet)
        self._first_of_message: collections.deque[_PendingTask] = collections.deque()
        self.deadline = time.monotonic() + STARTUP_TIMEOUT_S  # of start-up, then of tasks[0]
        self.connection.send(list(sys.path))
        self.connection.send(settings)

    @property
    def busy(self) -> bool:
        return bool(self.tasks)

    def assign(self, chunk: list[_PendingTask], payload: bytes, timeout_s: float) -> None:
        if not self.tasks:
            self.deadline = time.monotonic() + timeout_s
        self.tasks.extend(chunk)
        self._first_of_message.append(chunk[0])
        self.unread_messages += 1
        self.connection.send_bytes(payload)

    def answered(self, timeout_s: float) -> _PendingTask:
        """The task it was on is answered: it starts on the next one now."""
        pending = self.tasks.popleft()
        if self._first_of_message and self._first_of_message[0] is pending:
            self._first_of_message.popleft()
            self.unread_messages -= 1
        self.deadline = time.monotonic() + timeout_s
        return pending

    def request_exit(self) -> None:
        try:
            self.connection.send(None)
        except OSError:  # already gone
            pass

    def stop(self, grace_s: float = 0.0) -> None:
        """Wait up to grace_s seconds for the worker to exit, then kill it."""
        try:
            self.process.wait(grace_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.connection.close()


# ---------------------------------------------------------------------------
# The pool
# ---------------------------------------------------------------------------


class GradingPool:
    """Grades responses in ``workers`` processes; create once, submit every step, close at the end.

    ``submit`` does the cheap part of grading in the calling thread and returns a
    :class:`GradingJob` at once; the rest runs in the background.  Each item's sympy work
    gets ``timeout_s`` seconds in a worker (from the moment a worker takes it); an item that
    overruns or kills its worker scores 0 with status ``timeout`` / ``crashed``.

    Options: ``fast_path=False`` sends every answer to the workers whole (for measuring);
    ``cache_size`` finished verdicts are kept (0: none); ``lazy=True`` starts workers only
    when the first task needs one (a one-off batch that needs no sympy starts none);
    ``worker_hook`` is called in the worker with each task before grading it (tests inject
    crashes and hangs with it; it must be picklable by reference).
    """

    def __init__(
        self,
        workers: int = 2,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        *,
        fast_path: bool = True,
        cache_size: int = 65_536,
        lazy: bool = False,
        worker_hook: WorkerHook | None = None,
    ) -> None:
        if workers < 1:
            raise ValueError(f"GradingPool: workers must be >= 1, got {workers}")
        if not timeout_s > 0:
            raise ValueError(f"GradingPool: timeout_s must be > 0, got {timeout_s}")
        self.workers, self.timeout_s, self.fast_path = workers, timeout_s, fast_path
        self._settings = (worker_hook, SOFT_LIMIT_FRACTION * timeout_s)
        pickle.dumps(worker_hook)  # fail here, not in a worker, if the hook cannot travel
        self._cache_size = cache_size
        self._cache: collections.OrderedDict[Task, bool] = collections.OrderedDict()
        self._lock = threading.Lock()
        self._queue: collections.deque[_PendingTask] = collections.deque()
        self._by_task: dict[Task, _PendingTask] = {}  # queued or running, for de-duplication
        self._jobs: set[GradingJob] = set()  # unfinished, to fail them if the pool breaks
        self._counts = collections.Counter()
        self._want_workers = not lazy
        self._closing = False
        self._broken: BaseException | None = None
        self._wake_receiver, self._wake_sender = Pipe(duplex=False)
        # One wake-up message in the pipe is enough (more could fill it and block the caller).
        # The flag and the pipe change together under this lock, or a wake-up could be lost.
        self._wake_lock = threading.Lock()
        self._wake_sent = False
        self._workers: list[_Worker] = []  # touched by the dispatcher thread only
        self._startup_failures = 0
        self._dispatcher = threading.Thread(target=self._dispatch_forever, name="dsr_fast-grading-pool", daemon=True)
        self._dispatcher.start()

    # -- caller side -------------------------------------------------------

    def submit(self, responses: Sequence[str], ground_truths: Sequence[GroundTruth]) -> GradingJob:
        """Start grading; returns as soon as the cheap part is done, with a job whose
        ``result()`` gives the scores."""
        if len(responses) != len(ground_truths):
            raise ValueError(f"GradingPool.submit: {len(responses)} responses but {len(ground_truths)} ground truths")
        job = GradingJob(len(responses))
        with self._lock:
            self._check_usable()
            self._jobs.add(job)
        # Queue work chunk by chunk, so that workers start on sympy while this thread plans the rest.
        for start in range(0, len(responses), SUBMIT_CHUNK):
            stop = start + SUBMIT_CHUNK
            planned = [plan_item(r, g, fast_path=self.fast_path) for r, g in zip(responses[start:stop], ground_truths[start:stop])]
            if self._enqueue(job, start, planned):
                self._wake()
        with self._lock:
            if job.done():
                self._jobs.discard(job)
        return job

    def _enqueue(self, job: GradingJob, first_index: int, planned: list[float | Task]) -> bool:
        """Settle cheap items, queue the rest; True if anything was queued."""
        queued = False
        with self._lock:
            self._check_usable()
            for index, item in enumerate(planned, start=first_index):
                if isinstance(item, float):
                    self._counts["in_caller"] += 1
                    job._set(index, item, GRADED)
                elif item in self._cache:
                    self._counts["cached"] += 1
                    self._cache.move_to_end(item)
                    job._set(index, 1.0 if self._cache[item] else 0.0, GRADED)
                elif item in self._by_task:
                    self._counts["deduplicated"] += 1
                    self._by_task[item].waiters.append((job, index))
                else:
                    pending = _PendingTask(item, [(job, index)])
                    self._by_task[item] = pending
                    self._queue.append(pending)
                    queued = True
            if queued:
                self._want_workers = True
        return queued

    def score(self, responses: Sequence[str], ground_truths: Sequence[GroundTruth]) -> list[float]:
        """Submit and wait: the scores, in order."""
        return self.submit(responses, ground_truths).result()

    def clear_cache(self) -> None:
        """Forget finished verdicts (benchmarks use it to measure cold batches)."""
        with self._lock:
            self._cache.clear()

    def stats(self) -> dict[str, int]:
        """Counts since creation: items settled ``in_caller`` / from the cache / by sharing a
        task (``deduplicated``); ``tasks`` run in workers; ``timeouts``, ``crashes``,
        ``errors``; ``worker_starts``."""
        with self._lock:
            return dict(self._counts)

    def close(self) -> None:
        """Stop the workers; unfinished jobs fail with RuntimeError. Safe to call twice."""
        with self._lock:
            self._closing = True
        self._wake()
        self._dispatcher.join()
        self._wake_sender.close()
        self._wake_receiver.close()

    def __enter__(self) -> "GradingPool":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def _check_usable(self) -> None:
        if self._broken is not None:
            raise RuntimeError(f"grading pool is broken: {self._broken}") from self._broken
        if self._closing:
            raise RuntimeError("grading pool is closed")

    def _wake(self) -> None:
        with self._wake_lock:
            if self._wake_sent:
                return
            self._wake_sent = True
            try:
                self._wake_sender.send_bytes(b"")
            except OSError:  # closed: the dispatcher is gone already
                pass

    # -- dispatcher thread -------------------------------------------------

    def _dispatch_forever(self) -> None:
        try:
            while True:
                with self._lock:
                    if self._closing:
                        break
                    want_workers = self._want_workers
                if want_workers:
                    self._replace_missing_workers()
                self._feed_workers()
                self._wait_and_handle_events()
        except BaseException as error:  # a bug or a broken start-up: fail loudly, never hang callers
            with self._lock:
                self._broken = error
        finally:
            # Idle workers exit at once; busy ones get a moment to finish, then are killed.
            for worker in self._workers:
                worker.request_exit()
            grace_deadline = time.monotonic() + 0.5
            for worker in self._workers:
                worker.stop(grace_s=max(0.0, grace_deadline - time.monotonic()))
            self._workers.clear()
            with self._lock:
                error = self._broken or RuntimeError("grading pool was closed before this job finished")
                for job in self._jobs:
                    job._fail(error)
                self._jobs.clear()
                self._queue.clear()
                self._by_task.clear()

    def _replace_missing_workers(self) -> None:
        while len(self._workers) < self.workers:
            if self._startup_failures >= MAX_STARTUP_FAILURES:
                raise RuntimeError(
                    f"grading workers failed to start {self._startup_failures} times in a row "
                    f"(command: {sys.executable} -c ...; their error output is above)"
                )
            self._workers.append(_Worker(self._settings))
            with self._lock:
                self._counts["worker_starts"] += 1

    def _feed_workers(self) -> None:
        """Top up every ready worker that is on its last task (or idle) with a chunk."""
        for worker in self._workers:
            # unread_messages == 0: nothing of ours waits in its pipe, so the next message fits.
            if not worker.ready or len(worker.tasks) > 1 or worker.unread_messages:
                continue
            with self._lock:
                chunk, payload = self._take_chunk(idle=not worker.busy)
            if not chunk:
                continue
            try:
                worker.assign(chunk, payload, self.timeout_s)
            except OSError:  # it died: end-of-file on its pipe comes next, and fails or requeues its tasks
                pass

    def _take_chunk(self, idle: bool) -> tuple[list[_PendingTask], bytes]:
        """Tasks from the queue's front for one message, and the message (caller holds the lock)."""
        share = -(-len(self._queue) // (2 * self.workers))  # even loads as the queue drains
        chunk, size = [], 0
        while self._queue and len(chunk) < min(MAX_TASKS_PER_MESSAGE, max(1, share)):
            task_size = len(pickle.dumps(self._queue[0].task))  # the list adds a few bytes per item
            if size + task_size + 8 * len(chunk) > MAX_MESSAGE_BYTES and (chunk or not idle):
                break
            chunk.append(self._queue.popleft())
            size += task_size
        return chunk, pickle.dumps([pending.task for pending in chunk])

    def _wait_and_handle_events(self) -> None:
        by_connection = {worker.connection: worker for worker in self._workers}
        deadlines = [worker.deadline for worker in self._workers if worker.busy or not worker.ready]
        timeout = max(0.0, min(deadlines) - time.monotonic()) if deadlines else None
        for connection in wait([*by_connection, self._wake_receiver], timeout):
            if connection is self._wake_receiver:
                with self._wake_lock:
                    while self._wake_receiver.poll():
                        self._wake_receiver.recv_bytes()
                    self._wake_sent = False
                continue
            worker = by_connection[connection]
            try:
                message = connection.recv()
            except (EOFError, OSError):  # the worker died
                self._retire(worker, CRASHED)
                continue
            if message == "ready":
                worker.ready = True
                self._startup_failures = 0
            else:
                status, verdict = message
                self._settle(worker.answered(self.timeout_s), status, verdict)
        now = time.monotonic()
        for worker in list(self._workers):
            if now >= worker.deadline and (worker.busy or not worker.ready):
                self._retire(worker, TIMEOUT)

    def _retire(self, worker: _Worker, status: str) -> None:
        """Kill a dead, hung or never-started worker: the task it was on fails, the tasks queued
        behind it go back to the front of the queue, and a new worker replaces it."""
        worker.stop(grace_s=0.0)
        self._workers.remove(worker)
        if not worker.ready:
            self._startup_failures += 1
        if not worker.tasks:
            return
        failed = worker.tasks.popleft()
        with self._lock:
            self._queue.extendleft(reversed(worker.tasks))
            want_workers = self._want_workers
        if want_workers:
            # Before settling, so that whoever sees the failed item also sees its replacement.
            self._replace_missing_workers()
        self._settle(failed, status, False)

    def _settle(self, pending: _PendingTask, status: str, verdict: bool) -> None:
        score = 1.0 if verdict and status == GRADED else 0.0
        with self._lock:
            self._counts["tasks"] += 1
            if status != GRADED:
                self._counts[{TIMEOUT: "timeouts", CRASHED: "crashes", ERROR: "errors"}[status]] += 1
            self._by_task.pop(pending.task, None)
            if status == GRADED and self._cache_size > 0:  # a timeout may pass another time
                self._cache[pending.task] = verdict
                if len(self._cache) > self._cache_size:
                    self._cache.popitem(last=False)
            for job, index in pending.waiters:
                job._set(index, score, status)
                if job.done():
                    self._jobs.discard(job)


# ---------------------------------------------------------------------------
# The process's shared pool (grading.score_batch)
# ---------------------------------------------------------------------------

_shared_pools: dict[tuple[int, float], tuple[int, GradingPool]] = {}  # (workers, timeout_s) -> (pid, pool)
_shared_lock = threading.Lock()


def shared_pool(workers: int, timeout_s: float) -> GradingPool:
    """A lazy pool kept for the rest of the process, one per (workers, timeout_s).

    Starting workers costs ~1 s, as much as grading a few thousand typical responses, so
    :func:`dsr_fast.grading.score_batch` pays it once, not per call.  A forked child (the
    dispatcher thread does not survive a fork) or a broken pool gets a fresh one.
    """
    key = (workers, float(timeout_s))
    with _shared_lock:
        pid, pool = _shared_pools.get(key, (None, None))
        if pool is None or pid != os.getpid() or pool._broken is not None or pool._closing:
            if pool is not None and pid == os.getpid():
                pool.close()
            pool = GradingPool(workers=workers, timeout_s=timeout_s, lazy=True)
            _shared_pools[key] = (os.getpid(), pool)
        return pool


@atexit.register
def _close_shared_pools() -> None:
    with _shared_lock:
        for pid, pool in _shared_pools.values():
            if pid == os.getpid():
                pool.close()
        _shared_pools.clear()


# ---------------------------------------------------------------------------
# Worker side
# ---------------------------------------------------------------------------


_WARM_UP_TASK = SympyCheck(((("(x+1)^2", "x^2+2x+1"), ("sqrt(12)", "2sqrt(3)")),))


def serve(connection: Connection) -> None:
    """A worker's main loop: grade each task that arrives, until told to stop or orphaned."""
    # Ctrl-C reaches the whole process group; the parent decides when workers stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    hook, soft_limit_s = connection.recv()
    # sympy's first simplify() loads and sets up ~0.4 s worth of modules: do it before taking
    # work, so that the first real task is not the slow one.
    run_task(_WARM_UP_TASK)
    connection.send("ready")
    while True:
        try:
            task = connection.recv()  # a list of tasks (a chunk), or None to stop
        except EOFError:  # the parent is gone
            return
        if task is None:
            return
        for one in task:  # a chunk: answered one by one, so the parent knows which one is running
            connection.send(_grade_in_worker(one, hook, soft_limit_s))


def _grade_in_worker(task: Task, hook: WorkerHook | None, soft_limit_s: float) -> tuple[str, bool]:
    try:
        with time_limit(soft_limit_s):
            if hook is not None:
                hook(task)
            return GRADED, run_task(task)
    except TimeLimitExceeded:
        return TIMEOUT, False
    except Exception:
        print(f"dsr_fast.grading_pool: worker {os.getpid()} failed on {task!r}:", file=sys.stderr)
        traceback.print_exc()
        return ERROR, False
