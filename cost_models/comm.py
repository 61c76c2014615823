"""Collective communication times on a hierarchical cluster (alpha-beta per link type).

Topology: GPUs inside a node talk over the intra-node link (NVLink/NVSwitch, PCIe, shared
memory); nodes talk over the inter-node network (InfiniBand/RoCE/Ethernet). Both links
are given per GPU and per direction (`ClusterSpec`); a node's NICs are shared out per GPU
(8 NICs on an 8-GPU node: one each), so the inter-node part of a collective runs over
the members' own NIC shares in parallel.

Where a group sits is decided by the rank order of the device mesh (`group_placement`):
ranks are laid out outermost -> innermost (default pp, dp, tp), so on 8-GPU nodes a TP
group of 8 is one node, while a DP group of 32 spans 32 nodes with one member on each.

Conventions (those of nccl-tests' PERFORMANCE.md). `nbytes` is the full buffer on one
rank: all-reduce's buffer, reduce-scatter's input, all-gather's output, all-to-all's send
buffer, a point-to-point message. With n ranks, per-rank traffic (and the "bus bandwidth"
factor busbw = algbw * factor) is:
  all-reduce (ring)        2(n-1)/n * nbytes, in 2(n-1) steps
  reduce-scatter/all-gather (n-1)/n * nbytes, in n-1 steps
  all-to-all               (n-1)/n * nbytes, to n-1 peers
  point-to-point           nbytes, one step
Time = steps * alpha + traffic / (link bandwidth * achieved fraction). Tree all-reduce
(NCCL's double binary tree) takes 2 ceil(log2 n) steps but moves ~2 * nbytes per rank:
it wins on small messages, ring on large ones. NCCL-like, `collective` prices every
algorithm available for the collective and picks the fastest, reporting the choice.
Multi-node all-reduce is hierarchical: reduce-scatter inside each node, all-reduce of a
1/m shard across nodes (ring or tree), all-gather inside each node; reduce-scatter and
all-gather likewise run a node stage and a cross-node stage.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np

from cost_models.calibration import Calibration, shipped_calibration
from cost_models.cluster import ClusterSpec, LinkSpec
from cost_models.errors import MeshplanError

COLLECTIVES = ("all_reduce", "reduce_scatter", "all_gather", "all_to_all", "p2p")
# NCCL implements reduce-scatter and all-gather with rings only (its tree algorithm is
# for all-reduce); all-to-all is pairwise send/receive; p2p is one send.
ALGORITHMS = {"all_reduce": ("ring", "tree"), "reduce_scatter": ("ring",), "all_gather": ("ring",),
              "all_to_all": ("pairwise",), "p2p": ("direct",)}
DEFAULT_ORDER = ("pp", "dp", "tp")

# Achievable fraction of a link's peak for large messages: EMPIRICAL, overridable by a
# calibration (`meshplan profile` on several GPUs measures it) or the `bw_efficiency`
# argument. nvlink: nccl-tests all-reduce busbw on 8x A100 SXM (NVLink3, 300 GB/s per
# direction) is typically 230-250 GB/s, about 0.8 (H100 reaches more only through NVLink
# SHARP, which is not modelled). infiniband: nccl-tests multi-node busbw is typically
# reported at 80-90% of NIC line rate; we take 0.8. pcie and ethernet: assumed (protocol
# and host overheads), not measured. shm: the cluster's shared-memory figure for gloo is
# already an effective rate, so it is not derated.
DEFAULT_BW_EFFICIENCY = {"nvlink": 0.80, "infiniband": 0.80, "pcie": 0.75, "ethernet": 0.70, "shm": 1.0}


# --------------------------------------------------------------------------- placement

@dataclass(frozen=True)
class GroupPlacement:
    """How the process groups of one mesh dimension sit on nodes.

    size: ranks per group. nodes_spanned / members_per_node: for the group holding rank 0.
    patterns: every distinct (nodes spanned, most members on one node) over all groups of
    the dimension; more than one only when the degrees do not align with the node size
    (e.g. tp=3 on 8-GPU nodes). The collective time is that of the slowest pattern.
    """

    dim: str
    size: int
    nodes_spanned: int
    members_per_node: int
    rank_stride: int
    patterns: tuple = field(default=())

    @property
    def uniform(self) -> bool:
        return len(self.patterns) <= 1

    @property
    def crosses_nodes(self) -> bool:
        return any(k > 1 for k, _ in self.patterns)


def group_placement(cluster: ClusterSpec, degrees: dict, dim, order: tuple = DEFAULT_ORDER) -> GroupPlacement:
    """Placement of dimension `dim`'s groups for mesh `degrees` laid out in rank `order`.
    `dim` may be a tuple of dimensions: one group spans all of them (the data-parallel
    ranks times the context-parallel ones, which reduce gradients together); it is named
    after the first.

    Rank r has mesh coordinates from r in mixed radix, `order[-1]` varying fastest (stride 1);
    rank r lives on node r // gpus_per_node.
    """
    order = tuple(order)
    dims = tuple(dim) if isinstance(dim, (tuple, list)) else (dim,)
    unknown = sorted(set(degrees) - set(order))
    if unknown:
        raise MeshplanError(f"mesh dimension(s) {unknown} are not in the rank order {list(order)}")
    for one in dims:
        if one not in order:
            raise MeshplanError(f"dimension {one!r} is not in the rank order {list(order)}")
    if len(set(order)) != len(order):
        raise MeshplanError(f"rank order {list(order)} repeats a dimension")
    sizes = tuple(_degree(degrees.get(d, 1), d) for d in order)
    world = math.prod(sizes)
    if world > cluster.world_size:
        raise MeshplanError(f"mesh {dict(zip(order, sizes))} needs {world} devices; "
                            f"the cluster has {cluster.world_size}")
    return _placement(sizes, tuple(sorted(order.index(d) for d in dims)), cluster.gpus_per_node, dims[0])


def _degree(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise MeshplanError(f"degree of {name} must be a whole number >= 1, got {value!r}")
    return value


@lru_cache(maxsize=4096)
def _placement(sizes: tuple, axes: tuple, gpus_per_node: int, dim: str) -> GroupPlacement:
    size = math.prod(sizes[a] for a in axes)
    groups = np.moveaxis(np.arange(math.prod(sizes)).reshape(sizes), axes, range(-len(axes), 0)).reshape(-1, size)
    nodes = np.sort(groups // gpus_per_node, axis=1)
    spans, most = _node_counts(nodes)
    patterns = tuple(sorted(set(zip(spans.tolist(), most.tolist()))))
    stride = math.prod(sizes[axes[-1] + 1:])
    return GroupPlacement(dim, size, int(spans[0]), int(most[0]), stride, patterns)


def _node_counts(nodes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row of sorted node ids: distinct nodes, and the longest run (members on one node)."""
    rows, size = nodes.shape
    starts = np.ones((rows, size + 1), dtype=bool)       # column `size` closes the last run
    starts[:, 1:size] = nodes[:, 1:] != nodes[:, :-1]
    spans = starts[:, :size].sum(axis=1)
    flat = np.flatnonzero(starts.ravel())
    lengths, owner, column = np.diff(flat), flat[:-1] // (size + 1), flat[:-1] % (size + 1)
    real = column < size                                 # drop the row-closing pseudo-runs
    most = np.zeros(rows, dtype=np.int64)
    np.maximum.at(most, owner[real], lengths[real])
    return spans, most


