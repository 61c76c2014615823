"""What a person sees in a terminal: tables within 100 columns (full width with --wide), one
memory unit (GiB), --version, help and defaults on every flag, --force and a "wrote" line for
every output file, and a progress spinner that never reaches stdout or a pipe."""
import argparse
import json
import os
import pty
import select
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, version

import pytest

from helpers import REPO, assert_user_error

TINY_SIM = ("simulate", "--model", "gpt-tiny", "--cluster", "cpu:1x4", "--global-batch", "8", "--seq", "64",
            "--dp", "2", "--pp", "2")
TINY_PLAN = ("plan", "--model", "gpt-tiny", "--cluster", "cpu:1x4", "--global-batch", "8", "--seq", "64", "--top", "3")
COMPARE = ("compare", "--model", "gpt3-13b", "--tokens", "300e9", "--global-batch", "512",
           "--clusters", "h100-sxm-80gb:8x8,a100-sxm-80gb:16x8,mi300x:8x8")


def _widths(text: str) -> list[int]:
    return [len(line.rstrip()) for line in text.splitlines()]


@pytest.mark.parametrize("args", [
    ("models",), ("gpus",), ("engines",), TINY_SIM,
    ("plan", "--model", "gpt3-1.3b", "--cluster", "a100-sxm-80gb:4x8", "--global-batch", "256", "--top", "5",
     "--explain"),
], ids=lambda a: a[0])
def test_output_fits_100_columns_and_cuts_nothing(cli, args):
    proc = cli(*args)
    assert proc.returncode == 0, proc.stderr
    assert max(_widths(proc.stdout)) <= 100, proc.stdout
    assert "…" not in proc.stdout


def test_compare_fits_100_columns_and_wide_prints_one_line_per_row(cli):
    narrow = cli(*COMPARE)
    assert narrow.returncode == 0, narrow.stderr
    assert max(_widths(narrow.stdout)) <= 100 and "…" not in narrow.stdout
    wide = cli(*COMPARE, "--wide")
    first_table = wide.stdout.split("with interruptions")[0]   # the second table repeats the clusters
    rows = [line for line in first_table.splitlines() if line.startswith(("mi300x", "h100", "a100"))]
    assert len(rows) == 3 and max(_widths(wide.stdout)) > 100
    mi300x = next(r for r in rows if r.startswith("mi300x"))
    # the row whole on one line, its calibration marked transferred with the band on days
    assert "dp64 tp1 pp1 zero2" in mi300x and "transferred ±25%" in mi300x
    low, high = next(cell for cell in mi300x.split() if "-" in cell and cell[0].isdigit()).split("-")
    assert float(high) / float(low) == pytest.approx(1.25 / 0.75, rel=0.05)
    assert "measured" in next(r for r in rows if r.startswith("h100"))


def test_wide_keeps_long_lines_whole(cli):
    proc = cli("gpus", "--wide")
    assert any(line.startswith("named systems:") and line.rstrip().endswith("8x 400 Gb/s)")
               for line in proc.stdout.splitlines())


def test_memory_is_in_gib_everywhere(cli):
    sim = cli(*TINY_SIM)
    assert "memory per GPU, GiB" in sim.stdout
    nothing = cli("plan", "--model", "gpt3-175b", "--cluster", "a100-sxm-80gb:1x8", "--global-batch", "64")
    assert nothing.returncode == 2 and "GiB per GPU" in nothing.stderr and " GB" not in nothing.stderr


def test_reserve_takes_gib_and_gb_written_out(cli):
    def reserve_bytes(value):
        proc = cli(*TINY_PLAN, "--reserve", value, "--json")
        assert proc.returncode == 0, proc.stderr
        return json.loads(proc.stdout)["search"]["reserve_bytes"]
    assert reserve_bytes("0.5") == reserve_bytes("0.5GiB") == 0.5 * 2 ** 30
    assert reserve_bytes("0.5GB") == 0.5e9
    assert_user_error(cli(*TINY_PLAN, "--reserve", "3TB"), "--reserve", "GiB")


