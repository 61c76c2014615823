"""Cost models: the hardware/cluster catalogue and (later) compute, communication and memory.

Lowest layer of meshplan: it imports nothing from `planner` or `runtime`.
"""
from cost_models.errors import MeshplanError
from cost_models.hardware import GPUSpec, GPUS, get_gpu
from cost_models.cluster import ClusterSpec, LinkSpec, parse_cluster, SYSTEMS

__all__ = [
    "MeshplanError", "GPUSpec", "GPUS", "get_gpu",
    "ClusterSpec", "LinkSpec", "parse_cluster", "SYSTEMS",
]
