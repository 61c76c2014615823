"""`--from deepspeed` and `--export deepspeed`: a ds_config.json read as DeepSpeed's config
parser reads it. Where DeepSpeed is installed its own DeepSpeedConfig parses the same
files and must agree; everywhere, the exported keys are checked against the key names read
from DeepSpeed's source (tests/fixtures/interop/engine_config_keys.json, file + commit)."""
import json
from dataclasses import replace

import pytest

from cost_models import MeshplanError, parse_cluster
from helpers import FIXTURES, assert_user_error
from planner.interop import export_plan, import_job
from planner.interop.base import SplitError
from planner.plan import Plan
from planner.search import plan as search
from planner.simulate import simulate
from planner.zoo import load_model

pytestmark = pytest.mark.cli
KEYS = json.loads((FIXTURES / "interop" / "engine_config_keys.json").read_text())["deepspeed"]
SPEC = load_model("gpt3-125m")


def _job(config, world=8, **flags):
    return import_job("deepspeed", json.dumps(config), world, SPEC, flags)


@pytest.mark.parametrize("config, micro, global_batch", [
    ({"train_batch_size": 64, "train_micro_batch_size_per_gpu": 2}, 2, 64),            # accumulation 64/2/8 = 4
    ({"train_batch_size": 64, "gradient_accumulation_steps": 2}, 4, 64),                # micro 64/8/2
    ({"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 3}, 2, 48),   # 2 x 3 x dp 8
    ({"train_batch_size": 32}, 4, 32),                                                  # accumulation 1
])
def test_batch_follows_deepspeeds_rule(config, micro, global_batch):
    """train_batch = micro x accumulation x dp, the missing one derived as
    DeepSpeedConfig._set_batch_related_parameters does (deepspeed/runtime/config.py)."""
    job = _job(config)
    assert (job.fields["micro_batch"], job.fields["global_batch"], job.fields["dp"]) == (micro, global_batch, 8)
    parsed = _deepspeed()(config, dp=8)
    assert (parsed.train_micro_batch_size_per_gpu, parsed.train_batch_size) == (micro, global_batch)


def test_zero_precision_offload_and_degrees():
    config = {"train_batch_size": 32, "train_micro_batch_size_per_gpu": 1,
              "zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu", "pin_memory": True},
                                    "stage3_prefetch_bucket_size": 5e7, "reduce_bucket_size": 5e8},
              "bf16": {"enabled": True}, "tensor_parallel": {"autotp_size": 2},
              "optimizer": {"type": "AdamW", "params": {"lr": 1e-4}}, "gradient_clipping": 1.0}
    job = _job(config, pp=2)
    f = job.fields
    assert (f["dp"], f["tp"], f["pp"], f["zero"], f["precision"], f["offload_optimizer"]) == (2, 2, 2, 3, "bf16", True)
    assert job.engine == "deepspeed" and job.engine_options == {}   # overlap_comm: on for stage 3 by default
    assert _job({**config, "zero_optimization": {"stage": 3, "overlap_comm": False}}, pp=2).engine_options == \
        {"overlap_comm": False}
    assert _job({"train_batch_size": 32, "zero_optimization": {"stage": 1, "overlap_comm": True}}).engine_options == \
        {"overlap_comm": True}


def test_pipeline_interval_is_full_recompute():
    job = _job({"train_batch_size": 32, "train_micro_batch_size_per_gpu": 1,
                "pipeline": {"stages": 2, "activation_checkpoint_interval": 1}})
    assert job.fields["pp"] == 2 and job.fields["checkpoint"] == ["full"] * 12


