"""Our single-GPU runtime step vs the plain PyTorch loop of shared/reference/h100/measure.py.

Both train the same zoo model (planner.models.Decoder, initialised from the same seed)
on the same fixed batch: the plain loop is measure.py's step (autocast, loss.backward,
AdamW(fused=True) on CUDA, GradScaler for fp16, zero_grad(set_to_none=True)); the
runtime step is runtime.engine.Engine.step for a one-device plan (dp = tp = pp = 1),
which adds the global gradient-norm computation and clipping (--clip, default 1.0 as in
`meshplan train`; --clip 0 skips the clipping but still computes the norm it logs) and
the loss all-reduce-free bookkeeping. Prints median step times, their ratio, and
peak memory of each, plus one JSON line.

--compile adds a compiled arm to each: the plain loop with `block.compile(fullgraph=True)` on
every block (after its checkpoint wrapper: torchtitan's apply_compile), and the runtime with
the plan's `compile` (`meshplan train --compile`, runtime.compiling); the warm-up steps take
the compilation. The JSON line then also holds both compiled step times, their ratio and each
loop's compile speed-up (eager over compiled step time: what `meshplan simulate --compile`
predicts against the eager step).

    python benchmarks/runtime_vs_plain.py                      # gpt2-124m, seq 1024, mb 4, bf16 on CUDA
    python benchmarks/runtime_vs_plain.py --compile            # ... and both loops compiled
    python benchmarks/runtime_vs_plain.py --device cpu --model gpt-tiny --seq 64 --micro-batch 2 --precision fp32
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # run from a checkout without installing

import torch  # noqa: E402

from planner.plan import PRECISIONS, Plan, low_precision_dtype  # noqa: E402
from planner.zoo import load_model  # noqa: E402


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_peak(device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _time(step, device, warm, steps):
    for _ in range(warm):
        step()
    _sync(device)
    _reset_peak(device)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2], _peak(device)


def plain(spec, batch, args, device, compiled=False):
    """measure.py's loop on our Decoder (`compiled`: each block torch.compile'd)."""
    model = spec.build("cpu").init_weights(args.seed).to(device)
    if args.checkpoint == "full":      # measure.py: checkpoint(block, x, use_reentrant=False) per block
        from torch.utils.checkpoint import checkpoint
        for block in model.blocks.values():
            block.forward = (lambda f: lambda x: checkpoint(f, x, use_reentrant=False))(block.forward)
    if compiled:                       # torchtitan's apply_compile: after the checkpoint wrapper
        for block in model.blocks.values():
            block.compile(fullgraph=True)
    fused = device.type == "cuda"
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, **(dict(fused=True) if fused else {}))
    dtype = low_precision_dtype(args.precision)
    scaler = torch.amp.GradScaler(device.type) if args.precision == "fp16" else None
    idx, tgt = batch

    def step():
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = model(idx, tgt)
        if scaler:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        else:
            loss.backward()
            opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    return _time(step, device, args.warmup, args.steps)     # model and optimizer are freed on return


def runtime(spec, batch, args, device, compiled=False):
    from runtime import mesh
    from runtime.config import TrainingConfig
    from runtime.engine import Engine
    plan = Plan(micro_batch=args.micro_batch, global_batch=args.micro_batch, seq=args.seq,
                precision=args.precision, checkpoint=[args.checkpoint] * spec.config.layers, compile=compiled)
    for var in ("RANK", "WORLD_SIZE"):
        os.environ.pop(var, None)
    rt = mesh.setup(plan, device.type)
    engine = Engine(spec, plan, rt, TrainingConfig(seed=args.seed, lr=1e-4, weight_decay=0.0, warmup=0,
                                                   steps=10**6, min_lr=1e-4, clip=args.clip))
    idx, tgt = batch
    out = _time(lambda: engine.step(idx, tgt, plan.micro_batch), device, args.warmup, args.steps)
    mesh.teardown(rt)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="gpt2-124m")
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--precision", default="bf16", choices=PRECISIONS)
    ap.add_argument("--checkpoint", default="none", choices=["none", "full"],
                    help="full: every block recomputed in both loops (measure.py's ckpt=True)")
    ap.add_argument("--clip", type=float, default=1.0)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cuda", "cpu"])
    ap.add_argument("--compile", action="store_true",
                    help="also time both loops with every block torch.compile'd (runtime: the plan's compile)")
    args = ap.parse_args(argv)
    device = torch.device("cuda", 0) if args.device == "cuda" else torch.device("cpu")
    if args.compile:
        from cost_models.errors import MeshplanError
        from runtime.compiling import check_compiler
        try:
            check_compiler(device.type)     # no C++ compiler (CPU) or triton (CUDA): one line, before any work
        except MeshplanError as exc:
            sys.exit(f"runtime_vs_plain: {exc}")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    spec = load_model(args.model)
    gen = torch.Generator().manual_seed(args.seed)
    V = spec.config.vocab
    batch = tuple(torch.randint(0, V, (args.micro_batch, args.seq), generator=gen).to(device) for _ in range(2))

    def fresh():
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()

    t_plain, m_plain = plain(spec, batch, args, device)
    fresh()
    t_rt, m_rt = runtime(spec, batch, args, device)
    rec = dict(model=args.model, seq=args.seq, micro_batch=args.micro_batch, precision=args.precision,
               checkpoint=args.checkpoint, clip=args.clip, device=str(torch.cuda.get_device_name(device))
               if device.type == "cuda" else "cpu", torch=torch.__version__,
               plain_step_s=t_plain, runtime_step_s=t_rt, step_time_ratio=t_rt / t_plain,
               plain_peak_bytes=m_plain, runtime_peak_bytes=m_rt)
    if args.compile:
        fresh()
        tc_plain, mc_plain = plain(spec, batch, args, device, compiled=True)
        fresh()
        tc_rt, mc_rt = runtime(spec, batch, args, device, compiled=True)
        rec.update(plain_compiled_step_s=tc_plain, runtime_compiled_step_s=tc_rt,
                   compiled_step_time_ratio=tc_rt / tc_plain, plain_compile_speedup=t_plain / tc_plain,
                   runtime_compile_speedup=t_rt / tc_rt, plain_compiled_peak_bytes=mc_plain,
                   runtime_compiled_peak_bytes=mc_rt)
    mem = "peak allocated" if device.type == "cuda" else "peak RSS (process-wide, cumulative)"
    print(f"{args.model} seq {args.seq} mb {args.micro_batch} {args.precision} on {rec['device']}")
    print(f"  plain loop   : {1e3 * t_plain:9.2f} ms/step   {mem} {m_plain / 2**30:.2f} GiB")
    print(f"  meshplan step: {1e3 * t_rt:9.2f} ms/step   {mem} {m_rt / 2**30:.2f} GiB")
    print(f"  step-time ratio runtime/plain = {t_rt / t_plain:.3f}")
    if args.compile:
        print(f"  plain loop, compiled   : {1e3 * tc_plain:9.2f} ms/step   {mem} {mc_plain / 2**30:.2f} GiB "
              f"(compile speed-up {t_plain / tc_plain:.3f})")
        print(f"  meshplan step, compiled: {1e3 * tc_rt:9.2f} ms/step   {mem} {mc_rt / 2**30:.2f} GiB "
              f"(compile speed-up {t_rt / tc_rt:.3f})")
        print(f"  compiled step-time ratio runtime/plain = {tc_rt / tc_plain:.3f}")
    print(json.dumps(rec))
    return rec


if __name__ == "__main__":
    main()
