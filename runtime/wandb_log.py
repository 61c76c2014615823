"""`--wandb`: the per-step records to Weights & Biases (rank 0), offline unless asked.

Offline by default: the run is written under `./wandb` (or $WANDB_DIR) and needs no account
or network; `wandb sync DIR` uploads it later, `--wandb-mode online` logs live. The package
is optional (`pip install wandb`); without it `--wandb` is refused in one line before any
work (`check_available`). Calls used: `wandb.init(project=, name=, mode=, config=)`,
`run.log(dict, step=)`, `run.finish()` (wandb's public API, wandb/sdk/wandb_init.py,
wandb_run.py).
"""
from __future__ import annotations

import importlib

from cost_models.errors import MeshplanError

MODES = ("offline", "online")
# what goes to W&B from each record (runtime.train's keys), under "train/"
KEYS = ("loss", "lr", "grad_norm", "tokens_per_s", "step_time_s", "mfu", "peak_mem_bytes")


def _module():
    try:
        return importlib.import_module("wandb")
    except ImportError:
        raise MeshplanError("--wandb needs the wandb package: pip install wandb (or drop --wandb)") from None


def check_available():
    """Refuse --wandb in one line when the package is missing (before any work)."""
    _module()


class WandbLogger:
    def __init__(self, project: str, mode: str, name: str | None, config: dict):
        wandb = _module()
        try:
            self.run = wandb.init(project=project, name=name, mode=mode, config=config)
        except Exception as exc:        # wandb's own errors (login, network in online mode, ...)
            text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise MeshplanError(f"--wandb: wandb.init failed ({text}); try --wandb-mode offline") from None

    def log(self, rec: dict):
        values = {f"train/{k}": rec[k] for k in KEYS if rec.get(k) is not None}
        self.run.log(values, step=rec["step"])

    def finish(self):
        if self.run is not None:
            self.run.finish()
            self.run = None
