"""Save and resume with torch.distributed.checkpoint, atomically.

A checkpoint is a DCP directory `DIR/step-NNNNNNNN` holding the model and optimizer
(`get_state_dict`-style sharded state: each rank writes its own shards; module names are
the unsplit model's, so they do not depend on the pipeline cut), the step, the data
loader's position, the learning-rate schedule's step and the fp16 scaler. Every ZeRO
stage is FSDP's or replicate's DTensor state, so a checkpoint resumes under another plan.
Its `meshplan.json` names the model and plan and records the run's TrainingConfig under
"training" (`saved_training`), which a resume checks its own settings against.

Atomic: all ranks write into `DIR/.step-NNNNNNNN.partial` (synchronously, or from a
writer thread with dcp.async_save: `Checkpointer`); after every rank has finished, rank 0
adds `meshplan.json`, renames the directory into place and then rewrites `DIR/latest`
(write + rename). A crash at any point leaves the previous
`latest` and its directory untouched; a left-over `.partial` directory is ignored and
replaced by the next save of that step. On many nodes DIR must be a shared filesystem.

Verified before loading (`verify`, on every rank before the process group starts, so
`meshplan train`'s pre-check refuses a damaged checkpoint before torchrun starts):
`meshplan.json` parses, `.metadata` unpickles, every shard file it names exists and is
long enough for the byte ranges it records, each file's size and CRC-32 equal the ones
rank 0 recorded in `meshplan.json` ("files") when it saved (a zeroed or altered shard),
and the saved model's tensor names and shapes are this model's; then (`check_job`) that
its model config and the plan's global batch and sequence length are this run's. A damaged checkpoint is
refused in one line naming the step and the file, with the newest earlier checkpoint
that verifies offered for `--resume-from STEP`; a load that still fails on any rank ends
every rank (rank 0 says why, in one line). Nothing damaged is ever loaded silently
(up to what a CRC-32 can see; checkpoints saved before the CRCs were recorded get the
size checks only).

One job at a time: rank 0 holds an exclusive `flock` on `DIR/.meshplan.lock` for the
job's life (`DirectoryLock`); the kernel drops it when the process ends, however it ends.
"""
from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import socket
import threading
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.api import CheckpointException   # a BaseException, not an Exception
from torch.distributed.checkpoint.metadata import Metadata
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)

from cost_models.errors import MeshplanError

STEP_DIR = re.compile(r"^step-(\d{8})$")
MARKER = "meshplan.json"
METADATA = ".metadata"
LOCK = ".meshplan.lock"
_OPTIONS = StateDictOptions(flatten_optimizer_state_dict=True)


def _barrier(distributed: bool):
    if distributed:
        dist.barrier()


def check_directory(path: str, resume: bool):
    """Refuse to write into a directory that already holds checkpoints unless resuming.
    With --resume a missing or empty directory is fine: the first run of a job that is
    always launched with --resume (a spot instance's restart command) starts at step 0."""
    root = Path(path)
    if root.exists() and not root.is_dir():
        raise MeshplanError(f"--checkpoint-dir {path!r} is a file, not a directory")
    if resume:      # a directory that does not exist yet holds no checkpoint: the run starts at step 0
        return
    if root.is_dir() and (latest(path) is not None or any(STEP_DIR.match(p.name) for p in root.iterdir())):
        raise MeshplanError(f"{path!r} already holds checkpoints: pass --resume to continue from them, "
                            f"or choose another --checkpoint-dir")


def latest(path: str) -> Path | None:
    """The newest complete checkpoint under path, or None."""
    root = Path(path)
    pointer = root / "latest"
    try:
        name = pointer.read_text().strip() if pointer.is_file() else ""
    except (OSError, ValueError):     # unreadable or not text: fall back to the newest complete one
        name = ""
    if STEP_DIR.match(name) and (root / name / MARKER).is_file():
        return root / name
    done = sorted(p for p in root.glob("step-*") if STEP_DIR.match(p.name) and (p / MARKER).is_file())
    return done[-1] if done else None