@pytest.mark.parametrize("config, fragment", [
    ({"train_batch_size": 32, "zero_optimisation": {"stage": 2}}, "unknown key(s) ['zero_optimisation']"),
    ({"train_batch_size": 32, "zero_optimization": {"stage": 2, "overlap": True}}, "unknown key(s) ['overlap']"),
    ({"train_batch_size": 30, "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 2},
     "is not train_micro_batch_size_per_gpu"),
    ({"train_batch_size": 32, "fp16": {"enabled": True}, "bf16": {"enabled": True}}, "both enabled"),
    ({"train_batch_size": 32, "zero_optimization": {"stage": 3, "offload_param": {"device": "cpu"}}},
     "offload_param"),
    ({"train_batch_size": 32, "sparse_attention": {"mode": "fixed"}}, "sparse_attention"),
    ({"train_batch_size": 32, "pipeline": {"activation_checkpoint_interval": 2}}, "use 1"),
    ({"gradient_accumulation_steps": 2}, "give train_batch_size or train_micro_batch_size_per_gpu"),
])
def test_bad_configs_get_one_line(cli, tmp_path, config, fragment):
    path = tmp_path / "ds_config.json"
    path.write_text(json.dumps(config))
    proc = cli("simulate", "--from", "deepspeed", str(path), "--model", "gpt3-125m", "--cluster", "a100-sxm-80gb:1x8")
    assert_user_error(proc, fragment)


def test_needs_a_model_and_refuses_fixed_flags(cli, tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"train_batch_size": 32}))
    assert_user_error(cli("simulate", "--from", "deepspeed", str(path), "--cluster", "a100-sxm-80gb:1x8"),
                      "needs --model")
    assert_user_error(cli("simulate", "--from", "deepspeed", str(path), "--model", "gpt3-125m",
                          "--cluster", "a100-sxm-80gb:1x8", "--zero", "2"), "--zero cannot be combined")
    proc = cli("simulate", "--from", "deepspeed", str(path), "--model", "gpt3-125m", "--cluster",
               "a100-sxm-80gb:1x8", "--tp", "2", "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["step_time_s"] > 0


@pytest.mark.parametrize("pins", [dict(zero=2, pp=1, checkpoint="none"), dict(zero=1, pp=2, checkpoint="full")])
def test_export_round_trip(tmp_path, pins):
    cluster = parse_cluster("a100-sxm-80gb:1x8")
    best = search(SPEC, cluster, 32, 512, top_k=1, engine="deepspeed", **pins)[0]
    try:
        step_s, files = best.result.step_time_s, export_plan("deepspeed", best, SPEC, cluster, str(tmp_path))
    except SplitError:
        best = replace(best, stages=[])
        step_s, files = simulate(best, SPEC, cluster).step_time_s, export_plan("deepspeed", best, SPEC, cluster,
                                                                               str(tmp_path))
    config = json.loads((tmp_path / "ds_config.json").read_text())
    assert set(config) <= set(KEYS["top_level"]["keys"])
    for section in ("zero_optimization", "bf16", "fp16", "pipeline", "tensor_parallel"):
        assert set(config.get(section, {})) <= set(KEYS[section]["keys"]), section
    job = import_job("deepspeed", str(tmp_path / "ds_config.json"), cluster.world_size, SPEC, {"seq": 512})
    again = job.plan(SPEC.name, cluster.name)
    for name in ("dp", "tp", "pp", "zero", "micro_batch", "global_batch", "seq", "precision", "engine",
                 "engine_options", "offload_optimizer"):
        assert getattr(again, name) == getattr(best, name), name
    assert [again.checkpoint_for(i) for i in range(12)] == [best.checkpoint_for(i) for i in range(12)]
    assert simulate(again, SPEC, cluster).step_time_s == pytest.approx(step_s, rel=1e-9)
    parsed = _deepspeed()(config, dp=best.dp)
    assert (parsed.train_batch_size, parsed.train_micro_batch_size_per_gpu, parsed.gradient_accumulation_steps,
            parsed.zero_optimization_stage) == (best.global_batch, best.micro_batch, best.grad_accum, best.zero)
    assert parsed.bfloat16_config.enabled == (best.precision == "bf16")
    if best.pp > 1:
        assert parsed.pipeline["activation_checkpoint_interval"] == (1 if best.checkpoint_for(0) == "full" else 0)
    assert "PipelineModule(layers, num_stages" in (tmp_path / "README.txt").read_text()


def test_export_refuses_a_plan_deepspeed_cannot_run(tmp_path):
    cluster = parse_cluster("a100-sxm-80gb:1x8")
    plan = Plan(dp=4, pp=2, zero=2, micro_batch=1, global_batch=8, seq=512, engine="deepspeed")
    with pytest.raises(MeshplanError, match="ZeRO-2 and -3|offers ZeRO 0 or 1 with pipeline"):
        export_plan("deepspeed", plan, SPEC, cluster, str(tmp_path / "o"))


def _deepspeed():
    """DeepSpeed's own DeepSpeedConfig (deepspeed/runtime/config.py) with dp ranks. DeepSpeed
    is a test dependency (pyproject's [test] extra installs it, ~20 s, CPU-only): a missing or
    broken import fails the test, never skips the check."""
    try:
        import deepspeed.runtime.config as ds_config
    except Exception as exc:
        pytest.fail(f"DeepSpeed's config parser could not be imported ({exc!r}): pip install -e '.[test]'")

    class DataParallel:      # DeepSpeedConfig reads the dp world from an mpu
        def __init__(self, dp):
            self.dp = dp

        def get_data_parallel_world_size(self):
            return self.dp

    def parse(config, dp):
        original = ds_config.dist.get_rank
        ds_config.dist.get_rank = lambda *a, **k: 0
        try:
            return ds_config.DeepSpeedConfig(dict(config), mpu=DataParallel(dp))
        finally:
            ds_config.dist.get_rank = original
    return parse
