"""`python -m runtime.train`: train a zoo model with a plan (what `meshplan train` runs).

One process:      python -m runtime.train --model gpt-tiny --plan plan.json --steps 100
One machine:      torchrun --standalone --nproc-per-node 8 -m runtime.train ...
Many machines:    torchrun --nnodes 4 --nproc-per-node 8 --rdzv-backend c10d \
                      --rdzv-endpoint HOST:29500 --rdzv-id JOB -m runtime.train ...

A user mistake ends the run with one line on stderr ("meshplan: error: ...") and exit
code 2. `validate(argv)` runs every check that needs no process group; with the
environment variable MESHPLAN_CHECK_ONLY=1 (and WORLD_SIZE=N) `python -m runtime.train
ARGS` runs only those checks plus the plan's world size against N and exits 0 or 2 -
so a launcher can refuse a bad command in one line before torchrun starts N processes.
"""
from __future__ import annotations

import os
import signal
import sys
import time

import torch

from cost_models.errors import MeshplanError
from planner.cli.flags import Parser
from planner.plan import Plan
from planner.zoo import load_model
from runtime.config import TrainingConfig


def build_parser() -> Parser:
    p = Parser(prog="meshplan train", description="Train a model with a parallelism plan.")
    p.add_argument("--model", required=True, help="preset name or model config .json")
    p.add_argument("--plan", required=True, help="plan .json (meshplan plan / Plan.save)")
    p.add_argument("--data", default="synthetic", help="tokens .npy (1-D token ids) or 'synthetic' (default)")
    p.add_argument("--steps", type=int, required=True, help="optimizer steps to train (in total, counting resumed ones)")
    p.add_argument("--lr", type=float, default=3e-4, help="peak learning rate (default 3e-4)")
    p.add_argument("--min-lr", type=float, default=None, help="learning rate at the end of the cosine (default lr/10)")
    p.add_argument("--warmup", type=int, default=0, help="linear warm-up steps (default 0)")
    p.add_argument("--weight-decay", type=float, default=0.1, help="AdamW weight decay on matrices (default 0.1)")
    p.add_argument("--clip", type=float, default=1.0, help="global gradient-norm clip; 0 turns it off (default 1.0)")
    p.add_argument("--checkpoint-dir", help="directory for torch.distributed.checkpoint saves")
    p.add_argument("--checkpoint-every", type=int, default=0, help="save every K steps (and at the end)")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --checkpoint-dir")
    p.add_argument("--log-json", help="append one JSON line per step to this file")
    p.add_argument("--tensorboard", help="write TensorBoard scalars to this directory")
    p.add_argument("--seed", type=int, default=0, help="seed for weights and data (default 0)")
    p.add_argument("--gpu", help="catalogue GPU for MFU's peak FLOP/s (default: detected; 'cpu' on CPU)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="default: cuda if available")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    return p


def _check_args(args):
    if args.checkpoint_every < 0:
        raise MeshplanError(f"--checkpoint-every must be >= 0, got {args.checkpoint_every}")
    if (args.checkpoint_every or args.resume) and not args.checkpoint_dir:
        raise MeshplanError("--checkpoint-every and --resume need --checkpoint-dir")


def validate(argv=None):
    """Parse and check everything that needs no process group; returns (args, config, plan, spec)."""
    from runtime import checkpointing
    from runtime.metrics import peak_flops
    args = build_parser().parse_args(argv)
    config = TrainingConfig.from_args(args)
    _check_args(args)
    plan = Plan.load(args.plan)
    spec = load_model(args.model)
    from runtime.engine import check_plan
    check_plan(spec, plan)
    if args.gpu:
        peak_flops(args.gpu, plan.precision)     # unknown GPU or precision -> MeshplanError
    if args.data != "synthetic":
        from runtime.data import MemmapSource
        MemmapSource(args.data, spec.config.vocab, plan.seq, config.seed)
    if args.checkpoint_dir:
        checkpointing.check_directory(args.checkpoint_dir, args.resume)
        _resume_notes(args, config)
    return args, config, plan, spec


def _resume_notes(args, config: TrainingConfig) -> list[str]:
    """With --resume: refuse a latest checkpoint saved with other training settings
    (TrainingConfig.check_resume); the notes to print about it otherwise."""
    from runtime import checkpointing
    where = checkpointing.latest(args.checkpoint_dir) if args.resume else None
    return [] if where is None else config.check_resume(checkpointing.saved_training(where), where)


def _fault_injection(step: int, rank: int):
    """Test hooks, on rank R (MESHPLAN_FAULT_RANK, default 0) after step N:
    MESHPLAN_FAULT_SIGKILL_AFTER_STEP=N kills it (SIGKILL), MESHPLAN_FAULT_RAISE_AFTER_STEP=N
    raises in it (a rank that fails in Python and goes through teardown)."""
    if rank != int(os.environ.get("MESHPLAN_FAULT_RANK", "0")):
        return
    if os.environ.get("MESHPLAN_FAULT_SIGKILL_AFTER_STEP", "") == str(step):
        os.kill(os.getpid(), signal.SIGKILL)
    if os.environ.get("MESHPLAN_FAULT_RAISE_AFTER_STEP", "") == str(step):
        raise RuntimeError(f"injected fault on rank {rank} after step {step} (MESHPLAN_FAULT_RAISE_AFTER_STEP)")


def run(argv=None) -> list[dict]:
    """Train; returns the per-step records (on rank 0; other ranks get them too)."""
    from runtime import mesh
    from runtime.metrics import MetricsSink

    args, config, plan, spec = validate(argv)
    rank, world, _ = mesh.launch_env()
    if os.environ.get("MESHPLAN_CHECK_ONLY") == "1":
        mesh.check_world(plan, world)
        return []
    sink = MetricsSink(rank, config.steps, args.log_json, args.tensorboard, args.resume, args.quiet)
    rt = mesh.setup(plan, args.device)
    records, completed = [], False
    try:
        _train(args, config, plan, spec, rt, sink, records)
        completed = True
        return records
    except MeshplanError as exc:
        exc.after_setup = True      # may be this rank's alone: it reports it
        raise
    finally:
        sink.close()
        mesh.teardown(rt, completed)


def _train(args, config, plan, spec, rt, sink, records):
    from runtime import checkpointing
    from runtime.data import Loader, make_source
    from runtime.engine import Engine
    from runtime.metrics import flops_per_token, gpu_for_device, peak_flops, peak_memory_bytes
    engine = Engine(spec, plan, rt, config)
    source = make_source(args.data, spec.config.vocab, plan.seq, config.seed)
    loader = Loader(source, plan.global_batch, plan.micro_batch, plan.dp, rt.coords["dp"], rt.device)
    gpu = args.gpu or gpu_for_device(rt.device)
    peak = peak_flops(gpu, plan.precision, strict=bool(args.gpu))
    fpt = flops_per_token(spec.config, engine.params_total, plan.seq)

    ckpt = None
    if args.checkpoint_dir:
        ckpt = checkpointing.Checkpointer(args.checkpoint_dir, [engine.parts[v] for v in sorted(engine.parts)],
                                          engine.optimizers, rt)
    start = 0
    if args.resume:
        where = checkpointing.latest(args.checkpoint_dir)
        if where is None:
            sink.note(f"no checkpoint in {args.checkpoint_dir}: starting from step 0")
        else:
            for note in _resume_notes(args, config):
                sink.note(note)
            state = ckpt.load(where, {"step": 0, "data_position": 0, **engine.scaler_state()})
            start = int(state["step"])
            loader.load_state_dict({"position": state["data_position"]})
            engine.set_schedule_step(start)
            engine.load_scaler_state(state)
            sink.note(f"resumed from {where} (step {start})")
    sink.note(f"{spec.name}: {engine.params_total:,} parameters | dp {plan.dp} tp {plan.tp} pp {plan.pp} "
              f"zero {plan.zero} {plan.precision} | {plan.grad_accum} micro-batch(es) of {plan.micro_batch} "
              f"x {plan.seq} tokens per dp rank per step | {rt.world_size} process(es) on {rt.device.type}")
    meta = dict(model=spec.name, plan=plan.to_dict(), world_size=rt.world_size, zero=plan.zero,
                seed=config.seed, global_batch=plan.global_batch, training=config.to_dict())

    for step in range(start + 1, config.steps + 1):
        t0 = time.perf_counter()
        inputs, targets = loader.next_batch()
        out = engine.step(inputs, targets, plan.micro_batch)
        mem = torch.tensor([peak_memory_bytes(rt.device)], dtype=torch.float64, device=rt.device)
        if rt.distributed:
            torch.distributed.all_reduce(mem, op=torch.distributed.ReduceOp.MAX)
        dt = time.perf_counter() - t0
        tokens_per_s = plan.global_batch * plan.seq / dt
        rec = dict(step=step, loss=out["loss"], lr=out["lr"], grad_norm=out["grad_norm"],
                   tokens_per_s=tokens_per_s, step_time_s=dt,
                   mfu=fpt * tokens_per_s / (peak * rt.world_size) if peak else None,
                   peak_mem_bytes=int(mem.item()), skipped=out["skipped"])
        records.append(rec)
        sink.log(rec)
        if ckpt and ((args.checkpoint_every and step % args.checkpoint_every == 0) or step == config.steps):
            ckpt.save(step, {"step": step, "data_position": loader.position, **engine.scaler_state()}, meta)
        _fault_injection(step, rt.rank)
    return records


def main(argv=None) -> int:
    try:
        run(argv)
        return 0
    except MeshplanError as exc:
        from runtime.mesh import launch_env
        if launch_env()[0] == 0 or getattr(exc, "after_setup", False):   # checks before setup: rank 0 speaks
            print(f"meshplan: error: {exc}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        print("meshplan: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
