"""`--from ENGINE SOURCE` (simulate, plan) and `--export ENGINE --out DIR` (plan): the flags,
their checks and what they hand the commands. The reading and writing is planner.interop's.

- `simulate --from E SOURCE --cluster C`: the imported plan and model; a plan flag beside it
  is refused unless the source cannot say it (DeepSpeed: --tp, --pp, --checkpoint, --seq).
- `plan --from E SOURCE --cluster C`: the imported model, global batch and sequence length
  fill in --model/--global-batch/--seq when not given, and the imported plan fields become
  pins (a pin flag replaces its own); when the search runs for another engine (--engine or
  --export name one) only the model and batch are taken, and a note says so.
- `plan --export E --out DIR`: the search runs for engine E (a contradicting --engine is
  refused) and the best plan is written to DIR, no existing file replaced without --force.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field

from cost_models.errors import MeshplanError
from planner.interop import (IMPORTERS, EXPORTERS, check_export_folder, export_engines, export_plan, import_job,
                             importer)

PLAN_FLAGS = ("micro_batch", "dp", "tp", "pp", "zero", "checkpoint", "precision", "schedule", "interleave",
              "sequence_parallel", "offload_optimizer", "global_batch", "seq")


def add_from_flag(parser) -> None:
    parser.add_argument("--from", dest="from_", nargs=2, metavar=("ENGINE", "SOURCE"),
                        help=f"import a job: ENGINE one of {', '.join(IMPORTERS)}; SOURCE its configuration file "
                             f"(Megatron-LM, torchtitan: also a quoted launch line)")


def add_export_flag(parser) -> None:
    parser.add_argument("--export", type=str.lower, metavar="ENGINE",
                        help=f"write what runs the best plan on ENGINE ({', '.join(EXPORTERS)}) into --out DIR")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _given(args, names) -> dict:
    return {k: getattr(args, k) for k in names if getattr(args, k, None) is not None}


def _say(args, notes) -> None:
    for note in notes:
        print(f"note: {note}", file=sys.stderr if getattr(args, "json", False) else sys.stdout)


def simulate_job(args):
    """(Plan, ModelSpec) of `meshplan simulate --from ENGINE SOURCE`."""
    from cost_models import parse_cluster
    from planner.zoo import load_model
    engine, source = args.from_
    module = importer(engine)
    if args.cluster is None:
        raise MeshplanError(f"--from {engine} needs --cluster: the GPUs the job runs on")
    if args.engine is not None or args.engine_option:
        raise MeshplanError(f"--engine and --engine-option cannot be combined with --from: the {engine} "
                            f"configuration names the engine and its options")
    given = _given(args, PLAN_FLAGS)
    refused = [_flag(k) for k in given if k not in module.OPEN]
    if refused:
        raise MeshplanError(f"{', '.join(refused)} cannot be combined with --from {engine}, whose configuration "
                            f"fixes {'it' if len(refused) == 1 else 'them'}: edit the configuration")
    cluster = parse_cluster(args.cluster)
    spec = load_model(args.model) if args.model else None
    imported = import_job(engine, source, cluster.world_size, spec, given)
    _say(args, imported.notes)
    return imported.plan(imported.model.name, args.cluster), imported.model


@dataclass
class PlanJob:
    """What `meshplan plan` searches: the model, the batch, the pins and the engine."""

    spec: object
    global_batch: int
    seq: int
    pins: dict = field(default_factory=dict)
    engine: dict = field(default_factory=dict)


def check_export_args(args) -> None:
    """Before any search: --export has --out (a folder, its files new unless --force)."""
    if args.export is None:
        return
    if not args.out:
        raise MeshplanError(f"--export {args.export} needs --out DIR: the folder to write into")
    if getattr(args, "plot", None) and args.plot == args.out:
        raise MeshplanError("--plot and --out name the same path: give each its own")
    check_export_folder(args.export, args.out, args.force)


def plan_job(args, cluster) -> PlanJob:
    """The model, batch, pins and engine of `meshplan plan`, from its flags and --from / --export."""
    from planner.cli.flags import DEFAULT_SEQ, engine_args
    from planner.zoo import load_model
    engine = engine_args(args)
    allowed = export_engines(args.export) if args.export else None
    if allowed and engine and engine["engine"] not in allowed:
        raise MeshplanError(f"--export {args.export} writes plans of {' or '.join(allowed)}, but --engine is "
                            f"{engine['engine']}: drop one")
    if args.from_ is None:
        missing = [f for f, v in (("--model", args.model), ("--global-batch", args.global_batch)) if v is None]
        if missing:
            raise MeshplanError(f"the following arguments are required: {', '.join(missing)} (or --from ENGINE "
                                f"SOURCE; see `meshplan plan --help`)")
        return PlanJob(load_model(args.model), args.global_batch, args.seq or DEFAULT_SEQ,
                       engine=engine or ({"engine": allowed[0]} if allowed else {}))
    name, source = args.from_
    module = importer(name)
    spec = load_model(args.model) if args.model else None
    imported = import_job(name, source, cluster.world_size, spec, _given(args, module.OPEN))
    target = engine.get("engine") or (allowed[0] if allowed and imported.engine not in allowed else imported.engine)
    job = PlanJob(imported.model, args.global_batch or imported.fields["global_batch"],
                  args.seq or imported.fields["seq"])
    if target == imported.engine:
        job.pins = imported.pins()
        job.engine = {"engine": imported.engine,
                      "engine_options": {**imported.engine_options, **engine.get("engine_options", {})}}
    else:
        job.engine = engine or {"engine": target}
        imported.notes.append(f"the search runs for {target}: only the model, global batch and sequence length come "
                              f"from the {name} configuration")
    _say(args, imported.notes)
    return job


def export_best(args, plans, spec, cluster, compute=None, comm=None) -> None:
    """Write the best plan for --export and say where. An engine that splits the layers its
    own way (evenly) gets the best plan with the even split, simulated again, when it fits."""
    if args.export is None:
        return
    from dataclasses import replace
    from planner.interop.base import SplitError
    best, notes = plans[0], []
    try:
        written = export_plan(args.export, best, spec, cluster, args.out, args.force, args.model)
    except SplitError as exc:
        from planner.simulate import simulate
        even = replace(best, stages=[])
        result = simulate(even, spec, cluster, compute=compute, comm=comm)
        if not result.fits:
            raise MeshplanError(f"{exc}, and the even split does not fit in memory: pin --pp or --checkpoint") from None
        written = export_plan(args.export, even, spec, cluster, args.out, args.force, args.model)
        notes.append(f"{exc}: exported the best plan with the even split, step {result.step_time_s:.3f} s "
                     f"(the search's split: {best.result.step_time_s:.3f} s)")
    _say(args, notes)
    print(f"exported the best plan to {args.export}: {', '.join(written)}",
          file=sys.stderr if getattr(args, "json", False) else sys.stdout)