def step_of(where: Path) -> int:
    return int(STEP_DIR.match(Path(where).name).group(1))


def _meta(where: Path) -> dict:
    """meshplan.json of a checkpoint, checked for shape; MeshplanError naming the file otherwise."""
    path = Path(where) / MARKER
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as exc:          # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise MeshplanError(f"cannot read {path}: {_first_line(exc)}")
    if not isinstance(meta, dict) or not isinstance(meta.get("training", {}), (dict, type(None))) \
            or not isinstance(meta.get("files", {}), dict):
        raise MeshplanError(f"{path} is not a meshplan checkpoint record (a JSON object with a 'training' object)")
    return meta


def saved_training(where: Path) -> dict | None:
    """The TrainingConfig fields a checkpoint was saved with (runtime.config), or None when
    it records none (saved before meshplan recorded them)."""
    return _meta(where).get("training")


# Plan fields a checkpoint's step and data position mean something under: with another
# global batch a step is another number of sequences (the saved learning-rate schedule and
# data position would not line up), with another sequence length the data rows are cut
# elsewhere. The parallel layout (dp, tp, pp, ZeRO, micro-batch, precision) may change: DCP
# reshards the saved tensors.
RESUME_PLAN_MUST_MATCH = ("global_batch", "seq")


def check_job(where: Path, model_config: dict | None, plan: dict):
    """Refuse (one line) a checkpoint saved for another model - a config that differs beyond
    the tensor shapes `verify` compares (norm_eps, rope_theta, attention, ...) - or by a plan
    with another RESUME_PLAN_MUST_MATCH field. Checkpoints that recorded neither pass."""
    meta = _meta(where)
    saved_plan = meta.get("plan") if isinstance(meta.get("plan"), dict) else {}
    changed = [f"{k} {saved_plan[k]!r} there, {plan.get(k)!r} in this plan" for k in RESUME_PLAN_MUST_MATCH
               if k in saved_plan and saved_plan[k] != plan.get(k)]
    if changed:
        raise MeshplanError(f"cannot resume from {where}: it was saved by a plan with another "
                            f"{'; '.join(changed)}: give a plan with the saved global batch and sequence "
                            f"length, or start a new --checkpoint-dir")
    saved_model = meta.get("model_config")
    if isinstance(saved_model, dict) and model_config is not None:
        for key in sorted(set(saved_model) | set(model_config)):
            if key != "name" and saved_model.get(key) != model_config.get(key):
                raise MeshplanError(f"cannot resume from {where}: it holds another model ({key} "
                                    f"{saved_model.get(key)!r} there, {model_config.get(key)!r} in this one): "
                                    f"give the saved model, or start a new --checkpoint-dir")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:300]


def _crc32(path: Path) -> int:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            crc = zlib.crc32(chunk, crc)
    return crc


def _file_records(where: Path) -> dict:
    """{file name: [size, crc32]} of every file a DCP save wrote into `where`."""
    return {p.name: [p.stat().st_size, _crc32(p)] for p in sorted(Path(where).iterdir())
            if p.is_file() and p.name != MARKER}


def expected_shapes(module) -> dict:
    """{state-dict name: shape} of a (meta-device) model, and the groups of names that alias
    one tensor (tied embeddings), for `verify`."""
    state = module.state_dict(keep_vars=True)
    groups: dict = {}
    for name, t in state.items():
        groups.setdefault(id(t), []).append(name)
    return {"shapes": {name: tuple(t.shape) for name, t in state.items()}, "aliases": list(groups.values())}


def _shape(size) -> str:
    return "x".join(map(str, size)) or "a scalar"


