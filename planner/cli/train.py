"""`meshplan train`: launch `python -m runtime.train` in its own process(es), and pass it
the signals the launcher gets.

The planner never imports the runtime; this only starts it (see `launch`).

Stopping a job (Linux): SIGTERM, SIGINT, SIGHUP or SIGQUIT to the launcher is passed on to
its child - torchrun, which passes it to every rank (torch/distributed/elastic/
multiprocessing/api.py: `_terminate_process_handler`, then `PContext.close` signals each
worker's process group, waits, and SIGKILLs what is left), or the single training process.
The child runs in a session of its own, so a terminal's Ctrl-C or a signal to the launcher's
process group reaches the ranks once, through torchrun, not twice. SIGKILL cannot be passed
on: then every process below dies with its parent (`die_with_parent`). A rank that gets
SIGTERM - from torchrun, or from a user who signalled the rank itself - finishes its step,
and the ranks together write a checkpoint and exit PREEMPTED_EXIT (runtime.preemption).
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys

from cost_models import MeshplanError

HELP = "train a model with a plan: [--nproc-per-node N] then `python -m runtime.train --help` arguments"

# Exit code of a run stopped by SIGTERM (a spot instance's preemption notice) after its ranks
# wrote a checkpoint (with a --checkpoint-dir): EX_TEMPFAIL of sysexits.h, "try again
# later" - rerun the same command with --resume. `meshplan train` returns it also under torchrun, which would report 1.
PREEMPTED_EXIT = 75
FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT)
# How long torchrun waits after passing SIGTERM on before it SIGKILLs the ranks
# (TORCH_ELASTIC_SHUTDOWN_TIMEOUT, torch/distributed/launcher/api.py, added by pytorch#172596
# in March 2026: 2.13 reads it, releases before it wait a fixed 30 s): the ranks need a
# step and a checkpoint. A value the user set is kept. 120 s: a spot instance's notice on
# AWS (GCP and Azure give 30 s).
SHUTDOWN_TIMEOUT_S = 120


def die_with_parent(parent: int | None = None):
    """Have the kernel SIGKILL this process when its parent ends (Linux prctl
    PR_SET_PDEATHSIG; elsewhere nothing). It survives exec, so a launcher sets it in the
    child it starts (`preexec_fn`); a torchrun worker sets it itself (runtime.lifeline).
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


class _Forwarder:
    """While active, the FORWARDED signals this process gets go to its current child (and
    are remembered: `received`). A signal before any child started stops the launch."""

    def __init__(self):
        self.child: subprocess.Popen | None = None
        self.received: int | None = None
        self.forwarded = False
        self._previous = {}

    def __enter__(self):
        for sig in FORWARDED:
            self._previous[sig] = signal.signal(sig, self._on_signal)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _on_signal(self, signum, frame):
        if self.received is None:
            self.received = signum
        child = self.child
        if child is not None and child.returncode is None:
            print(f"meshplan: {signal.Signals(signum).name}: passed on to pid {child.pid}; "
                  f"the ranks stop at the end of their step", file=sys.stderr, flush=True)
            self.forwarded = True
            try:
                os.kill(child.pid, signum)
            except ProcessLookupError:      # it ended meanwhile
                pass

    def call(self, cmd: list, env: dict | None = None) -> int:
        """Run cmd to its end, dying with this launcher (see die_with_parent) in a session
        of its own; a signal's exit code (128 + N) if one came before it could start."""
        if self.received is not None:
            return 128 + self.received
        if not sys.platform.startswith("linux"):
            return subprocess.call(cmd, env=env)
        me = os.getpid()
        _libc()                    # loaded here: nothing but the prctl call runs between fork and exec
        self.child = subprocess.Popen(cmd, env=env, start_new_session=True, preexec_fn=lambda: die_with_parent(me))
        if self.received is not None and not self.forwarded:    # came while the child was starting
            self._on_signal(self.received, None)
        try:
            code = self.child.wait()
        finally:
            self.child = None
        return 128 - code if code < 0 else code     # killed by signal N: 128 + N, as a shell reports it


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
    with _Forwarder() as forwarder:
        if nproc == 1:
            return forwarder.call(single)
        # torchrun turns a worker's exit code 2 into 1 behind its own report: run every check
        # that needs no process group first, so a user mistake still ends in one line and code 2.
        env = dict(os.environ, MESHPLAN_CHECK_ONLY="1", WORLD_SIZE=str(nproc), RANK="0")
        checked = forwarder.call(single, env=env)
        if checked != 0:
            return checked
        # A rank that ends in a MeshplanError after the process group started also appends its
        # one line to MESHPLAN_ERROR_FILE: then the job's code is 2, not torchrun's 1. Rank 0 of a
        # run stopped by SIGTERM writes MESHPLAN_PREEMPTED_FILE once its checkpoint is whole.
        import tempfile
        with tempfile.TemporaryDirectory(prefix="meshplan-train-") as tmp:
            errors, preempted = os.path.join(tmp, "errors"), os.path.join(tmp, "preempted")
            env = dict(os.environ, MESHPLAN_ERROR_FILE=errors, MESHPLAN_PREEMPTED_FILE=preempted)
            env.setdefault("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", str(SHUTDOWN_TIMEOUT_S))
            code = forwarder.call([sys.executable, "-m", "torch.distributed.run", "--standalone",
                                   f"--nproc-per-node={nproc}", "-m", "runtime.train", *rest], env=env)
            if os.path.exists(preempted):
                return PREEMPTED_EXIT
            if code != 0 and os.path.exists(errors):
                return 2
            if code != 0 and forwarder.received is not None:
                return 128 + forwarder.received     # stopped by the signal it passed on (torchrun says 1)
            return code
