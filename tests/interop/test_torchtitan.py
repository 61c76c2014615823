"""`--from torchtitan` and `--export torchtitan`: the JSON torchtitan writes of its config
(Trainer.Config.to_dict(), b5bcd76) read with its defaults and rules; its launch lines
(`--module M --config C` recipes of torchtitan/models/M/config_registry.py, `--a.b v`
overrides) read through the same mapping, the expected values below read from that source by
hand, not from planner/interop/data/torchtitan_recipes.json; the export's keys
checked against the field names read from torchtitan's source
(tests/fixtures/interop/engine_config_keys.json); export -> import -> the same plan and step."""
import json
from dataclasses import replace

import pytest

from cost_models import MeshplanError, parse_cluster

from helpers import FIXTURES, REPO, assert_user_error
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
    ({"parallelism": {"context_parallel_degree": 2, "context_parallel_load_balancer": None}},
     "context_parallel_load_balancer"),
    ({"parallelism": {"pipeline_parallel_degree": 2, "pipeline_parallel_schedule": "ZBVZeroBubble"}}, "ZBVZeroBubble"),
    ({"model_spec": {"name": "flux", "flavor": "flux-dev"}}, "not one meshplan knows"),
    ({"override": {"imports": ["torchtitan.overrides.fused_swiglu.fused_swiglu"]}}, "override.imports"),
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


