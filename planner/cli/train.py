"""`meshplan train`: launch `python -m runtime.train` in its own process(es).

The planner never imports the runtime; this only starts it (see `launch`).
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys

from cost_models import MeshplanError

HELP = "train a model with a plan: [--nproc-per-node N] then `python -m runtime.train --help` arguments"


def die_with_parent(parent: int | None = None):
    """Have the kernel SIGKILL this process when its parent ends (Linux prctl
    PR_SET_PDEATHSIG; elsewhere nothing). It survives exec, so a launcher sets it in the
    child it starts (`preexec_fn`); a torchrun worker sets it itself (runtime.train.main).
    If `parent` (the pid that started us) has already gone, it kills this process now.

    Why not a thread polling os.getppid(): the kernel's signal needs no thread, no polling
    interval and nothing from a process stuck in a collective, and it fires for SIGKILL.
    (It fires when the parent *thread* that forked us ends: torchrun's agent and this
    launcher start their children from their main thread.) SIGKILL because checkpoints
    are atomic: a killed rank loses its unsaved steps, nothing else."""
    if not sys.platform.startswith("linux"):
        return
    _libc().prctl(1, int(signal.SIGKILL), 0, 0, 0)      # 1 = PR_SET_PDEATHSIG
    if parent is not None and os.getppid() != parent:
        os.kill(os.getpid(), signal.SIGKILL)


_LIBC = []


def _libc():
    if not _LIBC:
        import ctypes
        _LIBC.append(ctypes.CDLL(None, use_errno=True))
    return _LIBC[0]


def _call(cmd: list, env: dict | None = None) -> int:
    """subprocess.call, the child dying with this launcher (see die_with_parent)."""
    if not sys.platform.startswith("linux"):
        return subprocess.call(cmd, env=env)
    me = os.getpid()
    _libc()                    # loaded here: nothing but the prctl call runs between fork and exec
    return subprocess.call(cmd, env=env, preexec_fn=lambda: die_with_parent(me))


def launch(argv: list) -> int:
    """`meshplan train [--nproc-per-node N] ARGS`: run `runtime.train` in its own process(es).

    The planner never imports the runtime: training runs as `python -m runtime.train`,
    under a standalone torchrun when N > 1 (many nodes: call torchrun yourself, see README).
    """
    nproc, rest, i = 1, [], 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--nproc-per-node" or arg.startswith("--nproc-per-node="):
            value = arg.split("=", 1)[1] if "=" in arg else (argv[i + 1] if i + 1 < len(argv) else "")
            i += 1 if "=" in arg else 2
            if not value.isdigit() or int(value) < 1:
                raise MeshplanError(f"--nproc-per-node must be a whole number >= 1, got {value!r}")
            nproc = int(value)
            continue
        rest.append(arg)
        i += 1
    single = [sys.executable, "-m", "runtime.train", *rest]
    if nproc == 1:
        return _call(single)
    # torchrun turns a worker's exit code 2 into 1 behind its own report: run every check
    # that needs no process group first, so a user mistake still ends in one line and code 2.
    env = dict(os.environ, MESHPLAN_CHECK_ONLY="1", WORLD_SIZE=str(nproc), RANK="0")
    checked = _call(single, env=env)
    if checked != 0:
        return checked
    # A rank that ends in a MeshplanError after the process group started also appends its
    # one line to MESHPLAN_ERROR_FILE: then the job's code is 2, not torchrun's 1.
    import tempfile
    with tempfile.TemporaryDirectory(prefix="meshplan-train-") as tmp:
        errors = os.path.join(tmp, "errors")
        code = _call([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
                      "-m", "runtime.train", *rest], env=dict(os.environ, MESHPLAN_ERROR_FILE=errors))
        return 2 if code != 0 and os.path.exists(errors) else code
