"""`meshplan describe`, `models`, `gpus`, `engines` and `validate`: what meshplan knows, looked up.

A model's size and a cluster's summary, the model presets, the GPU catalogue, the training
engines, and whether
a plan file is valid (and fits a model and cluster). Nothing is traced or simulated.
"""
from __future__ import annotations

import json


from cost_models import GPUS, SYSTEMS, parse_cluster
from cost_models.units import GB, GIB, TERA
from planner.cli.flags import CLUSTER_HELP, JSON_HELP, MODEL_HELP
from planner.arch.layout import check_runnable
from planner.cli.tables import add_wide_flag, console_for, new_table
from planner.models import active_parameters, count_parameters
from planner.plan import Plan
from planner.zoo import PRESETS, load_model


def register(sub) -> None:
    """Add the five look-up subcommands to the `meshplan` subparsers."""
    p = sub.add_parser("describe", help="a model's parameter count and a cluster's summary")
    p.add_argument("--model", required=True, help=MODEL_HELP)
    p.add_argument("--cluster", required=True, help=CLUSTER_HELP)
    p.add_argument("--json", action="store_true", help=JSON_HELP)
    p.set_defaults(handler=_describe)

    p = sub.add_parser("models", help="list the model presets")
    p.add_argument("--json", action="store_true", help=JSON_HELP)
    add_wide_flag(p)
    p.set_defaults(handler=_models)

    p = sub.add_parser("gpus", help="list the GPU catalogue and named systems")
    p.add_argument("--json", action="store_true", help=JSON_HELP)
    add_wide_flag(p)
    p.set_defaults(handler=_gpus)

    p = sub.add_parser("engines", help="list the training engines a plan can name, what each offers, its options")
    p.add_argument("--json", action="store_true", help=JSON_HELP)
    add_wide_flag(p)
    p.set_defaults(handler=_engines)

    p = sub.add_parser("validate", help="check a plan file (and its fit to a model and cluster)")
    p.add_argument("--plan", required=True, help="the plan .json to check (from `meshplan plan --out`)")
    p.add_argument("--model", help=MODEL_HELP + "; also checks the plan can run it")
    p.add_argument("--cluster", help=CLUSTER_HELP + "; also checks the plan's GPU count and fit")
    p.set_defaults(handler=_validate)


def _describe(args) -> int:
    spec = load_model(args.model)
    model = spec.build("meta")
    params = count_parameters(model)
    cluster = parse_cluster(args.cluster)
    if args.json:
        print(json.dumps({"model": spec.name, "params": params,
                          "active_params": active_parameters(model) if spec.config else params,
                          "config": spec.config.to_dict() if spec.config else None,
                          "cluster": cluster.to_dict()}))
        return 0
    console = console_for()
    console.print(f"[bold]{spec.name}[/bold]: {params:,} parameters ({parameter_count(params)})")
    if spec.config:
        c = spec.config
        console.print(f"  {c.arch}: {c.layers} layers, hidden {c.hidden}, {c.heads} heads "
                      f"({c.kv_heads} kv), ffn {c.ffn}, vocab {c.vocab}, max_seq {c.max_seq}, "
                      f"tied embeddings: {c.tie_embeddings}")
        if c.is_moe:
            console.print(f"  experts: {experts_text(c)}, {c.router} router; "
                          f"{parameter_count(active_parameters(model))} active per token")
    console.print(f"[bold]cluster[/bold] {cluster.summary()}")
    return 0


def parameter_count(count: int) -> str:
    """A parameter count in billions, or millions below a billion (a tiny model is not "0.00 B")."""
    return f"{count / 1e9:.2f} B" if count >= 1e9 else f"{count / 1e6:.2f} M"


def experts_text(c) -> str:
    """An MoE config's experts in a few words: "256 x 2048, top 8, +1 shared, 3 dense first"."""
    return (f"{c.experts} x {c.expert_ffn}, top {c.top_k}"
            + (f", +{c.shared_experts} shared" if c.shared_experts else "")
            + (f", {c.dense_layers} dense first" if c.dense_layers else ""))


def _models(args) -> int:
    rows = []
    for name, cfg in PRESETS.items():
        model = load_model(name).build("meta")
        params = count_parameters(model)
        # active: what one token's forward pass uses (the routed experts it is sent to)
        rows.append(dict(name=name, arch=cfg.arch, layers=cfg.layers, hidden=cfg.hidden,
                         heads=cfg.heads, kv_heads=cfg.kv_heads, ffn=cfg.ffn, vocab=cfg.vocab,
                         experts=experts_text(cfg) if cfg.is_moe else None,
                         params=params, active_params=active_parameters(model)))
    if args.json:
        print(json.dumps(rows))
        return 0
    table = new_table("model presets (active: the parameters one token uses, embeddings included)")
    for col in ("name", "arch", "layers", "hidden", "heads", "kv", "ffn", "vocab", "experts", "params", "active"):
        table.add_column(col, justify="left" if col in ("name", "arch") else "right", no_wrap=True)
    for r, cfg in zip(rows, PRESETS.values()):
        # within 100 columns: "top-k of routed(+shared)" experts; `describe` says the rest
        experts = f"{cfg.top_k} of {cfg.experts}{f'+{cfg.shared_experts}' if cfg.shared_experts else ''}"
        table.add_row(*[parameter_count(v) if k in ("params", "active_params") else
                        (experts if cfg.is_moe else "-") if k == "experts" else str(v) for k, v in r.items()])
    console_for(table, wide=args.wide).print(table)
    return 0


