"""`--from megatron-lm` and `--export megatron-lm`: a launch line read as Megatron-LM's parser
and validate_args read it (each expected value below follows a rule of Megatron-LM's code,
named beside it), the export's options checked against Megatron-LM's own parser table, and
export -> import giving back the same plan and the same simulated step."""
import json
from dataclasses import replace
from pathlib import Path

import pytest

from cost_models import MeshplanError, parse_cluster
from helpers import FIXTURES, assert_user_error
from planner.interop import export_plan, import_job
from planner.interop.base import SplitError
from planner.interop.megatron_lm import options
from planner.plan import Plan
from planner.search import plan as search
from planner.simulate import simulate
from planner.zoo import load_model

pytestmark = pytest.mark.cli

BASE = ("--num-layers 8 --hidden-size 256 --num-attention-heads 8 --seq-length 512 --max-position-embeddings 512 "
        "--micro-batch-size 2")
# examples/sc21/run_table_1.sh at de7dc40 (1.7B row) with CONFIG.sh's MEGATRON_PARAMS, trimmed of paths
SC21_1P7B = """#!/bin/bash
python -u pretrain_gpt.py --checkpoint-activations \\
    --tensor-model-parallel-size 1 --pipeline-model-parallel-size 1 \\
    --micro-batch-size 16 --global-batch-size 512 \\
    --num-layers 24 --hidden-size 2304 --num-attention-heads 24 \\
    --DDP-impl torch --data-path DATA --vocab-file vocab.json --merge-file merges.txt \\
    --log-interval 5 --seq-length 2048 --max-position-embeddings 2048 \\
    --train-iters 500 --lr-decay-iters 320 --lr 0.0001 --min-lr 0.00001 --lr-decay-style cosine \\
    --lr-warmup-fraction 0.01 --split 969,30,1 --eval-iters 100 --eval-interval 1000 --clip-grad 1.0 \\
    --fp16 --loss-scale 8192
"""


def test_line_maps_every_cost_option():
    line = (f"torchrun --nnodes 2 --nproc-per-node 8 pretrain_gpt.py {BASE} --tensor-model-parallel-size 2 "
            f"--pipeline-model-parallel-size 2 --num-layers-per-virtual-pipeline-stage 2 --sequence-parallel --bf16 "
            f"--use-distributed-optimizer --overlap-grad-reduce --recompute-activations --global-batch-size 64 "
            f"--lr 3e-4 --seed 7 --save ckpt --save-interval 100")
    job = import_job("megatron-lm", line, world=16)
    f = job.fields
    assert (f["dp"], f["tp"], f["pp"]) == (4, 2, 2)                 # dp = world / (tp x pp)
    assert (f["micro_batch"], f["global_batch"], f["seq"]) == (2, 64, 512)
    assert (f["schedule"], f["interleave"]) == ("interleaved", 2)   # 8 layers / pp 2 / 2 per chunk
    assert f["sequence_parallel"] and f["zero"] == 1 and f["precision"] == "bf16"
    assert f["checkpoint"] == ["attention"] * 8                     # --recompute-activations = selective core_attn
    assert job.engine == "megatron-lm" and job.engine_options == {"overlap_grad_reduce": True}
    cfg = job.model.config
    assert (cfg.arch, cfg.ffn, cfg.dropout, cfg.tie_embeddings) == ("gpt", 1024, 0.1, True)   # 4h; dropouts 0.1
    assert cfg.vocab == 50432       # GPT-2's 50257 padded to a multiple of 128 x tp 2


def test_context_parallel_size_splits_the_data_ranks():
    """Megatron-Core's data-parallel size is world / (tp x pp x cp) (megatron/core/parallel_state.py)."""
    job = import_job("megatron-lm", f"{BASE} --tensor-model-parallel-size 2 --context-parallel-size 2 "
                                    f"--cp-comm-type p2p --bf16", world=16)
    assert (job.fields["dp"], job.fields["cp"], job.fields["tp"]) == (4, 2, 2)
    assert job.fields["global_batch"] == 2 * 4   # Megatron's default: micro-batch x dp (cp ranks share samples)


