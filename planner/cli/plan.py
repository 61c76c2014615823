"""`meshplan plan`: search the best plans for a model on a cluster and show them."""
from __future__ import annotations

import argparse
import json

from cost_models import parse_cluster
from cost_models.inputs import whole_number
from cost_models.units import GIB
from planner.cli.flags import (CALIBRATION_HELP, CLUSTER_HELP, MODEL_HELP, add_batch_flags, add_engine_flags,
                               add_moe_flags, add_plan_flags, check_distinct, check_image_path, memory_bytes,
                               moe_imbalance, pinned as pinned_flags)
from planner.cli import outputs
from planner.cli.tables import add_wide_flag, console_for, new_table, numbers_column, text_column
from planner.interop.cli import add_export_flag, add_from_flag
from cost_models.inputs import check_output_path
from planner.plan import PINNABLE, RECOMPUTE_MODES
from planner.search.ranking import MAX_TOP

HELP = ("search the best plans (degrees, ZeRO, micro-batch, schedule, stages, checkpointing) "
        "for a model on a cluster")
PIN_HELP = {"checkpoint": "the same mode for every layer (default: chosen per layer)",
            "precision": "default: bf16 (fp16 on GPUs without bf16); fp32 is never faster; fp8 only when "
                         "given (its numerics are the user's choice)",
            "fp8_recipe": "default tensorwise",
            "compile": "default: off (not searched)"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help=MODEL_HELP + " (required unless --from gives it)")
    p.add_argument("--cluster", required=True, help=CLUSTER_HELP)
    add_batch_flags(p, required=False, seq_default=None)   # required unless --from: planner.interop.cli.plan_job
    add_from_flag(p)
    add_export_flag(p)
    p.add_argument("--top", type=int, default=5, help="how many plans to list (default 5)")
    add_plan_flags(p.add_argument_group("pin a dimension (the search fills in the rest)"), PINNABLE, help=PIN_HELP)
    add_engine_flags(p)
    add_moe_flags(p)
    p.add_argument("--tp-across-nodes", action="store_true", help="allow tensor parallelism to span nodes")
    p.add_argument("--reserve", metavar="GIB", help="GiB of each GPU kept free beyond the CUDA context "
                                                    "(default 3%% of the GPU's memory); 3.2GB for decimal GB")
    p.add_argument("--calibration", help=CALIBRATION_HELP)
    p.add_argument("--json", action="store_true", help='print {"plans": [...], "search": {...}}')
    p.add_argument("--out", help="write the best plan as JSON (for `simulate --plan` and `train --plan`); "
                                 "with --export, the folder to write into")
    p.add_argument("--force", action="store_true", help=outputs.FORCE_HELP)
    p.add_argument("--explain", action="store_true", help="why the winner wins and why the rest lost")
    p.add_argument("--plot", help="write the top plans' step time and memory side by side (.png)")
    outputs.add_html_flag(p, force=False)
    add_wide_flag(p)


def run(args) -> int:
    from planner.interop import cli as interop
    from planner.search import plan
    _check_outputs(args)
    imbalance = moe_imbalance(args)
    cluster = parse_cluster(args.cluster)
    job = interop.plan_job(args, cluster)   # --model/--global-batch/--seq, or --from; the engine (--export)
    spec = job.spec
    pinned = {**job.pins, **pinned_flags(args, PINNABLE)}
    if "precision" not in pinned:
        pinned["precision"] = "bf16" if "bf16" in cluster.gpu.peak_flops else "fp16"
    from cost_models.calibration import calibration_line
    from cost_models.models_for import cost_models_for
    compute, comm, calibration = cost_models_for(cluster, args.calibration)
    reserve = None if args.reserve is None else memory_bytes(args.reserve, "--reserve")
    with outputs.progress(f"searching plans for {spec.name} on {cluster.name}"):
        plans = plan(spec, cluster, job.global_batch, job.seq, top_k=args.top, compute=compute, comm=comm,
                     reserve_bytes=reserve, tp_across_nodes=args.tp_across_nodes, moe_imbalance=imbalance,
                     **job.engine, **pinned)
    if args.out and not args.export:
        best = plans[0]
        best.save(args.out, overwrite=args.force)
        outputs.wrote(args, args.out)
    if args.plot:
        from planner.cli.plots import plans_png
        plans_png(plans, args.plot, title=f"{spec.name} on {cluster.name}: the best {len(plans)} plans, "
                                          f"global batch {job.global_batch} x {job.seq} tokens")
        outputs.wrote(args, args.plot)
    if args.html:
        from planner.report import plan_report
        outputs.write_html(args, plan_report(plans, spec.name, cluster.name,
                                             calibration_line(calibration, fp8=pinned["precision"] == "fp8"),
                                             outputs.command_line(args)))
    if args.json:
        print(json.dumps(plans_json(plans)))
    else:
        experts = bool(getattr(spec.config, "experts", 0)) if spec.config is not None else False
        _print_table(plans, spec.name, cluster, args.wide, experts, any(p.cp > 1 for p in plans)).print(
            calibration_line(calibration, experts, pinned["precision"] == "fp8"), highlight=False)
    if args.explain and not args.json:
        from planner.search.explain import explain
        console = console_for(wide=args.wide)
        for line in explain(plans):
            console.print(line, highlight=False)
    interop.export_best(args, plans, spec, cluster, compute, comm)
    return 0


