import json

import pytest
from hypothesis import given, settings, strategies as st

from cost_models import MeshplanError
from planner.plan import CHECKPOINT_MODES, SCHEMA_VERSION, Plan, even_stages


def test_derived_quantities():
    plan = Plan(dp=4, tp=2, pp=2, micro_batch=2, global_batch=64)
    assert plan.world_size == 16 and plan.grad_accum == 8 and plan.virtual_stages == 2
    assert plan.checkpoint_for(5) == "none"


@settings(max_examples=60, deadline=None)
@given(dp=st.integers(1, 8), tp=st.integers(1, 8), pp=st.integers(1, 4), mb=st.integers(1, 4),
       accum=st.integers(1, 6), zero=st.integers(0, 3), precision=st.sampled_from(["fp32", "bf16", "fp16"]),
       layers=st.integers(4, 12), ckpt=st.sampled_from(CHECKPOINT_MODES))
def test_json_round_trip(dp, tp, pp, mb, accum, zero, precision, layers, ckpt):
    plan = Plan(dp=dp, tp=tp, pp=pp, zero=zero, micro_batch=mb, global_batch=dp * mb * accum,
                precision=precision, stages=even_stages(layers, pp), checkpoint=[ckpt] * layers,
                sequence_parallel=tp > 1, tp_layout={"fc1": "colwise", "fc2": "rowwise"} if tp > 1 else {},
                model="gpt-tiny", cluster="cpu:1x4")
    again = Plan.from_json(plan.to_json())
    assert again == plan and again.grad_accum == accum
    again.check_fits(num_layers=layers, world_size=dp * tp * pp)


def test_save_refuses_to_overwrite(tmp_path):
    path = tmp_path / "plan.json"
    path.write_text("precious")
    with pytest.raises(MeshplanError, match="already exists"):
        Plan().save(path)
    assert path.read_text() == "precious"
    Plan(dp=2, global_batch=2).save(path, overwrite=True)
    assert Plan.load(path).dp == 2


@pytest.mark.parametrize("kwargs,fragment", [
    (dict(dp=0), "dp must be"),
    (dict(tp=1.5), "tp must be"),
    (dict(zero=4), "zero must be"),
    (dict(dp=3, micro_batch=2, global_batch=8), "not a multiple of micro_batch x dp"),
    (dict(precision="fp64"), "precision 'fp64'"),
    (dict(schedule="zb"), "schedule 'zb'"),
    (dict(interleave=2), "needs schedule 'interleaved'"),
    (dict(schedule="interleaved", interleave=2), "needs pp >= 2"),
    (dict(pp=2, schedule="interleaved", interleave=2, global_batch=3), "multiple of pp"),
    (dict(pp=2, stages=[[0, 2]]), "one [first, end) layer range per stage"),
    (dict(pp=2, stages=[[1, 2], [2, 4]]), "start at layer 0"),
    (dict(pp=2, stages=[[0, 2], [3, 4]]), "contiguous"),
    (dict(checkpoint=["none", "some"]), "each layer takes one of"),
    (dict(sequence_parallel=True), "needs tp >= 2"),
    (dict(tp_layout={"fc1": "diagonal"}), "tp_layout has style"),
    (dict(tp_layout={"fc1": "colwise"}), "tp is 1"),
    (dict(offload_optimizer=True, zero=1), "zero to 2 or 3"),
    (dict(rank_order=["dp", "tp"]), "rank_order"),
    (dict(cp=3, seq=1024), "divisible by 2 x cp = 6"),
    (dict(cp=2, dp=2, ep=2, global_batch=2), "cp > 1 with ep > 1"),
    (dict(fp8_recipe="rowwise"), "applies to precision fp8"),
    (dict(precision="fp8", fp8_recipe="blockwise"), "fp8_recipe"),
    (dict(compile="yes"), "compile must be true or false"),
    (dict(schema_version=99), "schema_version"),
])
def test_inconsistencies_say_what_to_change(kwargs, fragment):
    with pytest.raises(MeshplanError) as err:
        Plan(**kwargs)
    assert fragment in str(err.value)
    assert "\n" not in str(err.value)


def test_checks_against_model_and_cluster():
    plan = Plan(dp=2, tp=2, pp=2, global_batch=4, stages=[[0, 3], [3, 6]], checkpoint=["full"] * 6)
    plan.check_fits(num_layers=6, world_size=8, gpus_per_node=8)
    with pytest.raises(MeshplanError, match="cluster has 16 devices"):
        plan.check_fits(world_size=16)
    with pytest.raises(MeshplanError, match="last stage must end at 8"):
        Plan(dp=2, tp=2, pp=2, global_batch=4, stages=[[0, 3], [3, 6]]).check_fits(num_layers=8)
    with pytest.raises(MeshplanError, match="one entry per layer"):
        plan.check_fits(num_layers=7)
    with pytest.raises(MeshplanError, match="spans more than one node"):
        Plan(tp=8).check_fits(gpus_per_node=4)
    with pytest.raises(MeshplanError, match="exceeds the model's 2 layers"):
        Plan(pp=4, global_batch=4).check_fits(num_layers=2)


def test_reading_bad_plan_files(tmp_path):
    path = tmp_path / "p.json"
    path.write_text("{not json")
    with pytest.raises(MeshplanError, match="not valid JSON"):
        Plan.load(path)
    path.write_text(json.dumps({"dp": 1}))
    with pytest.raises(MeshplanError, match="no schema_version"):
        Plan.load(path)
    path.write_text(json.dumps({"dp": 1, "schema_version": SCHEMA_VERSION, "dpp": 2}))
    with pytest.raises(MeshplanError, match="unknown key"):
        Plan.load(path)
    path.write_text("[1, 2]")
    with pytest.raises(MeshplanError, match="JSON object"):
        Plan.load(path)


def test_even_stages():
    assert even_stages(10, 4) == [[0, 3], [3, 6], [6, 8], [8, 10]]
    with pytest.raises(MeshplanError):
        even_stages(2, 3)


def test_context_parallel_counts_in_the_world_and_old_rank_orders_gain_cp():
    plan = Plan(dp=2, cp=4, tp=2, pp=2, global_batch=8, seq=4096)
    assert plan.world_size == 32 and plan.local_seq == 1024
    with pytest.raises(MeshplanError, match=r"dp x cp x tp x pp = 2 x 4 x 2 x 2 = 32 but the cluster has 16"):
        plan.check_fits(world_size=16)
    # plans written before cp existed: cp goes just outside tp, whatever the order
    assert Plan(rank_order=["pp", "dp", "tp"]).rank_order == ["pp", "dp", "cp", "tp"]
    assert Plan(rank_order=["tp", "dp", "pp"]).rank_order == ["cp", "tp", "dp", "pp"]
    assert Plan.from_json(Plan(cp=2, seq=64, precision="fp8", fp8_recipe="rowwise", compile=True).to_json()) \
        == Plan(cp=2, seq=64, precision="fp8", fp8_recipe="rowwise", compile=True)