def test_llama_traits_padding_and_block_recompute():
    line = (f"{BASE} --position-embedding-type rope --swiglu --normalization RMSNorm --disable-bias-linear "
            f"--group-query-attention --num-query-groups 2 --untie-embeddings-and-output-weights "
            f"--hidden-dropout 0 --attention-dropout 0 --tokenizer-type HuggingFaceTokenizer --vocab-size 32000 "
            f"--pipeline-model-parallel-size 2 --recompute-granularity full --recompute-method block "
            f"--recompute-num-layers 3")
    job = import_job("megatron-lm", line, world=2)
    cfg = job.model.config
    assert (cfg.arch, cfg.kv_heads, cfg.tie_embeddings, cfg.dropout) == ("llama", 2, False, 0.0)
    assert cfg.ffn == 640                  # int(4 x 256 x 2/3 / 64) x 64 with --swiglu
    assert cfg.vocab == 32000              # already a multiple of 128 x tp 1
    # block: the first 3 layers of each stage's 4 recompute in full, the rest keep everything
    assert job.fields["checkpoint"] == ["full"] * 3 + ["none"] + ["full"] * 3 + ["none"]


def test_sc21_script_reads_as_the_2021_code():
    job = import_job("megatron-lm", SC21_1P7B, world=32)
    assert job.engine == "megatron-lm@2021" and job.engine_options == {"ddp_impl": "torch"}
    assert job.fields["checkpoint"] == ["full"] * 24 and job.fields["precision"] == "fp16"
    assert job.fields["dp"] == 32 and job.model.config.vocab == 50304   # 50257 padded to 128


def test_uneven_first_and_last_stage():
    job = import_job("megatron-lm", f"{BASE} --pipeline-model-parallel-size 3 --decoder-first-pipeline-num-layers 2 "
                                    f"--decoder-last-pipeline-num-layers 2", world=3)
    assert job.fields["stages"] == [[0, 2], [2, 6], [6, 8]]


@pytest.mark.parametrize("extra, fragment", [
    ("--tensor-model-parallel-size abc", "takes a whole number"),
    ("--num-experts 8", "--num-experts changes the job"),
    ("--context-parallel-size 2 --cp-comm-type a2a", "--cp-comm-type a2a is not modelled"),
    ("--fp8-format e4m3", "--fp8-format"),
    ("--no-such-option 3", "not a Megatron-LM option"),
    ("--lr '3e-4", "close the quote"),
    ("--swiglu", "set all or none"),
    ("--hidden-dropout 0", "both 0 or both above 0"),
    ("--recompute-granularity full", "needs --recompute-method"),
    ("--checkpoint-activations", "no longer valid"),
    ("--DDP-impl torch --recompute-activations", "Megatron-Core's current arguments only"),
])
def test_bad_lines_get_one_line(cli, extra, fragment):
    proc = cli("simulate", "--from", "megatron-lm", f"{BASE} {extra}", "--cluster", "a100-sxm-80gb:1x1")
    assert_user_error(proc, fragment)


def test_world_size_must_match_the_launcher():
    with pytest.raises(MeshplanError, match="launch 16 processes"):
        import_job("megatron-lm", f"torchrun --nnodes 2 --nproc-per-node 8 pretrain_gpt.py {BASE}", world=8)


def export_best(engine_name, spec, cluster, tmp_path, **pins):
    """The search's best plan exported (its even-split version where the engine splits evenly,
    as `meshplan plan --export` does), with the step time the exported plan simulates to."""
    best = search(spec, cluster, 32, 512, top_k=1, **pins)[0]
    try:
        return best, best.result.step_time_s, export_plan(engine_name, best, spec, cluster, str(tmp_path / "out"))
    except SplitError:
        even = replace(best, stages=[])
        step = simulate(even, spec, cluster).step_time_s
        return even, step, export_plan(engine_name, even, spec, cluster, str(tmp_path / "out"))


