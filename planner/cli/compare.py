"""`meshplan compare`: the flags, the table and the JSON of planner.compare.compare.

Exit code 0 when at least one cluster can train the model, else 1; bad input is a
one-line error (exit 2).
"""
from __future__ import annotations

import argparse
import json

from cost_models import MeshplanError
from cost_models.energy import DEFAULT_GRID_KG_PER_KWH, DEFAULT_PUE
from planner.cli.flags import (MODEL_HELP, add_batch_flags, add_engine_flags, add_moe_flags, add_plan_flags,
                               check_distinct, check_image_path, engine_args, moe_imbalance, pinned as pinned_flags)
from planner.cli import outputs
from planner.cli.tables import add_wide_flag, console_for, new_table, numbers_column, text_column
from planner.compare import TRANSFERRED_UNCERTAINTY, ClusterChoice, compare
from planner.plan import degree_words

HELP = "plan a model on several clusters: time-to-train, GPU-hours, $, energy, CO2"
PIN_FLAGS = ("tp", "pp", "cp", "ep", "zero", "micro_batch", "checkpoint", "schedule", "precision", "fp8_recipe",
             "compile")
PIN_HELP = {"compile": "default: off (not searched)"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help=MODEL_HELP)
    p.add_argument("--clusters", required=True,
                   help="comma-separated clusters: GPU:NODESxGPUS, named systems or .yaml/.json files")
    p.add_argument("--tokens", type=float, required=True, help="training tokens, e.g. 300e9")
    add_batch_flags(p, required=True)
    p.add_argument("--price", action="append", default=[], metavar="GPU=USD",
                   help="USD per GPU-hour for a GPU type (repeatable; default: the catalogue's price)")
    p.add_argument("--spot-price", action="append", default=[], metavar="GPU=USD",
                   help="spot USD per GPU-hour for a GPU type: price the run on spot too (repeatable; needs "
                        "--preemption-rate or the cluster file's preemption_rate_per_node_hour)")
    p.add_argument("--preemption-rate", action="append", default=[], metavar="GPU=RATE",
                   help="spot preemptions per node-hour for a GPU type (repeatable)")
    p.add_argument("--failure-rate", type=float,
                   help="hardware failures per GPU-hour on every cluster (default 1.97e-5, Llama 3's 16k-H100 "
                        "run; cost_models/failures.py)")
    p.add_argument("--grid-kg-per-kwh", type=float,
                   help=f"grid carbon intensity, kg CO2e per kWh (default {DEFAULT_GRID_KG_PER_KWH})")
    p.add_argument("--pue", type=float, help=f"data-centre power usage effectiveness (default {DEFAULT_PUE})")
    p.add_argument("--json", action="store_true", help='print {"clusters": [...]}')
    p.add_argument("--plot", help="write days, $ and MWh per cluster as bar charts (.png)")
    add_plan_flags(p.add_argument_group("pin a dimension on every cluster (the search fills in the rest)"),
                   PIN_FLAGS, help=PIN_HELP)
    add_engine_flags(p)
    add_moe_flags(p)
    outputs.add_html_flag(p)
    add_wide_flag(p)


def run(args) -> int:
    """Print the comparison; exit 0 when at least one cluster can train the model, else 1."""
    if args.plot:
        check_image_path(args.plot, overwrite=args.force)
    check_distinct(args, ("plot", "html"))
    outputs.check_html(args)
    clusters = [c.strip() for c in args.clusters.split(",") if c.strip()]
    pinned = pinned_flags(args, PIN_FLAGS)
    imbalance = moe_imbalance(args)
    with outputs.progress(f"planning {args.model} on {len(clusters)} clusters") as update:
        choices = compare(args.model, clusters, args.tokens, args.global_batch, args.seq,
                          prices=parse_prices(args.price), grid_kg_per_kwh=args.grid_kg_per_kwh, pue=args.pue,
                          spot_prices=parse_prices(args.spot_price, "--spot-price"),
                          preemption_rates=parse_prices(args.preemption_rate, "--preemption-rate",
                                                        "RATE_PER_NODE_HOUR"),
                          failure_rate_per_gpu_hour=args.failure_rate,
                          on_cluster=lambda i, n, name: update(f"planning {args.model} on {name} ({i} of {n})"),
                          moe_imbalance=imbalance, **engine_args(args), **pinned)
    if args.plot:
        from planner.cli.plots import compare_png
        compare_png(choices, args.plot, title=f"{args.model}, {args.tokens / 1e9:,.4g} B tokens: the best plan "
                                              f"on each of {len(choices)} clusters")
        outputs.wrote(args, args.plot)
    if args.html:
        from planner.report import compare_report
        outputs.write_html(args, compare_report(choices, args.model, args.tokens, outputs.command_line(args)))
    if args.json:
        print(json.dumps({"model": args.model, "tokens": args.tokens, "clusters": [c.to_dict() for c in choices]}))
    else:
        _print_table(choices, args.model, args.tokens, args.wide)
    return 0 if any(c.fits for c in choices) else 1


