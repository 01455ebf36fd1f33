"""SIGTERM and SIGINT during training: finish the step, save, stop cleanly.

A scheduler's preemption (SIGTERM) or a Ctrl-C (SIGINT) must not kill a step halfway: the train step donates its
input buffers, so the weights exist only once the step has finished. The handlers here only set a flag that the
loop reads at each step boundary; the loop then saves a checkpoint of that step and returns. Before the loop
(`defer()` not yet called) a signal stops the process at once with `Interrupted`, since nothing is trained yet; a
second signal while a stop is pending does the same (a user insisting, or a save that hangs).

Native libraries may install their own handlers (OR-Tools' CP-SAT takes SIGINT while it solves), so the loop calls
`install()` again after planning.
"""

from __future__ import annotations

import signal
import sys
import threading

import numpy as np

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Interrupted(KeyboardInterrupt):
    """A signal that stops the process now (before training started, or a second one)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class StopSignals:
    """Handlers for SIGTERM and SIGINT that turn the first one during the loop into a stop request."""

    def __init__(self, stream=None):
        self.stream = stream
        self._received: int | None = None
        self._deferred = False
        self._previous: dict[int, object] = {}

    def install(self) -> None:
        """(Re)install the handlers (main thread only: elsewhere Python cannot, and the loop then runs without)."""
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in SIGNALS:
            previous = signal.signal(sig, self._handle)
            if previous is not self._handle and sig not in self._previous:
                self._previous[sig] = previous

    def uninstall(self) -> None:
        """Put back the handlers that were there before the first `install`."""
        if threading.current_thread() is not threading.main_thread():
            return
        for sig, previous in self._previous.items():
            signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
        self._previous.clear()

    def defer(self) -> None:
        """From now on the first signal asks the loop to stop at the next step boundary."""
        self._deferred = True

    def requested(self) -> bool:
        """Whether a stop was asked for (on every process, when one was: see `autoshard.fit`)."""
        import jax

        if jax.process_count() > 1:  # a scheduler may signal one host only: all stop at the same step
            from jax.experimental import multihost_utils

            flags = multihost_utils.process_allgather(np.int32(self._received or 0))
            got = [int(f) for f in np.ravel(flags) if int(f)]
            if got and self._received is None:
                self._received = got[0]
        return self._received is not None

    @property
    def name(self) -> str | None:
        return signal.Signals(self._received).name if self._received else None

    @property
    def signum(self) -> int | None:
        return self._received

    def _handle(self, signum: int, frame) -> None:
        if not self._deferred or self._received is not None:
            raise Interrupted(signum)
        self._received = signum
        stream = self.stream or sys.stderr
        print(f"\n{signal.Signals(signum).name} received: stopping after this step (again to stop at once)",
              file=stream, flush=True)
