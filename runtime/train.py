"""`python -m runtime.train`: train a model with a plan (what `meshplan train` runs): a zoo
model, or a file.py:factory one (runtime.modules), which trains on its example_inputs.

One process:      python -m runtime.train --model gpt-tiny --plan plan.json --steps 100
One machine:      torchrun --standalone --nproc-per-node 8 -m runtime.train ...
Many machines:    torchrun --nnodes 4 --nproc-per-node 8 --rdzv-backend c10d \
                      --rdzv-endpoint HOST:29500 --rdzv-id JOB -m runtime.train ...

A user mistake ends the run with one line on stderr ("meshplan: error: ...") and exit
code 2. `validate(argv)` runs every check that needs no process group; with the
environment variable MESHPLAN_CHECK_ONLY=1 (and WORLD_SIZE=N) `python -m runtime.train
ARGS` runs only those checks plus the plan's world size against N and exits 0 or 2 -
so a launcher can refuse a bad command in one line before torchrun starts N processes.
Those checks include every output location (runtime.outputs), the checkpoint directory's
lock (another job writing it) and, with --resume / --resume-from, the checkpoint to
resume (runtime.checkpointing.verify).

Under torchrun, each rank dies with torchrun (runtime.lifeline: the kernel SIGKILLs it
when its parent, torchrun's agent, ends, and a rank whose agent ended before it could ask
for that ends itself), so a SIGKILLed launcher leaves no rank training into a checkpoint
directory that a --resume would then share.

SIGTERM (a spot instance's preemption notice, or `kill`) stops every rank after the same
step; they write a checkpoint and exit PREEMPTED_EXIT, 75 (runtime.preemption). Saves run
every --checkpoint-every K steps or at the Young/Daly interval (`auto`, runtime.cadence),
synchronously or with dcp.async_save (--async-checkpoint, runtime.checkpointing); each
prints a line, and the run ends with a summary line (runtime.summary).
"""
from __future__ import annotations

import os
import signal
import sys
import time

if __name__ == "__main__":     # a torchrun worker ends with its agent: set before torch's seconds of import
    from runtime.lifeline import die_with_agent
    die_with_agent()

import torch  # noqa: E402  (after the lifeline, on purpose)

from cost_models.errors import MeshplanError
from planner.cli.flags import Parser
from planner.plan import Plan, compute_precision
from planner.zoo import load_model
from runtime.config import TrainingConfig


def build_parser() -> Parser:
    p = Parser(prog="meshplan train", description="Train a model with a parallelism plan.")
    p.add_argument("--model", required=True, help="preset name, model config .json, or file.py:factory")
    p.add_argument("--plan", required=True, help="plan .json (meshplan plan / Plan.save)")
    p.add_argument("--data", default="synthetic", help="tokens .npy (1-D token ids) or 'synthetic' (default)")
    p.add_argument("--steps", type=int, required=True, help="optimizer steps to train (in total, counting resumed ones)")
    p.add_argument("--lr", type=float, default=3e-4, help="peak learning rate (default 3e-4)")
    p.add_argument("--min-lr", type=float, default=None, help="learning rate at the end of the cosine (default lr/10)")
    p.add_argument("--warmup", type=int, default=0, help="linear warm-up steps (default 0)")
    p.add_argument("--weight-decay", type=float, default=0.1, help="AdamW weight decay on matrices (default 0.1)")
    p.add_argument("--clip", type=float, default=1.0, help="global gradient-norm clip; 0 turns it off (default 1.0)")
    p.add_argument("--checkpoint-dir", help="directory for torch.distributed.checkpoint saves")
    p.add_argument("--checkpoint-every", default="0", metavar="K|auto",
                   help="save every K steps (and at the end; 0: only at the end), or 'auto': the Young/Daly "
                        "interval from the first save's measured time and --failure-rate-per-gpu-hour; default 0")
    p.add_argument("--failure-rate-per-gpu-hour", type=float, metavar="RATE",
                   help="failures per GPU per hour for --checkpoint-every auto (default 1.97e-5: Llama 3's "
                        "419 interruptions in 54 days on 16,384 H100s)")
    p.add_argument("--async-checkpoint", action="store_true",
                   help="save with dcp.async_save: training waits only for the copy to CPU memory")
    p.add_argument("--resume", action="store_true",
                   help="continue from the latest checkpoint in --checkpoint-dir (none there: start at step 0)")
    p.add_argument("--resume-from", type=int, metavar="STEP",
                   help="continue from the checkpoint of step STEP in --checkpoint-dir (implies --resume)")
    p.add_argument("--log-json", help="write one JSON line per step to this file (with --resume: append)")
    p.add_argument("--tensorboard", help="write TensorBoard scalars to this directory")
    p.add_argument("--wandb", nargs="?", const="meshplan", metavar="PROJECT",
                   help="log to Weights & Biases project PROJECT (default meshplan); needs `pip install wandb`")
    p.add_argument("--wandb-mode", choices=["offline", "online"],
                   help="offline (default: written under ./wandb, `wandb sync` uploads it) or online")
    p.add_argument("--seed", type=int, default=0, help="seed for weights and data (default 0)")
    p.add_argument("--gpu", help="catalogue GPU for MFU's peak FLOP/s (default: detected; 'cpu' on CPU)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="default: cuda if available")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile each block, as torchtitan does (a plan's \"compile\": true does too)")
    p.add_argument("--force", action="store_true",
                   help="replace an existing --log-json file (checkpoints are never replaced: use --resume or "
                        "another --checkpoint-dir)")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    return p


