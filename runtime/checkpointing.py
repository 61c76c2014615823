"""Save and resume with torch.distributed.checkpoint, atomically.

A checkpoint is a DCP directory `DIR/step-NNNNNNNN` holding the model and optimizer
(`get_state_dict`-style sharded state: each rank writes its own shards; module names are
the unsplit model's, so they do not depend on the pipeline cut), the step, the data
loader's position, the learning-rate schedule's step and the fp16 scaler. Every ZeRO
stage is FSDP's or replicate's DTensor state, so a checkpoint resumes under another plan.
Its `meshplan.json` names the model and plan and records the run's TrainingConfig under
"training" (`saved_training`), which a resume checks its own settings against.

Atomic: all ranks write into `DIR/.step-NNNNNNNN.partial`; after every rank has
finished, rank 0 adds `meshplan.json`, renames the directory into place and then
rewrites `DIR/latest` (write + rename). A crash at any point leaves the previous
`latest` and its directory untouched; a left-over `.partial` directory is ignored and
replaced by the next save of that step. On many nodes DIR must be a shared filesystem.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)

from cost_models.errors import MeshplanError

STEP_DIR = re.compile(r"^step-(\d{8})$")
MARKER = "meshplan.json"
_OPTIONS = StateDictOptions(flatten_optimizer_state_dict=True)


def _barrier(distributed: bool):
    if distributed:
        dist.barrier()


def check_directory(path: str, resume: bool):
    """Refuse to write into a directory that already holds checkpoints unless resuming."""
    root = Path(path)
    if root.exists() and not root.is_dir():
        raise MeshplanError(f"--checkpoint-dir {path!r} is a file, not a directory")
    if resume:
        if not root.is_dir():
            raise MeshplanError(f"--resume: checkpoint directory {path!r} does not exist")
        return
    if root.is_dir() and (latest(path) is not None or any(STEP_DIR.match(p.name) for p in root.iterdir())):
        raise MeshplanError(f"{path!r} already holds checkpoints: pass --resume to continue from them, "
                            f"or choose another --checkpoint-dir")


def latest(path: str) -> Path | None:
    """The newest complete checkpoint under path, or None."""
    root = Path(path)
    pointer = root / "latest"
    if pointer.is_file():
        candidate = root / pointer.read_text().strip()
        if STEP_DIR.match(candidate.name) and (candidate / MARKER).is_file():
            return candidate
    done = sorted(p for p in root.glob("step-*") if STEP_DIR.match(p.name) and (p / MARKER).is_file())
    return done[-1] if done else None


def saved_training(where: Path) -> dict | None:
    """The TrainingConfig fields a checkpoint was saved with (runtime.config), or None when
    it records none (saved before meshplan recorded them)."""
    try:
        meta = json.loads((Path(where) / MARKER).read_text())
    except (OSError, ValueError) as exc:
        raise MeshplanError(f"cannot read {Path(where) / MARKER}: {exc}")
    return meta.get("training") if isinstance(meta, dict) else None


class Checkpointer:
    def __init__(self, path: str, parts: list, optimizers: list, rt):
        self.root = Path(path)
        self.parts, self.optimizers, self.rt = parts, optimizers, rt

    # -- state -----------------------------------------------------------------
    def _model_state(self) -> dict:
        state = {}
        for part in self.parts:
            state.update(get_model_state_dict(part))
        return state

    def _optim_state(self) -> dict:
        state = {}
        for part, opt in zip(self.parts, self.optimizers):
            state.update(get_optimizer_state_dict(part, opt, options=_OPTIONS))
        return state

    # -- save ------------------------------------------------------------------
    def save(self, step: int, train_state: dict, meta: dict):
        distributed = self.rt.distributed
        name = f"step-{step:08d}"
        final, partial = self.root / name, self.root / f".{name}.partial"
        if self.rt.rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            if partial.exists():
                shutil.rmtree(partial)        # an earlier save of this step that never finished
            partial.mkdir()
        _barrier(distributed)
        state = {"model": self._model_state(), "optim": self._optim_state(), "train": dict(train_state)}
        dcp.save(state, checkpoint_id=str(partial))
        _barrier(distributed)
        if self.rt.rank == 0:
            (partial / MARKER).write_text(json.dumps({**meta, "step": step}, indent=2) + "\n")
            if final.exists():              # same step saved before (e.g. a re-run after resume): ours to replace
                old = self.root / f".{name}.old"
                if old.exists():
                    shutil.rmtree(old)
                os.replace(final, old)
                os.replace(partial, final)
                shutil.rmtree(old)
            else:
                os.replace(partial, final)
            pointer_tmp = self.root / ".latest.tmp"
            pointer_tmp.write_text(name + "\n")
            os.replace(pointer_tmp, self.root / "latest")
        _barrier(distributed)
        return final

    # -- load ------------------------------------------------------------------
    def load(self, where: Path, train_state: dict) -> dict:
        model_state = self._model_state()
        state = {"model": model_state, "optim": self._optim_state(), "train": dict(train_state)}
        try:
            dcp.load(state, checkpoint_id=str(where))
        except Exception as exc:  # a checkpoint that does not fit this model/plan is the user's to fix
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise MeshplanError(f"cannot resume from {where}: {first[:300]}")
        for part in self.parts:
            set_model_state_dict(part, state["model"], options=StateDictOptions(strict=False))
        for part, opt in zip(self.parts, self.optimizers):
            set_optimizer_state_dict(part, opt, optim_state_dict=state["optim"], options=_OPTIONS)
        return state["train"]
