"""SIGTERM ends a run at a step boundary with a checkpoint (a spot instance's preemption notice).

A rank's SIGTERM handler only raises a flag (`StopRequest`); the ranks combine their flags
at the end of every step in the all-reduce that already gathers the peak memory (MAX), so
all of them stop after the same step however many got the signal - torchrun's SIGTERM to
every rank, or a user's to one - and save together (DCP's save is collective: a rank that
left alone would hang the others). The run then raises `Preempted`; `runtime.train.main`
prints one line, and exits PREEMPTED_EXIT (planner.cli.train), after rank 0 has written
MESHPLAN_PREEMPTED_FILE for `meshplan train`, which exits with the same code where torchrun
would report 1.

SIGINT (Ctrl-C) keeps Python's KeyboardInterrupt: a prompt stop without a checkpoint.
"""
from __future__ import annotations

import os
import signal
import threading

from planner.cli.train import PREEMPTED_EXIT

__all__ = ["PREEMPTED_EXIT", "Preempted", "StopRequest"]


class Preempted(Exception):
    """Every rank stopped after `step` on a SIGTERM; `saved` is the checkpoint written, or None."""

    def __init__(self, step: int, saved, signame: str = "SIGTERM"):
        self.step, self.saved, self.signame = step, saved, signame
        where = f"checkpoint {saved} written; rerun the same command with --resume to continue" if saved \
            else "no --checkpoint-dir, nothing saved"
        super().__init__(f"stopped by {signame} after step {step}: {where}")

    def report(self, rank: int):
        """Rank 0 says so (one line on stderr) and tells `meshplan train` (MESHPLAN_PREEMPTED_FILE)."""
        if rank != 0:
            return
        import sys
        print(f"meshplan: {self}", file=sys.stderr, flush=True)
        marker = os.environ.get("MESHPLAN_PREEMPTED_FILE")
        if marker:
            try:
                with open(marker, "w") as f:
                    f.write(f"{self.step}\n")
            except OSError:
                pass


class StopRequest:
    """SIGTERM sets `signal`; nothing else happens in the handler (it may run inside any step)."""

    def __init__(self):
        self.signal: int | None = None
        self._previous = None

    def install(self):
        if threading.current_thread() is threading.main_thread():   # handlers can only be set there
            self._previous = signal.signal(signal.SIGTERM, self._on_signal)
        return self

    def _on_signal(self, signum, frame):
        if self.signal is None:
            self.signal = signum

    @property
    def requested(self) -> bool:
        return self.signal is not None

    @property
    def name(self) -> str:
        return signal.Signals(self.signal).name if self.signal else ""

    def restore(self):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None
