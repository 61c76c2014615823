"""`--html` reports opened in a real headless chromium (tests/browser.py): no console errors,
nothing fetched, the expected text in the rendered page, a timeline that draws every event
and zooms, and a screenshot. Without chromium the test fails: .ci/run installs it."""
import json
import re
import struct

import pytest

from browser import INSTALL_HINT, Browser, chromium_path, open_page
from helpers import run_cli_in_process

pytestmark = pytest.mark.cli

# A plan with 128 micro-batches per step over 8 pipeline stages: the timeline case the issue names.
SIMULATE = ("simulate", "--model", "gpt3-1.3b", "--cluster", "a100-sxm-80gb:4x8", "--global-batch", "256",
            "--dp", "2", "--tp", "2", "--pp", "8", "--micro-batch", "1")
PLAN = ("plan", "--model", "gpt3-1.3b", "--cluster", "a100-sxm-80gb:1x8", "--global-batch", "64", "--top", "3")
COMPARE = ("compare", "--model", "gpt3-1.3b", "--tokens", "26e9", "--global-batch", "64",
           "--clusters", "h100-sxm-80gb:1x8,mi300x:1x8")


@pytest.fixture(scope="module")
def browser():
    executable = chromium_path()
    if executable is None:
        pytest.fail(INSTALL_HINT)   # never a skip: a report nobody opened is not tested
    with Browser(executable) as b:
        yield b


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    folder = tmp_path_factory.mktemp("reports")
    out = {}
    for name, args in (("simulate", SIMULATE), ("plan", PLAN), ("compare", COMPARE)):
        path = folder / f"{name}.html"
        proc = run_cli_in_process(*args, "--html", path)
        assert proc.returncode == 0, proc.stderr
        assert f"wrote {path}" in proc.stdout
        out[name] = path
    return out


def _timeline_data(path):
    text = path.read_text()
    return json.loads(re.search(r'<script type="application/json" class="tl-data">(.*?)</script>', text, re.S)[1])


def _png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


def _loads_cleanly(page, path):
    assert page.errors == [], page.errors
    # self-contained: the page itself is the only thing loaded (no font, script or image fetched)
    assert page.requests == [path.resolve().as_uri()], page.requests


def test_simulate_report_draws_and_zooms_a_128_micro_batch_timeline(browser, reports, tmp_path):
    path = reports["simulate"]
    page = open_page(browser, path)
    _loads_cleanly(page, path)
    for text in ("gpt3-1.3b on a100-sxm-80gb:4x8", "dp=2 tp=2 pp=8 zero=0, micro-batch 1 x 128 accumulation",
                 "Where the step's time goes", "pipeline bubble", "Pipeline timeline, one step",
                 "Memory per GPU, by pipeline stage", "usable capacity", "calibration: a100-sxm-80gb"):
        assert text in page.text, text
    data = _timeline_data(path)
    assert not data["binned"] and data["ranks"] == 8
    assert len(data["events"]) == 2 * 128 * 8   # a forward and a backward per micro-batch and stage
    drawn = page.evaluate("document.querySelectorAll('.tl svg rect.ev').length")
    assert drawn == len(data["events"])
    assert page.evaluate("document.querySelectorAll('.tl svg rect.tail').length") == 2 * 8
    # opened zoomed in far enough that micro-batch numbers are readable, and the buttons zoom
    width = page.evaluate("document.querySelector('.tl svg').getAttribute('width') * 1")
    zoom = page.evaluate("document.querySelector('.zoomv').textContent")
    assert zoom != "1x" and page.evaluate("document.querySelectorAll('.tl svg text').length") > 100
    page.evaluate("document.querySelector('.tl-box button.fit').click()")
    assert page.evaluate("document.querySelector('.zoomv').textContent") == "1x"
    fitted = page.evaluate("document.querySelector('.tl svg').getAttribute('width') * 1")
    assert fitted == pytest.approx(width / int(zoom[:-1]), rel=0.01)
    page.evaluate("document.querySelector('.tl-box button.in').click()")
    assert page.evaluate("document.querySelector('.tl svg').getAttribute('width') * 1") == pytest.approx(2 * fitted)
    assert page.errors == []
    shot = page.screenshot(tmp_path / "simulate.png")
    width_px, height_px = _png_size(shot)
    assert width_px == 1280 and height_px > 1200 and len(shot) > 50_000


def test_plan_report_says_why_the_winner_wins(browser, reports, tmp_path):
    path = reports["plan"]
    page = open_page(browser, path)
    _loads_cleanly(page, path)
    for text in ("The best plans", "against the winner", "Why the winner wins, and why the others lost",
                 "beats", "per step", "planner's budget", "made by meshplan"):
        assert text in page.text, text
    rows = page.evaluate("document.querySelectorAll('#plans tbody tr').length")
    assert rows == 3
    assert page.evaluate("document.querySelector('#plans tbody tr').className") == "best"
    assert _png_size(page.screenshot(tmp_path / "plan.png"))[0] == 1280