def pair_group(cross_node: bool) -> GroupPlacement:
    """Two ranks outside the mesh's dimensions (e.g. the first and last pipeline stage that
    share a tied embedding): on two nodes, or on one."""
    pattern = (2, 1) if cross_node else (1, 2)
    return GroupPlacement("pair", 2, *pattern, rank_stride=0, patterns=(pattern,))


# --------------------------------------------------------------------------- first principles

def ring_all_reduce_s(n: int, nbytes: float, bw_bytes_per_s: float, alpha_s: float) -> float:
    """Reduce-scatter then all-gather around a ring: 2(n-1) steps of nbytes/n each."""
    if n <= 1:
        return 0.0
    return 2 * (n - 1) * alpha_s + 2 * (n - 1) / n * nbytes / bw_bytes_per_s


def tree_all_reduce_s(n: int, nbytes: float, bw_bytes_per_s: float, alpha_s: float) -> float:
    """Double binary tree (NCCL): reduce up and broadcast down, pipelined; log-depth latency."""
    if n <= 1:
        return 0.0
    return 2 * math.ceil(math.log2(n)) * alpha_s + 2 * nbytes / bw_bytes_per_s


def ring_scatter_gather_s(n: int, nbytes: float, bw_bytes_per_s: float, alpha_s: float) -> float:
    """Ring reduce-scatter or all-gather of an nbytes buffer: n-1 steps of nbytes/n."""
    if n <= 1:
        return 0.0
    return (n - 1) * alpha_s + (n - 1) / n * nbytes / bw_bytes_per_s