def _check_args(args):
    from runtime.cadence import parse_every, parse_rate
    args.checkpoint_every = parse_every(args.checkpoint_every)
    if args.failure_rate_per_gpu_hour is not None:
        parse_rate(args.failure_rate_per_gpu_hour)
        if args.checkpoint_every != "auto":
            raise MeshplanError("--failure-rate-per-gpu-hour sets the interval of --checkpoint-every auto: "
                                "add --checkpoint-every auto, or drop it")
    if args.resume_from is not None:
        if args.resume_from < 1:
            raise MeshplanError(f"--resume-from must be a saved step >= 1, got {args.resume_from}")
        if not args.checkpoint_dir:
            raise MeshplanError("--resume-from needs --checkpoint-dir (the directory holding that step)")
        args.resume = True
    for flag, given in (("--checkpoint-every", args.checkpoint_every), ("--async-checkpoint", args.async_checkpoint)):
        if given and not args.checkpoint_dir:
            raise MeshplanError(f"{flag} needs --checkpoint-dir")
    if args.wandb_mode and not args.wandb:
        raise MeshplanError("--wandb-mode needs --wandb")
    if args.wandb is not None and not args.wandb.strip():
        raise MeshplanError("--wandb PROJECT must not be empty")


def validate(argv=None):
    """Parse and check everything that needs no process group; returns (args, config, plan, spec)."""
    from runtime import checkpointing
    from runtime.metrics import peak_flops
    args = build_parser().parse_args(argv)
    config = TrainingConfig.from_args(args)
    _check_args(args)
    plan = Plan.load(args.plan)
    plan.compile = plan.compile or args.compile
    if plan.compile:
        from runtime.compiling import check_compiler
        check_compiler("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
                       else "cpu")
    spec = load_model(args.model)
    from runtime.engine import check_plan
    check_plan(spec, plan)
    if args.gpu:
        from cost_models.hardware import get_gpu
        from planner.fp8 import check_gpu
        check_gpu(get_gpu(args.gpu), plan.precision)   # fp8 on a GPU without it -> one line naming those with it
        peak_flops(args.gpu, plan.precision)     # unknown GPU or precision -> MeshplanError
    if plan.precision == "fp8":
        from runtime.fp8 import require_torchao
        require_torchao()                        # torchao missing -> one line, exit 2
    if args.data != "synthetic":
        if spec.config is None:
            raise MeshplanError(f"{spec.name} trains on its example_inputs: drop --data (it takes token files "
                                f"for zoo models)")
        from runtime.data import MemmapSource
        MemmapSource(args.data, spec.config.vocab, plan.seq, config.seed)
    _check_outputs(args)
    args.resume_point = _resume_point(args, config, spec, plan) if args.checkpoint_dir else (None, None, [])
    return args, config, plan, spec


