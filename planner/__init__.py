"""Planner: model zoo, Plan schema, tracing, search and simulation; the `meshplan` CLI.

Depends on `cost_models`; never on `runtime`.
"""
from planner import torch_compat  # noqa: F401  first: on a torch older than the floor, stop in one line
from planner.plan import Plan
from planner.zoo import PRESETS, ModelSpec, load_model
from planner.models import Decoder, ModelConfig

__all__ = ["Plan", "PRESETS", "ModelSpec", "load_model", "Decoder", "ModelConfig"]
