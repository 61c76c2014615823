"""plan(model, cluster, global_batch, seq): the best parallel plans of a model on a cluster.

Modules: ranking (plan(), the bounded walk over candidates, ranked by simulated step time),
space (the dp x tp x pp families and candidate plans), partition (stage split and
per-layer checkpointing), tp_graph and tp_ilp (the TP layout of a block, an ILP),
diagnosis (why nothing fits), explain (why the winner won, in words).
"""
from planner.search.ranking import PINNABLE, RankedPlans, Rejection, SearchStats, describe_family, plan
from planner.search.tp_ilp import BlockLayouts, TpLayout, layouts_for, solve_tp_layout

__all__ = ["plan", "PINNABLE", "RankedPlans", "Rejection", "SearchStats", "describe_family", "layouts_for",
           "solve_tp_layout", "BlockLayouts", "TpLayout"]
