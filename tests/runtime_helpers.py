"""Helpers for the runtime tests: multi-rank jobs with a hard time limit.

`run_ranks(world, fn, *args)` starts `world` processes, gives each torchrun's
environment variables and one CPU thread, starts a gloo process group, runs
fn(rank, *args), and tears down. A rank that raises, or exits non-zero (including a
crash in teardown), fails the job with its exit status; a job that outlives `timeout`
is killed and reported - never a hang.

Ranks are forked from a forkserver, not from the test process: CUDA builds of torch
(the default wheels, even on a machine without a GPU) refuse autograd in a child forked
after autograd ran in its parent ("Unable to handle autograd's threading in combination
with fork-based multiprocessing"), and the test process has run autograd by then. The
server never runs autograd; it imports torch and the runtime once (`_PRELOAD`), so each
rank starts as fast as a plain fork instead of re-importing torch as spawn does. fn and
args must pickle (module-level functions, partials of them, paths, strings).
"""
from __future__ import annotations

import json
import os
import socket
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.multiprocessing as mp

from planner.plan import Plan


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, fn, args):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    import torch.distributed as dist
    if world > 1:
        dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=120))
    try:
        fn(rank, *args)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


class JobFailed(AssertionError):
    pass


# What the forkserver imports once, before it forks any rank: the runtime and what the tests'
# rank bodies import (this module among them, so the server has the tests' directory on its
# sys.path), and torch._dynamo, which the first DDP/FSDP call in a process would otherwise
# import lazily (2.5-3.6 s per rank). Measured, 2-rank job of 2 steps on 2 busy cores: 2-3 s
# (a plain fork from the test process: 3-7 s, spawn: 10-27 s).
_PRELOAD = ["torch", "torch._dynamo", "runtime.train", "planner.simulate", "runtime_helpers"]


def run_ranks(world: int, fn, *args, timeout: float = 240.0):
    """Run fn(rank, *args) on `world` ranks sharing a gloo process group."""
    port = free_port()
    mp.set_forkserver_preload(_PRELOAD)
    ctx = mp.start_processes(_worker, args=(world, port, fn, args), nprocs=world, join=False,
                             start_method="forkserver")
    deadline = time.monotonic() + timeout
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise JobFailed(f"{world}-rank job did not finish in {timeout:.0f} s "
                                f"(alive: {[p.pid for p in ctx.processes if p.is_alive()]})")
            try:
                if ctx.join(timeout=min(left, 1.0)):
                    return
            except mp.ProcessRaisedException as exc:
                raise JobFailed(f"a rank raised:\n{exc}") from None
            except mp.ProcessExitedException as exc:
                raise JobFailed(f"a rank exited abnormally (exit code {exc.exit_code}, "
                                f"signal {exc.signal_name}): {exc}") from None
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
        for p in ctx.processes:
            p.join(timeout=5)


def write_plan(path: Path, **fields) -> Path:
    """Plan JSON written directly: for what `meshplan plan` decides itself and cannot be
    pinned to (hand-made stage splits, TP layouts, per-layer checkpoint mixes, rank
    orders), and for deliberately wrong plans."""
    Plan(**fields).save(path, overwrite=True)
    return path


_DECIDED_BY_THE_PLANNER = ("stages", "tp_layout", "rank_order")


def planned(path: Path, model: str, **fields) -> Path:
    """The plan `meshplan plan --model M --cluster cpu:1xN ... --out PATH` writes with every
    degree pinned: the path users take. Plans with fields no flag pins go to write_plan."""
    checkpoint = fields.get("checkpoint") or ["none"]
    # cp: written directly until `meshplan plan --cp` lands (the cp planner's branch)
    if any(k in fields for k in _DECIDED_BY_THE_PLANNER) or len(set(checkpoint)) > 1 or fields.get("cp", 1) > 1:
        return write_plan(path, **fields)
    from planner.cli import main
    p = Plan(**fields)
    argv = ["plan", "--model", model, "--cluster", f"cpu:1x{p.world_size}", "--global-batch", str(p.global_batch),
            "--seq", str(p.seq), "--dp", str(p.dp), "--tp", str(p.tp), "--pp", str(p.pp), "--zero", str(p.zero),
            "--micro-batch", str(p.micro_batch), "--schedule", p.schedule, "--interleave", str(p.interleave),
            "--precision", p.precision, "--checkpoint", checkpoint[0],
            "--sequence-parallel" if p.sequence_parallel else "--no-sequence-parallel",
            "--offload-optimizer" if p.offload_optimizer else "--no-offload-optimizer",
            "--top", "1", "--out", str(path), "--force"]
    assert main(argv) == 0, f"meshplan {' '.join(argv)} failed"
    written = Plan.load(path)
    assert (written.dp, written.tp, written.pp, written.zero, written.micro_batch) == (
        p.dp, p.tp, p.pp, p.zero, p.micro_batch)
    return path


