"""benchmarks/data/long_context_fp8_runs.json agrees with itself and with its sources: each
row's plan is the configuration it cites (GPUs = dp x tp x pp x cp, batch, micro-batch,
sequence, precision, system), every plan is one meshplan's Plan accepts, the model configs
are meshplan's presets, and the FLOP conventions that turn printed TFLOP/s into tokens/s
reproduce the sources' own pairs. Catches a mistyped row before it skews the MAPE."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from cost_models.cluster import parse_cluster
from helpers import assert_published_plan
from planner.models import ModelConfig
from planner.plan import Plan
from planner.zoo import PRESETS

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
DATA = json.loads((BENCHMARKS / "data" / "long_context_fp8_runs.json").read_text())


def _module(name):
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


FLOPS = _module("flops_conventions")
SCRIPT = _module("long_context_fp8_runs")
# The systems the sources name, as meshplan's catalogue spells their GPU.
SYSTEM_GPU = {"DGX-H100": "h100-sxm-80gb", "Grand Teton H100 96GB": "h100-sxm-80gb",
              "H100 80GB HBM3 700 W, Grand Teton, 400 Gb/s RoCE": "h100-sxm-80gb", "8x H200 a host": "h200-141gb"}
# Published column -> plan field, compared where the source prints a number.
SAME = {"gbs": "global_batch", "mbs": "micro_batch", "seq": "seq", "tp": "tp", "pp": "pp", "cp": "cp", "dp": "dp"}
ROWS = DATA["rows"]


def plan_of(row) -> Plan:
    fields = {k: v for k, v in row["plan"].items() if k != "checkpoint"}
    layers = DATA["models"][row["model"]]["config"]["layers"]
    mode = row["plan"]["checkpoint"]
    return Plan(**fields, checkpoint=[] if mode == "none" else [mode] * layers, engine=row["engine"],
                engine_options=row.get("engine_options", {}))


@pytest.mark.parametrize("row", ROWS, ids=lambda row: row["id"])
def test_row_plan_is_the_published_configuration(row):
    plan, published = row["plan"], row["published"]
    gpus = assert_published_plan(row, DATA, SAME)
    if published.get("fsdp") == 0:   # Megatron-Bridge: DDP with the distributed optimizer
        assert plan["zero"] <= 1
    elif "fsdp" in published:        # the FSDP degree is dp (sharding over dp x cp); no reshard under PP
        assert published["fsdp"] == plan["dp"] and plan["zero"] == (3 if plan["pp"] == 1 else 2)
    if "local_batch" in published:
        assert plan["global_batch"] == published["local_batch"] * plan["dp"]
    if "batch_per_dp" in published:
        assert plan["global_batch"] == published["batch_per_dp"] * plan["dp"]
        assert abs(plan["global_batch"] * plan["seq"] / 2 ** 24 - 1) < 0.01   # "16M" tokens a batch
    cluster = parse_cluster(row["cluster"])
    assert cluster.world_size == gpus
    assert cluster.gpu.name == SYSTEM_GPU[published["system"]]
    plan_of(row)   # every rule a Plan checks: seq % (2 cp), interleaved micro-batches, sp with tp, ...
    assert plan["global_batch"] % (plan["dp"] * plan["micro_batch"]) == 0
    assert plan["seq"] <= DATA["models"][row["model"]]["config"]["max_seq"]


@pytest.mark.parametrize("row", ROWS, ids=lambda row: row["id"])
def test_row_precision_and_features_are_the_published_ones(row):
    plan, published = row["plan"], row["published"]
    printed = " ".join([row["section"], *(str(published.get(k, "")) for k in ("precision", "technique", "quantization"))]).lower()
    assert (plan["precision"] == "fp8") == ("fp8" in printed or "float8" in printed)
    if "rowwise" in printed:
        assert plan["fp8_recipe"] == "rowwise"
    elif plan["precision"] == "fp8":
        assert plan["fp8_recipe"] == "tensorwise"
    if "compile" in published.get("technique", "") or "torch.compile" in row["section"]:
        assert plan["compile"] is True
    assert row["engine"] == ("megatron-lm" if row["source"].startswith(("nemo", "mbridge")) else "torchtitan")
    assert set(row.get("assumed", {})) <= set(plan) | {"engine", "overlap_grad_reduce", "tokens_per_s_per_gpu"}
    assert row.get("status") is None or row["status"] in SCRIPT.STATUS_REASONS
    assert ("tokens_per_s_per_gpu" in published) != ("flops_formula" in row)
    assert row.get("flops_formula") in (None, *FLOPS.FORMULAS)


@pytest.mark.parametrize("row", [r for r in ROWS if "baseline" in r], ids=lambda row: row["id"])
def test_baseline_is_the_same_run_but_one_feature(row):
    base = next(r for r in ROWS if r["id"] == row["baseline"]["id"])
    differing = {k for k in set(row["plan"]) | set(base["plan"]) if row["plan"].get(k) != base["plan"].get(k)}
    assert differing and differing <= {"precision", "fp8_recipe", "compile"}
    assert (row["model"], row["cluster"], row["engine"], row["source"]) == \
           (base["model"], base["cluster"], base["engine"], base["source"])


@pytest.mark.parametrize("name", sorted(DATA["models"]))
def test_model_configs_are_the_presets(name):
    entry = DATA["models"][name]
    config = ModelConfig(**entry["config"])
    preset = PRESETS[entry["preset"]]
    for field in ("arch", "layers", "hidden", "heads", "kv_heads", "ffn", "vocab", "rope_theta"):
        assert getattr(config, field) == getattr(preset, field), field
    assert config.max_seq >= preset.max_seq


def test_flop_conventions_reproduce_the_sources_pairs():
    """Rows printing both tokens/s and TFLOP/s: NeMo 24.07 counts full attention,
    Megatron-Bridge (25.11 on) causal; torchtitan's '33% to 39% MFU' of Table 1 follows
    from its convention and the 989.5 TFLOP/s H100 SXM peak."""
    checked = 0
    for row in ROWS:
        published = row["published"]
        if "model_tflops_per_gpu" in published and "tokens_per_s_per_gpu" in published:
            formula = "nemo-llama-full-attention" if row["source"] == "nemo-summary-2407" else "nemo-llama-causal"
            tokens = FLOPS.tokens_per_s_per_gpu(published["model_tflops_per_gpu"], formula,
                                                DATA["models"][row["model"]]["config"], published["seq"])
            assert tokens == pytest.approx(published["tokens_per_s_per_gpu"], rel=0.01), row["id"]
            checked += 1
    assert checked >= 9
    cfg = DATA["models"]["llama3-8b"]["config"]
    assert FLOPS.llama_params(cfg) == pytest.approx(8.03e9, rel=0.01)
    mfus = [FLOPS.torchtitan_flops_per_token(cfg, 8192) * r["published"]["tokens_per_s_per_gpu"] / 989.5e12
            for r in ROWS if r["id"] in ("tt2412-llama3-8b-fsdp8-bf16-eager", "tt2412-llama3-8b-fsdp8-bf16-compile")]
    assert [round(100 * m) for m in mfus] == [34, 39]


def test_cases_name_new_features_only_where_used():
    by_id = {row["id"]: row for row in ROWS}
    plain = SCRIPT.run_case(by_id["tt2412-llama3-8b-fsdp8-bf16-eager"], DATA["models"])
    assert not {"cp", "compile", "fp8_recipe"} & set(plain)
    fp8 = SCRIPT.run_case(by_id["tt2412-llama3-8b-fsdp4-cp2-seq64k-fp8"], DATA["models"])
    assert (fp8["cp"], fp8["compile"], fp8["precision"], fp8["fp8_recipe"]) == (2, True, "fp8", "tensorwise")


def test_script_scores_skips_and_lists_refusals(tmp_path, capsys):
    """A tiny data file through the real CLI: a bf16 row is scored, a kept row is skipped
    with its reason, and its fp8 twin is either scored (with the speedup) or refused in one line."""
    tiny = {"arch": "llama", "name": "tiny", "layers": 2, "hidden": 256, "heads": 4, "kv_heads": 2, "ffn": 512,
            "vocab": 1024, "max_seq": 1024}
    base = {"source": "s", "section": "-", "model": "tiny", "cluster": "h100-sxm-80gb:1x2", "engine": "torchtitan",
            "published": {"tokens_per_s_per_gpu": 1e5}}
    plan = {"dp": 2, "tp": 1, "pp": 1, "cp": 1, "zero": 3, "micro_batch": 1, "global_batch": 4, "seq": 512,
            "precision": "bf16", "checkpoint": "none"}
    rows = [{**base, "id": "bf16", "plan": plan},
            {**base, "id": "fp8", "plan": {**plan, "precision": "fp8", "fp8_recipe": "tensorwise"},
             "baseline": {"id": "bf16", "what": "float8"}},
            {**base, "id": "kept", "status": "async_tp", "plan": plan}]
    data = tmp_path / "rows.json"
    data.write_text(json.dumps({"sources": {"s": {}}, "models": {"tiny": {"config": tiny}}, "rows": rows}))
    assert SCRIPT.main(["--data", str(data)]) == 0
    out = capsys.readouterr().out
    assert "\nbf16 " in out and "skipped kept: async TP" in out
    assert "failed  fp8: " in out or any(line.split()[:2] == ["fp8", "float8"] and "measured x" in line
                                         for line in out.splitlines())
    assert "scored, MAPE" in out
