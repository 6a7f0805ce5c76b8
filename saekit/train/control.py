"""What long training shows and how it stops: a progress bar, and Ctrl-C or SIGTERM at a step boundary."""

import contextlib
import signal
import threading

from tqdm.auto import tqdm

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)  # Ctrl-C, and what schedulers and preemptible machines send


def progress_bar(total: int, desc: str, show: bool):
    return tqdm(total=total, desc=desc, unit="it", disable=not show, dynamic_ncols=True, mininterval=0.5)


class StepBoundaryStop:
    """Within this block, Ctrl-C (SIGINT) or SIGTERM asks the loop to stop after the current step
    (`requested` turns True) instead of breaking it in the middle, so the saved state is always
    that of a whole step. Further signals change nothing: a step is applied whole or not at all,
    whenever they come. (SIGKILL still ends the process at once; the last checkpoint remains.)

    Blocks nest: an inner one is the outer one (a run keeps signals waiting from its first step
    to its last checkpoint, across the trainer's own block). Outside the main thread, signal
    handlers cannot be set; Ctrl-C then raises as usual. A signal the process was told to ignore
    (as a shell's background job ignores Ctrl-C) stays ignored.
    """

    active: "StepBoundaryStop | None" = None  # the outermost block in effect
    final = False  # within `stop_is_final()`: after a requested stop, the stop signals stay ignored

    def __enter__(self) -> "StepBoundaryStop":
        outer = StepBoundaryStop.active
        self.previous: dict = {}
        if outer is not None:
            return outer
        self.requested = False
        if threading.current_thread() is threading.main_thread():
            heeded = [s for s in STOP_SIGNALS if signal.getsignal(s) is not signal.SIG_IGN]
            self.previous = {s: signal.signal(s, self._handle) for s in heeded}
            StepBoundaryStop.active = self
        return self

    def _handle(self, signum, frame):
        self.requested = True

    def __exit__(self, *exc):
        if StepBoundaryStop.active is self:
            StepBoundaryStop.active = None
        for s, handler in self.previous.items():
            signal.signal(s, signal.SIG_IGN if self.requested and StepBoundaryStop.final else handler)
        return False


@contextlib.contextmanager
def stop_is_final():
    """Within this block, a stop that a block of StepBoundaryStop heeded ends the process: the stop signals
    stay ignored after that block, as the process reports the saved run and exits, rather than raising
    KeyboardInterrupt in the middle of the report (a further Ctrl-C has nothing left to stop)."""
    StepBoundaryStop.final = True
    try:
        yield
    finally:
        StepBoundaryStop.final = False


class TermAsInterrupt:
    """Within this block SIGTERM raises KeyboardInterrupt, as Ctrl-C does (for loops that stop that way)."""

    def __enter__(self):
        self.previous = None
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
        return self

    def __exit__(self, *exc):
        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)
        return False
