"""Communication cost model: placement from rank order, alpha-beta formulas, link choice."""
import pytest

from cost_models import MeshplanError, parse_cluster
from cost_models.comm import (ALGORITHMS, COLLECTIVES, DEFAULT_BW_EFFICIENCY, CommModel, group_placement,
                              ring_all_reduce_s, ring_scatter_gather_s, tree_all_reduce_s)
from cost_models.units import GB

DGX = parse_cluster("dgx-h100:128")                 # 128 nodes x 8 H100, NVLink + 8x400 Gb/s NDR
MESH = {"pp": 4, "dp": 32, "tp": 8}
NVLINK_BPS = DGX.intra_node.bandwidth_bytes_per_s * DEFAULT_BW_EFFICIENCY["nvlink"]
IB_BPS = DGX.inter_node.bandwidth_bytes_per_s * DEFAULT_BW_EFFICIENCY["infiniband"]


@pytest.fixture
def comm():
    return CommModel(DGX)


# --------------------------------------------------------------------------- placement

def test_default_order_puts_tp_in_a_node_and_spreads_dp_and_pp():
    tp = group_placement(DGX, MESH, "tp")
    assert (tp.size, tp.nodes_spanned, tp.members_per_node, tp.rank_stride) == (8, 1, 8, 1)
    dp = group_placement(DGX, MESH, "dp")
    assert (dp.size, dp.nodes_spanned, dp.members_per_node, dp.rank_stride) == (32, 32, 1, 8)
    pp = group_placement(DGX, MESH, "pp")
    assert (pp.size, pp.nodes_spanned, pp.members_per_node) == (4, 4, 1)
    assert tp.uniform and dp.uniform and not tp.crosses_nodes and dp.crosses_nodes


def test_rank_order_decides_placement():
    # tp outermost: its 8 members are 32*4 = 128 ranks apart -> 8 nodes, 1 member each
    tp = group_placement(DGX, MESH, "tp", order=("tp", "pp", "dp"))
    assert (tp.nodes_spanned, tp.members_per_node) == (8, 1)
    # dp of 16 innermost on 8-GPU nodes: 2 nodes with 8 members each
    dp = group_placement(DGX, {"dp": 16, "tp": 8}, "dp", order=("tp", "dp"))
    assert (dp.nodes_spanned, dp.members_per_node) == (2, 8)
    # tp of 2 inside dp of 4 inside a node, dp strided by 2: 4 members on one node
    dp = group_placement(DGX, {"dp": 4, "tp": 2}, "dp")
    assert (dp.size, dp.nodes_spanned, dp.members_per_node, dp.rank_stride) == (4, 1, 4, 2)


def test_degrees_that_do_not_align_with_nodes_give_several_patterns():
    tp = group_placement(parse_cluster("h100:2x8"), {"dp": 5, "tp": 3}, "tp", order=("dp", "tp"))
    assert not tp.uniform
    assert tp.patterns == ((1, 3), (2, 2))        # ranks 6,7 | 8 straddle the node boundary


@pytest.mark.parametrize("degrees, dim, order, fragment", [
    ({"pp": 4, "dp": 64, "tp": 8}, "dp", ("pp", "dp", "tp"), "needs 2048 devices"),
    ({"ep": 2}, "ep", ("pp", "dp", "tp"), "not in the rank order"),
    ({"dp": 2}, "cp", ("pp", "dp", "tp"), "not in the rank order"),
    ({"dp": 0}, "dp", ("pp", "dp", "tp"), "whole number >= 1"),
    ({"dp": 2}, "dp", ("dp", "dp"), "repeats"),
])
def test_placement_mistakes_are_user_errors(degrees, dim, order, fragment):
    with pytest.raises(MeshplanError, match=fragment):
        group_placement(DGX, degrees, dim, order)


# --------------------------------------------------------------------------- formulas

def test_one_rank_or_no_bytes_costs_nothing(comm):
    single = group_placement(DGX, {"dp": 1}, "dp")
    for kind in COLLECTIVES:
        assert comm.time_s(kind, 1e9, single) == 0.0
        assert comm.time_s(kind, 0, group_placement(DGX, MESH, "dp")) == 0.0


def test_ring_formula_limits():
    bw, alpha = 100 * GB, 5e-6
    assert ring_all_reduce_s(2, 1e9, bw, alpha) == pytest.approx(2 * alpha + 1e9 / bw)
    # large n: each rank moves 2(n-1)/n -> 2 buffers; bus bandwidth = link bandwidth
    big = ring_all_reduce_s(1024, 1e12, bw, 0.0)
    assert 1e12 / big * 2 * 1023 / 1024 == pytest.approx(bw)
    assert big == pytest.approx(2 * 1e12 / bw, rel=1e-3)
    assert ring_scatter_gather_s(8, 8e9, bw, 0.0) == pytest.approx(7e9 / bw)
    # latency grows linearly with n on a ring, logarithmically on a tree
    assert ring_all_reduce_s(64, 0, bw, alpha) == pytest.approx(126 * alpha)
    assert tree_all_reduce_s(64, 0, bw, alpha) == pytest.approx(12 * alpha)


def test_intra_node_tp8_is_faster_than_tp8_over_8_nodes(comm):
    inside = group_placement(DGX, MESH, "tp")
    across = group_placement(DGX, MESH, "tp", order=("tp", "pp", "dp"))
    for kind in ("all_reduce", "reduce_scatter", "all_gather", "all_to_all"):
        for nbytes in (1e4, 1e7, 1e9):
            assert comm.time_s(kind, nbytes, inside) < comm.time_s(kind, nbytes, across)
    # 1 GB all-reduce: bandwidth term on NVLink vs on one NIC share per GPU
    assert comm.all_reduce_s(1e9, inside) == pytest.approx(ring_all_reduce_s(8, 1e9, NVLINK_BPS, DGX.intra_node.latency_s))
    assert comm.all_reduce_s(1e9, across) == pytest.approx(ring_all_reduce_s(8, 1e9, IB_BPS, DGX.inter_node.latency_s))


