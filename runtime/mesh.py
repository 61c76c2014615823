"""Process group and device mesh for a plan.

Launch is torchrun's (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT in the
environment, multi-node through its rendezvous); without those variables the run is
one process. The mesh is `init_device_mesh` with the plan's named dimensions in
`plan.rank_order` (outermost first), so global rank r sits at the row-major position of
r in that shape - the layout the simulator assumes (default pp, dp, tp: tensor-parallel
ranks adjacent, pipeline stages outermost).

A plan with context parallelism (cp > 1) also gets its ("dp", "cp") dimensions flattened
into one "dp_cp" mesh, over which data parallelism reduces the gradients (torchtitan's
"fsdp" dimension, dp_shard x cp flattened: torchtitan/distributed/parallel_dims.py);
`Runtime.data_mesh` is that mesh, or "dp".

A plan with expert parallelism (ep > 1) gets a second mesh over the same ranks, with dp
unflattened into (edp, ep) (runtime.expert_parallel.expert_mesh), and its coordinates
"edp" and "ep" beside the plan's.
"""
from __future__ import annotations

import gc
import os
import socket
import sys
import weakref
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from cost_models.errors import MeshplanError
from planner.plan import MESH_DIMS, Plan
from planner.torch_compat import RUNTIME_MIN_TORCH, require_torch


@dataclass
class Runtime:
    """Where this process sits: its rank, device, mesh and mesh coordinates."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    mesh: DeviceMesh | None                   # None in a single process without a process group
    coords: dict = field(default_factory=lambda: {d: 0 for d in MESH_DIMS})
    owns_process_group: bool = False          # we called init_process_group, so we destroy it
    expert_mesh: DeviceMesh | None = None     # ep > 1: (..., edp, ep, ...) for the experts
    data_mesh: DeviceMesh | None = None       # where gradients are reduced: dp, or dp x cp flattened

    @property
    def distributed(self) -> bool:
        return self.mesh is not None

    def submesh(self, dim: str) -> DeviceMesh | None:
        return self.mesh[dim] if self.mesh is not None else None

    def group(self, dim: str):
        return self.mesh.get_group(dim) if self.mesh is not None else None

    def size(self, dim: str) -> int:
        return self.mesh.size(self.mesh.mesh_dim_names.index(dim)) if self.mesh is not None else 1

    def rank_at(self, **coords) -> int:
        """Global rank at the given mesh coordinates (others taken from this rank's)."""
        where = {**self.coords, **coords}
        index = tuple(where[d] for d in self.mesh.mesh_dim_names)
        return int(self.mesh.mesh[index])


def launch_env() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun's variables, or a single process."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        try:
            rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
            local = int(os.environ.get("LOCAL_RANK", rank))
        except ValueError:
            raise MeshplanError("RANK/WORLD_SIZE/LOCAL_RANK must be whole numbers (set by torchrun)")
        return rank, world, local
    return 0, 1, 0


def pick_device(choice: str, local_rank: int) -> torch.device:
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    if choice == "cuda":
        if not torch.cuda.is_available():
            raise MeshplanError("--device cuda asked for, but PyTorch sees no CUDA device: use --device cpu")
        if local_rank >= torch.cuda.device_count():
            raise MeshplanError(f"local rank {local_rank} has no GPU (this node has {torch.cuda.device_count()}): "
                                f"lower --nproc-per-node")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    if choice != "cpu":
        raise MeshplanError(f"--device {choice!r} is unknown; use auto, cpu or cuda")
    return torch.device("cpu")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check_world(plan: Plan, world: int):
    """Can `plan` run on `world` processes with this torch? (Every run, `MESHPLAN_CHECK_ONLY`
    included, passes here before it starts anything.)"""
    require_torch(RUNTIME_MIN_TORCH, "the meshplan training runtime")
    if plan.world_size != world:
        raise MeshplanError(f"the plan needs dp x cp x tp x pp = {plan.dp} x {plan.cp} x {plan.tp} x {plan.pp} = "
                            f"{plan.world_size} processes but {world} were started: start {plan.world_size} "
                            f"(meshplan train --nproc-per-node {plan.world_size}), or use a plan for {world}")


def setup(plan: Plan, device_choice: str = "auto", timeout_s: float = 600.0) -> Runtime:
    """Join (or start) the process group and build the plan's device mesh.

    A single process needs no process group unless the plan uses FSDP (ZeRO 1-3, e.g.
    for CPU optimizer offload); then it starts a one-rank group on a free local port.
    """
    rank, world, local_rank = launch_env()
    check_world(plan, world)
    device = pick_device(device_choice, local_rank)
    need_group = world > 1 or plan.zero >= 1
    if not need_group:
        return Runtime(rank, world, local_rank, device, None)
    owns = False
    if not dist.is_initialized():
        if world == 1:
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(_free_port()))
        backend = "nccl" if device.type == "cuda" else "gloo"
        kwargs = dict(device_id=device) if device.type == "cuda" else {}
        dist.init_process_group(backend, rank=rank, world_size=world,
                                timeout=timedelta(seconds=timeout_s), **kwargs)
        owns = True
    elif dist.get_world_size() != world:
        raise MeshplanError(f"a process group of {dist.get_world_size()} ranks is already running, "
                            f"not {world}")
    order = tuple(str(d) for d in plan.rank_order)
    shape = tuple(getattr(plan, d) for d in order)
    mesh = init_device_mesh(device.type, shape, mesh_dim_names=order)
    coords = {d: mesh.get_local_rank(d) for d in order}
    data = mesh["dp"]
    if plan.cp > 1:
        data = mesh[tuple(d for d in order if d in ("dp", "cp"))]._flatten("dp_cp")
    emesh = None
    if plan.ep > 1:
        from runtime.expert_parallel import EXPERT_DIMS, expert_mesh
        emesh = expert_mesh(plan, device.type)
        coords.update({d: emesh.get_local_rank(d) for d in EXPERT_DIMS})
    return Runtime(rank, world, local_rank, device, mesh, coords, owns, emesh, data)


