"""`meshplan compare`: plan one model on several clusters and price the whole training run.

For every cluster the planner's best plan (`planner.search.plan`, top 1) gives a step time;
`cost_models.energy.run_cost` turns it into time-to-train for `tokens` tokens, GPU-hours,
dollars (the catalogue's price per GPU-hour unless overridden), energy (GPU power at the
simulated compute-busy fraction, times the PUE) and CO2 (energy x grid intensity).

A cluster on which nothing fits stays in the output with the planner's one-line reason;
the others are still priced. Results are sorted by time-to-train, clusters that cannot
train the model last.
"""
from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass

from cost_models import ClusterSpec, MeshplanError, get_gpu, parse_cluster
from cost_models.calibration import calibration_line, default_calibration
from cost_models.energy import DEFAULT_GRID_KG_PER_KWH, DEFAULT_PUE, RunCost, run_cost
from planner.plan import CHECKPOINT_MODES, SCHEDULES, check_new_path
from planner.tables import console_for

SECONDS_PER_DAY = 86400.0
PIN_FLAGS = ("tp", "pp", "zero", "micro_batch", "checkpoint", "schedule")


@dataclass
class ClusterChoice:
    """One cluster's best plan and what the whole run costs on it, or why it cannot train."""

    cluster: str
    gpu: str
    gpus: int
    price_usd_per_gpu_hour: float
    plan: object = None            # planner.plan.Plan with `.result`; None when nothing fits
    run_cost: RunCost | None = None
    busy_fraction: float = 0.0     # mean share of the step the GPUs' compute streams are busy
    reason: str | None = None      # why nothing fits (one line)
    calibration: str = ""          # where its GPU's compute numbers come from (calibration_line)

    @property
    def fits(self) -> bool:
        return self.plan is not None

    @property
    def days(self) -> float:
        return self.run_cost.time_to_train_s / SECONDS_PER_DAY if self.fits else math.inf

    def to_dict(self) -> dict:
        data = dict(cluster=self.cluster, gpu=self.gpu, gpus=self.gpus,
                    price_usd_per_gpu_hour=self.price_usd_per_gpu_hour, fits=self.fits, reason=self.reason,
                    calibration=self.calibration)
        if self.fits:
            result = self.plan.result
            data.update(plan=self.plan.to_dict(), busy_fraction=self.busy_fraction, days=self.days,
                        step_time_s=result.step_time_s, tokens_per_s=result.tokens_per_s, mfu=result.mfu,
                        tflops_per_gpu=result.tflops_per_gpu, run_cost=self.run_cost.to_dict())
        return data


def compare(model, clusters, tokens: float, global_batch: int, seq: int, prices: dict | None = None,
            grid_kg_per_kwh: float | None = None, pue: float | None = None, **pinned) -> list[ClusterChoice]:
    """Best plan and run cost per cluster, fastest time-to-train first (non-fitting last).

    `clusters`: cluster strings or ClusterSpecs. `prices`: GPU name or alias -> USD per
    GPU-hour, replacing the catalogue price of every cluster of that GPU. `pinned`: any of
    planner.search.PINNABLE, applied on every cluster (`precision` defaults to bf16, fp16
    on GPUs without bf16). Bad input raises MeshplanError; a cluster the model does not
    fit on is returned with `reason` set.
    """
    from planner.zoo import ModelSpec, load_model
    specs = _parse_clusters(clusters)
    _check_run_inputs(tokens, global_batch, seq, grid_kg_per_kwh, pue, pinned)
    specs = _apply_prices(specs, prices or {})
    spec = model if isinstance(model, ModelSpec) else load_model(model)
    pue = DEFAULT_PUE if pue is None else pue
    grid = DEFAULT_GRID_KG_PER_KWH if grid_kg_per_kwh is None else grid_kg_per_kwh
    choices = [_choose(spec, cluster, tokens, global_batch, seq, pue, grid, pinned) for cluster in specs]
    return sorted(choices, key=lambda c: (not c.fits, c.run_cost.time_to_train_s if c.fits else 0.0))


def _parse_clusters(clusters) -> list[ClusterSpec]:
    if isinstance(clusters, (str, ClusterSpec)):
        clusters = [clusters]
    specs = [c if isinstance(c, ClusterSpec) else parse_cluster(c) for c in clusters if str(c).strip()]
    if not specs:
        raise MeshplanError("give at least one cluster, e.g. --clusters h100-sxm-80gb:64x8,a100-sxm-80gb:128x8")
    return specs