def _check_outputs(args):
    """Every location the run will write, before any work (runtime.outputs)."""
    from runtime import checkpointing, outputs
    if args.checkpoint_dir:
        outputs.check_directory(args.checkpoint_dir, "--checkpoint-dir")
        from runtime.mesh import launch_env
        if launch_env()[0] == 0:    # rank 0 (or the launcher's pre-check) takes the lock; the others would meet it
            checkpointing.DirectoryLock(args.checkpoint_dir).probe()
        checkpointing.check_directory(args.checkpoint_dir, args.resume)
    if args.log_json:
        if os.path.exists(args.log_json) and not (args.resume or args.force):
            raise MeshplanError(f"{args.log_json!r} already exists: choose another --log-json path, add --force "
                                f"to replace it, or --resume to append to it")
        outputs.check_file(args.log_json, "--log-json")
    if args.tensorboard:
        import importlib.util
        if importlib.util.find_spec("tensorboard") is None:
            raise MeshplanError("--tensorboard needs the tensorboard package: pip install 'meshplan[tensorboard]'")
        outputs.check_directory(args.tensorboard, "--tensorboard")
    if args.wandb:
        from runtime.wandb_log import check_available
        check_available()


def _resume_point(args, config: TrainingConfig, spec, plan: Plan):
    """With --resume / --resume-from: (checkpoint, expected shapes, notes). Refuses a
    checkpoint that is damaged or holds another model (checkpointing.verify) or was saved
    with other training settings (TrainingConfig.check_resume), or for another model
    config or plan (checkpointing.check_job)."""
    from runtime import checkpointing
    where = checkpointing.resume_target(args.checkpoint_dir, args.resume_from) if args.resume else None
    if where is None:
        return None, None, []
    expected = checkpointing.expected_shapes(spec.build("meta"))
    checkpointing.verify(where, expected)
    checkpointing.check_job(where, _model_config(spec), plan.to_dict())
    return where, expected, config.check_resume(checkpointing.saved_training(where), where)


def _model_config(spec) -> dict | None:
    """The model's config as a checkpoint records it (None for a factory model)."""
    from dataclasses import asdict
    return asdict(spec.config) if spec.config is not None else None


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
    """Train; returns the per-step records (on rank 0; other ranks get them too). A SIGTERM
    ends it after a checkpoint with `Preempted` (runtime.preemption)."""
    from runtime import mesh
    from runtime.checkpointing import DirectoryLock
    from runtime.metrics import MetricsSink
    from runtime.preemption import StopRequest

    stop = StopRequest().install()      # before any work: a SIGTERM during setup stops after the first step
    try:
        args, config, plan, spec = validate(argv)
        rank, world, _ = mesh.launch_env()
        if os.environ.get("MESHPLAN_CHECK_ONLY") == "1":
            mesh.check_world(plan, world)
            return []
        lock = DirectoryLock(args.checkpoint_dir) if args.checkpoint_dir and rank == 0 else None
        if lock:
            lock.acquire()              # held until this process ends: one job per checkpoint directory
        try:
            sink = MetricsSink(rank, config.steps, args.log_json, args.tensorboard, args.resume, args.quiet,
                               replace=args.force and not args.resume, wandb=_wandb(args, plan, spec, config) if rank == 0 else None)
            rt = mesh.setup(plan, args.device)
            records, completed, stopped = [], False, None
            try:
                stopped = _train(args, config, plan, spec, rt, sink, records, stop)
                completed = True        # a stop too: every rank stopped after the same step
            except MeshplanError as exc:
                exc.after_setup = True      # may be this rank's alone: it reports it
                if getattr(exc, "rank0_reports", False) and rt.distributed:
                    if rank == 0:           # every rank has it: rank 0 says it before anyone leaves
                        _report(exc)
                    torch.distributed.barrier()
                raise
            finally:
                sink.close()
                mesh.teardown(rt, completed)
            if stopped is not None:     # raised here, after teardown: its traceback would hold the model
                stopped.report(rank)    # before the SIGTERM handler goes: torchrun may signal us again now
                raise stopped
            return records
        finally:
            if lock:
                lock.release()
    finally:
        stop.restore()