def teardown(rt: Runtime, completed: bool = True):
    """Destroy the process groups this process started; after a completed run, also end
    their worker threads before the interpreter exits.

    Why: gloo runs each collective on a C++ worker thread, which drops its reference to
    the finished work - and to the tensors it holds - only after the waiting rank has
    moved on. If that is the last reference to a tensor whose Python object was already
    released, the worker needs the GIL to free it; once the interpreter is finalizing,
    CPython ends such a thread with pthread_exit, whose forced unwind through the noexcept
    ~AsyncWork calls std::terminate ("terminate called without an active exception",
    SIGABRT, torchrun exits 1 after a run that succeeded). destroy_process_group does not
    stop gloo's workers (its shutdown is a no-op); ~ProcessGroupGloo joins them, and it
    runs only when the last reference to the group goes - so drop ours and collect.
    Not after a failed run: ~ProcessGroupGloo first waits for its queued work, which may
    wait on ranks that are gone, and a failed run exits non-zero anyway.
    """
    if not (rt.owns_process_group and dist.is_initialized()):
        return
    groups = [weakref.ref(pg) for pg in dist.distributed_c10d._world.pg_map]
    dist.destroy_process_group()
    if not completed:
        return
    _release_mesh_groups(rt)
    gc.collect()        # the parallelized modules hold groups in reference cycles
    alive = sum(ref() is not None for ref in groups)
    if alive:
        print(f"meshplan: warning: {alive} process group(s) still referenced after teardown; their gloo "
              f"threads outlive the run and may abort the process at exit", file=sys.stderr, flush=True)


def _release_mesh_groups(rt: Runtime):
    """Forget the groups our device mesh holds: torch keeps meshes alive in caches (e.g. the
    lru_cache of DTensor's MeshTopoInfo.build_from_mesh), and a root mesh - ours is one -
    keeps its groups and its sub-meshes' in _pg_registry."""
    for m in (rt.mesh, rt.expert_mesh):
        if m is not None:
            getattr(m, "_pg_registry", {}).clear()
    rt.mesh = rt.expert_mesh = rt.data_mesh = None
