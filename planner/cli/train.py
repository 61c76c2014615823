"""`meshplan train`: launch `python -m runtime.train` in its own process(es).

The planner never imports the runtime; this only starts it (see `launch`).
"""
from __future__ import annotations

import subprocess
import sys

from cost_models import MeshplanError

HELP = "train a model with a plan: [--nproc-per-node N] then `python -m runtime.train --help` arguments"


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
        return subprocess.call(single)
    # torchrun turns a worker's exit code 2 into 1 behind its own report: run every check
    # that needs no process group first, so a user mistake still ends in one line and code 2.
    import os
    env = dict(os.environ, MESHPLAN_CHECK_ONLY="1", WORLD_SIZE=str(nproc), RANK="0")
    checked = subprocess.call(single, env=env)
    if checked != 0:
        return checked
    return subprocess.call([sys.executable, "-m", "torch.distributed.run", "--standalone",
                            f"--nproc-per-node={nproc}", "-m", "runtime.train", *rest])