@pytest.mark.parametrize("pins", [dict(pp=1, checkpoint="full"), dict(pp=2, tp=2, checkpoint="selective"),
                                  dict(cp=2, tp=2, zero=3, checkpoint="full")])
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
    for name in ("dp", "cp", "tp", "pp", "zero", "micro_batch", "global_batch", "seq", "precision", "schedule",
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


def _line(line, world=16):
    return import_job("torchtitan", line, world)


def test_llama3_8b_recipe():
    """torchtitan/models/llama3/config_registry.py llama3_8b: model_registry("8B"),
    TrainingConfig(num_tokens_per_microbatch_per_dp_rank=1 * 8192, max_context_length=8192),
    no ParallelismConfig (data_parallel_shard_degree -1: every rank FSDP), SelectiveAC.
    models/llama3/__init__.py _8b: dim 4096, 32 layers, 32 heads, 8 kv heads, vocab 128256,
    compute_ffn_hidden_dim(4096, multiple_of=1024, ffn_dim_multiplier=1.3) = 14336."""
    job = _line("torchrun --nnodes 2 --nproc_per_node 8 -m torchtitan.train --module llama3 --config llama3_8b")
    f = job.fields
    assert (f["dp"], f["tp"], f["pp"], f["ep"], f["zero"]) == (16, 1, 1, 1, 3)
    assert (f["micro_batch"], f["global_batch"], f["seq"], f["precision"]) == (1, 16, 8192, "bf16")
    assert f["checkpoint"] == ["selective"] * 32
    c = job.model.config
    assert (c.layers, c.hidden, c.heads, c.kv_heads, c.vocab, c.ffn, c.tie_embeddings) == \
        (32, 4096, 32, 8, 128256, 14336, False)
    assert job.model.name == "llama3-8b" and job.notes == []


def test_compiled_model_is_the_plans_compile(tmp_path):
    """compile.enable with "model" in compile.components (its default ["model", "loss"]) is
    apply_compile per block: the plan's compile; the loss alone leaves the blocks eager. The
    export writes it back, the model's blocks only (meshplan prices the loss eager)."""
    line = "--module llama3 --config llama3_8b"
    assert _line(line).fields["compile"] is False
    job = _line(line + " --compile.enable")
    assert job.fields["compile"] is True
    assert _line(line + " --compile.enable --compile.components loss").fields["compile"] is False
    cluster = parse_cluster("h100-sxm-80gb:2x8")
    compiled = job.plan(job.model.name, cluster.name)
    eager = replace(compiled, compile=False)
    assert simulate(compiled, job.model, cluster).step_time_s < simulate(eager, job.model, cluster).step_time_s
    export_plan("torchtitan", replace(compiled, stages=[]), job.model, cluster, str(tmp_path))
    assert json.loads((tmp_path / "job_config.json").read_text())["compile"] == {"enable": True,
                                                                                 "components": ["model"]}
    assert "config.compile.enable = True" in (tmp_path / "meshplan_torchtitan.py").read_text()
    assert import_job("torchtitan", str(tmp_path / "job_config.json"), 16).fields["compile"] is True


def test_moe_recipe_maps_expert_parallelism():
    """deepseek_v3/config_registry.py deepseek_v3_16b: model_registry("16B"), 4 * 4096 tokens
    per micro-batch at max_context_length 4096, ParallelismConfig(expert_parallel_degree=8,
    pipeline_parallel_schedule="Interleaved1F1B"), SelectiveAC, CompileConfig(enable=True,
    components=["loss"]) (the model is not compiled). deepseek_v3/__init__.py _16b: dim 2048,
    27 layers, vocab 102400, 16 heads (MLA, q_lora_rank 0, v_head_dim 128), 64 experts,
    router_top_k 6, softmax, route_norm False (build_mla_moe_layers' default), moe_hidden_dim
    1408, 2 shared experts built as one FFN of 2 x 1408, 1 dense layer of 10944."""
    job = _line("NGPU=16 MODULE=deepseek_v3 CONFIG=deepseek_v3_16b ./run_train.sh")
    f = job.fields
    assert (f["dp"], f["ep"], f["tp"], f["pp"], f["zero"]) == (16, 8, 1, 1, 3)
    assert (f["micro_batch"], f["global_batch"], f["seq"]) == (4, 64, 4096)
    assert f["checkpoint"] == ["selective"] * 27
    c = job.model.config
    assert (c.arch, c.layers, c.hidden, c.heads, c.head_dim, c.vocab) == ("moe", 27, 2048, 16, 128, 102400)
    assert (c.experts, c.top_k, c.expert_ffn, c.shared_experts, c.shared_expert_ffn) == (64, 6, 1408, 1, 2816)
    assert (c.dense_layers, c.dense_ffn, c.router, c.router_normalize) == (1, 10944, "softmax", False)
    assert any("latent attention" in n for n in job.notes)          # the stand-in is said
    plan = job.plan(job.model.name, "dgx-h100:2")
    assert plan.ep == 8


def test_moe_shapes_of_qwen3_and_gpt_oss():
    """qwen3/__init__.py _30b_a3b: dim 2048, 48 layers, 32 heads, 4 kv heads, head_dim 128,
    vocab 151936, 128 experts, top_k 8, moe_hidden_dim 768, rope theta 1e6; its recipe
    qwen3_30b_a3b: 2 * 4096 tokens, seq 4096, FullAC. gpt_oss/__init__.py _20b: dim 2880, 24
    layers, vocab 201088, 32 experts, top_k 4, hidden_dim 2880, attention helper defaults 64
    heads of 64, 8 kv heads, biased wqkv and wo; its recipe gpt_oss_20b: 8192 tokens, FullAC."""
    qwen = _line("--module qwen3 --config qwen3_30b_a3b", 8)
    c = qwen.model.config
    assert (c.layers, c.hidden, c.heads, c.kv_heads, c.head_dim, c.vocab) == (48, 2048, 32, 4, 128, 151936)
    assert (c.experts, c.top_k, c.expert_ffn, c.rope_theta) == (128, 8, 768, 1e6)
    assert (qwen.fields["micro_batch"], qwen.fields["seq"], qwen.fields["checkpoint"][0]) == (2, 4096, "full")
    oss = _line("--module gpt_oss --config gpt_oss_20b", 8)
    c = oss.model.config
    assert (c.layers, c.hidden, c.heads, c.kv_heads, c.head_dim, c.vocab) == (24, 2880, 64, 8, 64, 201088)
    assert (c.experts, c.top_k, c.expert_ffn, c.qkv_bias, c.out_bias) == (32, 4, 2880, True, True)
    assert (oss.fields["micro_batch"], oss.fields["seq"], oss.fields["checkpoint"][0]) == (1, 8192, "full")


def test_deepseek_671b_is_the_published_runs_model():
    """The import prices the same stand-in model as benchmarks/data/moe_runs.json's
    deepseek-v3-gqa (both from deepseek_v3/__init__.py _671b)."""
    published = json.loads((REPO / "benchmarks" / "data" / "moe_runs.json").read_text())
    expected = published["models"]["deepseek-v3-gqa"]["config"]
    got = flavor_config("671B", 4096, "deepseek_v3").to_dict()
    assert {k: got[k] for k in expected if k not in ("name", "max_seq")} == \
        {k: v for k, v in expected.items() if k not in ("name", "max_seq")}


def test_overrides_apply():
    """tyro's forms: `--a.b v`, `--a.b=v`, hyphens, a bool switch and its `no-` form; options
    that change nothing priced (training.steps, metrics) are read past."""
    job = _line("torchrun -m torchtitan.train --module llama3 --config llama3_8b "
                "--parallelism.tensor_parallel_degree 2 --parallelism.pipeline-parallel-degree=2 "
                "--parallelism.num_pp_microbatches 4 --training.num_tokens_per_microbatch_per_dp_rank 16384 "
                "--training.max_context_length 4096 --training.mixed_precision_param float32 "
                "--parallelism.no-enable-sequence-parallel --training.steps 10 --metrics.log_freq 1 "
                "--compile.no-enable")
    f = job.fields
    assert (f["dp"], f["tp"], f["pp"], f["zero"]) == (4, 2, 2, 2)   # "default" reshard with pp: ZeRO-2
    assert (f["micro_batch"], f["global_batch"], f["seq"], f["precision"]) == (4, 64, 4096, "fp32")
    assert f["sequence_parallel"] is False and len(f["stages"]) == 2
    moe = _line("--module qwen3 --config qwen3_moe_debug --parallelism.expert_parallel_degree 4", 8)
    assert (moe.fields["dp"], moe.fields["ep"]) == (8, 4)
    # the leftover ranks exclude cp; FSDP shards over dp_shard x cp (distributed/parallel_dims.py)
    cp = _line("--module llama3 --config llama3_8b --parallelism.context_parallel_degree 2", 8)
    assert (cp.fields["dp"], cp.fields["cp"], cp.fields["zero"]) == (4, 2, 3)


@pytest.mark.parametrize("line, fragment", [
    ("--module llama3 --config llama3_9b", "known: llama3_405b, llama3_70b, llama3_8b,"),
    ("--module mixtral --config mixtral_8x7b", "it reads deepseek_v3, gpt_oss, llama3, qwen3"),
    ("--module llama3 --config llama3_8b --training.seq_len 2048", "--training.seq_len is not a torchtitan"),
    ("--module llama3 --config llama3_8b --override.imports my.kernel", "not mapped"),
    ("--module llama3 --config llama3_8b --parallelism.context_parallel_degree 3", "replicate x cp x tp x pp = 3"),
    ("--module llama3 --config llama3_8b_mxfp8", "prices a lone Float8LinearConverter (precision fp8) only"),
    ("--module deepseek_v3 --config deepseek_v3_671b_float8", "Float8GroupedExpertsConverter; meshplan prices"),
    ("--module deepseek_v3 --config deepseek_v3_debugmodel_mtp", "multi-token-prediction"),
    ("--module llama3 --config llama3_8b --parallelism.expert_parallel_degree 2", "Mixture-of-Experts"),
    ("torchrun -m torchtitan.train --config llama3_8b", "give both --module and --config"),
])
def test_bad_launch_lines_get_one_line(cli, line, fragment):
    assert_user_error(cli("simulate", "--from", "torchtitan", line, "--cluster", "h100-sxm-80gb:2x8"), fragment)


def test_readme_launch_line_example(cli):
    """The README's torchtitan import: the launch line in examples/engines/torchtitan_launch.sh
    (a backslash-continued torchrun line with comments) prints the line the README shows."""
    proc = cli("simulate", "--from", "torchtitan", "examples/engines/torchtitan_launch.sh", "--cluster", "dgx-h100:2")
    assert proc.returncode == 0, proc.stderr
    shown = (REPO / "README.md").read_text().split("torchtitan_launch.sh --cluster dgx-h100:2\n", 1)[1]
    assert proc.stdout.splitlines()[0] == shown.splitlines()[0]


def test_float8_recipe_is_precision_fp8_rowwise():
    """llama3/config_registry.py llama3_debugmodel_float8: model_registry("debugmodel",
    converters=[Float8LinearConverter.Config(...)]) - recipe_name defaults to "rowwise"
    (components/quantization/float8.py), the only float8 scaling torchtitan b5bcd76 offers."""
    job = _line("--module llama3 --config llama3_debugmodel_float8", 8)
    assert (job.fields["precision"], job.fields["fp8_recipe"]) == ("fp8", "rowwise")
    assert any("recipe_name rowwise" in note for note in job.notes)
    plan = job.plan(job.model.name, "h100-sxm-80gb:1x8")
    assert simulate(plan, job.model, "h100-sxm-80gb:1x8").step_time_s > 0


def test_fp8_plan_exports_a_float8_converter(tmp_path):
    cluster = parse_cluster("h100-sxm-80gb:1x8")
    config = flavor_config("debugmodel", 2048)
    spec = ModelSpec(config.name, config)
    best = search(spec, cluster, 32, 2048, top_k=1, engine="torchtitan", precision="fp8", fp8_recipe="rowwise",
                  pp=1, checkpoint="full")[0]
    export_plan("torchtitan", best, spec, cluster, str(tmp_path))
    module = (tmp_path / "meshplan_torchtitan.py").read_text()
    compile(module, "meshplan_torchtitan.py", "exec")
    assert "converters=[Float8LinearConverter.Config(recipe_name='rowwise', filter_fqns=['lm_head']" in module
    again = import_job("torchtitan", str(tmp_path / "job_config.json"), 8).plan(spec.name, cluster.name)
    assert (again.precision, again.fp8_recipe) == ("fp8", "rowwise")
    assert simulate(again, spec, cluster).step_time_s == pytest.approx(best.result.step_time_s, rel=1e-9)


def test_tensorwise_fp8_is_priced_but_not_exported(tmp_path):
    """torchtitan ran tensorwise float8 until 2025 (its published Float8 benchmarks); b5bcd76,
    what the export writes for, takes rowwise only."""
    cluster = parse_cluster("h100-sxm-80gb:1x8")
    config = flavor_config("debugmodel", 2048)
    spec = ModelSpec(config.name, config)
    best = search(spec, cluster, 32, 2048, top_k=1, engine="torchtitan", precision="fp8", fp8_recipe="tensorwise",
                  pp=1, checkpoint="full")[0]
    assert best.fp8_recipe == "tensorwise" and best.result.step_time_s > 0
    with pytest.raises(MeshplanError, match="recipe_name rowwise only, not tensorwise"):
        export_plan("torchtitan", best, spec, cluster, str(tmp_path))
    assert not any(tmp_path.iterdir())
