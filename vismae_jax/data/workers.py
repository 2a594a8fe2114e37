"""Map a function over many inputs in worker processes, with a deadline and a memory limit each.

Unlike with `multiprocessing.Pool`, a worker that runs past the deadline is killed, and a worker
that dies (a crash inside a C decoder, the out-of-memory killer) is noticed. Either way a new
worker takes its place, and the input it held gets a failure result instead of stalling the run.
"""

import contextlib
import dataclasses
import multiprocessing
import os
import resource
import signal
import time
from collections.abc import Callable, Iterator, Sequence
from multiprocessing.connection import Connection, wait
from typing import Any

from absl import logging

# Workers run single-threaded numeric libraries: the parallelism comes from the processes, and
# per-thread BLAS buffers would count against each worker's address-space limit.
_WORKER_ENVIRONMENT = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}

_READY = -1  # Task index of the message a worker sends once it has started.


def _worker_main(connection: Connection, function: Callable, memory_limit_bytes: int) -> None:
    """Receive (index, task), send back (index, function(task), peak RSS in bytes) until EOF."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is handled by the parent.
    if memory_limit_bytes:
        # NOTE: checked on Linux only; other systems may not enforce RLIMIT_AS.
        resource.setrlimit(resource.RLIMIT_AS, (memory_limit_bytes, memory_limit_bytes))
    connection.send((_READY, None, 0))
    while True:
        try:
            message = connection.recv()
        except EOFError:  # The parent closed the pipe or died.
            return
        if message is None:
            return
        index, task = message
        result = function(task)
        peak_rss_bytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux.
        connection.send((index, result, peak_rss_bytes))


@contextlib.contextmanager
def _environment(values: dict[str, str]):
    """Set environment variables for the duration of the block (inherited by spawned workers)."""
    previous = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in previous.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@dataclasses.dataclass(eq=False)
class _Worker:
    """A worker process, the parent's end of its pipe, and the task it is running (if any)."""

    process: multiprocessing.Process
    connection: Connection
    ready: bool = False
    index: int | None = None
    started: float = 0.0


def _exit_description(process: multiprocessing.Process) -> str:
    code = process.exitcode
    if code is None:
        return "still running"
    if code < 0:
        return f"killed by {signal.Signals(-code).name}"
    return f"exit code {code}"


