"""Stopping on a signal: SIGTERM (a scheduler's pre-emption, ``kill``) and SIGINT (Ctrl-C).

Long work (training, the reference pass of ``prep``, a study) runs inside a :class:`GracefulStop`.
The first signal only sets a flag and starts a clock: the work looks at the flag at its next safe
point (the end of a training step, a finished shard, a finished run), saves what it has finished
and raises :class:`~dpo_zoo.errors.StoppedError`, whose message says where it stopped and how to go
on; the CLI prints it and exits with ``128 + signal`` (143 for SIGTERM, 130 for SIGINT), as a shell
does for a process a signal ended. Two things bound the wait:

* ``grace_s`` (``train.stop_grace_s``): when the safe point and the save have not come within that
  many seconds of the signal, the process ends at once. Set it a little under the scheduler's own
  grace (Slurm's ``KillWait`` and Kubernetes' ``terminationGracePeriodSeconds`` are 30 s by default).
* a second signal ends the process at once.

Ending at once loses nothing that was finished: every checkpoint, shard and run record is written
under a temporary name and renamed when complete (:mod:`dpo_zoo.files`), so what a hard stop cuts
short is never read as good; the next run resumes from the last finished one.

This module imports nothing of dpo_zoo beyond the errors (the base layer): a caller on several
processes agrees on stopping itself (the trainer all-reduces :attr:`GracefulStop.requested`).
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from typing import Callable, Dict, Optional

SIGNALS = (signal.SIGTERM, signal.SIGINT)


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


class GracefulStop:
    """Catch SIGTERM and SIGINT for the duration of a ``with`` block (see the module docstring).

    ``what``: the command's name in messages (``train``, ``prep``, ``study``); ``unit``: what it
    finishes before stopping (a ``step``, a ``shard``, a ``run``). ``grace_s``: seconds
    between the first signal and a hard stop (0 or None: no limit). ``on_hard_stop``: called with a
    line to print just before a hard stop (the default prints it to stderr). Handlers are installed
    only in the main thread (Python allows no other); blocks may nest, the inner one's handlers
    win while it runs and the outer ones come back after it.
    """

    def __init__(self, what: str, grace_s: Optional[float] = None, *, unit: str = "step", resume_hint: str = "",
                 on_hard_stop: Optional[Callable[[str], None]] = None):
        self.what = what
        self.grace_s = float(grace_s) if grace_s else 0.0
        self.unit = unit
        self.resume_hint = resume_hint
        self.signum: Optional[int] = None
        self.received_at: Optional[float] = None
        self._previous: Dict[int, object] = {}
        self._timer: Optional[threading.Timer] = None
        self._on_hard_stop = on_hard_stop or (lambda line: print(line, file=sys.stderr, flush=True))

    @property
    def requested(self) -> bool:
        """Whether a stop signal arrived in this block."""
        return self.signum is not None

    def request(self, signum: int = signal.SIGTERM) -> None:
        """What the first signal does (also how another rank's stop is adopted): flag it, start the clock."""
        if self.signum is not None:
            return
        self.signum, self.received_at = int(signum), time.monotonic()
        limit = f" (at most {self.grace_s:g} s, train.stop_grace_s)" if self.grace_s else ""
        print(f"[dpo-zoo {self.what}] {signal_name(signum)} received: finishing the current {self.unit} and saving "
              f"what is finished{limit}; a second signal stops at once", file=sys.stderr, flush=True)
        if self.grace_s:
            self._timer = threading.Timer(self.grace_s, self._hard_stop, args=(signum, "train.stop_grace_s "
                                          f"({self.grace_s:g} s) passed before the save finished"))
            self._timer.daemon = True
            self._timer.start()

    def _handle(self, signum, frame) -> None:
        if self.signum is None:
            self.request(signum)
        else:
            self._hard_stop(signum, f"a second {signal_name(signum)}")

    def _hard_stop(self, signum: int, why: str) -> None:
        hint = f"; {self.resume_hint}" if self.resume_hint else ""
        self._on_hard_stop(f"[dpo-zoo {self.what}] stopped at once ({why}): work in progress was dropped, "
                           f"everything finished before it is kept{hint}")
        os._exit(128 + int(signum))

    def __enter__(self) -> "GracefulStop":
        if threading.current_thread() is threading.main_thread():
            for signum in SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        if self._timer is not None:
            self._timer.cancel()
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def message(self, where: str) -> str:
        """The StoppedError text: which signal, ``where`` (what was saved), and the resume hint."""
        hint = f"; {self.resume_hint}" if self.resume_hint else ""
        return f"stopped by {signal_name(self.signum or signal.SIGTERM)}: {where}{hint}"
