"""What the outputs say: a plan that does not fit gets its overflow and changes that really
fit; pictures name model, cluster and plan, and tell plans apart; the Chrome trace holds the
whole step (pipeline, data-parallel sync, optimizer) on named tracks."""
import json
import re

import pytest

from helpers import assert_user_error

# GPT-3 1.3B at micro-batch 8 without recomputation: activations overflow a 40 GB A100
TOO_BIG = ("simulate", "--model", "gpt3-1.3b", "--cluster", "a100-sxm-40gb:1x8", "--global-batch", "64",
           "--dp", "8", "--micro-batch", "8")
PIPELINE = ("simulate", "--model", "gpt3-1.3b", "--cluster", "a100-sxm-80gb:4x8", "--global-batch", "256",
            "--dp", "2", "--tp", "2", "--pp", "8", "--micro-batch", "1")


def test_a_plan_that_does_not_fit_says_by_how_much_and_which_changes_fit(cli):
    proc = cli(*TOO_BIG, "--json")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["fits"] is False
    line = data["does_not_fit"]
    worst = max(data["stages"], key=lambda s: s["peak_reserved_bytes"])
    over_gib = (worst["peak_reserved_bytes"] - data["capacity_bytes"]) / 2 ** 30
    assert f"{over_gib:.1f} GiB over the {data['capacity_bytes'] / 2 ** 30:.1f} GiB usable" in line
    changes = re.findall(r"(--[a-z-]+(?: \d+)?(?: --[a-z-]+ \d+)?) \(step ([\d.]+) s", line.split("fit: ", 1)[1])
    assert changes, line
    steps = [float(s) for _, s in changes]
    assert steps == sorted(steps)   # fastest first
    for flags, step in changes:   # each suggestion, applied, fits and runs as fast as it said
        args = list(TOO_BIG)
        for name, value in re.findall(r"(--[a-z-]+)(?: (\d+))?", flags):
            if name in args:
                del args[args.index(name):args.index(name) + 2]
            args += [name] + ([value] if value else [])
        fixed = json.loads(cli(*args, "--json").stdout)
        assert fixed["fits"] and "does_not_fit" not in fixed
        assert fixed["step_time_s"] == pytest.approx(float(step), abs=5e-4)
    text = " ".join(cli(*TOO_BIG).stdout.split())   # the line is wrapped to 100 columns
    assert line in text


def test_plan_labels_tell_plans_apart_and_titles_name_the_job(cli, tmp_path, monkeypatch):
    from planner.cli import plots
    from planner.search import plan
    plans = plan("llama3-8b", "dgx-h100:1", 64, 2048, top_k=5)
    labels = [plots.plan_label(p) for p in plans]
    assert len(set(labels)) == len(labels), labels
    figures = []
    monkeypatch.setattr(plots.plt, "close", figures.append)
    proc = cli(*PIPELINE, "--timeline", tmp_path / "t.png", "--memory-plot", tmp_path / "m.png")
    assert proc.returncode == 0, proc.stderr
    titles = [fig.axes[0].get_title() for fig in figures]
    job = "gpt3-1.3b on a100-sxm-80gb:4x8, dp2 tp2 pp8 zero0 mb1 x128 1f1b"
    assert all(t.startswith(job) for t in titles), titles
    assert "MFU" in titles[0] and titles[1].endswith("fits")


def test_the_chrome_trace_holds_the_whole_step_on_named_tracks(cli, tmp_path):
    trace_path = tmp_path / "trace.json"
    proc = cli(*PIPELINE, "--trace", trace_path, "--json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    events = json.loads(trace_path.read_text())["traceEvents"]
    names = {e["tid"]: e["args"]["name"] for e in events if e["name"] == "thread_name"}
    assert names == {**{2 * r: f"stage {r}: compute" for r in range(8)},
                     **{2 * r + 1: f"stage {r}: communication" for r in range(8)}}
    process = next(e for e in events if e["name"] == "process_name")["args"]["name"]
    assert process.startswith("gpt3-1.3b on a100-sxm-80gb:4x8, dp2 tp2 pp8")
    spans = [e for e in events if e["ph"] == "X"]
    assert {e["cat"] for e in spans} == {"F", "B", "dp", "optimizer"}
    assert sum(e["cat"] == "F" for e in spans) == sum(e["cat"] == "B" for e in spans) == 128 * 8
    optimizer = [e for e in spans if e["cat"] == "optimizer"]
    assert sorted(e["tid"] for e in optimizer) == [2 * r for r in range(8)]
    # the step ends when the slowest stage's optimizer step does, as the simulator says
    end_s = max(e["ts"] + e["dur"] for e in spans) / 1e6
    assert end_s == pytest.approx(result["step_time_s"], rel=1e-9)
    dp = [e for e in spans if e["cat"] == "dp"]
    assert dp and all(e["tid"] % 2 == 1 for e in dp)
    phases = result["phases"]
    slowest = max(optimizer, key=lambda e: e["ts"] + e["dur"])
    assert slowest["dur"] / 1e6 == pytest.approx(phases["optimizer_s"], rel=1e-9)
    mine = [e for e in dp if e["tid"] == slowest["tid"] + 1]
    assert sum(e["dur"] for e in mine) / 1e6 == pytest.approx(phases["exposed_dp_comm_s"], rel=1e-9)


def test_report_must_be_html(cli, tmp_path):
    assert_user_error(cli(*PIPELINE, "--html", tmp_path / "r.txt"), ".html")