def test_compare_report_marks_transferred_calibrations(browser, reports, tmp_path):
    path = reports["compare"]
    page = open_page(browser, path)
    _loads_cleanly(page, path)
    for text in ("Best plan per cluster, fastest first", "Time against cost", "days to train",
                 "Where each cluster's step goes"):
        assert text in page.text, text
    cells = page.evaluate("[...document.querySelectorAll('#clusters tbody tr')].map("
                          "r => [r.cells[0].innerText, r.cells[r.cells.length - 1].innerText])")
    assert dict(cells) == {"h100-sxm-80gb:1x8": "measured", "mi300x:1x8": "transferred"}
    assert page.evaluate("document.querySelectorAll('#front circle.cluster').length") == 2
    assert page.evaluate("document.querySelectorAll('#front rect.band').length") == 1   # mi300x's uncertainty
    assert _png_size(page.screenshot(tmp_path / "compare.png"))[0] == 1280


def test_a_page_with_a_script_error_is_caught(browser, tmp_path):
    """The harness itself: an error thrown by a page's script, and a fetch, are reported."""
    path = tmp_path / "broken.html"
    path.write_text('<html><body><p>x</p><img src="https://example.invalid/a.png">'
                    '<script>console.error("boom"); undefined_function();</script></body></html>')
    page = open_page(browser, path)
    assert any("boom" in e for e in page.errors) and any("undefined_function" in e for e in page.errors)
    assert "https://example.invalid/a.png" in page.requests


def test_a_65536_event_timeline_is_binned_and_still_adds_up(browser, tmp_path):
    """4096 micro-batches over 8 stages: too many rects for a page, so each stage's row is cut
    into time bins filled by the share forward and backward take - and those shares still
    add up to each stage's busy time."""
    from planner import Plan, simulate
    from planner.report import simulate_report, write_report
    from planner.report.timeline import BINS_PER_RANK, timeline_data
    plan = Plan(dp=1, tp=1, pp=8, micro_batch=1, global_batch=4096, seq=256)
    result = simulate(plan, "gpt2-124m", "a100-sxm-80gb:1x8")
    data = timeline_data(result)
    assert data["binned"] and data["event_count"] == 2 * 4096 * 8
    assert len(data["events"]) <= 8 * BINS_PER_RANK * 3
    bin_s = result.step_time_s / BINS_PER_RANK
    for rank in range(8):
        binned_busy = sum(e[6] * (e[5] - e[4]) for e in data["events"] if e[0] == rank)
        # each bin's shares are rounded to a tenth: at most half a tenth of the step off
        assert binned_busy == pytest.approx(result.timeline.busy_s[rank], abs=0.05 * result.step_time_s + bin_s)
    path = tmp_path / "binned.html"
    write_report(str(path), simulate_report(plan, result, "gpt2-124m", "a100-sxm-80gb:1x8", "calibration: test"))
    page = open_page(browser, path)
    _loads_cleanly(page, path)
    assert "65,536 events" in page.text
    assert page.evaluate("document.querySelectorAll('.tl svg rect.ev').length") == len(data["events"])


def test_batch_report_lists_every_case_and_its_error(browser, tmp_path):
    cases = tmp_path / "cases.jsonl"
    good = {"model": "gpt3-1.3b", "cluster": "a100-sxm-80gb:1x8", "global_batch": 64, "seq": 2048, "dp": 8}
    cases.write_text("\n".join(json.dumps(c) for c in (
        good, {**good, "dp": 4, "tp": 2}, {**good, "checkpoint": "bogus"})) + "\n")
    path = tmp_path / "batch.html"
    proc = run_cli_in_process("simulate", "--batch", cases, "--html", path)
    assert proc.returncode == 0, proc.stderr
    results = [json.loads(line) for line in proc.stdout.splitlines()]    # stdout stays JSON lines
    assert len(results) == 3 and "error" in results[2] and f"wrote {path}" in proc.stderr
    page = open_page(browser, path)
    _loads_cleanly(page, path)
    rows = page.evaluate("[...document.querySelectorAll('#cases tbody tr')].map(r => [...r.cells].map("
                         "c => c.innerText))")
    assert [r[0] for r in rows] == ["1", "2", "3"]
    assert rows[0][3].startswith("dp=8 tp=1 pp=1") and rows[1][3].startswith("dp=4 tp=2 pp=1")
    assert rows[0][4] == f"{results[0]['step_time_s']:.3f}" and rows[2][-1] == "error"
    assert results[2]["error"] in rows[2][3]
    assert page.evaluate("document.querySelectorAll('#phases svg rect.phase').length") >= 2
    assert "3 case(s) from" in page.text and "1 with an error" in page.text