class WorkerPool:
    """Apply a picklable `function` to tasks in `num_workers` spawned processes, in task order.

    timeout_s: wall-clock limit per task, counted from the moment a started worker receives it.
    memory_limit_bytes: address-space limit (RLIMIT_AS) of each worker; an allocation beyond it
      raises MemoryError inside `function`, which should turn it into a result. 0 = no limit.
    failure: builds the result of a task whose worker timed out or died, from (task, reason).
      Reasons start with `timeout:` or `worker_crashed:`.
    """

    def __init__(
        self,
        function: Callable[[Any], Any],
        num_workers: int,
        *,
        timeout_s: float,
        failure: Callable[[Any, str], Any],
        memory_limit_bytes: int = 0,
    ):
        if num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {num_workers}.")
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}.")
        self.function = function
        self.num_workers = num_workers
        self.timeout_s = timeout_s
        self.failure = failure
        self.memory_limit_bytes = memory_limit_bytes
        self.peak_rss_bytes = 0  # Largest peak resident memory any worker reported.
        self.num_replaced = 0  # Workers killed after a timeout or found dead.
        # Spawned (not forked) workers: the parent may hold threads (JAX, tqdm) that fork breaks.
        self._context = multiprocessing.get_context("spawn")
        self._workers: list[_Worker] = []

    def _start_worker(self) -> _Worker:
        parent_end, child_end = self._context.Pipe()
        process = self._context.Process(
            target=_worker_main,
            args=(child_end, self.function, self.memory_limit_bytes),
            daemon=True,
        )
        with _environment(_WORKER_ENVIRONMENT):
            process.start()
        child_end.close()
        return _Worker(process, parent_end)

    def _replace(self, worker: _Worker, kill: bool) -> None:
        """Stop a worker and start a fresh one in its place."""
        if kill:
            worker.process.kill()
        worker.process.join(timeout=10)
        worker.connection.close()
        self.num_replaced += 1
        self._workers[self._workers.index(worker)] = self._start_worker()

    def _fail_task(self, worker: _Worker, tasks: Sequence, results: dict, reason: str) -> None:
        logging.warning("Task %d failed (%s); starting a new worker.", worker.index, reason)
        results[worker.index] = self.failure(tasks[worker.index], reason)

    def _receive(self, worker: _Worker, tasks: Sequence, results: dict) -> None:
        """Read one message from a worker whose pipe is readable, or handle its death."""
        try:
            index, result, peak_rss_bytes = worker.connection.recv()
        except (EOFError, OSError):
            worker.process.join(timeout=10)
            if not worker.ready:
                raise RuntimeError(
                    f"A worker process failed to start ({_exit_description(worker.process)}); "
                    "run with num_workers=0 to see the error in this process."
                ) from None
            if worker.index is not None:
                reason = f"worker_crashed: the worker died ({_exit_description(worker.process)})"
                self._fail_task(worker, tasks, results, reason)
            self._replace(worker, kill=False)
            return

        if index == _READY:
            worker.ready = True
            return
        results[index] = result
        worker.index = None
        self.peak_rss_bytes = max(self.peak_rss_bytes, peak_rss_bytes)

    def _dispatch(self, worker: _Worker, index: int, task) -> bool:
        """Send a task to an idle worker; return False (and replace it) if it has died."""
        try:
            worker.connection.send((index, task))
        except OSError:
            self._replace(worker, kill=True)
            return False
        worker.index, worker.started = index, time.monotonic()
        return True

    def _wait_and_collect(self, tasks: Sequence, results: dict) -> None:
        """Wait for the next message or deadline; collect results, replace failed workers."""
        now = time.monotonic()
        busy = [worker for worker in self._workers if worker.index is not None]
        deadlines = [worker.started + self.timeout_s for worker in busy]
        wait_s = max(0.0, min(deadlines) - now) if deadlines else None
        readable = wait([worker.connection for worker in self._workers], timeout=wait_s)

        for worker in list(self._workers):
            if worker.connection in readable:
                self._receive(worker, tasks, results)

        now = time.monotonic()
        for worker in list(self._workers):
            late = worker.index is not None and now >= worker.started + self.timeout_s
            if late and not worker.connection.poll():
                reason = f"timeout: the task took longer than {self.timeout_s:g} s"
                self._fail_task(worker, tasks, results, reason)
                self._replace(worker, kill=True)

    def map(self, tasks: Sequence) -> Iterator:
        """Yield function(task), or failure(task, reason), for every task in order.

        At most 4 x num_workers results wait in memory for an earlier, slower task.
        """
        window = 4 * self.num_workers
        results: dict[int, Any] = {}
        next_task = next_result = 0
        try:
            self._workers = [self._start_worker() for _ in range(self.num_workers)]
            while next_result < len(tasks):
                if next_result in results:
                    yield results.pop(next_result)
                    next_result += 1
                    continue
                for worker in list(self._workers):
                    idle = worker.ready and worker.index is None
                    if idle and next_task < min(len(tasks), next_result + window):
                        if self._dispatch(worker, next_task, tasks[next_task]):
                            next_task += 1
                self._wait_and_collect(tasks, results)
        finally:
            self.close()

    def close(self) -> None:
        """Ask idle workers to exit, kill the rest, and wait for all of them."""
        for worker in self._workers:
            with contextlib.suppress(OSError):
                if worker.index is None:
                    worker.connection.send(None)
        for worker in self._workers:
            worker.process.join(timeout=5 if worker.index is None else 0)
            if worker.process.is_alive():
                worker.process.kill()
                # A process stuck in uninterruptible I/O (a hung network file system) outlives
                # SIGKILL, so do not wait for it forever.
                worker.process.join(timeout=10)
            worker.connection.close()
        self._workers = []
