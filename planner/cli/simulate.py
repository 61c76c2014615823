"""`meshplan simulate`: one plan's step time and per-GPU memory, from flags, a plan file or a batch.

`--batch FILE` reads one JSON case (these flags as keys) a line and prints one JSON result
a line; a bad case gets `{"error": ...}` and the others still run.
"""
from __future__ import annotations

import argparse
import json
from dataclasses import replace

from cost_models import MeshplanError, parse_cluster
from cost_models.inputs import parse_json
from cost_models.units import GIB
from planner.cli.flags import (CALIBRATION_HELP, CLUSTER_HELP, DEFAULT_SEQ, JSON_HELP, MODEL_HELP, add_batch_flags,
                               add_engine_flags, add_moe_flags, add_plan_flags, check_distinct, check_image_path,
                               engine_args, flag, moe_imbalance, pinned, with_defaults)
from planner.cli import outputs
from planner.fp8 import precision_words
from planner.cli.tables import add_wide_flag, console_for, new_table, numbers_column
from planner.interop.cli import add_from_flag
from cost_models.inputs import check_output_path
from planner.engines.base import option_text
from planner.plan import Plan, degree_words
from planner.zoo import load_model

HELP = "predict step time and per-GPU memory of one plan"
PLAN_FIELDS = ("micro_batch", "dp", "tp", "pp", "cp", "ep", "zero", "checkpoint", "precision", "fp8_recipe",
               "schedule", "interleave", "sequence_parallel", "compile")
_PLAN_ARGS = tuple(k for k in PLAN_FIELDS if k != "checkpoint")   # the Plan's own (checkpoint: per layer)
FIELD_HELP = {"checkpoint": "recompute every block: attention (its attention core, Megatron-LM's selective), "
                            "selective (op-level, torchtitan-like) or full"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help=MODEL_HELP + " (default: the plan file's)")
    p.add_argument("--cluster", help=CLUSTER_HELP + " (default: the plan file's)")
    p.add_argument("--plan", help="a plan .json instead of the flags below")
    p.add_argument("--batch", help="cases .jsonl: one JSON object of these flags a line")
    add_from_flag(p)
    add_batch_flags(p, required=False, seq_default=None)
    add_plan_flags(p, PLAN_FIELDS, defaults=True, help=FIELD_HELP)
    add_engine_flags(p)
    add_moe_flags(p)
    p.add_argument("--trace", help="write the pipeline timeline as Chrome/Perfetto trace JSON")
    p.add_argument("--timeline", help="write a Gantt chart of the pipeline timeline (.png)")
    p.add_argument("--memory-plot", help="write per-stage memory bars against capacity (.png)")
    p.add_argument("--calibration", help=CALIBRATION_HELP)
    p.add_argument("--json", action="store_true", help=JSON_HELP)
    outputs.add_html_flag(p)
    add_wide_flag(p)


# What --plan fixes (a flag beside it would be ignored), and what --batch's cases carry.
_JOB_FIELDS = ("global_batch", "seq") + PLAN_FIELDS + ("engine", "engine_option")
_OUTPUTS = ("trace", "timeline", "memory_plot", "html")


def _check_flags(args) -> None:
    """Refuse flags that would be ignored, and check every output before any work."""
    if args.from_ and (args.batch or args.plan):
        raise MeshplanError(f"--from cannot be combined with {'--batch' if args.batch else '--plan'}: give one")
    if args.batch:
        # --html is the batch's one output: a page of every case (planner.report.pages.batch_report)
        ignored = [flag(k) for k in ("model", "cluster", "plan", *_JOB_FIELDS, *_OUTPUTS, "calibration",
                                     "moe_imbalance")
                   if getattr(args, k) is not None and k != "html"]
        if ignored:
            raise MeshplanError(f"{', '.join(ignored)} cannot be combined with --batch: each case line carries "
                                f"its own fields")
    elif args.plan:
        ignored = [flag(k) for k in _JOB_FIELDS if getattr(args, k) is not None]
        if ignored:
            raise MeshplanError(f"{', '.join(ignored)} cannot be combined with --plan, which fixes them: "
                                f"edit the plan file or drop --plan")
    check_distinct(args, _OUTPUTS)
    outputs.check_html(args)
    if args.trace:
        check_output_path(args.trace, overwrite=args.force, force_hint=True)
    for target in (args.timeline, args.memory_plot):
        if target:
            check_image_path(target, overwrite=args.force)