def _problem(where: Path, expected: dict | None) -> tuple[Path, str] | None:
    """The first thing wrong with checkpoint `where` as (file, what), or None."""
    try:
        meta = _meta(where)
    except MeshplanError as exc:
        return where / MARKER, str(exc).split(": ", 1)[-1]
    md_path = where / METADATA
    if not md_path.is_file():
        return md_path, "is missing"
    try:
        md = FileSystemReader(str(where)).read_metadata()
        if not isinstance(md, Metadata):
            raise TypeError(f"holds a {type(md).__name__}, not DCP metadata")
        need: dict = {}
        for info in md.storage_data.values():
            need[info.relative_path] = max(need.get(info.relative_path, 0), int(info.offset) + int(info.length))
    except Exception as exc:         # garbage unpickles to anything, or raises anything
        return md_path, f"cannot be read ({type(exc).__name__}: {_first_line(exc)})"
    for name, size in sorted(need.items()):
        path = where / name
        if not path.is_file():
            return path, "is missing (named by .metadata)"
        if path.stat().st_size < size:
            return path, f"is truncated ({path.stat().st_size} bytes; .metadata needs {size})"
    for name, record in sorted(meta.get("files", {}).items()):
        path = where / name
        if not path.is_file():
            return path, "is missing (recorded when it was saved)"
        if not (isinstance(record, list) and len(record) == 2):
            return where / MARKER, f"has a malformed 'files' entry for {name}"
        if path.stat().st_size != record[0]:
            return path, f"has {path.stat().st_size} bytes, {record[0]} when it was saved"
        if _crc32(path) != record[1]:
            return path, "does not match the CRC-32 recorded when it was saved (zeroed or altered)"
    if expected is not None:
        saved = {k[len("model."):]: tuple(v.size) for k, v in md.state_dict_metadata.items()
                 if k.startswith("model.") and hasattr(v, "size")}
        ours = expected["shapes"]
        for name in sorted(set(saved) & set(ours)):
            if saved[name] != ours[name]:
                return md_path, (f"holds another model: {name} is {_shape(saved[name])} there, "
                                 f"{_shape(ours[name])} in this one")
        extra = sorted(set(saved) - set(ours))
        missing = [g[0] for g in expected["aliases"] if not any(n in saved for n in g)]
        if extra or missing:
            what = f"has {extra[0]}, which this model lacks" if extra else f"lacks this model's {missing[0]}"
            return md_path, f"holds another model: it {what}"
    return None


def complete_steps(path: str) -> list[int]:
    """Steps of the complete (meshplan.json written) checkpoints under path, oldest first."""
    root = Path(path)
    if not root.is_dir():
        return []
    return sorted(step_of(p) for p in root.iterdir() if STEP_DIR.match(p.name) and (p / MARKER).is_file())


def _offer(root: Path, before: int, expected: dict | None) -> str:
    for step in reversed([s for s in complete_steps(str(root)) if s < before]):
        if _problem(root / f"step-{step:08d}", expected) is None:
            return f"resume from the previous complete checkpoint with --resume-from {step}"
    return f"no earlier checkpoint in {str(root)!r} passes these checks: start a new --checkpoint-dir"


def verify(where: Path, expected: dict | None = None):
    """Refuse (MeshplanError, one line) a checkpoint that is damaged or holds another model,
    offering the newest earlier checkpoint that passes."""
    where = Path(where)
    found = _problem(where, expected)
    if found is not None:
        file, what = found
        step = step_of(where)
        raise MeshplanError(f"checkpoint step {step} is unusable: {file} {what}; "
                            f"{_offer(where.parent, step, expected)}")


def resume_target(path: str, step: int | None) -> Path | None:
    """The checkpoint to resume: step `step` (--resume-from), else the latest; None if there is none."""
    if step is None:
        return latest(path)
    where = Path(path) / f"step-{step:08d}"
    if not (where / MARKER).is_file():
        steps = complete_steps(path)
        have = f"complete ones: {', '.join(map(str, steps))}" if steps else "it holds none complete"
        raise MeshplanError(f"--resume-from {step}: {str(path)!r} has no complete checkpoint of step {step} ({have})")
    return where


