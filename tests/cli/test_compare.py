"""`meshplan compare`: real planning of small cases, priced with cost_models.energy."""
import argparse
import json

import pytest

from helpers import assert_user_error
from cost_models import MeshplanError, get_gpu
from cost_models.energy import DEFAULT_GRID_KG_PER_KWH, DEFAULT_PUE
from planner.cli import compare as compare_cli
from planner.compare import compare

MODEL, TOKENS, GLOBAL_BATCH, SEQ = "gpt3-1.3b", 300e9, 64, 1024
H100, A100 = "h100-sxm-80gb:1x8", "a100-sxm-80gb:2x8"
TOO_SMALL = "v100-16gb:1x1"     # GPT-3 1.3B's model states alone need ~21 GB


def _compare(clusters=(H100, A100), **kwargs):
    return {c.cluster: c for c in compare(MODEL, list(clusters), TOKENS, GLOBAL_BATCH, SEQ, **kwargs)}


@pytest.fixture(scope="module")
def base():
    return compare(MODEL, [TOO_SMALL, A100, H100], TOKENS, GLOBAL_BATCH, SEQ)


def test_sorted_by_time_to_train_with_the_misfit_last(base):
    assert [c.cluster for c in base] == [H100, A100, TOO_SMALL]
    assert base[0].run_cost.time_to_train_s < base[1].run_cost.time_to_train_s


def test_h100_trains_faster_per_gpu(base):
    h100, a100 = base[0], base[1]
    per_gpu = [c.plan.result.tokens_per_s / c.gpus for c in (h100, a100)]
    assert per_gpu[0] > per_gpu[1]
    assert h100.run_cost.gpu_hours < a100.run_cost.gpu_hours


def test_run_cost_from_first_principles(base):
    for c in base[:2]:
        cost, result = c.run_cost, c.plan.result
        assert c.price_usd_per_gpu_hour == get_gpu(c.gpu).price_usd_per_hour
        assert cost.time_to_train_s == pytest.approx(TOKENS / result.tokens_per_s)
        assert cost.gpu_hours == pytest.approx(c.gpus * cost.time_to_train_s / 3600)
        assert cost.cost_usd == pytest.approx(cost.gpu_hours * c.price_usd_per_gpu_hour)
        assert cost.co2_kg == pytest.approx(cost.energy_kwh * DEFAULT_GRID_KG_PER_KWH)
        tdp_w = get_gpu(c.gpu).tdp_w
        assert 0.15 * tdp_w < cost.avg_gpu_power_w <= tdp_w
        assert cost.energy_kwh == pytest.approx(c.gpus * cost.avg_gpu_power_w * cost.time_to_train_s
                                                * DEFAULT_PUE / 3.6e6)
        assert 0 < c.busy_fraction <= 1


def test_misfit_is_reported_and_the_rest_priced(base):
    misfit = base[-1]
    assert not misfit.fits and misfit.plan is None and misfit.run_cost is None
    assert "nothing fits" in misfit.reason and "\n" not in misfit.reason
    assert all(c.fits and c.run_cost.cost_usd > 0 for c in base[:2])


def test_overridden_price_changes_only_the_dollars(base):
    before = {c.cluster: c for c in base}
    after = _compare(prices={"a100": 1.25})
    assert after[A100].price_usd_per_gpu_hour == 1.25
    assert after[A100].run_cost.cost_usd == pytest.approx(after[A100].run_cost.gpu_hours * 1.25)
    assert after[A100].run_cost.cost_usd < before[A100].run_cost.cost_usd
    for name in (H100, A100):
        old, new = before[name].run_cost.to_dict(), after[name].run_cost.to_dict()
        changed = {k for k in old if old[k] != pytest.approx(new[k])}
        assert changed == ({"cost_usd"} if name == A100 else set())


def test_energy_grows_with_pue_and_co2_with_grid(base):
    plain = _compare(pue=1.0, grid_kg_per_kwh=0.1)
    cooled = _compare(pue=1.5, grid_kg_per_kwh=0.1)
    for name in (H100, A100):
        assert cooled[name].run_cost.energy_kwh == pytest.approx(1.5 * plain[name].run_cost.energy_kwh)
        assert cooled[name].run_cost.cost_usd == pytest.approx(plain[name].run_cost.cost_usd)
        assert plain[name].run_cost.co2_kg == pytest.approx(0.1 * plain[name].run_cost.energy_kwh)


