"""`meshplan` command line: one subcommand per use, each a thin layer over the library.

Every user mistake surfaces as a `MeshplanError`; `main` prints it as one line on
stderr and returns exit code 2. Nothing here writes over a user's file.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from dataclasses import replace

from rich.console import Console
from rich.table import Table

from cost_models import GPUS, SYSTEMS, MeshplanError, parse_cluster
from cost_models.units import GB, GIB, TERA
from planner.models import count_parameters
from planner.plan import CHECKPOINT_MODES, PRECISIONS, SCHEDULES, Plan, check_new_path
from planner.tables import console_for
from planner.zoo import PRESETS, load_model


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage mistake in one line (exit code 2), no usage dump."""

    def error(self, message):
        raise MeshplanError(f"{message} (see `{self.prog} --help`)")


def _describe(args) -> int:
    spec = load_model(args.model)
    model = spec.build("meta")
    params = count_parameters(model)
    cluster = parse_cluster(args.cluster)
    if args.json:
        print(json.dumps({"model": spec.name, "params": params,
                          "config": spec.config.to_dict() if spec.config else None,
                          "cluster": cluster.to_dict()}))
        return 0
    console = Console()
    console.print(f"[bold]{spec.name}[/bold]: {params:,} parameters ({parameter_count(params)})")
    if spec.config:
        c = spec.config
        console.print(f"  {c.arch}: {c.layers} layers, hidden {c.hidden}, {c.heads} heads "
                      f"({c.kv_heads} kv), ffn {c.ffn}, vocab {c.vocab}, max_seq {c.max_seq}, "
                      f"tied embeddings: {c.tie_embeddings}")
    console.print(f"[bold]cluster[/bold] {cluster.summary()}")
    return 0


def parameter_count(count: int) -> str:
    """A parameter count in billions, or millions below a billion (a tiny model is not "0.00 B")."""
    return f"{count / 1e9:.2f} B" if count >= 1e9 else f"{count / 1e6:.2f} M"


def _models(args) -> int:
    rows = []
    for name, cfg in PRESETS.items():
        params = count_parameters(load_model(name).build("meta"))
        rows.append(dict(name=name, arch=cfg.arch, layers=cfg.layers, hidden=cfg.hidden,
                         heads=cfg.heads, kv_heads=cfg.kv_heads, ffn=cfg.ffn, vocab=cfg.vocab,
                         params=params))
    if args.json:
        print(json.dumps(rows))
        return 0
    table = Table(title="model presets")
    for col in ("name", "arch", "layers", "hidden", "heads", "kv_heads", "ffn", "vocab", "params"):
        table.add_column(col, justify="left" if col in ("name", "arch") else "right", no_wrap=col == "name")
    for r in rows:
        table.add_row(*[parameter_count(r[k]) if k == "params" else str(r[k]) for k in r])
    console_for(table).print(table)
    return 0


def _gpus(args) -> int:
    if args.json:
        print(json.dumps([dict(name=g.name, display_name=g.display_name, memory_bytes=g.memory_bytes,
                               peak_flops=g.peak_flops, memory_bw_bytes_per_s=g.memory_bw_bytes_per_s,
                               nvlink_bw_bytes_per_s=g.nvlink_bw_bytes_per_s, tdp_w=g.tdp_w,
                               price_usd_per_hour=g.price_usd_per_hour) for g in GPUS.values()]))
        return 0
    table = Table(title="GPU catalogue (dense peaks; link bandwidth unidirectional per GPU)")
    for col in ("name", "memory GiB", "bf16 TFLOP/s", "fp32 TFLOP/s", "HBM GB/s", "NVLink GB/s",
                "TDP W", "$/hour"):
        table.add_column(col, justify="left" if col == "name" else "right", no_wrap=col == "name")
    for g in GPUS.values():
        bf16 = g.peak_flops.get("bf16", g.peak_flops.get("fp16"))
        table.add_row(g.name, f"{g.memory_bytes / GIB:.0f}", f"{bf16 / TERA:.0f}" if bf16 else "-",
                      f"{g.peak_flops['fp32'] / TERA:.1f}", f"{g.memory_bw_bytes_per_s / GB:.0f}",
                      f"{g.nvlink_bw_bytes_per_s / GB:.0f}", f"{g.tdp_w:.0f}", f"{g.price_usd_per_hour:.2f}")
    console = console_for(table)
    console.print(table)
    console.print("named systems: " + "; ".join(f"{k} ({v.description})" for k, v in SYSTEMS.items()))
    return 0