def parse_prices(items: list[str], flag: str = "--price", unit: str = "USD_PER_HOUR") -> dict:
    """`["h100=2.5", ...]` -> {"h100": 2.5}; a malformed item is a one-line error."""
    prices = {}
    for item in items:
        name, sep, value = item.partition("=")
        try:
            number = float(value)
        except ValueError:
            number = None
        if not sep or not name.strip() or number is None:
            raise MeshplanError(f"{flag} {item!r}: write GPU={unit}, e.g. {flag} h100-sxm-80gb=2.50")
        prices[name.strip()] = number
    return prices


def _plan_summary(plan) -> str:
    return degree_words(plan, eq="") + f" zero{plan.zero}"


def _print_table(choices: list[ClusterChoice], model: str, tokens: float, wide: bool = False) -> None:
    table = new_table(f"{model}: {tokens / 1e9:,.4g} B tokens, best plan per cluster, fastest first")
    for col in ("cluster", "GPUs", "calibration", "best plan", "step s", "MFU", "days", "GPU-h", "$", "MWh",
                "t CO2"):
        if col in ("cluster", "best plan", "calibration"):
            text_column(table, col, justify="left")
        else:
            numbers_column(table, col)
    for c in choices:
        # a transferred calibration's numbers carry its uncertainty on time, so on days, $, MWh, CO2
        source = "measured" if c.measured else f"[yellow]transferred ±{100 * c.uncertainty:.0f}%[/yellow]"
        if not c.fits:
            table.add_row(c.cluster, str(c.gpus), source, "[red]does not fit[/red] (below)", *["-"] * 7)
            continue
        r, cost = c.plan.result, c.run_cost
        low, high = c.days * (1 - c.uncertainty), c.days * (1 + c.uncertainty)
        days = f"{c.days:,.1f}" if c.measured else f"{low:,.1f}-{high:,.1f}"
        table.add_row(c.cluster, str(c.gpus), source, _plan_summary(c.plan), f"{r.step_time_s:.3f}",
                      f"{100 * r.mfu:.1f}%", days, f"{cost.gpu_hours:,.0f}", f"{cost.cost_usd:,.0f}",
                      f"{cost.energy_kwh / 1e3:,.1f}", f"{cost.co2_kg / 1e3:,.1f}")
    console = console_for(table, wide=wide)
    console.print(table)
    for c in choices:
        if not c.fits:
            console.print(f"{c.cluster}: {c.reason}", highlight=False)
    if not all(c.measured for c in choices):
        console.print(f"transferred: the GPU was never measured; its days, $, MWh and CO2 carry "
                      f"±{100 * TRANSFERRED_UNCERTAINTY:.0f}% (days shown as a range; docs/cli.md)", highlight=False)
    for line in dict.fromkeys(c.calibration for c in choices):   # one per GPU, in table order
        console.print(line, highlight=False)
    _print_interruptions(console, choices)


def _print_interruptions(console, choices: list[ClusterChoice]) -> None:
    """The same runs with failures (and spot preemptions), checkpoints and restarts priced."""
    table = new_table("with interruptions: checkpoints at the Young/Daly interval, restarts "
                      "(* on the time-vs-$ Pareto front, + on the time-vs-CO2 one)")
    for col in ("cluster", "capacity", "$/GPU-h", "interruptions", "ckpt every", "goodput", "days", "$", "MWh"):
        if col in ("cluster", "capacity"):
            text_column(table, col, justify="left")
        else:
            numbers_column(table, col)
    for c in choices:
        for label, option in (("on-demand", c.with_failures), ("spot", c.spot)):
            if option is None:
                continue
            f, cost = option.forecast, option.run_cost
            mark = (" *" if option.pareto else "") + (" +" if option.pareto_co2 else "")
            table.add_row(c.cluster, label + mark, f"{option.price_usd_per_gpu_hour:.2f}", f"{f.interruptions:,.1f}",
                          f"{f.interval_s / 60:,.0f} min", f"{100 * f.goodput:.1f}%",
                          f"{option.days:,.1f}" if cost else "never", f"{cost.cost_usd:,.0f}" if cost else "-",
                          f"{cost.energy_kwh / 1e3:,.1f}" if cost else "-")
    if table.row_count:
        console.print(table)
