"""Stop training cleanly on a preemption notice (SIGTERM, or SIGINT from Ctrl-C).

The loop calls `PreemptionWatcher.should_stop(step)` after dispatching each step. Once it
returns True, the loop saves a checkpoint of that step and returns, so the program exits 0 and
rerunning the same command resumes from that step.

On one process a signal handler sets a flag. On several processes every process must save the
same step, so the watcher uses JAX's preemption sync point instead. When any process receives
SIGTERM, the coordination service of `jax.distributed` notifies all of them, and
`multihost_utils.reached_preemption_sync_point(step)` returns True on every process at the
same step (one past the largest step any process had reached).

NOTE: Ctrl-C in a terminal sends SIGINT to the whole process group, so Grain's worker
processes (data.num_workers > 0) print KeyboardInterrupt tracebacks and exit. The step in
flight already has its batch, so the save still works (checked by hand with 2 workers), but a
signal that arrives while the loop waits for a batch may end the run without saving. Schedulers
that signal every process of a job (SLURM does) can do the same with SIGTERM; `kill PID` on
the main process alone cannot.
"""

import signal
import threading
import types

import jax
from absl import logging
from jax.experimental import multihost_utils

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class PreemptionWatcher:
    """Context manager that turns SIGTERM and SIGINT into a request to stop after a step.

    The first signal only sets the request and reinstalls the handlers that were in place
    before `__enter__`. So a second signal acts as it would without the watcher: SIGTERM ends
    the process and SIGINT raises KeyboardInterrupt.

    With more than one JAX process, SIGTERM is left to the preemption notifier of
    `jax.distributed` (it installs its own handler when the distributed runtime starts), and
    SIGINT is forwarded to this process as SIGTERM so that it reaches the notifier too.
    """

    def __init__(self):
        self._multi_process = jax.process_count() > 1
        self._received: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> "PreemptionWatcher":
        if threading.current_thread() is not threading.main_thread():
            # NOTE: Python accepts signal handlers only in the main thread. A loop run from
            # another thread therefore stops on SIGTERM or SIGINT without saving.
            logging.warning(
                "Not in the main thread: SIGTERM and SIGINT will not save a checkpoint."
            )
            return self
        signals = (signal.SIGINT,) if self._multi_process else STOP_SIGNALS
        for signum in signals:
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc_info) -> None:
        self._restore_handlers()

    def _restore_handlers(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def _handle(self, signum: int, frame: types.FrameType | None) -> None:
        del frame
        self._restore_handlers()
        name = signal.Signals(signum).name
        if self._multi_process:
            logging.warning(
                "Received %s; forwarding it as SIGTERM to the preemption notifier.", name
            )
            signal.raise_signal(signal.SIGTERM)
            return
        self._received = signum
        logging.warning(
            "Received %s: finishing the current step, saving a checkpoint and exiting. Send it "
            "again to stop at once without saving.",
            name,
        )

    @property
    def received(self) -> str | None:
        """Name of the signal received on this process (e.g. "SIGTERM"), or None."""
        return None if self._received is None else signal.Signals(self._received).name

    def should_stop(self, step: int) -> bool:
        """Return True when the run should save `step` and stop.

        Call it on every process after every step, with the same step numbers. With several
        processes it returns True on all of them at the same step.
        """
        if self._multi_process:
            return multihost_utils.reached_preemption_sync_point(step)
        return self._received is not None