def _check_outputs(args) -> None:
    """Fail before searching, so a long search never ends in 'cannot write'."""
    whole_number(args.top, "--top", high=MAX_TOP)
    if args.reserve is not None:
        memory_bytes(args.reserve, "--reserve")
    check_distinct(args, ("out", "plot", "html"))
    outputs.check_html(args)
    from planner.interop.cli import check_export_args
    check_export_args(args)
    if args.out and not args.export:
        check_output_path(args.out, overwrite=args.force, force_hint=True)
    if args.plot:
        check_image_path(args.plot, overwrite=args.force)


def plans_json(plans) -> dict:
    out = []
    for p in plans:
        data = p.to_dict()
        data["result"] = p.result.to_dict()
        out.append(data)
    search = plans.stats.to_dict()
    search.update(budget_bytes=plans.budget_bytes, capacity_bytes=plans.capacity_bytes,
                  reserve_bytes=plans.reserve_bytes)
    return {"plans": out, "search": search}


def _checkpoint_summary(p) -> str:
    if not p.checkpoint:
        return "none"
    counts = {m: p.checkpoint.count(m) for m in reversed(RECOMPUTE_MODES) if p.checkpoint.count(m)}
    return ", ".join(f"{n} {m}" for m, n in counts.items()) or "none"


def _split_words(sizes: list[int]) -> str:
    """Blocks per pipeline stage: "80", "10 x8" (even), "9/10/10/11", or "9-11 over 16"."""
    if len(set(sizes)) == 1:
        return f"{sizes[0]}" + (f" x{len(sizes)}" if len(sizes) > 1 else "")
    return "/".join(map(str, sizes)) if len(sizes) <= 4 else f"{min(sizes)}-{max(sizes)} over {len(sizes)}"


def _print_table(plans, model_name: str, cluster, wide: bool = False, experts: bool = False,
                 context: bool = False):
    """The ranked plans; an MoE model's (`experts`) with an ep column, and a cp column where
    some plan splits the sequence (`context`)."""
    table = new_table(f"{model_name} on {cluster.name}: best {len(plans)} plans "
                      f"(memory budget {plans.budget_bytes / GIB:.1f} GiB per GPU)")
    rows = []
    for i, p in enumerate(plans, 1):
        r = p.result
        schedule = p.schedule + (f" x{p.interleave}" if p.interleave > 1 else "")
        schedule += " +sp" if p.sequence_parallel else ""
        schedule += " +offload" if p.offload_optimizer else ""
        schedule += " +compile" if p.compile else ""
        rows.append((str(i), str(p.dp), *((str(p.cp),) if context else ()), str(p.tp), str(p.pp),
                     *((str(p.ep),) if experts else ()), str(p.zero),
                     f"{p.micro_batch} x {p.grad_accum}", schedule, _split_words([e - s for s, e in p.stages]), _checkpoint_summary(p),
                     f"{r.step_time_s:.3f}", f"{r.tokens_per_s:,.0f}", f"{100 * r.mfu:.1f}%",
                     f"{r.worst_stage.peak_reserved_bytes / GIB:.1f}/{r.capacity_bytes / GIB:.1f}"))
    headers = ("#", "dp", *(("cp",) if context else ()), "tp", "pp", *(("ep",) if experts else ()), "zero", "mb x acc", "schedule", "blocks per stage", "checkpointed",
               "step s", "tokens/s", "MFU", "peak GiB")
    for n, col in enumerate(headers):
        if col in ("schedule", "blocks per stage", "checkpointed"):   # text: wraps onto more lines
            text_column(table, col, justify="right")
        else:
            numbers_column(table, col)
    for row in rows:
        table.add_row(*row)
    console = console_for(table, wide=wide)
    console.print(table)
    s = plans.stats
    console.print(f"searched {s.candidates} candidates in {s.search_s:.2f} s: {s.pruned_model_states} pruned "
                  f"(model states), {s.pruned_dominated} dominated, {s.pruned_bound} bounded out, "
                  f"{s.no_partition} without a fitting split, {s.partitioned} partitioned, {s.simulated} simulated"
                  + (f", {s.skipped} the model cannot take" if s.skipped else ""), highlight=False)
    return console