def _validate(args) -> int:
    plan = Plan.load(args.plan)
    num_layers = world = per_node = None
    model_text = args.model or plan.model
    cluster_text = args.cluster or plan.cluster
    if model_text:
        spec = load_model(model_text)
        num_layers = spec.config.layers if spec.config else None
    if cluster_text:
        cluster = parse_cluster(cluster_text)
        world, per_node = cluster.world_size, cluster.gpus_per_node
    plan.check_fits(num_layers, world, per_node)
    print(f"plan {args.plan} is valid: dp={plan.dp} tp={plan.tp} pp={plan.pp} zero={plan.zero}, "
          f"{plan.grad_accum} micro-batch(es) of {plan.micro_batch} per step")
    return 0


def _plan_from_args(args) -> Plan:
    """A Plan from `--plan FILE` or from the simulate flags (every degree given)."""
    if args.plan:
        return Plan.load(args.plan)
    missing = [flag for flag, value in (("--cluster", args.cluster), ("--global-batch", args.global_batch))
               if value is None]
    if missing:
        raise MeshplanError(f"give {' and '.join(missing)} (or --plan FILE)")
    return Plan(dp=args.dp, tp=args.tp, pp=args.pp, zero=args.zero, micro_batch=args.micro_batch,
                global_batch=args.global_batch, seq=args.seq, precision=args.precision,
                schedule=args.schedule, interleave=args.interleave,
                sequence_parallel=args.sequence_parallel, model=args.model, cluster=args.cluster)


def _with_layers(plan: Plan, spec, mode: str | None) -> Plan:
    """Expand a uniform --checkpoint mode to the model's layers (validated as a plan's)."""
    if mode and mode != "none" and spec.config is not None:
        return replace(plan, checkpoint=[mode] * spec.config.layers)
    return plan


def _simulate_one(case: dict):
    from planner.simulate import simulate
    model = case.get("model")
    if model is None:
        raise MeshplanError("each case needs a model")
    spec = load_model(model)
    keys = {"dp", "tp", "pp", "zero", "micro_batch", "global_batch", "seq", "precision", "schedule",
            "interleave", "sequence_parallel"}
    unknown = sorted(set(case) - keys - {"model", "cluster", "checkpoint"})
    if unknown:
        raise MeshplanError(f"unknown key(s) {unknown}")
    if "cluster" not in case:
        raise MeshplanError("each case needs a cluster")
    plan = Plan(**{k: v for k, v in case.items() if k in keys})
    plan = _with_layers(plan, spec, case.get("checkpoint"))
    return simulate(plan, spec, case["cluster"])


def _simulate(args) -> int:
    if args.batch:
        return _simulate_batch(args.batch)
    plan = _plan_from_args(args)
    model_text = args.model or plan.model
    cluster_text = args.cluster or plan.cluster
    if not model_text or not cluster_text:
        raise MeshplanError("give --model and --cluster (the plan file names neither)")
    from planner.simulate import simulate
    spec = load_model(model_text)
    if not args.plan:
        plan = _with_layers(plan, spec, args.checkpoint)
    cluster = parse_cluster(cluster_text)
    from cost_models.calibration import calibration_line
    from cost_models.models_for import cost_models_for
    compute, comm, calibration = cost_models_for(cluster, args.calibration)
    result = simulate(plan, spec, cluster, compute=compute, comm=comm)
    if args.trace:
        _write_new(args.trace, json.dumps({"traceEvents": result.timeline.to_chrome_trace()}))
    for target, draw in ((args.timeline, "timeline_png"), (args.memory_plot, "memory_png")):
        if target:
            check_new_path(target)
            from planner import plots
            getattr(plots, draw)(result, target)
    if args.json:
        print(json.dumps(result.to_dict()))
        return 0
    _print_result(plan, result)
    print(calibration_line(calibration))
    return 0


def _write_new(path: str, text: str):
    check_new_path(path)
    from pathlib import Path
    Path(path).write_text(text)


def format_phases(phases: dict) -> str:
    """'compute 8.178 s (recomputation 0.412 s), exposed tensor-parallel communication ...'"""
    from planner.simulate import PHASE_WORDS

    parts = [f"{PHASE_WORDS.get(k, k)} {v:.3f} s" for k, v in phases.items() if k != "recompute_s"]
    if phases.get("recompute_s"):
        parts[0] += f" (recomputation {phases['recompute_s']:.3f} s)"
    return ", ".join(parts)


def _print_result(plan: Plan, result) -> None:
    table = Table(title=f"memory per GPU (capacity {result.capacity_bytes / GIB:.1f} GiB)")
    for col in ("stage", "params", "grads", "optimizer", "activations", "transient", "allocated", "reserved"):
        table.add_column(col, justify="right")
    for m in result.stages:
        table.add_row(str(m.stage), *[f"{v / GIB:.2f}" for v in (
            m.params_bytes, m.grads_bytes, m.optimizer_bytes, m.activations_bytes, m.transient_bytes,
            m.peak_allocated_bytes, m.peak_reserved_bytes)])
    console = console_for(table)
    console.print(f"[bold]dp={plan.dp} tp={plan.tp} pp={plan.pp}[/bold] zero={plan.zero} "
                  f"micro-batch {plan.micro_batch} x {plan.grad_accum} accumulation, {plan.precision}, "
                  f"{plan.schedule}")
    console.print(f"step {result.step_time_s:.3f} s, {result.tokens_per_s:,.0f} tokens/s, "
                  f"{result.tflops_per_gpu:.1f} TFLOP/s per GPU, MFU {100 * result.mfu:.1f}%")
    console.print("phases: " + format_phases(result.phases))
    console.print(table)
    console.print("fits" if result.fits else "[red]does not fit[/red]")