def p2p_s(nbytes: float, bw_bytes_per_s: float, alpha_s: float) -> float:
    return alpha_s + nbytes / bw_bytes_per_s if nbytes > 0 else 0.0


_FLAT_ALL_REDUCE = {"ring": ring_all_reduce_s, "tree": tree_all_reduce_s}


# --------------------------------------------------------------------------- the model

@dataclass(frozen=True)
class CollectiveCost:
    """A priced collective: the chosen algorithm, its time, and every candidate's time."""

    kind: str
    nbytes: float
    algorithm: str
    time_s: float
    candidates: dict
    intra_s: float = 0.0       # part of time_s spent on the intra-node link (chosen algorithm)
    inter_s: float = 0.0       # part on the inter-node network


class CommModel:
    """Collective times on one cluster; achieved link fractions from a calibration.

    calibration: its `comm_bw_efficiency` / `comm_latency_s` (by link kind) override the
    defaults; `None` uses the shipped calibration of the cluster's GPU if it has comm data.
    bw_efficiency / latency_s: explicit per-link-kind overrides, applied last.
    """

    def __init__(self, cluster: ClusterSpec, calibration: Calibration | None = None,
                 bw_efficiency: dict | None = None, latency_s: dict | None = None):
        calibration = calibration if calibration is not None else shipped_calibration(cluster.gpu.name)
        self.cluster = cluster
        self.bw_efficiency = {**DEFAULT_BW_EFFICIENCY, **(calibration.comm_bw_efficiency if calibration else {}),
                              **(bw_efficiency or {})}
        self.latency_s = {**(calibration.comm_latency_s if calibration else {}), **(latency_s or {})}
        for kind, fraction in self.bw_efficiency.items():
            if not fraction > 0:
                raise MeshplanError(f"achieved bandwidth fraction of {kind} must be > 0, got {fraction!r}")

    # -- links ----------------------------------------------------------------------------
    def bandwidth_bytes_per_s(self, link: LinkSpec) -> float:
        """Achieved per-GPU, per-direction bandwidth of a link."""
        return link.bandwidth_bytes_per_s * self.bw_efficiency.get(link.kind, 1.0)

    def alpha_s(self, link: LinkSpec) -> float:
        """Per-step latency: calibrated for the link kind, else the cluster's figure."""
        return self.latency_s.get(link.kind, link.latency_s)

    def _flat(self, link: LinkSpec) -> tuple[float, float]:
        return self.bandwidth_bytes_per_s(link), self.alpha_s(link)

    # -- placement ------------------------------------------------------------------------
    def group(self, degrees: dict, dim: str, order: tuple = DEFAULT_ORDER) -> GroupPlacement:
        return group_placement(self.cluster, degrees, dim, order)

    # -- collectives ----------------------------------------------------------------------
    def collective(self, kind: str, nbytes: float, group: GroupPlacement,
                   algorithm: str | None = None) -> CollectiveCost:
        """Price `kind` over `group`; `algorithm=None` picks the fastest (NCCL-like)."""
        if kind not in COLLECTIVES:
            raise MeshplanError(f"unknown collective {kind!r}; use one of {', '.join(COLLECTIVES)}")
        if isinstance(nbytes, bool) or not isinstance(nbytes, (int, float)) or not nbytes >= 0:
            raise MeshplanError(f"collective size must be a number of bytes >= 0, got {nbytes!r}")
        allowed = ALGORITHMS[kind]
        if algorithm is not None and algorithm not in allowed:
            raise MeshplanError(f"{kind} has no {algorithm!r} algorithm; use one of {', '.join(allowed)}")
        if group.size <= 1 or nbytes == 0:
            return CollectiveCost(kind, nbytes, algorithm or allowed[0], 0.0, {a: 0.0 for a in allowed})
        priced = {a: self._slowest_pattern(kind, a, nbytes, group) for a in allowed}
        chosen = algorithm or min(priced, key=lambda a: sum(priced[a]))
        intra, inter = priced[chosen]
        return CollectiveCost(kind, nbytes, chosen, intra + inter,
                              {a: sum(parts) for a, parts in priced.items()}, intra, inter)

    def time_s(self, kind: str, nbytes: float, group: GroupPlacement, algorithm: str | None = None) -> float:
        # a planner prices the same few collectives thousands of times: remember them
        key = (kind, nbytes, group, algorithm)
        memo = self.__dict__.setdefault("_memo", {})
        if key not in memo:
            if len(memo) > 100_000:
                memo.clear()
            memo[key] = self.collective(kind, nbytes, group, algorithm).time_s
        return memo[key]

    def all_reduce_s(self, nbytes: float, group: GroupPlacement, algorithm: str | None = None) -> float:
        return self.time_s("all_reduce", nbytes, group, algorithm)

    def reduce_scatter_s(self, nbytes: float, group: GroupPlacement) -> float:
        return self.time_s("reduce_scatter", nbytes, group)

    def all_gather_s(self, nbytes: float, group: GroupPlacement) -> float:
        return self.time_s("all_gather", nbytes, group)

    def all_to_all_s(self, nbytes: float, group: GroupPlacement) -> float:
        return self.time_s("all_to_all", nbytes, group)

    def p2p_s(self, nbytes: float, cross_node: bool) -> float:
        """One message between two GPUs, on the inter-node link when they are on different nodes."""
        link = self.cluster.inter_node if cross_node else self.cluster.intra_node
        return p2p_s(nbytes, *self._flat(link))

    # -- pricing --------------------------------------------------------------------------
    def _slowest_pattern(self, kind: str, algorithm: str, nbytes: float,
                         group: GroupPlacement) -> tuple[float, float]:
        patterns = group.patterns or ((group.nodes_spanned, group.members_per_node),)
        return max((self._price(kind, algorithm, nbytes, group.size, k, m) for k, m in patterns),
                   key=sum)

    def _price(self, kind: str, algorithm: str, nbytes: float, n: int, nodes: int,
               per_node: int) -> tuple[float, float]:
        """(intra-node seconds, inter-node seconds) for one group of n over `nodes` nodes."""
        intra, inter = self._flat(self.cluster.intra_node), self._flat(self.cluster.inter_node)
        if kind == "p2p":
            return (0.0, p2p_s(nbytes, *inter)) if nodes > 1 else (p2p_s(nbytes, *intra), 0.0)
        if kind == "all_to_all":
            return self._all_to_all(nbytes, n, per_node, intra, inter)
        if nodes == 1:
            return self._one_level(kind, algorithm, nbytes, n, intra), 0.0
        if per_node == 1:
            return 0.0, self._one_level(kind, algorithm, nbytes, n, inter)
        shard = nbytes / per_node
        node_stage = ring_scatter_gather_s(per_node, nbytes, *intra)
        if kind == "all_reduce":
            return 2 * node_stage, _FLAT_ALL_REDUCE[algorithm](nodes, shard, *inter)
        return node_stage, ring_scatter_gather_s(nodes, shard, *inter)

    @staticmethod
    def _one_level(kind: str, algorithm: str, nbytes: float, n: int, link: tuple) -> float:
        if kind == "all_reduce":
            return _FLAT_ALL_REDUCE[algorithm](n, nbytes, *link)
        return ring_scatter_gather_s(n, nbytes, *link)

    @staticmethod
    def _all_to_all(nbytes: float, n: int, per_node: int, intra: tuple, inter: tuple) -> tuple[float, float]:
        """Pairwise exchange: nbytes/n to each peer; same-node peers over the intra link,
        the rest over this GPU's NIC share, both at once (the slower one sets the time)."""
        local_peers, remote_peers = min(per_node, n) - 1, n - min(per_node, n)
        intra_s = local_peers * (intra[1] + nbytes / n / intra[0])
        inter_s = remote_peers * (inter[1] + nbytes / n / inter[0])
        return (intra_s, 0.0) if intra_s >= inter_s else (0.0, inter_s)