def _plan_from_args(args) -> Plan:
    """A Plan from `--plan FILE` or from the simulate flags (every degree given)."""
    if args.plan:
        return Plan.load(args.plan)
    missing = [flag for flag, value in (("--cluster", args.cluster), ("--global-batch", args.global_batch))
               if value is None]
    if missing:
        raise MeshplanError(f"give {' and '.join(missing)} (or --plan FILE)")
    fields = with_defaults(pinned(args, _PLAN_ARGS), _PLAN_ARGS)
    return Plan(**fields, **engine_args(args), global_batch=args.global_batch, seq=args.seq or DEFAULT_SEQ,
                model=args.model, cluster=args.cluster)


def _with_layers(plan: Plan, spec, mode) -> Plan:
    """Expand a uniform --checkpoint mode to the model's layers (validated as a plan's)."""
    if mode is None or mode == "none":
        return plan
    if spec.config is None:
        raise MeshplanError(f"checkpoint {mode} needs a preset or JSON model (one entry per block); "
                            f"{spec.name} is a factory: give a plan file with a per-block checkpoint list")
    return replace(plan, checkpoint=[mode] * spec.config.layers)


_CASE_KEYS = {"dp", "tp", "pp", "cp", "ep", "zero", "micro_batch", "global_batch", "seq", "precision", "fp8_recipe",
              "schedule", "interleave", "sequence_parallel", "offload_optimizer", "compile", "engine", "engine_options"}


def _simulate_one(case: dict):
    from cost_models.cluster import cluster_from_dict
    from planner.simulate import simulate
    unknown = sorted(map(str, set(case) - _CASE_KEYS - {"model", "cluster", "checkpoint", "moe_imbalance"}))
    if unknown:
        raise MeshplanError(f"unknown key(s) {unknown}")
    for key in ("model", "cluster"):
        if case.get(key) is None:
            raise MeshplanError(f"each case needs a {key}")
    if not isinstance(case["model"], (str, dict)) or not isinstance(case["cluster"], (str, dict)):
        raise MeshplanError("a case's model and cluster are each a name, a file path or a config object")
    spec = load_model(case["model"])
    cluster = case["cluster"]
    cluster = cluster_from_dict(cluster, "the case's cluster") if isinstance(cluster, dict) else parse_cluster(cluster)
    plan = Plan(**{k: v for k, v in case.items() if k in _CASE_KEYS})
    plan = _with_layers(plan, spec, case.get("checkpoint"))
    imbalance = case.get("moe_imbalance", 1.0)
    return spec, cluster, plan, simulate(plan, spec, cluster, moe_imbalance=1.0 if imbalance is None else imbalance)


def run(args) -> int:
    _check_flags(args)
    if args.batch:
        return _simulate_batch(args)
    imbalance = moe_imbalance(args)
    if args.from_:
        from planner.interop.cli import simulate_job
        plan, imported_spec = simulate_job(args)
    else:
        plan, imported_spec = _plan_from_args(args), None
    model_text = args.model or plan.model
    cluster_text = args.cluster or plan.cluster
    if not model_text or not cluster_text:
        raise MeshplanError("give --model and --cluster (the plan file names neither)")
    from planner.simulate import simulate
    spec = imported_spec or load_model(model_text)
    if not args.plan and not args.from_:
        plan = _with_layers(plan, spec, args.checkpoint)
    cluster = parse_cluster(cluster_text)
    from cost_models.calibration import calibration_line
    from cost_models.models_for import cost_models_for
    compute, comm, calibration = cost_models_for(cluster, args.calibration)
    with outputs.progress(f"simulating {spec.name} on {cluster.name}"):
        result = simulate(plan, spec, cluster, compute=compute, comm=comm, moe_imbalance=imbalance)
    from planner.cli.simulate_outputs import write_outputs
    experts = bool(getattr(spec.config, "experts", 0)) if spec.config is not None else False
    line = calibration_line(calibration, experts, plan.precision == "fp8")
    misfit = write_outputs(args, plan, result, spec, cluster, compute, comm, line)
    if args.json:
        print(json.dumps({**result.to_dict(), "plan": plan.to_dict(), **({"does_not_fit": misfit} if misfit else {})}))
        return 0
    _print_result(plan, result, args.wide, misfit).print(line, highlight=False)
    return 0


