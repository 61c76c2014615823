"""`--from torchtitan` and `--export torchtitan`: the JSON torchtitan writes of its config
(Trainer.Config.to_dict(), b5bcd76) read with its defaults and rules; the export's keys
checked against the field names read from torchtitan's source
(tests/fixtures/interop/engine_config_keys.json); export -> import -> the same plan and step."""
import json
from dataclasses import replace

import pytest

from cost_models import MeshplanError, parse_cluster
from helpers import FIXTURES, assert_user_error
from planner.interop import export_plan, import_job
from planner.interop.base import SplitError
from planner.interop.torchtitan import flavor_config, split_stages
from planner.search import plan as search
from planner.simulate import simulate
from planner.zoo import PRESETS, ModelSpec, load_model

pytestmark = pytest.mark.cli
KEYS = json.loads((FIXTURES / "interop" / "engine_config_keys.json").read_text())["torchtitan"]


def _job(config, world=16):
    return import_job("torchtitan", json.dumps(config), world)


def test_defaults_fsdp_and_selective_recompute():
    """No parallelism section: data_parallel_shard_degree -1 takes every rank (FSDP, ZeRO-3),
    and Trainer.Config's default activation checkpointing is SelectiveAC."""
    job = _job({"model_spec": {"name": "llama3", "flavor": "8B"},
                "training": {"num_tokens_per_microbatch_per_dp_rank": 8192, "max_context_length": 4096}})
    f = job.fields
    assert (f["dp"], f["zero"], f["micro_batch"], f["global_batch"], f["seq"]) == (16, 3, 2, 32, 4096)
    assert f["precision"] == "bf16" and f["checkpoint"] == ["selective"] * 32
    assert job.model.config == PRESETS["llama3-8b"] and job.engine == "torchtitan"


def test_pipeline_split_zero2_and_batch():
    job = _job({"model_spec": {"name": "llama3", "flavor": "8B"},
                "training": {"num_tokens_per_microbatch_per_dp_rank": 8192, "max_context_length": 8192,
                             "mixed_precision_param": "float32"},
                "parallelism": {"tensor_parallel_degree": 2, "pipeline_parallel_degree": 4,
                                "num_pp_microbatches": 8},
                "activation_checkpoint": {"preserve_rng_state": True, "determinism_check": "default",
                                          "debug": False}})
    f = job.fields
    assert (f["dp"], f["tp"], f["pp"], f["zero"]) == (2, 2, 4, 2)    # "default" keeps params with pp: ZeRO-2
    assert (f["micro_batch"], f["global_batch"], f["sequence_parallel"], f["precision"]) == (1, 16, True, "fp32")
    # 32 layers + 1 + 1 weights over 4 stages: 9, 9, 8, 8 effective; embedding and head take one each
    assert f["stages"] == [[0, 8], [8, 17], [17, 25], [25, 32]]
    assert f["checkpoint"] == ["full"] * 32                          # FullAC.Config's keys only


def test_split_matches_torchtitans_example():
    """The docstring example of _generate_llm_fqn_per_model_part (2 stages, 3 layers, weights 2/2),
    stepped through its code: 7 effective layers, 4 and 3 per stage; the embedding takes 2 of
    stage 0's 4, the norm and head 2 of stage 1's 3."""
    assert split_stages(2, 3, 2, 2) == [[0, 2], [2, 3]]


@pytest.mark.parametrize("config, fragment", [
    ({"training": {"seq_len": 2048}}, "unknown key(s) ['seq_len']"),
    ({"job": {}}, "unknown section(s) ['job']"),
    ({"parallelism": {"data_parallel_replicate_degree": 2, "data_parallel_shard_degree": 8}}, "HSDP"),
    ({"parallelism": {"context_parallel_degree": 2}}, "context_parallel_degree"),
    ({"compile": {"enable": True}}, "torch.compile"),
    ({"parallelism": {"pipeline_parallel_degree": 2, "pipeline_parallel_schedule": "ZBVZeroBubble"}}, "ZBVZeroBubble"),
    ({"model_spec": {"name": "deepseek_v3", "flavor": "16B"}}, "llama3 flavors"),
    ({"training": {"num_tokens_per_microbatch_per_dp_rank": 3000}}, "whole number of max_context_length"),
])
def test_bad_configs_get_one_line(cli, tmp_path, config, fragment):
    config.setdefault("model_spec", {"name": "llama3", "flavor": "debugmodel"})
    path = tmp_path / "job.json"
    path.write_text(json.dumps(config))
    assert_user_error(cli("simulate", "--from", "torchtitan", str(path), "--cluster", "h100-sxm-80gb:2x8"), fragment)


def test_flavors_are_torchtitans():
    """compute_ffn_hidden_dim gives Llama 3's published FFN widths for the preset flavors."""
    for flavor, preset in (("8B", "llama3-8b"), ("70B", "llama3-70b"), ("405B", "llama3-405b")):
        assert flavor_config(flavor, 8192) == PRESETS[preset]
    assert flavor_config("1B", 2048).ffn == 8192 and flavor_config("debugmodel", 2048).ffn == 768


@pytest.mark.parametrize("pins", [dict(pp=1, checkpoint="full"), dict(pp=2, tp=2, checkpoint="selective")])
def test_export_round_trip(tmp_path, pins):
    cluster = parse_cluster("h100-sxm-80gb:1x8")
    config = flavor_config("debugmodel", 2048)
    spec = ModelSpec(config.name, config)
    best = search(spec, cluster, 32, 2048, top_k=1, engine="torchtitan", **pins)[0]
    try:
        step_s, files = best.result.step_time_s, export_plan("torchtitan", best, spec, cluster, str(tmp_path))
    except SplitError:
        best = replace(best, stages=[])
        step_s = simulate(best, spec, cluster).step_time_s
        files = export_plan("torchtitan", best, spec, cluster, str(tmp_path))
    job = json.loads((tmp_path / "job_config.json").read_text())
    assert set(job) <= set(KEYS["sections"]["keys"])
    for section in ("training", "parallelism", "compile"):
        assert set(job[section]) <= set(KEYS[section]["keys"]), section
    imported = import_job("torchtitan", str(tmp_path / "job_config.json"), cluster.world_size)
    again = imported.plan(spec.name, cluster.name)
    for name in ("dp", "tp", "pp", "zero", "micro_batch", "global_batch", "seq", "precision", "schedule",
                 "interleave", "sequence_parallel", "offload_optimizer", "engine"):
        assert getattr(again, name) == getattr(best, name), name
    assert [again.checkpoint_for(i) for i in range(6)] == [best.checkpoint_for(i) for i in range(6)]
    assert simulate(again, imported.model, cluster).step_time_s == pytest.approx(step_s, rel=1e-9)
    module = (tmp_path / "meshplan_torchtitan.py").read_text()
    compile(module, "meshplan_torchtitan.py", "exec")
    assert "def meshplan_plan() -> Trainer.Config" in module and "model_registry('debugmodel')" in module
    assert "--module meshplan_torchtitan --config meshplan_plan" in (tmp_path / "launch.sh").read_text()


def test_export_refuses_a_model_torchtitan_has_not(tmp_path):
    cluster = parse_cluster("h100-sxm-80gb:1x8")
    best = search("gpt3-125m", cluster, 32, 512, top_k=1, engine="torchtitan")[0]
    with pytest.raises(MeshplanError, match="named flavors"):
        export_plan("torchtitan", best, load_model("gpt3-125m"), cluster, str(tmp_path))
