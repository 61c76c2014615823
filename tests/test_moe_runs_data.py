"""benchmarks/data/moe_runs.json agrees with itself: each row's plan is the published
configuration it cites (GPU count, batch, micro-batch, sequence, tp/pp/ep, system), and
every model config is one meshplan accepts. Catches a mistyped row before it skews the MAPE."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from cost_models.cluster import parse_cluster
from helpers import assert_published_plan
from planner.models import ModelConfig

DATA = json.loads((Path(__file__).resolve().parents[1] / "benchmarks" / "data" / "moe_runs.json").read_text())
# The systems the sources name, as meshplan's catalogue spells their GPU.
SYSTEM_GPU = {"DGX-H100": "h100-sxm-80gb", "DGX-B200": "b200"}
# Published column -> plan field, compared where the source prints a number ("-", "n/a": not stated).
SAME = {"gbs": "global_batch", "mbs": "micro_batch", "seq": "seq", "tp": "tp", "pp": "pp", "ep": "ep"}


@pytest.mark.parametrize("row", DATA["rows"], ids=lambda row: row["id"])
def test_row_plan_is_the_published_configuration(row):
    plan, published = row["plan"], row["published"]
    gpus = assert_published_plan(row, DATA, SAME)
    cluster = parse_cluster(row["cluster"])
    assert cluster.world_size == gpus
    assert cluster.gpu.name == SYSTEM_GPU.get(published.get("system", "DGX-H100"))
    assert plan["precision"] == published.get("precision", "BF16").lower()
    assert plan["global_batch"] % (plan["dp"] * plan["micro_batch"]) == 0
    if plan["tp"] == 1:   # Megatron-Core folds ep over tp x dp; such rows are kept, not scored
        assert plan["dp"] % plan["ep"] == 0
    assert DATA["models"][row["model"]]["config"]["experts"] % plan["ep"] == 0


@pytest.mark.parametrize("name", sorted(DATA["models"]))
def test_model_configs_are_valid_moe_models(name):
    assert ModelConfig(**DATA["models"][name]["config"]).is_moe