def test_hierarchical_all_reduce_is_rs_in_node_ar_across_ag_in_node(comm):
    dp = group_placement(DGX, {"dp": 16, "tp": 8}, "dp", order=("tp", "dp"))   # 2 nodes x 8
    nbytes = 4e9
    node_stage = ring_scatter_gather_s(8, nbytes, NVLINK_BPS, DGX.intra_node.latency_s)
    cross = ring_all_reduce_s(2, nbytes / 8, IB_BPS, DGX.inter_node.latency_s)
    cost = comm.collective("all_reduce", nbytes, dp, algorithm="ring")
    assert cost.intra_s == pytest.approx(2 * node_stage)
    assert cost.inter_s == pytest.approx(cross)
    assert cost.time_s == pytest.approx(2 * node_stage + cross)
    # 8 members per node share the cross-node traffic: far faster than a flat 16-rank IB ring
    assert cost.time_s < ring_all_reduce_s(16, nbytes, IB_BPS, DGX.inter_node.latency_s) / 4


def test_tree_wins_small_messages_ring_wins_large_and_the_choice_is_exposed(comm):
    dp = group_placement(DGX, MESH, "dp")
    small, large = comm.collective("all_reduce", 1e4, dp), comm.collective("all_reduce", 4e9, dp)
    assert small.algorithm == "tree" and large.algorithm == "ring"
    assert set(small.candidates) == {"ring", "tree"}
    assert small.time_s == min(small.candidates.values())
    forced = comm.collective("all_reduce", 1e4, dp, algorithm="ring")
    assert forced.algorithm == "ring" and forced.time_s > small.time_s
    with pytest.raises(MeshplanError, match="no 'tree' algorithm"):
        comm.collective("all_gather", 1e4, dp, algorithm="tree")
    assert all(comm.collective(k, 1e6, dp).algorithm in ALGORITHMS[k] for k in COLLECTIVES)


def test_times_grow_with_bytes_for_every_collective_and_placement(comm):
    for dim in ("tp", "dp", "pp"):
        group = group_placement(DGX, MESH, dim)
        for kind in COLLECTIVES:
            times = [comm.time_s(kind, b, group) for b in (1e2, 1e4, 1e6, 1e8, 1e10)]
            assert times == sorted(times) and times[0] > 0, (dim, kind)


def test_p2p_across_nodes_uses_the_inter_node_link(comm):
    pp = group_placement(DGX, MESH, "pp")
    nbytes = 64e6
    expected = DGX.inter_node.latency_s + nbytes / IB_BPS
    assert comm.time_s("p2p", nbytes, pp) == pytest.approx(expected)
    assert comm.p2p_s(nbytes, cross_node=True) == pytest.approx(expected)
    assert comm.p2p_s(nbytes, cross_node=False) == pytest.approx(DGX.intra_node.latency_s + nbytes / NVLINK_BPS)
    inside = group_placement(DGX, {"pp": 4, "tp": 2}, "pp")           # 4 stages in one node
    assert comm.time_s("p2p", nbytes, inside) == comm.p2p_s(nbytes, cross_node=False)


def test_all_to_all_splits_traffic_between_links(comm):
    ep = group_placement(DGX, {"dp": 16, "tp": 8}, "dp", order=("tp", "dp"))   # 2 nodes x 8
    cost = comm.collective("all_to_all", 16e6, ep)
    remote_s = 8 * (DGX.inter_node.latency_s + 1e6 / IB_BPS)               # 8 off-node peers, 1 MB each
    assert cost.time_s == pytest.approx(remote_s) and cost.inter_s == cost.time_s


def test_achieved_fractions_are_overridable():
    dp = group_placement(DGX, MESH, "dp")
    base = CommModel(DGX).collective("all_reduce", 4e9, dp, algorithm="ring")
    slow = CommModel(DGX, bw_efficiency={"infiniband": 0.4}).collective("all_reduce", 4e9, dp, algorithm="ring")
    latency_s = 31 * 2 * DGX.inter_node.latency_s
    assert slow.time_s - latency_s == pytest.approx(2 * (base.time_s - latency_s))
    with pytest.raises(MeshplanError, match="must be > 0"):
        CommModel(DGX, bw_efficiency={"nvlink": 0})


def test_slower_nics_slow_only_the_cross_node_stage():
    half = parse_cluster("dgx-h100:128")
    half = type(half)(**{**vars(half), "inter_node": type(half.inter_node)(
        "infiniband", half.inter_node.bandwidth_bytes_per_s / 2, half.inter_node.latency_s)})
    tp, dp = group_placement(DGX, MESH, "tp"), group_placement(DGX, MESH, "dp")
    assert CommModel(half).all_reduce_s(1e9, tp) == CommModel(DGX).all_reduce_s(1e9, tp)
    assert CommModel(half).all_reduce_s(1e9, dp) > 1.9 * CommModel(DGX).all_reduce_s(1e9, dp)


def test_bad_collective_arguments_are_user_errors(comm):
    dp = group_placement(DGX, MESH, "dp")
    with pytest.raises(MeshplanError, match="unknown collective"):
        comm.time_s("broadcast_all", 1e6, dp)
    with pytest.raises(MeshplanError, match="bytes >= 0"):
        comm.time_s("all_reduce", -1, dp)