class DirectoryLock:
    """An exclusive flock on DIR/.meshplan.lock: one job writes a checkpoint directory at a
    time. The holder writes "pid N on HOST" into the file for whoever is refused."""

    def __init__(self, path: str):
        self.root = Path(path)
        self.fd = None

    def _refuse(self, fd: int):
        holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "pid unknown"
        os.close(fd)
        raise MeshplanError(f"--checkpoint-dir {str(self.root)!r} is in use by another job ({holder}): "
                            f"wait for it to end or stop it, or choose another --checkpoint-dir")

    def acquire(self):
        """Take the lock for this process's life (creating DIR); MeshplanError if held."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.root / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise MeshplanError(f"--checkpoint-dir {str(self.root)!r} cannot be written: {exc.strerror or exc}")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._refuse(fd)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        self.fd = fd

    def probe(self):
        """Refuse now if another job holds the lock (takes nothing; for pre-checks)."""
        try:
            fd = os.open(self.root / LOCK, os.O_RDONLY)
        except OSError:
            return          # no lock file: nobody has held it
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            self._refuse(fd)
        os.close(fd)

    def release(self):
        if self.fd is not None:
            os.close(self.fd)       # closing the last descriptor drops the flock
            self.fd = None


@dataclass
class _Pending:
    """An asynchronous save in flight (dcp.async_save's future)."""
    step: int
    future: object
    meta: dict
    started: float
    blocked_s: float = 0.0
    uploaded: float | None = None       # perf_counter() when its upload ended (set by the writer thread)


class Checkpointer:
    """Saves (synchronous, or asynchronous with `asynchronous=True`) and loads checkpoints.

    Asynchronous saves (`dcp.async_save`, torch/distributed/checkpoint/state_dict_saver.py):
    the step's state is copied to CPU memory (its "staging") while training waits, then a
    writer thread saves the copy while the next steps run. One save is in flight at a time
    (a new one first waits for the last). The writer coordinates the ranks over a gloo group
    of its own: collectives of two threads on one group could interleave. DCP's save gathers
    every rank's write results to rank 0 before it writes `.metadata` and returns, so when
    rank 0's future is done every shard is on disk: rank 0 then finishes the checkpoint alone
    (`poll`/`wait`: CRCs, meshplan.json, rename, latest), at a step boundary. A process killed
    before that leaves only a `.partial` directory; `latest` still names the previous one.

    `report(step, where, save_s, blocked_s)` is called on rank 0 when a checkpoint is complete."""

    def __init__(self, path: str, parts: list, optimizers: list, rt, asynchronous: bool = False, report=None):
        self.root = Path(path)
        self.parts, self.optimizers, self.rt = parts, optimizers, rt
        self.asynchronous, self.report = asynchronous, report
        self.pending: _Pending | None = None
        self.last_step: int | None = None       # newest step saved or being saved
        self.last_saved: Path | None = None     # newest complete checkpoint this run wrote
        # every rank creates the group, in the same order: here, before the first step
        self.group = dist.new_group(backend="gloo") if asynchronous and rt.distributed else None

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
    def save(self, step: int, train_state: dict, meta: dict, asynchronous: bool | None = None) -> float:
        """Save `step` on every rank (a collective); returns the seconds training waited for it."""
        asynchronous = self.asynchronous if asynchronous is None else asynchronous
        self.wait()
        started = time.perf_counter()
        distributed = self.rt.distributed
        partial = self.root / f".step-{step:08d}.partial"
        if self.rt.rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            if partial.exists():
                shutil.rmtree(partial)        # an earlier save of this step that never finished
            partial.mkdir()
        _barrier(distributed)
        state = {"model": self._model_state(), "optim": self._optim_state(), "train": dict(train_state)}
        self.last_step = step
        if asynchronous:
            kwargs = dict(process_group=self.group) if self.group is not None else {}
            future = dcp.async_save(state, checkpoint_id=str(partial), **kwargs)
            pending = _Pending(step, future, meta, started)
            future.add_done_callback(lambda _: setattr(pending, "uploaded", time.perf_counter()))
            pending.blocked_s = time.perf_counter() - started
            self.pending = pending
            return pending.blocked_s
        dcp.save(state, checkpoint_id=str(partial))
        _barrier(distributed)
        if self.rt.rank == 0:
            self._finish(step, meta, time.perf_counter() - started, None)
        _barrier(distributed)
        return time.perf_counter() - started

    def poll(self):
        """Finish the asynchronous save in flight if its upload has ended (no collective)."""
        if self.pending is not None and self.pending.future.done():
            self._complete()

    def wait(self):
        """Wait for the asynchronous save in flight, and finish it."""
        if self.pending is not None:
            self.pending.future.result()
            self._complete()

    def close(self):
        """Finish the save in flight, then let DCP's writer threads end: a thread still
        unwinding holds the save's arguments - the process groups - and mesh.teardown checks
        that none outlives the run. Each async_save starts its own one-thread pool named
        "AsyncCheckpointExecutor" and shuts it down when the save is done
        (torch/distributed/checkpoint/_async_thread_executor.py); its thread ends right after."""
        self.wait()
        for thread in threading.enumerate():
            if thread.name.startswith("AsyncCheckpointExecutor") and thread is not threading.current_thread():
                thread.join(timeout=60)
        self.group = None

    def _complete(self):
        pending, self.pending = self.pending, None
        try:
            pending.future.result()
        except BaseException as exc:         # CheckpointException is a BaseException
            raise RuntimeError(f"asynchronous checkpoint of step {pending.step} failed: {_first_line(exc)}") from exc
        if self.rt.rank == 0:
            done = pending.uploaded or time.perf_counter()
            self._finish(pending.step, pending.meta, done - pending.started, pending.blocked_s)

    def _finish(self, step: int, meta: dict, save_s: float, blocked_s: float | None):
        """Rank 0, once every rank's shards are written: record, rename into place, point latest."""
        name = f"step-{step:08d}"
        final, partial = self.root / name, self.root / f".{name}.partial"
        record = {**meta, "step": step, "files": _file_records(partial)}
        (partial / MARKER).write_text(json.dumps(record, indent=2) + "\n")
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
        self.last_saved = final
        if self.report:
            self.report(step, final, save_s, save_s if blocked_s is None else blocked_s)

    # -- load ------------------------------------------------------------------
    def load(self, where: Path, train_state: dict, expected: dict | None = None) -> dict:
        """Load `where` into the model and optimizers (verified beforehand: see `verify`).
        If loading fails on any rank, every rank raises MeshplanError with the first failing
        rank's reason, marked `rank0_reports` (rank 0 prints it, the others stay quiet)."""
        error = None
        state = {}
        try:
            state = {"model": self._model_state(), "optim": self._optim_state(), "train": dict(train_state)}
            dcp.load(state, checkpoint_id=str(where))
            for part in self.parts:
                set_model_state_dict(part, state["model"], options=StateDictOptions(strict=False))
            for part, opt in zip(self.parts, self.optimizers):
                set_optimizer_state_dict(part, opt, optim_state_dict=state["optim"], options=_OPTIONS)
        except CheckpointException as exc:                 # a BaseException, not an Exception
            rank, (inner, _) = min(exc.failures.items(), key=lambda kv: kv[0])   # the first failing rank's cause
            error = f"{type(inner).__name__} on rank {rank}: {_first_line(inner)}"
        except Exception as exc:
            error = f"{type(exc).__name__}: {_first_line(exc)}"
        errors = [error]
        if self.rt.distributed:
            errors = [None] * dist.get_world_size()
            dist.all_gather_object(errors, error)
        failed = [(rank, e) for rank, e in enumerate(errors) if e is not None]
        if failed:
            rank, reason = failed[0]
            step = step_of(where)
            exc = MeshplanError(f"cannot resume from checkpoint step {step} ({where}; rank {rank} loading it): "
                                f"{reason}; {_offer(Path(where).parent, step, expected)}")
            exc.rank0_reports = True
            raise exc
        return state["train"]