def _gpus(args) -> int:
    if args.json:
        print(json.dumps([dict(name=g.name, display_name=g.display_name, memory_bytes=g.memory_bytes,
                               peak_flops=g.peak_flops, memory_bw_bytes_per_s=g.memory_bw_bytes_per_s,
                               nvlink_bw_bytes_per_s=g.nvlink_bw_bytes_per_s, tdp_w=g.tdp_w,
                               price_usd_per_hour=g.price_usd_per_hour) for g in GPUS.values()]))
        return 0
    table = new_table("GPU catalogue (dense peaks; link bandwidth unidirectional per GPU)")
    for col in ("name", "memory GiB", "bf16 TFLOP/s", "fp32 TFLOP/s", "HBM GB/s", "NVLink GB/s",
                "TDP W", "$/hour"):
        table.add_column(col, justify="left" if col == "name" else "right", no_wrap=True)
    for g in GPUS.values():
        bf16 = g.peak_flops.get("bf16", g.peak_flops.get("fp16"))
        table.add_row(g.name, f"{g.memory_bytes / GIB:.0f}", f"{bf16 / TERA:.0f}" if bf16 else "-",
                      f"{g.peak_flops['fp32'] / TERA:.1f}", f"{g.memory_bw_bytes_per_s / GB:.0f}",
                      f"{g.nvlink_bw_bytes_per_s / GB:.0f}", f"{g.tdp_w:.0f}", f"{g.price_usd_per_hour:.2f}")
    console = console_for(table, wide=args.wide)
    console.print(table)
    console.print("named systems: " + "; ".join(f"{k} ({v.description})" for k, v in SYSTEMS.items()))
    return 0


def _engines(args) -> int:
    from planner.engines import ENGINES
    from planner.engines.base import option_text
    rows = [dict(name=e.name, describes=e.describes, zero=list(e.zero), pipeline_zero=list(e.pipeline_zero),
                 schedules=list(e.schedules), recompute=list(e.recompute), precisions=list(e.precisions),
                 sequence_parallel=e.sequence_parallel, offload_optimizer=e.offload_optimizer,
                 compile=not e.compile_refusal, options={k: dict(values=list(map(option_text, o.values)), default=option_text(o.default), help=o.help)
                          for k, o in e.options.items()}) for e in ENGINES.values()]
    if args.json:
        print(json.dumps(rows))
        return 0
    table = new_table("training engines (--engine; options: --engine-option KEY=VALUE)")
    for col in ("engine", "ZeRO (with pp)", "schedules", "recompute", "precisions", "sp", "offload", "options"):
        table.add_column(col, no_wrap=col in ("engine", "sp", "offload"))
    for e, r in zip(ENGINES.values(), rows):
        zero = "".join(map(str, e.zero)) + (f" ({''.join(map(str, e.pipeline_zero))})"
                                            if e.pipeline_zero != e.zero else "")
        options = "; ".join(f"{k}: {' | '.join(o['values'])} (default {o['default']})" for k, o in r["options"].items())
        table.add_row(e.name, zero, ", ".join(e.schedules), ", ".join(e.recompute), ", ".join(e.precisions),
                      "yes" if e.sequence_parallel else "no", "yes" if e.offload_optimizer else "no", options or "-")
    console = console_for(table, wide=args.wide)
    console.print(table)
    for e in ENGINES.values():
        console.print(f"{e.name}: {e.describes}", highlight=False)
    return 0


def _validate(args) -> int:
    plan = Plan.load(args.plan)
    world = per_node = None
    model_text = args.model or plan.model
    cluster_text = args.cluster or plan.cluster
    if cluster_text:
        cluster = parse_cluster(cluster_text)
        world, per_node = cluster.world_size, cluster.gpus_per_node
    plan.check_fits(None, world, per_node)
    if model_text:
        spec = load_model(model_text)
        if spec.config is not None:   # everything the runtime would refuse, as simulate refuses it
            check_runnable(plan, spec.config)
    print(f"plan {args.plan} is valid: dp={plan.dp} tp={plan.tp} pp={plan.pp} zero={plan.zero}, "
          f"{plan.grad_accum} micro-batch(es) of {plan.micro_batch} per step")
    return 0
