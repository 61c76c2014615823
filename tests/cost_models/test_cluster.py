import json

import pytest

from cost_models import MeshplanError, SYSTEMS, parse_cluster
from cost_models.units import GB, GBIT_BYTES


def test_preset_string():
    c = parse_cluster("a100-sxm-80gb:128x8")
    assert (c.nodes, c.gpus_per_node, c.world_size) == (128, 8, 1024)
    assert c.gpu.name == "a100-sxm-80gb"
    assert c.intra_node.kind == "nvlink" and c.intra_node.bandwidth_bytes_per_s == pytest.approx(300 * GB)
    assert c.inter_node.bandwidth_bytes_per_s == pytest.approx(200 * GBIT_BYTES)
    assert c.price_usd_per_gpu_hour == c.gpu.price_usd_per_hour


def test_pcie_cards_use_pcie_inside_a_node():
    c = parse_cluster("l40s:2x4")
    assert c.intra_node.kind == "pcie" and c.inter_node.kind == "ethernet"


def test_named_systems():
    for name, system in SYSTEMS.items():
        c = parse_cluster(name)
        assert c.nodes == 1 and c.gpus_per_node == system.gpus_per_node
    c = parse_cluster("dgx-h100:16")
    assert c.world_size == 128 and c.inter_node.kind == "infiniband"
    assert c.inter_node.bandwidth_bytes_per_s == pytest.approx(400 * GBIT_BYTES)


def test_yaml_and_json_files(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("gpu: h100\nnodes: 4\ngpus_per_node: 8\n"
                 "inter_node: {kind: ethernet, bandwidth_Gbps: 100, latency_us: 12}\n"
                 "price_usd_per_gpu_hour: 2.5\n")
    c = parse_cluster(str(y))
    assert c.world_size == 32 and c.price_usd_per_gpu_hour == 2.5
    assert c.inter_node.kind == "ethernet" and c.inter_node.latency_s == pytest.approx(12e-6)
    assert c.inter_node.bandwidth_bytes_per_s == pytest.approx(100 * GBIT_BYTES)
    j = tmp_path / "c.json"
    j.write_text(json.dumps({"system": "dgx-a100", "nodes": 2,
                             "gpu": {"base": "a100", "memory_GB": 100, "name": "a100-100"}}))
    c = parse_cluster(str(j))
    assert c.world_size == 16 and c.gpu.memory_bytes == 100 * GB


@pytest.mark.parametrize("text,fragment", [
    ("z100:1x8", "unknown GPU"),
    ("h100:0x8", "nodes must be"),
    ("h100:8", "cannot read cluster"),
    ("dgx-z:2", "cannot read cluster"),
])
def test_bad_presets(text, fragment):
    with pytest.raises(MeshplanError, match=fragment):
        parse_cluster(text)


@pytest.mark.parametrize("content,fragment", [
    ("gpu: h100\nnodez: 2\n", "unknown key"),
    ("gpu: [h100\n", "not valid YAML"),
    ("- 1\n- 2\n", "must hold a mapping"),
    ("nodes: 2\n", "give `gpu`"),
    ("gpu: h100\nnodes: two\n", "nodes must be"),
    ("gpu: h100\nintra_node: {bandwidth_GBps: -3}\n", "must be positive"),
    ("gpu: h100\nintra_node: {bandwidth_GBps: 3, bandwidth_Gbps: 4}\n", "not both"),
])
def test_malformed_cluster_files(tmp_path, content, fragment):
    path = tmp_path / "bad.yaml"
    path.write_text(content)
    with pytest.raises(MeshplanError, match=fragment):
        parse_cluster(str(path))


def test_missing_cluster_file(tmp_path):
    with pytest.raises(MeshplanError, match="does not exist"):
        parse_cluster(str(tmp_path / "nope.json"))
