"""Plan one model on several clusters and price the whole training run (`meshplan compare`).

For every cluster the planner's best plan (`planner.search.plan`, top 1) gives a step time;
`cost_models.energy.run_cost` turns it into time-to-train for `tokens` tokens, GPU-hours,
dollars (the catalogue's price per GPU-hour unless overridden), energy (GPU power at the
simulated compute-busy fraction, times the PUE) and CO2 (energy x grid intensity).

Failures and preemption (cost_models.failures): each run is also priced with the cluster's
interruptions - hardware failures, and on spot capacity preemptions - checkpointing at the
Young/Daly interval and restarting after each: wall time, GPU-hours, $, energy and CO2 at
the resulting goodput, beside the failure-free figures. A cluster with a spot price is
priced on spot too. `pareto` marks the options (on-demand or spot, failures included) no
other option beats on both time and dollars.

A cluster on which nothing fits stays in the output with the planner's one-line reason;
the others are still priced. Results are sorted by time-to-train, clusters that cannot
train the model last.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from cost_models import ClusterSpec, MeshplanError, get_gpu, parse_cluster
from cost_models.calibration import calibration_line, default_calibration
from cost_models.energy import DEFAULT_GRID_KG_PER_KWH, DEFAULT_PUE, RunCost, run_cost
from cost_models.failures import CHECKPOINT_BYTES_PER_PARAM, Forecast, forecast
from cost_models.inputs import MAX_GLOBAL_BATCH, MAX_SEQ, finite_number, shown, whole_number
from planner.models import count_parameters

SECONDS_PER_DAY = 86400.0
MAX_CLUSTERS = 64   # each is planned in full
PIN_FLAGS = ("tp", "pp", "zero", "micro_batch", "checkpoint", "schedule")
# How far off a cluster's time (and so its cost) may be when its GPU's calibration is
# transferred from another GPU's: the H100 fit transferred to the A100 misses vTrain's measured
# A100 runs by 24.1 % MAPE single-node (median 18.6 %) and 12.6 % multi-node, where the A100's
# own fit misses by 6.9 % and 7.5 % (benchmarks/transfer_error.py; docs/accuracy.md).
TRANSFERRED_UNCERTAINTY = 0.25


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
    with_failures: "Interrupted | None" = None   # on-demand, failures and checkpoints included
    spot: "Interrupted | None" = None            # on spot capacity (when the cluster has a spot price)
    measured: bool = True          # its GPU's calibration was fitted on it (else transferred from another)

    @property
    def fits(self) -> bool:
        return self.plan is not None

    @property
    def uncertainty(self) -> float:
        """Relative uncertainty of its time and cost from the calibration alone (0: measured)."""
        return 0.0 if self.measured else TRANSFERRED_UNCERTAINTY

    @property
    def days(self) -> float:
        return self.run_cost.time_to_train_s / SECONDS_PER_DAY if self.fits else math.inf

    def to_dict(self) -> dict:
        data = dict(cluster=self.cluster, gpu=self.gpu, gpus=self.gpus,
                    price_usd_per_gpu_hour=self.price_usd_per_gpu_hour, fits=self.fits, reason=self.reason,
                    calibration=self.calibration, calibration_measured=self.measured,
                    time_uncertainty=self.uncertainty)
        if self.fits:
            result = self.plan.result
            data.update(plan=self.plan.to_dict(), busy_fraction=self.busy_fraction, days=self.days,
                        step_time_s=result.step_time_s, tokens_per_s=result.tokens_per_s, mfu=result.mfu,
                        tflops_per_gpu=result.tflops_per_gpu, run_cost=self.run_cost.to_dict(),
                        with_failures=self.with_failures.to_dict(),
                        spot=self.spot.to_dict() if self.spot else None)
        return data


@dataclass
class Interrupted:
    """A run priced with interruptions: its forecast and the run cost at that goodput."""

    price_usd_per_gpu_hour: float
    forecast: Forecast
    run_cost: RunCost | None      # None when failures outpace progress (goodput 0)
    pareto: bool = False          # no other option is both faster and cheaper
    pareto_co2: bool = False      # no other option is both faster and lower in CO2

    @property
    def days(self) -> float:
        return self.run_cost.time_to_train_s / SECONDS_PER_DAY if self.run_cost else math.inf

    def to_dict(self) -> dict:
        return dict(price_usd_per_gpu_hour=self.price_usd_per_gpu_hour, forecast=self.forecast.to_dict(),
                    run_cost=self.run_cost.to_dict() if self.run_cost else None, days=self.days, pareto=self.pareto,
                    pareto_co2=self.pareto_co2)


def compare(model, clusters, tokens: float, global_batch: int, seq: int, prices: dict | None = None,
            grid_kg_per_kwh: float | None = None, pue: float | None = None, engine: str = "meshplan",
            engine_options: dict | None = None, spot_prices: dict | None = None,
            preemption_rates: dict | None = None, failure_rate_per_gpu_hour: float | None = None,
            on_cluster=None, moe_imbalance: float = 1.0, **pinned) -> list[ClusterChoice]:
    """Best plan and run cost per cluster, fastest time-to-train first (non-fitting last).

    `clusters`: cluster strings or ClusterSpecs. `prices`: GPU name or alias -> USD per
    GPU-hour, replacing the catalogue price of every cluster of that GPU; `spot_prices` and
    `preemption_rates` (per node-hour) likewise set spot capacity, and
    `failure_rate_per_gpu_hour` every cluster's hardware failure rate (cost_models.failures
    has the defaults and the cluster-file keys). `pinned`: any of
    planner.plan.PINNABLE, applied on every cluster (`precision` defaults to bf16, fp16
    on GPUs without bf16). `engine`, `engine_options`: the training engine that runs the
    plans (planner.engines). `on_cluster(i, n, name)`, if given, is called before each cluster
    is planned (a progress display). Bad input raises MeshplanError; a cluster the model does
    not fit on is returned with `reason` set.
    """
    from planner.engines import get_engine
    from planner.search.ranking import check_pins_for_engine
    from planner.zoo import load_model
    _check_run_inputs(tokens, global_batch, seq, grid_kg_per_kwh, pue, pinned)
    runner = get_engine(engine)
    check_pins_for_engine(pinned, runner)
    pinned = {**pinned, "engine": runner.name, "engine_options": runner.checked_options(engine_options),
              "moe_imbalance": moe_imbalance}   # the busiest expert-parallel rank's load (planner.search.plan)
    specs = _parse_clusters(clusters)
    specs = _apply_prices(specs, prices or {})
    specs = _apply_reliability(specs, spot_prices or {}, preemption_rates or {}, failure_rate_per_gpu_hour)
    spec = load_model(model)
    checkpoint_bytes = count_parameters(spec.build("meta")) * CHECKPOINT_BYTES_PER_PARAM
    pue = DEFAULT_PUE if pue is None else pue
    grid = DEFAULT_GRID_KG_PER_KWH if grid_kg_per_kwh is None else grid_kg_per_kwh
    choices = []
    for i, cluster in enumerate(specs, 1):
        if on_cluster is not None:
            on_cluster(i, len(specs), cluster.name)
        choices.append(_choose(spec, cluster, tokens, global_batch, seq, pue, grid, pinned))
    for choice, cluster in zip(choices, specs):
        if choice.fits:
            _price_interruptions(choice, cluster, checkpoint_bytes, pue, grid)
    _mark_pareto(choices)
    return sorted(choices, key=lambda c: (not c.fits, c.run_cost.time_to_train_s if c.fits else 0.0))


def _price_interruptions(choice: ClusterChoice, cluster: ClusterSpec, checkpoint_bytes: float, pue, grid) -> None:
    """The run on demand and, with a spot price, on spot - failures, checkpoints, restarts included."""
    rel = cluster.reliability
    options = [("with_failures", cluster.price_usd_per_gpu_hour, False)]
    if rel.spot_price_usd_per_gpu_hour is not None:
        options.append(("spot", rel.spot_price_usd_per_gpu_hour, True))
    for name, price, spot in options:
        outlook = forecast(choice.run_cost.time_to_train_s, cluster.world_size, cluster.nodes, checkpoint_bytes,
                           rel, spot=spot)
        cost = None
        if outlook.goodput > 0:
            cost = run_cost(outlook.wall_s, 1.0, cluster.world_size, price, cluster.gpu.tdp_w, choice.busy_fraction,
                            pue=pue, grid_kg_per_kwh=grid)   # `wall_s` seconds at 1 "token" per second
        setattr(choice, name, Interrupted(price, outlook, cost))


def _mark_pareto(choices: list[ClusterChoice]) -> None:
    """Flag the options (on-demand or spot, interruptions included) that no other option beats
    on both wall time and dollars (`pareto`), and on both wall time and CO2 (`pareto_co2`)."""
    options = [o for c in choices if c.fits for o in (c.with_failures, c.spot) if o is not None and o.run_cost]
    for o in options:
        o.pareto = _unbeaten(o, options, "cost_usd")
        o.pareto_co2 = _unbeaten(o, options, "co2_kg")


def _unbeaten(option: Interrupted, options: list[Interrupted], other: str) -> bool:
    """No option is at least as fast and as low in `other` (a RunCost field), and better in one."""
    mine = (option.run_cost.time_to_train_s, getattr(option.run_cost, other))
    return not any(p.run_cost.time_to_train_s <= mine[0] and getattr(p.run_cost, other) <= mine[1]
                   and (p.run_cost.time_to_train_s, getattr(p.run_cost, other)) != mine for p in options)


def _parse_clusters(clusters) -> list[ClusterSpec]:
    if isinstance(clusters, (str, ClusterSpec)):
        clusters = [clusters]
    if not isinstance(clusters, (list, tuple)):
        raise MeshplanError(f"clusters must be a list of cluster strings or ClusterSpecs, got {shown(clusters)}")
    if len(clusters) > MAX_CLUSTERS:
        raise MeshplanError(f"{len(clusters):,} clusters: compare plans each in full and takes at most {MAX_CLUSTERS}")
    specs = [parse_cluster(c) for c in clusters if not isinstance(c, str) or c.strip()]
    if not specs:
        raise MeshplanError("give at least one cluster, e.g. --clusters h100-sxm-80gb:64x8,a100-sxm-80gb:128x8")
    return specs


def _check_run_inputs(tokens, global_batch, seq, grid_kg_per_kwh, pue, pinned) -> None:
    finite_number(tokens, "--tokens (training tokens, e.g. 300e9)", low=0, low_open=True)
    whole_number(global_batch, "--global-batch", high=MAX_GLOBAL_BATCH)
    whole_number(seq, "--seq", high=MAX_SEQ)
    if pue is not None:
        finite_number(pue, "--pue (IT power included)", low=1)
    if grid_kg_per_kwh is not None:
        finite_number(grid_kg_per_kwh, "--grid-kg-per-kwh", low=0)
    from planner.search.ranking import check_pinned
    check_pinned(dict(pinned), 1, global_batch, seq)   # a bad pin is the user's, not a cluster's reason


def _apply_prices(specs: list[ClusterSpec], prices: dict) -> list[ClusterSpec]:
    """Each cluster with its GPU's overriding price; a price for a GPU no cluster uses is an error."""
    by_gpu = _per_gpu(specs, prices, "--price", "the price per GPU-hour")
    return [c.with_price(by_gpu[c.gpu.name]) if c.gpu.name in by_gpu else c for c in specs]