@pytest.mark.parametrize("kwargs,fragment", [
    (dict(clusters=["z100:1x8"]), "unknown GPU 'z100'"),
    (dict(clusters=["dgx-a100:x"]), "cannot read cluster"),
    (dict(clusters=[]), "at least one cluster"),
    (dict(tokens=0), "--tokens"),
    (dict(tokens=-1e9), "--tokens"),
    (dict(pue=0.9), "--pue"),
    (dict(grid_kg_per_kwh=-1), "--grid-kg-per-kwh"),
    (dict(prices={"z100": 2.0}), "unknown GPU 'z100'"),
    (dict(prices={"h200": 2.0}), "no cluster uses it"),
    (dict(prices={"h100": -2.0}), ">= 0"),
    (dict(layers=3), "cannot pin"),
])
def test_bad_input_is_one_line(kwargs, fragment):
    args = dict(clusters=[H100], tokens=TOKENS) | kwargs
    with pytest.raises(MeshplanError) as exc:
        compare(MODEL, args.pop("clusters"), args.pop("tokens"), GLOBAL_BATCH, SEQ, **args)
    assert fragment in str(exc.value) and "\n" not in str(exc.value)


# -- the command line, through the parser `add_arguments` builds and the real `main`'s contract --------
def _main(argv) -> int:
    """What planner.cli.main does for a registered subcommand: MeshplanError -> exit 2."""
    from planner.cli import Parser
    parser = Parser(prog="meshplan compare")
    compare_cli.add_arguments(parser)
    try:
        return compare_cli.run(parser.parse_args(argv))
    except MeshplanError as exc:
        print(f"meshplan: error: {exc}")
        return 2


ARGV = ["--model", MODEL, "--tokens", "300e9", "--global-batch", str(GLOBAL_BATCH), "--seq", str(SEQ)]


def test_json_and_plot(tmp_path, capsys):
    plot = tmp_path / "compare.png"
    rc = _main([*ARGV, "--clusters", f"{A100},{TOO_SMALL},{H100}", "--price", "h100-sxm-80gb=2.5",
                "--json", "--plot", str(plot)])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    rows = out["clusters"]
    assert [r["cluster"] for r in rows] == [H100, A100, TOO_SMALL]
    assert rows[0]["price_usd_per_gpu_hour"] == 2.5
    assert rows[0]["run_cost"]["cost_usd"] == pytest.approx(2.5 * rows[0]["run_cost"]["gpu_hours"])
    assert rows[0]["plan"]["dp"] * rows[0]["plan"]["tp"] * rows[0]["plan"]["pp"] == 8
    assert rows[2]["fits"] is False and "nothing fits" in rows[2]["reason"]
    assert rows[1]["calibration"].startswith("calibration: a100-sxm-80gb, ")
    assert plot.is_file() and plot.stat().st_size > 10_000
    stamp = plot.stat().st_mtime_ns
    assert _main([*ARGV, "--clusters", H100, "--plot", str(plot)]) == 2
    assert "already exists" in capsys.readouterr().out
    assert plot.stat().st_mtime_ns == stamp


def test_table_names_the_misfit(capsys):
    assert _main([*ARGV, "--clusters", f"{H100},{TOO_SMALL}", "--tp", "1"]) == 0
    out = capsys.readouterr().out
    assert "dp8 tp1 pp1" in out and "does not fit" in out and f"{TOO_SMALL}: nothing fits" in out
    # each GPU's calibration is named once: the V100 has none of its own, it borrows the H100's
    assert out.count("calibration: h100-sxm-80gb, ") == 1
    assert "calibration: v100-16gb, transferred from the h100-sxm-80gb calibration" in out


@pytest.mark.parametrize("extra,fragment", [
    (["--clusters", H100, "--price", "h100"], "GPU=USD_PER_HOUR"),
    (["--clusters", H100, "--price", "h100=cheap"], "GPU=USD_PER_HOUR"),
    (["--clusters", H100, "--price", "z100=2"], "unknown GPU 'z100'"),
    (["--clusters", "nonsense"], "cannot read cluster"),
    (["--clusters", H100, "--tokens", "0"], "--tokens"),
    (["--clusters", H100, "--checkpoint", "some"], "invalid choice"),
])
def test_bad_flags_exit_2(extra, fragment, capsys):
    assert _main([*ARGV, *extra]) == 2
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and fragment in out[0]


def _registered() -> bool:
    from planner.cli import build_parser
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return "compare" in sub.choices


@pytest.mark.skipif(not _registered(), reason="`compare` is not registered in planner/cli yet")
def test_cli_bad_flags_exit_2(cli):
    assert_user_error(cli("compare", *ARGV, "--clusters", H100, "--price", "h100"), "GPU=USD_PER_HOUR")
    assert_user_error(cli("compare", *ARGV, "--clusters", "z100:1x8"), "unknown GPU 'z100'")