def _wandb(args, plan, spec, config):
    if not args.wandb:
        return None
    from runtime.wandb_log import WandbLogger
    return WandbLogger(args.wandb, args.wandb_mode or "offline", None,
                       dict(model=spec.name, plan=plan.to_dict(), training=config.to_dict()))


def _train(args, config, plan, spec, rt, sink, records, stop):
    """The training loop; appends each step's record to `records`. Returns None, or the
    `Preempted` to raise once the process group is down when a SIGTERM stopped the run."""
    from runtime import checkpointing
    from runtime.cadence import Cadence
    from runtime.data import Loader, make_source
    from runtime.engine import Engine
    from runtime.metrics import flops_per_token, gpu_for_device, peak_flops, peak_memory_bytes
    from runtime.preemption import Preempted
    engine = Engine(spec, plan, rt, config)
    gpu = args.gpu or gpu_for_device(rt.device)
    # MFU against the 16-bit peak under fp8 too, as the simulator and torchtitan report it
    peak = peak_flops(gpu, compute_precision(plan.precision), strict=bool(args.gpu))
    if spec.config is None:
        from runtime.modules import ExampleSource
        loader = ExampleSource(engine.factory.maker, spec.name, plan.global_batch, plan.seq, config.seed, plan.dp,
                               rt.coords["dp"], rt.device)
        fpt = _factory_flops_per_token(spec, plan) if peak else None
    else:
        source = make_source(args.data, spec.config.vocab, plan.seq, config.seed)
        loader = Loader(source, plan.global_batch, plan.micro_batch, plan.dp, rt.coords["dp"], rt.device)
        fpt = flops_per_token(spec.config, engine.params_total, plan.seq)

    ckpt = cadence = None
    if args.checkpoint_dir:
        def saved_line(step, where, save_s, blocked_s):
            waited = f", training waited {blocked_s:.3g} s" if blocked_s < save_s else ""
            sink.note(f"saved checkpoint step {step} to {where} in {save_s:.3g} s{waited}")
        ckpt = checkpointing.Checkpointer(args.checkpoint_dir, [engine.parts[v] for v in sorted(engine.parts)],
                                          engine.optimizers, rt, asynchronous=args.async_checkpoint,
                                          report=saved_line)
        cadence = Cadence(args.checkpoint_every, config.steps, rt.world_size, args.failure_rate_per_gpu_hour)
    start = 0
    if args.resume:
        where, expected, notes = args.resume_point
        if not args.checkpoint_dir:
            sink.note("--resume without --checkpoint-dir: nothing to resume from, starting from step 0 "
                      "(and saving no checkpoint)")
        elif where is None:
            sink.note(f"no checkpoint in {args.checkpoint_dir}: starting from step 0")
        else:
            for note in notes:
                sink.note(note)
            state = ckpt.load(where, {"step": 0, "data_position": 0, **engine.scaler_state()}, expected)
            start = int(state["step"])
            loader.load_state_dict({"position": state["data_position"]})
            engine.set_schedule_step(start)
            engine.load_scaler_state(state)
            sink.note(f"resumed from {where} (step {start})")
        sink.drop_after(start)
    ep = f" (ep {plan.ep})" if plan.ep > 1 else ""
    cp = f" cp {plan.cp}" if plan.cp > 1 else ""
    sink.note(f"{spec.name}: {engine.params_total:,} parameters | dp {plan.dp}{ep}{cp} tp {plan.tp} pp {plan.pp} "
              f"zero {plan.zero} {plan.precision}{' compiled' if plan.compile else ''} | {plan.grad_accum} "
              f"micro-batch(es) of {plan.micro_batch} "
              f"x {plan.seq} tokens per dp rank per step | {rt.world_size} process(es) on {rt.device.type}")
    meta = dict(model=spec.name, model_config=_model_config(spec), plan=plan.to_dict(), world_size=rt.world_size,
                zero=plan.zero, seed=config.seed, global_batch=plan.global_batch, training=config.to_dict())

    def train_state():
        return {"step": step, "data_position": loader.position, **engine.scaler_state()}

    stopped = None
    for step in range(start + 1, config.steps + 1):
        t0 = time.perf_counter()
        inputs, targets = loader.next_batch()
        out = engine.step(inputs, targets, plan.micro_batch)
        # One all-reduce (MAX) per step: the peak memory, whether any rank got SIGTERM, and
        # whether rank 0's clock says a --checkpoint-every auto save is due.
        due = bool(cadence and rt.rank == 0 and cadence.due(step))
        flags = torch.tensor([peak_memory_bytes(rt.device), stop.requested, due], dtype=torch.float64,
                             device=rt.device)
        if rt.distributed:
            torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
        dt = time.perf_counter() - t0
        tokens_per_s = plan.global_batch * plan.seq / dt
        rec = dict(step=step, loss=out["loss"], lr=out["lr"], grad_norm=out["grad_norm"],
                   tokens_per_s=tokens_per_s, step_time_s=dt,
                   mfu=fpt * tokens_per_s / (peak * rt.world_size) if peak and fpt else None,
                   peak_mem_bytes=int(flags[0].item()), skipped=out["skipped"])
        records.append(rec)
        sink.log(rec)
        if ckpt:
            ckpt.poll()
            if flags[2].item() or (cadence.every != "auto" and cadence.due(step)):
                line = cadence.saved(ckpt.save(step, train_state(), meta))
                if line:
                    sink.note(line)
        _fault_injection(step, rt.rank)
        if flags[1].item() and step < config.steps:
            stopped = step
            break
    if ckpt:
        if stopped is not None and ckpt.last_step != stopped:
            ckpt.save(stopped, train_state(), meta, asynchronous=False)
        ckpt.close()
    if not args.quiet and rt.rank == 0:
        from runtime.summary import summary_line
        sink.note(summary_line(records, plan, spec, gpu, rt.world_size, rt.device.type))
    return None if stopped is None else Preempted(stopped, ckpt.last_saved if ckpt else None, stop.name or "SIGTERM")


