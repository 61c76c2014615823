"""A torchrun worker dies with torchrun's agent, even when the agent ended first.

Standard library only: `python -m runtime.train` calls `die_with_agent` before it imports
torch, which takes seconds on a busy machine - an agent SIGKILLed in those seconds (its
launcher was) used to leave its ranks training as orphans, the kernel's parent-death
signal not being set yet (seen: 4 ranks reparented to init after the launcher was
SIGKILLed 2 s into a job). So after setting it, the worker checks that its parent is
still an agent and ends itself if it is not (it was reparented: to init, or to a
subreaper). The launcher's side is planner.cli.train.die_with_parent.
"""
from __future__ import annotations

import os
import signal
import sys

# What an elastic agent's command line holds: `python -m torch.distributed.run`, the
# `torchrun` script, or the older `python -m torch.distributed.launch` (an agent too).
_AGENT_MARKS = (b"torch.distributed.run", b"torchrun", b"torch.distributed.launch")


def _parent_is_agent() -> bool:
    try:
        cmdline = open(f"/proc/{os.getppid()}/cmdline", "rb").read()
    except OSError:
        return True             # cannot tell: trust the signal set above
    return any(mark in cmdline for mark in _AGENT_MARKS)


def die_with_agent():
    """Under torchrun (TORCHELASTIC_RUN_ID set), on Linux: the kernel SIGKILLs this process
    when its parent ends (PR_SET_PDEATHSIG); if the parent has already ended, SIGKILL now.
    Elsewhere nothing."""
    if "TORCHELASTIC_RUN_ID" not in os.environ or not sys.platform.startswith("linux"):
        return
    import ctypes
    ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL), 0, 0, 0)    # 1 = PR_SET_PDEATHSIG
    if not _parent_is_agent():
        os.kill(os.getpid(), signal.SIGKILL)
