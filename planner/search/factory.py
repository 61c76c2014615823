"""What a file.py:factory model can take, for the search: its blocks (a pipeline's unit),
whether the runtime can cut it into stages, and its tensor-parallel layout.

A factory model has no config: its blocks are those the tracer finds (repeated modules,
planner.trace.find_units), counted from one trace. The runtime cuts a model into stages
by torch.fx (runtime.split), so pp > 1 needs a model fx can trace with its blocks as
leaves - the tracer's first route; a model the tracer had to run through make_fx (Python
control flow on shapes, say) trains with pp 1. Tensor parallelism is what the TP-layout
ILP finds for its blocks in the runtime's terms (planner.search.tp_ilp, `factory=True`:
linears only, a column-parallel one feeding row-parallel ones), solved per micro-batch,
precision and tp; a layout that splits no linear is no reason to pay for tp, so such a
candidate is skipped.
"""
from __future__ import annotations

import time
from dataclasses import replace

from cost_models.compute import gemm_dims
from cost_models.errors import MeshplanError
from planner.plan import Plan
from planner.search.tp_ilp import layouts_for
from planner.simulate import model_key, trace_cached
from planner.trace.skeleton import ROUTES

SPLIT_STYLES = ("colwise", "rowwise")


class FactorySearch:
    """Mixin of planner.search.ranking._Search."""

    def block_count(self) -> int:
        """The blocks a pipeline splits: a config's layers, or a factory's traced blocks."""
        if self.spec.config is not None:
            return self.spec.config.layers
        return len(self.factory_trace().blocks)

    def factory_trace(self):
        """The model traced at micro-batch 1 (block count, route, shapes)."""
        if getattr(self, "_factory_traced", None) is None:
            precision = self.values("precision", ("bf16",))[0]
            self._factory_traced = trace_cached(model_key(self.spec), 1, self.seq, precision, "autocast")
        return self._factory_traced

    def factory_pp_unfit(self) -> str | None:
        traced = self.factory_trace()
        if traced.route != ROUTES[0]:
            return (f"needs the model traced by {ROUTES[0]} with its blocks as leaves, which is how the runtime "
                    f"cuts it into stages; {self.spec.name} traces only by {traced.route}")
        return None

    def factory_tp_unfit(self, tp: int) -> str | None:
        traced = self.factory_trace()
        if not traced.blocks:
            return f"splits block linears only, and {self.spec.name} has no repeated blocks"
        for index in traced.blocks:
            for op in traced.cost_of(index).ops:
                if op.kind == "linear" and op.gemm is not None:
                    _, k, n, _ = gemm_dims(op.gemm)
                    if n % tp == 0 or k % tp == 0:
                        return None
        return f"divides no feature count of a linear in {self.spec.name}'s blocks (tp splits linears only)"

    def factory_layout(self, plan: Plan) -> Plan | None:
        """The plan with the ILP's layout for its blocks (only the split linears listed), or
        None, with the candidate recorded as skipped, when the layout splits nothing or the
        ILP cannot take the model's blocks."""
        key = (plan.micro_batch, plan.precision, plan.tp)
        if key not in self._layouts:
            try:
                sim = self.simulation(plan)
                started = time.perf_counter()
                blocks = layouts_for(sim.traced, self.compute, self.comm, sim.tp_group, factory=True)
            except MeshplanError as exc:   # e.g. a block whose output the ILP's graph cannot take
                self._layouts[key] = str(exc)
            else:
                self.stats.tp_ilp_s += time.perf_counter() - started
                self.stats.tp_ilp_solves += blocks.solves
                layout = {k: v for k, v in blocks.plan_layout().items() if v in SPLIT_STYLES}
                self._layouts[key] = layout or (f"the TP-layout ILP splits no linear at tp {plan.tp}, micro-batch "
                                                f"{plan.micro_batch}: tp would only repeat the work")
        layout = self._layouts[key]
        if isinstance(layout, str):   # why this candidate gets no layout
            self.skip(plan, layout)
            return None
        return replace(plan, tp_layout=dict(layout))