@pytest.mark.parametrize("engine, pins", [
    ("megatron-lm", dict(tp=2, pp=2, checkpoint="full", sequence_parallel=True)),
    ("megatron-lm@2021", dict(pp=2, checkpoint="full")),
    ("megatron-lm", dict(cp=2, tp=2, checkpoint="full")),   # --context-parallel-size
])
def test_export_round_trip(tmp_path, engine, pins):
    spec, cluster = load_model("gpt3-125m"), parse_cluster("a100-sxm-80gb:2x4")
    best, step_s, files = export_best("megatron-lm", spec, cluster, tmp_path, engine=engine, **pins)
    table = options(engine)
    for path in files:
        imported = import_job("megatron-lm", str(path), cluster.world_size)
        again = imported.plan(spec.name, cluster.name)
        for name in ("dp", "cp", "tp", "pp", "zero", "micro_batch", "global_batch", "seq", "precision", "schedule",
                     "interleave", "sequence_parallel", "engine", "engine_options", "offload_optimizer", "rank_order"):
            assert getattr(again, name) == getattr(best, name), name
        assert [again.checkpoint_for(i) for i in range(12)] == [best.checkpoint_for(i) for i in range(12)]
        config = imported.model.config
        for name in ("layers", "hidden", "heads", "ffn", "vocab", "max_seq", "tie_embeddings", "dropout"):
            assert getattr(config, name) == getattr(spec.config, name), name
        assert simulate(again, imported.model, cluster).step_time_s == pytest.approx(step_s, rel=1e-9)
        words = Path(path).read_text().split()
        exported = [w for w in words[words.index("pretrain_gpt.py") + 1:] if w.startswith("--")] \
            if "pretrain_gpt.py" in words else [w for w in words if w.startswith("--")]
        assert exported and all(w in table for w in exported), [w for w in exported if w not in table]


def test_option_table_is_megatrons():
    """The table the importer reads was generated from the parsers (fixture script), not typed."""
    data = json.loads((Path(__file__).parents[2] / "planner/interop/data/megatron_lm_options.json").read_text())
    assert data["megatron-lm"]["commits"] == ["d98e8a64ddf34856e74b24714e3bedb2f5a39553"]
    current, old = data["megatron-lm"]["options"], data["megatron-lm@2021"]["options"]
    assert current["--tensor-model-parallel-size"] == ["transformer configuration", 1]
    assert current["--use-distributed-optimizer"][1] == 0 and "--DDP-impl" not in current
    assert old["--DDP-impl"] == ["distributed", 1] and "--use-distributed-optimizer" not in old
    assert (FIXTURES / "interop" / "make_megatron_options.py").is_file()


def test_cli_plan_from_line_pins_and_exports(cli, tmp_path):
    line = f"{BASE} --tensor-model-parallel-size 2 --global-batch-size 16 --bf16 --use-distributed-optimizer"
    out = tmp_path / "exp"
    proc = cli("plan", "--from", "megatron-lm", line, "--cluster", "a100-sxm-80gb:1x4", "--export", "megatron-lm",
               "--out", str(out), "--top", "1", "--json")
    assert proc.returncode == 0, proc.stderr
    best = json.loads(proc.stdout)["plans"][0]
    assert (best["tp"], best["dp"], best["zero"], best["micro_batch"], best["global_batch"], best["seq"]) == \
        (2, 2, 1, 2, 16, 512)
    assert best["engine"] == "megatron-lm"
    assert sorted(p.name for p in out.iterdir()) == ["launch.sh", "megatron_args.txt"]
    again = cli("plan", "--from", "megatron-lm", line, "--cluster", "a100-sxm-80gb:1x4", "--export", "megatron-lm",
                "--out", str(out), "--top", "1")
    assert_user_error(again, "already exists", "--force")


