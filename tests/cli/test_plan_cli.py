"""`meshplan plan`: the table, --json, --out (read back by simulate), --explain, --plot, errors."""
import json

from helpers import assert_user_error, run_cli
from planner.plan import Plan

ARGS = ("plan", "--model", "gpt3-350m", "--cluster", "a100-sxm-80gb:1x8", "--global-batch", "32", "--seq", "1024")


def test_json_lists_ranked_plans_with_results_and_search_stats():
    """A real process: nothing but the JSON reaches file descriptor 1 (solver chatter included)."""
    proc = run_cli(*ARGS, "--top", "3", "--json")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    plans = data["plans"]
    assert 1 <= len(plans) <= 3
    times = [p["result"]["step_time_s"] for p in plans]
    assert times == sorted(times)
    for p in plans:
        Plan.from_dict({k: v for k, v in p.items() if k != "result"})   # each is a valid Plan
        result = p["result"]
        for key in ("step_time_s", "tokens_per_s", "tflops_per_gpu", "mfu", "fits"):
            assert key in result
        memory = result["memory"]
        assert memory["peak_reserved_bytes"] <= data["search"]["budget_bytes"]
        assert set(memory["breakdown"]) >= {"params_bytes", "grads_bytes", "optimizer_bytes",
                                            "activations_bytes", "transient_bytes"}
    search = data["search"]
    assert search["candidates"] > 0 and search["simulated"] > 0 and search["search_s"] > 0


def test_out_writes_the_best_plan_that_simulate_reads_back(cli, tmp_path):
    out = tmp_path / "plan.json"
    proc = cli(*ARGS, "--top", "1", "--json", "--out", out)
    assert proc.returncode == 0, proc.stderr
    best = json.loads(proc.stdout)["plans"][0]
    again = cli("simulate", "--plan", out, "--json")
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["step_time_s"] == best["result"]["step_time_s"]
    # never overwritten unless asked
    before = out.read_text()
    refused = cli(*ARGS, "--top", "1", "--out", out)
    assert_user_error(refused, "already exists", "--force")
    assert out.read_text() == before


def test_pins_explain_and_plot(cli, tmp_path):
    picture = tmp_path / "plans.png"
    proc = cli(*ARGS, "--tp", "2", "--pp", "2", "--top", "2", "--explain", "--plot", picture)
    assert proc.returncode == 0, proc.stderr
    assert "beats" in proc.stdout or "only plan" in proc.stdout
    assert "…" not in proc.stdout   # the ranked table is printed whole, not squeezed into 80 columns
    assert "calibration: a100-sxm-80gb, " in proc.stdout   # and the report names its calibration
    assert "rejected families:" in proc.stdout
    assert picture.stat().st_size > 10_000 and picture.read_bytes()[:4] == b"\x89PNG"


def test_bad_input_is_one_line(cli):
    assert_user_error(cli("plan", "--model", "gpt-nope", "--cluster", "h100:1x8", "--global-batch", "8"),
                      "unknown model")
    assert_user_error(cli("plan", "--model", "gpt3-6.7b", "--cluster", "a10:1x1", "--global-batch", "16"),
                      "nothing fits", "GiB per GPU", "GPUs")
    assert_user_error(cli(*ARGS, "--tp", "3"), "no dp x tp x pp")
