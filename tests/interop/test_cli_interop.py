"""The `--from` / `--export` flags as a user meets them: engine names, flags the source already
fixes, a search run for another engine than the imported one, and an export of an engine that
splits the layers its own way."""
import json

import pytest

from helpers import assert_user_error

pytestmark = pytest.mark.cli
LINE = ("--num-layers 12 --hidden-size 256 --num-attention-heads 8 --seq-length 512 --max-position-embeddings 512 "
        "--micro-batch-size 2 --global-batch-size 16 --bf16")


def test_unknown_engines_are_named(cli):
    assert_user_error(cli("simulate", "--from", "nemo", "x.yaml", "--cluster", "a100-sxm-80gb:1x8"),
                      "'nemo' is not an engine", "megatron-lm, megatron-lm@2021, deepspeed, torchtitan")
    assert_user_error(cli("plan", "--from", "colossalai", "x", "--cluster", "a100-sxm-80gb:1x8"), "'colossalai'")


def test_flags_the_source_fixes_are_refused(cli):
    base = ("simulate", "--from", "megatron-lm", LINE, "--cluster", "a100-sxm-80gb:1x8")
    assert_user_error(cli(*base, "--tp", "2"), "--tp cannot be combined with --from megatron-lm")
    assert_user_error(cli(*base, "--engine", "meshplan"), "--engine and --engine-option cannot be combined")
    assert_user_error(cli(*base, "--plan", "p.json"), "--from cannot be combined with --plan")
    assert_user_error(cli("simulate", "--from", "megatron-lm", LINE), "needs --cluster")
    assert_user_error(cli("plan", "--cluster", "a100-sxm-80gb:1x8", "--seq", "512"),
                      "required: --model, --global-batch")


def test_plan_for_another_engine_takes_the_job_only(cli, tmp_path):
    proc = cli("plan", "--from", "megatron-lm", LINE, "--cluster", "h100-sxm-80gb:1x8", "--engine", "meshplan",
               "--tp", "1", "--pp", "1", "--top", "1", "--json")
    assert proc.returncode == 0, proc.stderr
    best = json.loads(proc.stdout)["plans"][0]
    assert best["engine"] == "meshplan" and (best["global_batch"], best["seq"]) == (16, 512)
    assert "the search runs for meshplan: only the model, global batch and sequence length" in proc.stderr


def test_even_split_export_says_what_changed(cli, tmp_path):
    """Megatron-LM 2021 splits layers evenly: where the search's best split is uneven the export
    writes the even split, simulated again, and says both step times."""
    proc = cli("plan", "--model", "gpt3-125m", "--cluster", "a100-sxm-80gb:2x4", "--global-batch", "32", "--seq",
               "512", "--pp", "2", "--checkpoint", "full", "--engine", "megatron-lm@2021", "--top", "1",
               "--export", "megatron-lm", "--out", str(tmp_path / "x"))
    assert proc.returncode == 0, proc.stderr
    args = (tmp_path / "x" / "megatron_args.txt").read_text()
    assert "--DDP-impl local" in args and "--checkpoint-activations" in args
    table = [line for line in proc.stdout.splitlines() if line.split()[:1] == ["1"]][0]
    # the note when, and only when, the search's split was uneven
    assert ("exported the best plan with the even split, step" in proc.stdout) == (" 6/6 " not in table), table