def _check_run_inputs(tokens, global_batch, seq, grid_kg_per_kwh, pue, pinned) -> None:
    from planner.search import PINNABLE
    if isinstance(tokens, bool) or not isinstance(tokens, (int, float)) or not 0 < tokens < math.inf:
        raise MeshplanError(f"--tokens must be a positive number of training tokens (e.g. 300e9), got {tokens!r}")
    for name, value in (("--global-batch", global_batch), ("--seq", seq)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise MeshplanError(f"{name} must be a whole number >= 1, got {value!r}")
    if pue is not None and not 1 <= pue < math.inf:
        raise MeshplanError(f"--pue must be at least 1 (IT power included), got {pue!r}")
    if grid_kg_per_kwh is not None and not 0 <= grid_kg_per_kwh < math.inf:
        raise MeshplanError(f"--grid-kg-per-kwh must not be negative, got {grid_kg_per_kwh!r}")
    unknown = sorted(set(pinned) - set(PINNABLE))
    if unknown:
        raise MeshplanError(f"cannot pin {unknown}; pinnable: {', '.join(PINNABLE)}")


def _apply_prices(specs: list[ClusterSpec], prices: dict) -> list[ClusterSpec]:
    """Each cluster with its GPU's overriding price; a price for a GPU no cluster uses is an error."""
    used = {c.gpu.name for c in specs}
    by_gpu = {}
    for name, usd in prices.items():
        gpu = name.strip().lower() if name.strip().lower() in used else _gpu_name(name)
        if gpu not in used:
            raise MeshplanError(f"--price names {name!r} but no cluster uses it; the clusters use "
                                f"{', '.join(sorted(used))}")
        if isinstance(usd, bool) or not isinstance(usd, (int, float)) or not 0 <= usd < math.inf:
            raise MeshplanError(f"--price {name}: the price per GPU-hour must be a number >= 0, got {usd!r}")
        by_gpu[gpu] = float(usd)
    return [c.with_price(by_gpu[c.gpu.name]) if c.gpu.name in by_gpu else c for c in specs]


def _gpu_name(name: str) -> str:
    try:
        return get_gpu(name).name
    except MeshplanError as exc:
        raise MeshplanError(f"--price {name}=...: {exc}") from None


def _choose(spec, cluster: ClusterSpec, tokens, global_batch, seq, pue, grid, pinned) -> ClusterChoice:
    from planner.search import plan
    choice = ClusterChoice(cluster.name, cluster.gpu.name, cluster.world_size, cluster.price_usd_per_gpu_hour,
                           calibration=calibration_line(default_calibration(cluster.gpu)))
    pins = dict(pinned)
    precision = pins.pop("precision", "bf16" if "bf16" in cluster.gpu.peak_flops else "fp16")
    try:
        choice.plan = plan(spec, cluster, global_batch, seq, precision=precision, top_k=1, **pins)[0]
    except MeshplanError as exc:
        choice.reason = str(exc)
        return choice
    result = choice.plan.result
    choice.busy_fraction = busy_fraction(result)
    choice.run_cost = run_cost(tokens, result.tokens_per_s, cluster.world_size, cluster.price_usd_per_gpu_hour,
                               cluster.gpu.tdp_w, choice.busy_fraction, pue=pue, grid_kg_per_kwh=grid)
    return choice


def busy_fraction(result) -> float:
    """Mean over pipeline ranks of the time a rank's layers run (recompute, and the TP and
    FSDP communication inside them, included) per step; every rank stands for the same number
    of GPUs. Pipeline bubbles, the gradient reduction after backward and idle time count as idle."""
    busy_s = result.timeline.busy_s if result.timeline is not None else [result.phases["compute_s"]]
    return min(sum(busy_s) / len(busy_s) / result.step_time_s, 1.0)


# -- command line --------------------------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="preset name, config .json, or file.py:factory")
    p.add_argument("--clusters", required=True,
                   help="comma-separated clusters: GPU:NODESxGPUS, named systems or .yaml/.json files")
    p.add_argument("--tokens", type=float, required=True, help="training tokens, e.g. 300e9")
    p.add_argument("--global-batch", type=int, required=True, help="sequences per optimizer step")
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--price", action="append", default=[], metavar="GPU=USD",
                   help="USD per GPU-hour for a GPU type (repeatable; default: the catalogue's price)")
    p.add_argument("--grid-kg-per-kwh", type=float,
                   help=f"grid carbon intensity, kg CO2e per kWh (default {DEFAULT_GRID_KG_PER_KWH})")
    p.add_argument("--pue", type=float, help=f"data-centre power usage effectiveness (default {DEFAULT_PUE})")
    p.add_argument("--json", action="store_true", help='print {"clusters": [...]}')
    p.add_argument("--plot", help="write days, $ and MWh per cluster as bar charts (.png; never overwritten)")
    pins = p.add_argument_group("pin a dimension on every cluster (the search fills in the rest)")
    for flag in ("tp", "pp", "zero", "micro-batch"):
        pins.add_argument(f"--{flag}", type=int)
    pins.add_argument("--checkpoint", choices=CHECKPOINT_MODES)
    pins.add_argument("--schedule", choices=SCHEDULES)