def _apply_reliability(specs: list[ClusterSpec], spot_prices: dict, preemption_rates: dict,
                       failure_rate: float | None) -> list[ClusterSpec]:
    """Each cluster with the spot prices, preemption rates and failure rate given as arguments."""
    spot = _per_gpu(specs, spot_prices, "--spot-price", "the spot price per GPU-hour")
    rates = _per_gpu(specs, preemption_rates, "--preemption-rate", "preemptions per node-hour")
    if failure_rate is not None:
        finite_number(failure_rate, "--failure-rate (failures per GPU-hour)", low=0)
    out = []
    for c in specs:
        changes = {}
        if c.gpu.name in spot:
            changes["spot_price_usd_per_gpu_hour"] = spot[c.gpu.name]
        if c.gpu.name in rates:
            changes["preemption_rate_per_node_hour"] = rates[c.gpu.name]
        if failure_rate is not None:
            changes["failure_rate_per_gpu_hour"] = failure_rate
        out.append(c.with_reliability(**changes) if changes else c)
    return out


def _per_gpu(specs: list[ClusterSpec], values: dict, flag: str, what: str) -> dict:
    """{catalogue GPU name: number} from {GPU name or alias: number}; a GPU no cluster uses is an error."""
    if not isinstance(values, dict):
        raise MeshplanError(f"{flag} values must map GPU names to numbers, got {shown(values)}")
    used = {c.gpu.name for c in specs}
    by_gpu = {}
    for name, number in values.items():
        if not isinstance(name, str):
            raise MeshplanError(f"{flag}: a GPU name must be text, got {shown(name)}")
        gpu = name.strip().lower() if name.strip().lower() in used else _gpu_name(name, flag)
        if gpu not in used:
            raise MeshplanError(f"{flag} names {name!r} but no cluster uses it; the clusters use "
                                f"{', '.join(sorted(used))}")
        by_gpu[gpu] = finite_number(number, f"{flag} {name}: {what}", low=0)
    return by_gpu


def _gpu_name(name: str, flag: str) -> str:
    try:
        return get_gpu(name).name
    except MeshplanError as exc:
        raise MeshplanError(f"{flag} {name}=...: {exc}") from None


def _choose(spec, cluster: ClusterSpec, tokens, global_batch, seq, pue, grid, pinned) -> ClusterChoice:
    from planner.search import plan
    calibration = default_calibration(cluster.gpu)
    choice = ClusterChoice(cluster.name, cluster.gpu.name, cluster.world_size, cluster.price_usd_per_gpu_hour,
                           calibration=calibration_line(calibration, bool(getattr(spec.config, "experts", 0)),
                                                        pinned.get("precision") == "fp8"),
                           measured=calibration.measured)
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