def test_version(cli):
    proc = cli("--version")
    assert proc.returncode == 0
    try:
        expected = version("meshplan")
    except PackageNotFoundError:
        expected = "unknown"
    assert proc.stdout.strip().startswith(f"meshplan {expected}")


def test_every_flag_has_help_and_shows_its_default():
    from planner.cli import build_parser
    from runtime.train import build_parser as train_parser
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    missing = []
    for name, p in [("meshplan", parser), *sub.choices.items(), ("train", train_parser())]:
        for action in p._actions:
            if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            text = action.help or ""
            if not text:
                missing.append(f"{name} {action.option_strings or action.dest}: no help")
            elif action.default not in (None, False, [], argparse.SUPPRESS) and "default" not in text:
                missing.append(f"{name} {action.option_strings}: default {action.default!r} not said")
    assert not missing, missing


@pytest.mark.parametrize("args,flag,suffix", [
    (TINY_SIM, "--trace", "json"), (TINY_SIM, "--timeline", "png"), (TINY_SIM, "--memory-plot", "png"),
    (TINY_SIM, "--html", "html"), (TINY_PLAN, "--out", "json"), (TINY_PLAN, "--plot", "png"),
    (TINY_PLAN, "--html", "html"),
    (("compare", "--model", "gpt-tiny", "--tokens", "1e6", "--global-batch", "8", "--seq", "64",
      "--clusters", "cpu:1x4"), "--plot", "png"),
], ids=lambda a: a if isinstance(a, str) else None)
def test_every_output_is_kept_unless_forced_and_announced(cli, tmp_path, args, flag, suffix):
    target = tmp_path / f"out.{suffix}"
    target.write_text("mine")
    assert_user_error(cli(*args, flag, target), "already exists", "--force")
    assert target.read_text() == "mine"
    forced = cli(*args, flag, target, "--force", "--json")
    assert forced.returncode == 0, forced.stderr
    assert target.read_bytes() != b"mine" and target.stat().st_size > 100
    json.loads(forced.stdout)   # stdout is the JSON alone ...
    assert f"wrote {target}" in forced.stderr   # ... and the file is announced on stderr
    fresh = tmp_path / f"new.{suffix}"
    proc = cli(*args, flag, fresh)
    assert proc.returncode == 0 and f"wrote {fresh}" in proc.stdout


def _run_with_terminal_stderr(*args):
    """`meshplan args` with stdout piped and stderr on a pseudo-terminal, as `meshplan ... | jq` runs."""
    master, slave = pty.openpty()
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, "-m", "planner.cli", *args], stdout=subprocess.PIPE, stderr=slave,
                            env=env, cwd=REPO)
    os.close(slave)
    err = b""
    while True:
        ready, _, _ = select.select([master], [], [], 0.5)
        if ready:
            try:
                chunk = os.read(master, 65536)
            except OSError:   # the child closed its end
                break
            if not chunk:
                break
            err += chunk
        elif proc.poll() is not None:
            break
    out = proc.stdout.read()
    proc.wait(timeout=60)
    os.close(master)
    return proc.returncode, out.decode(), err.decode(errors="replace")


def test_progress_goes_to_a_terminal_stderr_only():
    args = ("compare", "--model", "gpt3-1.3b", "--tokens", "26e9", "--global-batch", "64",
            "--clusters", "h100-sxm-80gb:1x8,mi300x:1x8", "--json")
    code, out, err = _run_with_terminal_stderr(*args)
    assert code == 0
    assert [c["cluster"] for c in json.loads(out)["clusters"]] == ["mi300x:1x8", "h100-sxm-80gb:1x8"]
    assert "planning gpt3-1.3b on h100-sxm-80gb:1x8 (1 of 2)" in err and "0:00:0" in err   # spinner, elapsed
    # piped stderr (a log, CI): no spinner at all
    piped = subprocess.run([sys.executable, "-m", "planner.cli", *args], capture_output=True, text=True,
                           env=dict(os.environ, PYTHONPATH=str(REPO)), cwd=REPO, timeout=300)
    assert piped.returncode == 0 and piped.stderr == ""
    assert json.loads(piped.stdout) == json.loads(out)