def run(args) -> int:
    """Print the comparison; exit 0 when at least one cluster can train the model, else 1."""
    if args.plot:
        check_new_path(args.plot)
    clusters = [c.strip() for c in args.clusters.split(",") if c.strip()]
    pinned = {k: getattr(args, k) for k in PIN_FLAGS if getattr(args, k) is not None}
    choices = compare(args.model, clusters, args.tokens, args.global_batch, args.seq,
                      prices=parse_prices(args.price), grid_kg_per_kwh=args.grid_kg_per_kwh, pue=args.pue,
                      **pinned)
    if args.plot:
        compare_png(choices, args.plot, title=f"{args.model}, {args.tokens:.3g} tokens")
    if args.json:
        print(json.dumps({"model": args.model, "tokens": args.tokens, "clusters": [c.to_dict() for c in choices]}))
    else:
        _print_table(choices, args.model, args.tokens)
    return 0 if any(c.fits for c in choices) else 1


def parse_prices(items: list[str]) -> dict:
    """`["h100=2.5", ...]` -> {"h100": 2.5}; a malformed item is a one-line error."""
    prices = {}
    for item in items:
        name, sep, value = item.partition("=")
        try:
            usd = float(value)
        except ValueError:
            usd = None
        if not sep or not name.strip() or usd is None:
            raise MeshplanError(f"--price {item!r}: write GPU=USD_PER_HOUR, e.g. --price h100-sxm-80gb=2.50")
        prices[name.strip()] = usd
    return prices


def _plan_summary(plan) -> str:
    return f"dp{plan.dp} tp{plan.tp} pp{plan.pp} zero{plan.zero}"


def _print_table(choices: list[ClusterChoice], model: str, tokens: float) -> None:
    from rich.table import Table
    table = Table(title=f"{model}: {tokens:.3g} tokens, best plan per cluster, fastest first")
    for col in ("cluster", "GPUs", "best plan", "step s", "MFU", "days", "GPU-hours", "$", "MWh", "t CO2"):
        table.add_column(col, justify="left" if col in ("cluster", "best plan") else "right")
    for c in choices:
        if not c.fits:
            table.add_row(c.cluster, str(c.gpus), "[red]does not fit[/red] (below)", *["-"] * 7)
            continue
        r, cost = c.plan.result, c.run_cost
        table.add_row(c.cluster, str(c.gpus), _plan_summary(c.plan), f"{r.step_time_s:.3f}", f"{100 * r.mfu:.1f}%",
                      f"{c.days:,.1f}", f"{cost.gpu_hours:,.0f}", f"{cost.cost_usd:,.0f}",
                      f"{cost.energy_kwh / 1e3:,.1f}", f"{cost.co2_kg / 1e3:,.1f}")
    console = console_for(table)
    console.print(table)
    for c in choices:
        if not c.fits:
            console.print(f"{c.cluster}: {c.reason}", highlight=False)
    for line in dict.fromkeys(c.calibration for c in choices):   # one per GPU, in table order
        console.print(line, highlight=False)


def compare_png(choices: list[ClusterChoice], path: str, title: str = "") -> None:
    """Three bar charts side by side: days, dollars and MWh per cluster (non-fitting: no bar)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    labels = [c.cluster for c in choices]
    panels = (("days to train", lambda c: c.days), ("cost (USD)", lambda c: c.run_cost.cost_usd),
              ("energy (MWh)", lambda c: c.run_cost.energy_kwh / 1e3))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 0.5 * len(choices) + 2.5), sharey=True)
    y = list(range(len(choices)))
    for ax, (label, value) in zip(axes, panels):
        ax.barh(y, [value(c) if c.fits else 0.0 for c in choices], color="#4C72B0")
        for i, c in enumerate(choices):
            if not c.fits:
                ax.text(0, i, " does not fit", va="center", color="#C44E52")
        ax.set_xlabel(label)
    axes[0].set_yticks(y, labels)
    axes[0].invert_yaxis()
    fig.suptitle(title or "training run per cluster")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