def _factory_flops_per_token(spec, plan) -> float:
    """A factory model's forward + backward FLOPs per token (per sample with seq 1), as
    FlopCounterMode counts one micro-batch on the meta device (planner.trace)."""
    from planner.trace import flop_counter_reference
    fwd, bwd = flop_counter_reference(spec, plan.micro_batch, plan.seq)
    return (fwd + bwd) / (plan.micro_batch * plan.seq)


def _report(exc: MeshplanError):
    """The one line on stderr (once); also appended to MESHPLAN_ERROR_FILE when the launcher
    set one, so that `meshplan train` exits 2 where torchrun turns a rank's 2 into 1."""
    if getattr(exc, "reported", False):
        return
    exc.reported = True
    line = f"meshplan: error: {exc}"
    print(line, file=sys.stderr, flush=True)
    if os.environ.get("MESHPLAN_ERROR_FILE"):
        try:
            with open(os.environ["MESHPLAN_ERROR_FILE"], "a") as f:
                f.write(line + "\n")
        except OSError:
            pass


def main(argv=None) -> int:
    from runtime.preemption import PREEMPTED_EXIT, Preempted
    from runtime.lifeline import die_with_agent
    die_with_agent()        # a torchrun worker ends with torchrun's agent (again: run as a library too)
    try:
        run(argv)
        return 0
    except MeshplanError as exc:
        from runtime.mesh import launch_env
        rank0 = launch_env()[0] == 0
        # checks before setup and errors every rank shares (rank0_reports): rank 0 speaks
        if rank0 or (getattr(exc, "after_setup", False) and not getattr(exc, "rank0_reports", False)):
            _report(exc)
        return 2
    except Preempted:                   # run() has reported it
        return PREEMPTED_EXIT
    except KeyboardInterrupt:
        print("meshplan: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
