"""Save and resume with torch.distributed.checkpoint, atomically.

A checkpoint is a DCP directory `DIR/step-NNNNNNNN` holding the model and optimizer
(`get_state_dict`-style sharded state: each rank writes its own shards; module names are
the unsplit model's, so they do not depend on the pipeline cut), the step, the data
loader's position, the learning-rate schedule's step and the fp16 scaler. With ZeRO 1
each rank's optimizer partition is stored as its own blob.

Atomic: all ranks write into `DIR/.step-NNNNNNNN.partial`; after every rank has
finished, rank 0 adds `meshplan.json`, renames the directory into place and then
rewrites `DIR/latest` (write + rename). A crash at any point leaves the previous
`latest` and its directory untouched; a left-over `.partial` directory is ignored and
replaced by the next save of that step. On many nodes DIR must be a shared filesystem.
"""
from __future__ import annotations

import io
import json
import os
import re
import shutil
from pathlib import Path

import torch
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


class Checkpointer:
    def __init__(self, path: str, parts: list, optimizers: list, rt, zero1: bool):
        self.root = Path(path)
        self.parts, self.optimizers, self.rt, self.zero1 = parts, optimizers, rt, zero1

    # -- state -----------------------------------------------------------------
    def _model_state(self) -> dict:
        state = {}
        for part in self.parts:
            state.update(get_model_state_dict(part))
        return state

    def _optim_state(self) -> dict:
        if self.zero1:
            blob = io.BytesIO()
            torch.save([opt.optim.state_dict() for opt in self.optimizers], blob)
            blob.seek(0)
            return {f"zero1_rank{self.rt.rank}": blob}
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
        meta = json.loads((where / MARKER).read_text())
        model_state = self._model_state()
        state = {"model": model_state, "train": dict(train_state)}
        if self.zero1:
            if meta.get("world_size") != self.rt.world_size or meta.get("zero") != 1:
                raise MeshplanError(f"{where} was saved by a different layout; a zero 1 run resumes only from "
                                    f"a checkpoint of the same plan")
            state["optim"] = {f"zero1_rank{self.rt.rank}": io.BytesIO()}
        else:
            state["optim"] = self._optim_state()
        try:
            dcp.load(state, checkpoint_id=str(where))
        except Exception as exc:  # a checkpoint that does not fit this model/plan is the user's to fix
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise MeshplanError(f"cannot resume from {where}: {first[:300]}")
        for part in self.parts:
            set_model_state_dict(part, state["model"], options=StateDictOptions(strict=False))
        if self.zero1:
            blob = state["optim"][f"zero1_rank{self.rt.rank}"]
            blob.seek(0)
            for opt, sd in zip(self.optimizers, torch.load(blob, weights_only=False)):
                opt.optim.load_state_dict(sd)
        else:
            for part, opt in zip(self.parts, self.optimizers):
                set_optimizer_state_dict(part, opt, optim_state_dict=state["optim"], options=_OPTIONS)
        return state["train"]
