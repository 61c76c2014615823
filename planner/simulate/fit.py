"""When a simulated plan does not fit: by how much, and the nearest changes that do.

"Nearest": one plan field changed the way that saves memory - recompute every block, shard
more with ZeRO, halve the micro-batch, offload the optimizer, sequence parallelism, or move
a factor of 2 from data to tensor or pipeline parallelism - each simulated as the plan's
engine would run it; the ones that fit are returned fastest first.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

from cost_models.errors import MeshplanError


@dataclass
class Change:
    flags: str          # the change as simulate's flags, e.g. "--zero 3" or "--tp 4 --dp 8"
    plan: object        # the changed Plan
    result: object      # its SimResult (fits)


def overflow_bytes(result) -> float:
    """How far the worst stage's reserved peak is over the usable capacity (<= 0: fits)."""
    return result.worst_stage.peak_reserved_bytes - result.capacity_bytes


def _variants(plan, layers: int | None):
    """(flags, the fields changed) for each one-field change that saves memory."""
    if layers and any(mode != "full" for mode in (plan.checkpoint or ["none"] * layers)):
        yield "--checkpoint full", dict(checkpoint=["full"] * layers)
    if plan.dp * plan.cp > 1:
        for zero in range(plan.zero + 1, 4):
            yield f"--zero {zero}", dict(zero=zero)
    if plan.micro_batch > 1:
        smaller = plan.micro_batch // 2
        yield f"--micro-batch {smaller}", dict(micro_batch=smaller)
    if not plan.offload_optimizer:
        zero = max(plan.zero, 2)
        yield "--offload-optimizer" + (f" --zero {zero}" if zero != plan.zero else ""), \
            dict(offload_optimizer=True, zero=zero)
    if plan.tp > 1 and not plan.sequence_parallel:
        yield "--sequence-parallel", dict(sequence_parallel=True)
    if plan.dp % 2 == 0:
        yield f"--tp {plan.tp * 2} --dp {plan.dp // 2}", dict(tp=plan.tp * 2, dp=plan.dp // 2, stages=[])
        yield f"--pp {plan.pp * 2} --dp {plan.dp // 2}", dict(pp=plan.pp * 2, dp=plan.dp // 2, stages=[])
        if plan.seq % (4 * plan.cp) == 0:   # each rank keeps half the tokens of a sequence
            yield f"--cp {plan.cp * 2} --dp {plan.dp // 2}", dict(cp=plan.cp * 2, dp=plan.dp // 2)


def nearest_fits(plan, model, cluster, compute=None, comm=None, limit: int = 3) -> list[Change]:
    """Up to `limit` one-field changes of `plan` that fit, fastest first."""
    from planner.simulate.step import simulate
    from planner.zoo import load_model
    spec = load_model(model)
    layers = spec.config.layers if spec.config is not None else None
    fits, seen = [], set()
    for flags, fields in _variants(plan, layers):
        try:
            changed = replace(plan, **fields)
            result = simulate(changed, spec, cluster, compute=compute, comm=comm)
        except MeshplanError:   # a change the plan (ep must divide dp), model, engine or batch cannot take
            continue
        # the same step and memory as a smaller change already found (ZeRO 2 where 1 fits): not nearer
        outcome = (round(result.step_time_s, 6), round(result.worst_stage.peak_reserved_bytes))
        if result.fits and outcome not in seen:
            seen.add(outcome)
            fits.append(Change(flags, changed, result))
    return sorted(fits, key=lambda c: c.result.step_time_s)[:limit]


def advice(plan, result, model, cluster, compute=None, comm=None) -> str:
    """One line: where the plan overflows, by how much, and what nearest change fits."""
    from cost_models.units import GIB
    worst = result.worst_stage
    over = overflow_bytes(result)
    if over <= 0:   # fits the GPU, not the host (offloaded optimizer state)
        head = (f"does not fit: stage {worst.stage}'s offloaded state needs {worst.host_bytes / GIB:.1f} GiB "
                f"of host memory")
    else:
        head = (f"does not fit: stage {worst.stage} needs {worst.peak_reserved_bytes / GIB:.1f} GiB per GPU, "
                f"{over / GIB:.1f} GiB over the {result.capacity_bytes / GIB:.1f} GiB usable")
    changes = nearest_fits(plan, model, cluster, compute, comm)
    if not changes:
        return head + "; no single change fits: let `meshplan plan` search (with the same --model, --cluster, " \
                      "--global-batch and --seq)"
    return head + "; nearest changes that fit: " + ", ".join(
        f"{c.flags} (step {c.result.step_time_s:.3f} s, peak {c.result.worst_stage.peak_reserved_bytes / GIB:.1f} GiB)"
        for c in changes)
