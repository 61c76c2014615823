"""Clusters: nodes x GPUs of one type, with an intra-node link and an inter-node network.

Build one from
- a preset string `GPU:NODESxGPUS` (`a100-sxm-80gb:128x8`, `h100:1x1`, `cpu:1x4`),
- a named system, optionally with a node count (`dgx-h100`, `dgx-a100:16`),
- a YAML or JSON file (see `cluster_from_dict` for the keys).
Bandwidths are unidirectional per GPU, in bytes/s; latencies in seconds.
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from cost_models.errors import MeshplanError
from cost_models.failures import Reliability, reliability_from_dict
from cost_models.hardware import GPUSpec, custom_gpu, get_gpu
from cost_models.inputs import MAX_GPUS, MAX_GPUS_PER_NODE, finite_number, load_file, shown, whole_number
from cost_models.units import GB, GBIT_BYTES, GIB, US

LINK_KINDS = ("nvlink", "pcie", "infiniband", "ethernet", "shm")
# Typical one-hop latencies (alpha terms), first-principles orders of magnitude that the
# communication model's calibration refines: NVLink/NVSwitch ~ a few us per NCCL hop,
# InfiniBand/RoCE ~ 5 us, PCIe through the host ~ 5 us, gloo over loopback ~ 20 us.
DEFAULT_LATENCY_S = {"nvlink": 3 * US, "pcie": 5 * US, "infiniband": 5 * US,
                     "ethernet": 10 * US, "shm": 20 * US}


# Datasheet: a DGX A100 node ships 1 TB of system memory for its 8 GPUs (DGX H100: 2 TB).
# The default CPU memory one GPU's share of a node offers to optimizer offload.
HOST_MEMORY_BYTES_PER_GPU = 1e12 / 8


@dataclass(frozen=True)
class LinkSpec:
    """A link as one GPU sees it: unidirectional bandwidth per GPU and one-hop latency."""

    kind: str
    bandwidth_bytes_per_s: float
    latency_s: float

    def __post_init__(self):
        if self.kind not in LINK_KINDS:
            raise MeshplanError(f"unknown link kind {shown(self.kind)}; use one of {', '.join(LINK_KINDS)}")
        finite_number(self.bandwidth_bytes_per_s, f"{self.kind} link bandwidth", low=0, low_open=True)
        finite_number(self.latency_s, f"{self.kind} link latency", low=0)


@dataclass(frozen=True)
class ClusterSpec:
    name: str
    gpu: GPUSpec
    nodes: int
    gpus_per_node: int
    intra_node: LinkSpec
    inter_node: LinkSpec
    price_usd_per_gpu_hour: float
    host_memory_bytes_per_gpu: float = HOST_MEMORY_BYTES_PER_GPU   # what optimizer offload may fill
    reliability: Reliability = Reliability()   # failures, checkpoint bandwidth, restart, spot (cost_models.failures)

    def __post_init__(self):
        whole_number(self.nodes, "cluster nodes", high=MAX_GPUS)
        whole_number(self.gpus_per_node, "cluster gpus_per_node", high=MAX_GPUS_PER_NODE)
        if self.nodes * self.gpus_per_node > MAX_GPUS:
            raise MeshplanError(f"cluster of {self.nodes:,} x {self.gpus_per_node} = "
                                f"{self.nodes * self.gpus_per_node:,} GPUs: meshplan plans at most {MAX_GPUS:,}")
        finite_number(self.price_usd_per_gpu_hour, "cluster price per GPU-hour", low=0)
        finite_number(self.host_memory_bytes_per_gpu, "cluster host memory per GPU", low=0)

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node

    def with_price(self, usd_per_gpu_hour: float) -> "ClusterSpec":
        return replace(self, price_usd_per_gpu_hour=usd_per_gpu_hour)

    def with_reliability(self, **changes) -> "ClusterSpec":
        return replace(self, reliability=replace(self.reliability, **changes))

    def summary(self) -> str:
        return (f"{self.name}: {self.nodes} node(s) x {self.gpus_per_node} x {self.gpu.display_name} "
                f"= {self.world_size} devices, {self.world_size * self.gpu.memory_bytes / GIB:,.0f} GiB in all; "
                f"intra-node {self.intra_node.kind} {self.intra_node.bandwidth_bytes_per_s / GB:.0f} GB/s per device, "
                f"inter-node {self.inter_node.kind} {self.inter_node.bandwidth_bytes_per_s / GBIT_BYTES:.0f} Gb/s per device; "
                f"${self.price_usd_per_gpu_hour:.2f} per device-hour")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["gpu"] = self.gpu.name
        d["world_size"] = self.world_size
        return d


def default_intra_link(gpu: GPUSpec) -> LinkSpec:
    if gpu.name == "cpu":
        return LinkSpec("shm", 5 * GB, DEFAULT_LATENCY_S["shm"])
    if gpu.nvlink_bw_bytes_per_s > 0:
        return LinkSpec("nvlink", gpu.nvlink_bw_bytes_per_s, DEFAULT_LATENCY_S["nvlink"])
    return LinkSpec("pcie", gpu.host_link_bw_bytes_per_s, DEFAULT_LATENCY_S["pcie"])


def default_inter_link(gpu: GPUSpec) -> LinkSpec:
    kind = "ethernet" if gpu.name == "cpu" or gpu.nvlink_bw_bytes_per_s == 0 else "infiniband"
    return LinkSpec(kind, gpu.scaleout_bw_bytes_per_s, DEFAULT_LATENCY_S[kind])


@dataclass(frozen=True)
class SystemSpec:
    """A named node design: GPU type, GPUs per node, and its NICs."""

    gpu: str
    gpus_per_node: int
    nic_Gbps_per_gpu: float
    description: str


# Reference node designs, from gpu_specs.json's typical_scaleout_note fields.
SYSTEMS = {
    "dgx-2": SystemSpec("v100-32gb", 16, 50, "16x V100 32GB, NVSwitch, 8x 100 Gb/s EDR IB"),
    "dgx-a100": SystemSpec("a100-sxm-80gb", 8, 200, "8x A100 80GB, NVSwitch, 8x 200 Gb/s HDR IB"),
    "dgx-a100-40gb": SystemSpec("a100-sxm-40gb", 8, 200, "8x A100 40GB, NVSwitch, 8x 200 Gb/s HDR IB"),
    "dgx-h100": SystemSpec("h100-sxm-80gb", 8, 400, "8x H100 80GB, NVSwitch, 8x 400 Gb/s NDR IB"),
    "dgx-h200": SystemSpec("h200-141gb", 8, 400, "8x H200 141GB, NVSwitch, 8x 400 Gb/s"),
    "dgx-b200": SystemSpec("b200", 8, 400, "8x B200, NVSwitch (NVLink 5), 8x 400 Gb/s"),
    "mi300x-8": SystemSpec("mi300x", 8, 400, "8x MI300X, Infinity Fabric, 8x 400 Gb/s"),
}

_PRESET = re.compile(r"^(?P<gpu>[A-Za-z0-9._-]+):(?P<nodes>\d+)x(?P<per>\d+)$")
_SYSTEM = re.compile(r"^(?P<system>[A-Za-z0-9._-]+)(:(?P<nodes>\d+))?$")


def _system_cluster(system: str, nodes: int) -> ClusterSpec:
    spec = SYSTEMS[system]
    gpu = get_gpu(spec.gpu)
    inter = LinkSpec("infiniband", spec.nic_Gbps_per_gpu * GBIT_BYTES, DEFAULT_LATENCY_S["infiniband"])
    return ClusterSpec(f"{system}:{nodes}" if nodes > 1 else system, gpu, nodes, spec.gpus_per_node,
                       default_intra_link(gpu), inter, gpu.price_usd_per_hour)


def parse_cluster(text: str) -> ClusterSpec:
    """A cluster from a preset string, a named system, or a YAML/JSON file path."""
    if isinstance(text, ClusterSpec):
        return text
    if not isinstance(text, (str, Path)):
        raise MeshplanError(f"a cluster is a string such as a100-sxm-80gb:128x8 or a .yaml/.json path, "
                            f"not {shown(text)}")
    text = str(text).strip()
    path = Path(text)
    if path.suffix.lower() in (".yaml", ".yml", ".json"):
        return cluster_from_file(path)
    match = _PRESET.match(text)
    if match:
        gpu = get_gpu(match["gpu"])
        nodes, per = _count(match["nodes"], "nodes"), _count(match["per"], "gpus_per_node")
        return ClusterSpec(f"{gpu.name}:{nodes}x{per}", gpu, nodes, per,
                           default_intra_link(gpu), default_inter_link(gpu), gpu.price_usd_per_hour)
    match = _SYSTEM.match(text)
    if match and match["system"].lower() in SYSTEMS:
        return _system_cluster(match["system"].lower(), _count(match["nodes"] or "1", "nodes"))
    raise MeshplanError(
        f"cannot read cluster {text!r}: use GPU:NODESxGPUS (e.g. a100-sxm-80gb:128x8), a named "
        f"system ({', '.join(SYSTEMS)}, optionally :NODES) or a .yaml/.json file")


def _count(digits: str, what: str) -> int:
    """A count from a cluster string; absurdly long ones stop here, before int() or any work."""
    if len(digits) > 12:
        raise MeshplanError(f"cluster {what} must be a whole number from 1 to {MAX_GPUS:,}, got {len(digits)} digits")
    return int(digits)


def cluster_from_file(path: Path) -> ClusterSpec:
    data = load_file(path, "cluster file")
    if not isinstance(data, dict):
        raise MeshplanError(f"cluster file {str(path)!r} must hold a mapping of keys, not {type(data).__name__}")
    return cluster_from_dict(data, where=str(path))


_CLUSTER_KEYS = {"name", "system", "gpu", "nodes", "gpus_per_node", "intra_node", "inter_node",
                 "price_usd_per_gpu_hour", "reliability"}
_LINK_KEYS = {"kind", "bandwidth_GBps", "bandwidth_Gbps", "latency_us"}


def cluster_from_dict(data: dict, where: str = "cluster") -> ClusterSpec:
    """Keys: `gpu` (catalogue name or a custom-GPU mapping), `nodes`, `gpus_per_node`,
    optional `system` (a named system to start from), `name`, `price_usd_per_gpu_hour`,
    `intra_node`/`inter_node` mappings with `kind`, `bandwidth_GBps` or `bandwidth_Gbps`
    (per GPU, unidirectional) and `latency_us`, and `reliability` (cost_models.failures:
    failure_rate_per_gpu_hour, checkpoint_write_GBps_per_gpu, restart_s,
    spot_price_usd_per_gpu_hour, preemption_rate_per_node_hour)."""
    if not isinstance(data, dict):
        raise MeshplanError(f"{where} must be a mapping of keys, not {shown(data)}")
    unknown = sorted(map(str, set(data) - _CLUSTER_KEYS))
    if unknown:
        raise MeshplanError(f"{where}: unknown key(s) {unknown}; allowed: {sorted(_CLUSTER_KEYS)}")
    if "system" in data:
        system = str(data["system"]).lower() if isinstance(data["system"], str) else None
        if system not in SYSTEMS:
            raise MeshplanError(f"{where}: unknown system {shown(data['system'])}; known: {', '.join(SYSTEMS)}")
        base = _system_cluster(system, 1)
    elif "gpu" in data:
        gpu = _gpu_from(data["gpu"], where)
        base = ClusterSpec(gpu.name, gpu, 1, 1, default_intra_link(gpu), default_inter_link(gpu),
                           gpu.price_usd_per_hour)
    else:
        raise MeshplanError(f"{where}: give `gpu` (a catalogue name) or `system` ({', '.join(SYSTEMS)})")
    gpu = _gpu_from(data["gpu"], where) if "gpu" in data else base.gpu
    nodes = whole_number(data.get("nodes", 1), f"{where}: nodes", high=MAX_GPUS)
    per = whole_number(data.get("gpus_per_node", base.gpus_per_node), f"{where}: gpus_per_node",
                       high=MAX_GPUS_PER_NODE)
    name = data.get("name", where)
    if not isinstance(name, (str, int, float)) or isinstance(name, bool):
        raise MeshplanError(f"{where}: name must be text, got {shown(name)}")
    return ClusterSpec(
        name=str(name), gpu=gpu, nodes=nodes, gpus_per_node=per,
        intra_node=_link_from(data.get("intra_node"), default_intra_link(gpu), f"{where}: intra_node"),
        inter_node=_link_from(data.get("inter_node"), base.inter_node, f"{where}: inter_node"),
        price_usd_per_gpu_hour=_number(data.get("price_usd_per_gpu_hour", gpu.price_usd_per_hour),
                                       f"{where}: price_usd_per_gpu_hour"),
        reliability=reliability_from_dict(data.get("reliability"), f"{where}: reliability"))


def _gpu_from(value, where: str) -> GPUSpec:
    if isinstance(value, str):
        return get_gpu(value)
    if isinstance(value, dict):
        return custom_gpu(value)
    raise MeshplanError(f"{where}: `gpu` must be a catalogue name or a mapping, not {shown(value)}")


def _number(value, where: str, positive: bool = False) -> float:
    return finite_number(value, where, low=0, low_open=positive)


def _link_from(value, default: LinkSpec, where: str) -> LinkSpec:
    if value is None:
        return default
    if not isinstance(value, dict):
        raise MeshplanError(f"{where} must be a mapping with kind/bandwidth_GBps/latency_us")
    unknown = sorted(map(str, set(value) - _LINK_KEYS))
    if unknown:
        raise MeshplanError(f"{where}: unknown key(s) {unknown}; allowed: {sorted(_LINK_KEYS)}")
    if "bandwidth_GBps" in value and "bandwidth_Gbps" in value:
        raise MeshplanError(f"{where}: give bandwidth_GBps (bytes) or bandwidth_Gbps (bits), not both")
    bandwidth = default.bandwidth_bytes_per_s
    if "bandwidth_GBps" in value:
        bandwidth = _number(value["bandwidth_GBps"], f"{where}.bandwidth_GBps", positive=True) * GB
    elif "bandwidth_Gbps" in value:
        bandwidth = _number(value["bandwidth_Gbps"], f"{where}.bandwidth_Gbps", positive=True) * GBIT_BYTES
    kind = value.get("kind", default.kind)
    if kind not in LINK_KINDS:
        raise MeshplanError(f"{where}: unknown link kind {shown(kind)}; use one of {', '.join(LINK_KINDS)}")
    latency = (_number(value["latency_us"], f"{where}.latency_us") * US if "latency_us" in value
               else DEFAULT_LATENCY_S.get(kind, default.latency_s))
    return LinkSpec(kind, bandwidth, latency)