def read_jsonl(path) -> list[dict]:
    """One record per step; when a resumed run appended a step again, the later record wins."""
    by_step = {}
    for line in Path(path).read_text().splitlines():
        if line.strip():
            rec = json.loads(line)
            by_step[rec["step"]] = rec
    return [by_step[k] for k in sorted(by_step)]


def step_losses(path, steps: int) -> list[float]:
    """The losses a run logged (JSONL), checked to be one per step 1..steps."""
    recs = read_jsonl(path)
    assert [r["step"] for r in recs] == list(range(1, steps + 1))
    return [r["loss"] for r in recs]


def train_many(rank, runs):
    """Worker body: run `python -m runtime.train ARGS` in-process for each ARGS list in turn."""
    import torch.distributed as dist
    from runtime.train import run
    for argv in runs:
        if callable(argv):                  # a file-system step between runs: rank 0 does it
            if rank == 0:
                argv()
            if dist.is_initialized():
                dist.barrier()
            continue
        try:
            run(list(argv))
        except BaseException as exc:
            raise RuntimeError(f"rank {rank}: run {' '.join(map(str, argv))} failed: {exc!r}") from exc


def drop_checkpoints_after(directory, step):
    """Make `step` the latest checkpoint in directory, as if the run had died after it."""
    import shutil
    root = Path(directory)
    for d in root.glob("step-*"):
        if int(d.name.split("-")[1]) > step:
            shutil.rmtree(d)
    (root / "latest").write_text(f"step-{step:08d}\n")


def mesh_coords(rank, plan_paths, out_dir):
    """Worker body: where runtime.mesh puts this rank for each plan (written as JSON)."""
    from planner.plan import Plan
    from runtime import mesh
    for i, path in enumerate(plan_paths):
        rt = mesh.setup(Plan.load(path), "cpu")
        Path(out_dir, f"coords-{i}-{rank}.json").write_text(json.dumps(rt.coords))


def processes_with(marker: str) -> dict[int, str]:
    """{pid: command line} of this machine's live processes whose command line holds
    `marker` (psutil when installed, else /proc); a zombie has ended and is left out."""
    found = {}
    try:
        import psutil
    except ImportError:
        psutil = None
    if psutil is not None:
        for proc in psutil.process_iter(["cmdline", "status"]):
            cmd = " ".join(proc.info["cmdline"] or [])
            if marker in cmd and proc.info["status"] != psutil.STATUS_ZOMBIE:
                found[proc.pid] = cmd
        return found
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
                state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
            except OSError:
                continue
            if marker in cmd and state != "Z":
                found[int(entry.name)] = cmd
    return found


def rank_of(pid: int) -> str | None:
    """The RANK in a process's environment (a torchrun worker's), or None."""
    env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return next((e.split(b"=", 1)[1].decode() for e in env if e.startswith(b"RANK=")), None)


def wait_for_lines(job, path: Path, count: int, timeout_s: float = 240):
    """Wait until background job `job` (a Popen) wrote `count` lines to `path`; fails with
    its stderr if it ended or the time ran out first."""
    deadline = time.monotonic() + timeout_s
    while not (path.exists() and path.read_text().count("\n") >= count):
        assert job.poll() is None and time.monotonic() < deadline, job.communicate()[1][-3000:]
        time.sleep(0.2)


def left_running(marker: str, timeout_s: float = 15) -> dict[int, str]:
    """processes_with(marker) once it is empty, or after timeout_s."""
    deadline = time.monotonic() + timeout_s
    while processes_with(marker) and time.monotonic() < deadline:
        time.sleep(0.2)
    return processes_with(marker)


def end_job(job, marker: str):
    """After a test of background job `job`: SIGKILL whatever is left of it, reap it."""
    for pid in processes_with(marker):
        os.kill(pid, 9)
    if job.poll() is None:
        job.kill()
    job.communicate()