def test_export_refuses_what_megatron_cannot_run(tmp_path):
    cluster, spec = parse_cluster("a100-sxm-80gb:1x4"), load_model("gpt3-125m")
    plan = Plan(dp=4, zero=3, micro_batch=1, global_batch=8, seq=512, engine="meshplan")
    with pytest.raises(MeshplanError, match="plan with --engine megatron-lm"):
        export_plan("megatron-lm", plan, spec, cluster, str(tmp_path / "o"))
    mixed = Plan(dp=4, micro_batch=1, global_batch=8, seq=512, engine="megatron-lm",
                 checkpoint=["full", "none"] * 6)
    with pytest.raises(MeshplanError, match="pin --checkpoint full or none"):
        export_plan("megatron-lm", mixed, spec, cluster, str(tmp_path / "o"))
    assert not (tmp_path / "o").exists()


def test_bf16_reduces_gradients_in_fp32_already():
    """Megatron-Core accumulates and all-reduces bf16 gradients in fp32 by default (arguments.py
    validate_args), so saying so changes nothing; with fp16 it would, and is refused."""
    line = f"{BASE} --bf16 --accumulate-allreduce-grads-in-fp32 --apply-layernorm-1p --empty-unused-memory-level 1"
    assert import_job("megatron-lm", line, world=1).fields["precision"] == "bf16"
    with pytest.raises(MeshplanError, match="--accumulate-allreduce-grads-in-fp32 changes the job"):
        import_job("megatron-lm", f"{BASE} --fp16 --accumulate-allreduce-grads-in-fp32", world=1)
    with pytest.raises(MeshplanError, match="--grad-reduce-in-bf16 changes the job"):
        import_job("megatron-lm", f"{BASE} --bf16 --grad-reduce-in-bf16", world=1)


def test_fp8_format_reads_as_precision_fp8_and_round_trips(tmp_path):
    """--fp8-format hybrid (TransformerConfig.fp8) with --fp8-recipe tensorwise, or the default
    delayed (per-tensor too, said in a note), is precision fp8 tensorwise; the export writes it back."""
    line = f"{BASE} --bf16 --use-distributed-optimizer --fp8-format hybrid --fp8-amax-history-len 1024"
    job = import_job("megatron-lm", line, world=8)
    assert job.fields["precision"] == "fp8" and any("delayed" in note for note in job.notes)
    plan = job.plan("megatron-8x256", "h100-sxm-80gb:1x8")
    assert (plan.precision, plan.fp8_recipe, plan.engine) == ("fp8", "tensorwise", "megatron-lm")
    tensorwise = import_job("megatron-lm", f"{line} --fp8-recipe tensorwise", world=8)
    assert tensorwise.fields["precision"] == "fp8" and not tensorwise.notes
    spec, cluster = load_model("gpt3-125m"), parse_cluster("h100-sxm-80gb:1x8")
    best, step_s, files = export_best("megatron-lm", spec, cluster, tmp_path, engine="megatron-lm", zero=1,
                                      precision="fp8")
    words = Path(files[0]).read_text().split()
    assert words[words.index("--fp8-format") + 1] == "hybrid" and "--bf16" in words
    again = import_job("megatron-lm", str(files[0]), cluster.world_size).plan(spec.name, cluster.name)
    assert (again.precision, again.fp8_recipe) == ("fp8", "tensorwise")
    assert simulate(again, spec, cluster).step_time_s == pytest.approx(step_s, rel=1e-9)


@pytest.mark.parametrize("extra, fragment", [
    ("--bf16 --fp8-format hybrid --fp8-recipe mxfp8", "per-tensor FP8 scaling"),
    ("--fp8-format hybrid", "add --bf16"),
    ("--bf16 --fp8-format hybrid --fp8-param-gather --use-distributed-optimizer", "--fp8-param-gather"),
])
def test_fp8_options_meshplan_does_not_price_are_refused(extra, fragment):
    with pytest.raises(MeshplanError, match=fragment):
        import_job("megatron-lm", f"{BASE} {extra}", world=8)
