"""Stop signals: Ctrl-C (SIGINT), and SIGTERM / SIGUSR1, which is how a cluster preempts a job
or warns that its time limit is near (SLURM: `--signal=USR1@120`; Kubernetes and `kill`: TERM).

During training the first signal asks the loop to stop after the current step and save the
resumable state (`last.pt`); elsewhere (loading, the final test), or at a second signal, the run
stops at once. Either way the run records `"status": "interrupted"` in summary.json and a log
line, and the process exits with 128 + the signal's number (130, 143, 138), as a shell reports a
process that a signal ended, so schedulers read it as preempted rather than failed.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from collections.abc import Iterator

from metarun.errors import RunInterrupted

log = logging.getLogger("metarun")
NAMES = {signal.SIGINT: "Ctrl-C", signal.SIGTERM: "SIGTERM", signal.SIGUSR1: "SIGUSR1"}


def exit_code(signum: int) -> int:
    return 128 + signum


class StopSignals:
    """What signal, if any, asked this process to stop; installed for the length of a run."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.deferring = False
        self.active = False  # handlers installed (by `installed`)

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def _handle(self, signum: int, frame: object) -> None:
        name = NAMES[signum]
        if self.deferring and self.signum is None:
            self.signum = signum
            log.warning("%s: stopping after this step and saving (%s again stops at once)",
                        name, name)  # fmt: skip
            return
        self.signum = self.signum or signum
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        raise RunInterrupted(f"interrupted by {name}", exit_code(signum))

    @contextlib.contextmanager
    def installed(self) -> Iterator[StopSignals]:
        """Handle the stop signals while the block runs (main thread only: Python delivers
        signals there, and a run inside a worker thread leaves them to its host)."""
        self.signum, self.deferring = None, False
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = {s: signal.signal(s, self._handle) for s in NAMES}
        self.active = True
        try:
            yield self
        finally:
            self.active = False
            for s, handler in previous.items():
                signal.signal(s, handler)

    @contextlib.contextmanager
    def deferred(self) -> Iterator[None]:
        """Inside the block a first signal is only recorded: the loop polls `requested`. A
        training loop used outside a run (a Trainer driven directly) installs the handlers
        for its own length, so Ctrl-C still saves after the step."""
        with contextlib.ExitStack() as stack:
            if not self.active:
                stack.enter_context(self.installed())
            self.deferring = True
            try:
                yield
            finally:
                self.deferring = False

    def stopped(self, step: int, resume_dir: object) -> RunInterrupted:
        """The error that ends a run the loop stopped after `step`, saying how to resume."""
        assert self.signum is not None
        name = NAMES[self.signum]
        return RunInterrupted(
            f"interrupted by {name} after step {step}; the state is saved: resume with "
            f"train.resume={resume_dir} (or the same command with run_dir={resume_dir})",
            exit_code(self.signum),
        )


STOP = StopSignals()  # one per process: signal handlers are process-wide
