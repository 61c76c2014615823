"""Per-layer time records of a simulated step: one micro-batch through a layer (LayerTimes)
and the part of its FSDP communication left exposed (FsdpExposure)."""
from __future__ import annotations

from typing import NamedTuple


class LayerTimes(NamedTuple):
    """One micro-batch through a layer (or summed over a stage's layers): forward and
    backward as the schedule runs them, and the parts of them that are recomputation and
    exposed TP, FSDP and expert-parallel communication (what the phases report)."""

    fwd_s: float
    bwd_s: float
    recompute_s: float
    tp_comm_s: float
    fsdp_comm_s: float
    ep_comm_s: float = 0.0
    cp_comm_s: float = 0.0


class FsdpExposure(NamedTuple):
    """Exposed FSDP communication of one micro-batch through a layer, by what the action
    issues (planner.simulate.fsdp.play says which actions issue what)."""

    forward_gather_s: float = 0.0
    backward_gather_s: float = 0.0
    backward_scatter_s: float = 0.0
    backward_gather_scatter_s: float = 0.0

    def backward_s(self, gathers: bool, scatters: bool) -> float:
        if gathers:
            return self.backward_gather_scatter_s if scatters else self.backward_gather_s
        return self.backward_scatter_s if scatters else 0.0