def _simulate_batch(path: str) -> int:
    """One JSON case a line in, one JSON result a line out; a bad case gets {"error": ...}."""
    from pathlib import Path
    source = Path(path)
    if not source.is_file():
        raise MeshplanError(f"cases file {path!r} does not exist")
    for number, line in enumerate(source.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            case = json.loads(line)
            if not isinstance(case, dict):
                raise MeshplanError("a case must be a JSON object")
            print(json.dumps(_simulate_one(case).to_dict()), flush=True)
        except json.JSONDecodeError as exc:
            print(json.dumps({"error": f"line {number}: not valid JSON: {exc}"}), flush=True)
        except MeshplanError as exc:
            print(json.dumps({"error": f"line {number}: {exc}"}), flush=True)
    return 0


def _launch_train(argv: list) -> int:
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


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="meshplan", description="Plan, simulate and run parallel PyTorch training.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("describe", help="a model's parameter count and a cluster's summary")
    p.add_argument("--model", required=True, help="preset name, config .json, or file.py:factory")
    p.add_argument("--cluster", required=True, help="GPU:NODESxGPUS, a named system, or a .yaml/.json file")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=_describe)

    p = sub.add_parser("models", help="list the model presets")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=_models)

    p = sub.add_parser("gpus", help="list the GPU catalogue and named systems")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=_gpus)

    p = sub.add_parser("validate", help="check a plan file (and its fit to a model and cluster)")
    p.add_argument("--plan", required=True)
    p.add_argument("--model")
    p.add_argument("--cluster")
    p.set_defaults(handler=_validate)

    p = sub.add_parser("simulate", help="predict step time and per-GPU memory of one plan")
    p.add_argument("--model")
    p.add_argument("--cluster")
    p.add_argument("--plan", help="a plan .json instead of the flags below")
    p.add_argument("--batch", help="cases .jsonl: one JSON object of these flags a line")
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--global-batch", type=int)
    p.add_argument("--micro-batch", type=int, default=1)
    p.add_argument("--dp", type=int, default=1)
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--zero", type=int, default=0)
    p.add_argument("--checkpoint", choices=CHECKPOINT_MODES, default="none",
                   help="recompute every block: attention (its attention core, Megatron-LM's selective), "
                        "selective (op-level, torchtitan-like) or full")
    p.add_argument("--precision", choices=PRECISIONS, default="bf16")
    p.add_argument("--schedule", choices=SCHEDULES, default="1f1b")
    p.add_argument("--interleave", type=int, default=1)
    p.add_argument("--sequence-parallel", action="store_true")
    p.add_argument("--trace", help="write the pipeline timeline as Chrome/Perfetto trace JSON")
    p.add_argument("--timeline", help="write a Gantt chart of the pipeline timeline (.png)")
    p.add_argument("--memory-plot", help="write per-stage memory bars against capacity (.png)")
    p.add_argument("--calibration", help="a calibration JSON from `meshplan profile` for the cluster's GPU")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=_simulate)

    from planner import plan_cli
    p = sub.add_parser("plan", help="search the best plans (degrees, ZeRO, micro-batch, schedule, stages, "
                                    "checkpointing) for a model on a cluster")
    plan_cli.add_arguments(p)
    p.set_defaults(handler=plan_cli.run)

    from planner import compare
    p = sub.add_parser("compare", help="plan a model on several clusters: time-to-train, GPU-hours, $, energy, CO2")
    compare.add_arguments(p)
    p.set_defaults(handler=compare.run)

    from cost_models import profile_cli
    p = sub.add_parser("profile", help="measure this machine's GEMMs, attention, copies (and collectives) "
                                       "into a calibration JSON")
    profile_cli.add_arguments(p)
    p.set_defaults(handler=profile_cli.run)

    # Listed for --help; main() forwards everything after `train` to runtime.train.
    sub.add_parser("train", help="train a model with a plan: [--nproc-per-node N] then "
                                 "`python -m runtime.train --help` arguments", add_help=False)
    return parser


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        if argv[:1] == ["train"]:
            return _launch_train(argv[1:])
        args = build_parser().parse_args(argv)
        return args.handler(args)
    except MeshplanError as exc:
        print(f"meshplan: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("meshplan: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
