"""Training engines: how each one runs a plan (its Execution) and which plans it can run.

One module per engine registers its profile (planner.engines.base.register): meshplan (this
project's runtime), megatron-lm and megatron-lm@2021, torchtitan, deepspeed.
"""
# registered in this order, the order help texts list them
from planner.engines import meshplan, megatron_lm, torchtitan, deepspeed  # noqa: F401,I001
from planner.engines.base import DEFAULT_ENGINE, ENGINES, Engine, EngineOption, get_engine, register
from planner.engines.execution import MESHPLAN_RUNTIME, Execution
from planner.engines.megatron_lm import MEGATRON_2021

__all__ = ["DEFAULT_ENGINE", "ENGINES", "Engine", "EngineOption", "Execution", "MEGATRON_2021", "MESHPLAN_RUNTIME",
           "get_engine", "register"]