def format_phases(phases: dict) -> str:
    """'compute 8.178 s (recomputation 0.412 s), exposed tensor-parallel communication ...'"""
    from planner.simulate import PHASE_WORDS

    parts = [f"{PHASE_WORDS.get(k, k)} {v:.3f} s" for k, v in phases.items() if k != "recompute_s"]
    if phases.get("recompute_s"):
        parts[0] += f" (recomputation {phases['recompute_s']:.3f} s)"
    return ", ".join(parts)


def _print_result(plan: Plan, result, wide: bool = False, misfit: str | None = None):
    table = new_table(f"memory per GPU, GiB (capacity {result.capacity_bytes / GIB:.1f} GiB)")
    for col in ("stage", "params", "grads", "optimizer", "activations", "transient", "allocated", "reserved"):
        numbers_column(table, col)
    for m in result.stages:
        table.add_row(str(m.stage), *[f"{v / GIB:.2f}" for v in (
            m.params_bytes, m.grads_bytes, m.optimizer_bytes, m.activations_bytes, m.transient_bytes,
            m.peak_allocated_bytes, m.peak_reserved_bytes)])
    console = console_for(table, wide=wide)
    console.print(f"[bold]{degree_words(plan)}[/bold] zero={plan.zero} "
                  f"micro-batch {plan.micro_batch} x {plan.grad_accum} accumulation, {precision_words(plan)}, "
                  f"{plan.schedule}{', compiled' if plan.compile else ''}, run by {plan.engine}"
                  + "".join(f" {k}={option_text(v)}" for k, v in plan.engine_options.items()))
    console.print(f"step {result.step_time_s:.3f} s, {result.tokens_per_s:,.0f} tokens/s, "
                  f"{result.tflops_per_gpu:.1f} TFLOP/s per GPU, MFU {100 * result.mfu:.1f}%"
                  + (f" ({100 * result.mfu_causal:.1f}% with attention FLOPs over the causal half, as Megatron counts)"
                     if result.mfu - result.mfu_causal >= 0.005 else ""))
    console.print("phases: " + format_phases(result.phases))
    console.print(table)
    console.print("fits" if result.fits else f"[red]{misfit or 'does not fit'}[/red]", highlight=False)
    return console


def _simulate_batch(args) -> int:
    """One JSON case a line in, one JSON result a line out; a bad case (not UTF-8, not JSON,
    a bad value, a plan the runtime could not run) gets {"error": "line N: ..."} and the
    others still run. With --html, the page lists every case too (written at the end, after
    the JSON lines, its "wrote" line on stderr so stdout stays JSON lines)."""
    from pathlib import Path
    path = args.batch
    rows = []           # (line number, spec, cluster, plan, result, error) for the report
    source = Path(path)
    if not source.is_file():
        raise MeshplanError(f"cases file {path!r} does not exist")
    try:
        handle = open(source, "rb")
    except OSError as exc:
        raise MeshplanError(f"cannot read cases file {path!r}: {exc.strerror or exc}") from None
    with handle, outputs.progress(f"simulating the cases of {path}") as update:
        for number, raw in enumerate(handle, 1):
            update(f"simulating case {number} of {path}")
            try:
                line = raw.decode("utf-8")
                if not line.strip():
                    continue
                case = parse_json(line, "the case")
                if not isinstance(case, dict):
                    raise MeshplanError("a case must be a JSON object")
                spec, cluster, plan, result = _simulate_one(case)
                out = {**result.to_dict(), "plan": plan.to_dict()}
                rows.append((number, spec.name, cluster.name, plan, result, None))
            except UnicodeDecodeError as exc:
                out = {"error": f"line {number}: not UTF-8 text ({exc.reason} at byte {exc.start})"}
            except MeshplanError as exc:
                out = {"error": f"line {number}: {exc}"}
            if "error" in out:
                rows.append((number, None, None, None, None, out["error"]))
            print(json.dumps(out), flush=True)
    if args.html:
        from planner.report.pages import batch_report
        args.json = True        # the "wrote" line goes to stderr: stdout is the cases' JSON lines
        outputs.write_html(args, batch_report(rows, path, outputs.command_line(args)))
    return 0
