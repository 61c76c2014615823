"""Runtime: executes a `planner.Plan` with PyTorch's own distributed engine.

Depends on `planner` and `cost_models`; nothing depends on it.
"""
