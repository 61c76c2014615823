"""Megatron-LM weak scaling (SC21 Table 1): predicted vs published TFLOP/s, and plan quality.

    python benchmarks/megatron_table.py            # all 10 rows, 1.7B on 32 GPUs ... 1T on 3072
    python benchmarks/megatron_table.py --rows 4   # the first 4 rows
    python benchmarks/megatron_table.py --json     # machine-readable

Ground truth: Narayanan et al., "Efficient Large-Scale Language Model Training on GPU
Clusters Using Megatron-LM", SC21 (arXiv:2104.04473), Table 1, as transcribed in
shared/reference/megatron_sc21_table1.json. Selene: DGX A100 80GB nodes, NVSwitch inside a
node, 8x 200 Gb/s HDR InfiniBand per node (one 200 Gb/s NIC per GPU) = the named system
`dgx-a100` (cost_models/cluster.py SYSTEMS), so a row of N GPUs runs on `dgx-a100:N/8`.

Per row (the paper's GPU count, global batch, tensor- and pipeline-parallel degrees):
(a) `plan()` with the paper's tp and pp pinned, the rest searched (meshplan's runtime);
    and the paper's system through the CLI: `meshplan plan --engine megatron-lm@2021` with
    tp, pp, full recompute, no ZeRO and no sequence parallelism pinned, the model with
    Megatron's dropout 0.1; the engine (planner/engines/megatron_lm.py) runs the unfused
    core attention - flash attention came in 2022 -, fp16 parameters and gradients, the
    gradient all-reduce after backward, blocking pipeline sends with scatter/gather and its
    fused kernels. These are facts of the measured system, not fits; this column is the bar.
    Predicted TFLOP/s per GPU uses the paper's own FLOP count, which includes the recompute
    forward pass whatever the plan checkpoints: F = 96 B s l h^2 (1 + s/(6h) + V/(16 l h))
    per iteration, divided by (simulated step time x GPUs).
(b) `plan()` unconstrained; the plan-quality bar is that its simulated throughput
    (tokens/s) is at least that of the pinned-(tp, pp) plan;
(c) "as run": the paper's system as its artifact ran it (Megatron-LM examples/sc21/
    run_table_1.sh): its micro-batch size, virtual pipeline stages and DDP implementation
    (torch DDP overlaps the all-reduce with backward, Megatron's local DDP runs it after),
    one `meshplan simulate --batch` case per row (engine option ddp_impl).
`--commands` prints the meshplan commands of (a)'s Megatron column and (c).
Nothing here is fitted; the paper does not report micro-batch sizes and interleave factors,
so (a) lets the planner choose them, as the bar asks. Precision is the planner's default
(bf16; the paper ran fp16 mixed precision, and the A100's bf16 and fp16 peaks are equal).
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from planner.cli import main as meshplan
from planner.plan import RECOMPUTE_MODES, Plan
from planner.search import plan
from planner.zoo import PRESETS

DEFAULT_REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference"
TABLE = "megatron_sc21_table1.json"
GPUS_PER_NODE = 8   # DGX A100
BAR_PCT = 10.0      # the bar: predicted TFLOP/s within 10 % of the paper's on every row
MEGATRON_2021_MODEL = dict(dropout=0.1)   # Megatron-LM's GPT as the paper ran it (its default dropout)
# The paper's execution, pinned: full recompute, no ZeRO, and no sequence parallelism (it came
# a year later, Korthikanti et al. 2022): with tp 8, every GPU of the TP group runs the
# LayerNorms, dropouts and residual adds on the whole residual stream. The engine
# `megatron-lm@2021` offers nothing else, and runs the unfused core attention.
MEGATRON_2021_FLAGS = ["--engine", "megatron-lm@2021", "--checkpoint", "full", "--zero", "0",
                       "--no-sequence-parallel"]
# The artifact's settings per row, keyed by (layers, hidden): global batch (checked against
# the table), micro-batch, layers per virtual pipeline stage (0: no interleaving) and
# --DDP-impl. Source: NVIDIA/Megatron-LM examples/sc21/run_table_1.sh.
AS_RUN = {(24, 2304): (512, 16, 0, "torch"), (30, 3072): (512, 16, 0, "torch"), (36, 4096): (512, 16, 0, "torch"),
          (40, 6144): (1024, 8, 0, "torch"), (48, 8192): (1536, 4, 0, "local"), (60, 10240): (1792, 2, 5, "local"),
          (80, 12288): (2304, 2, 5, "local"), (96, 16384): (2160, 1, 3, "local"),
          (105, 20480): (2520, 1, 1, "local"), (128, 25600): (3072, 1, 0, "local")}


def paper_flops_per_iteration(row: dict) -> float:
    """The paper's F = 96 B s l h^2 (1 + s/(6h) + V/(16 l h)), recompute forward included."""
    b, s, l, h, v = (row[k] for k in ("global_batch_size", "seq_len", "num_layers", "hidden_size", "vocab_size"))
    return 96 * b * s * l * h ** 2 * (1 + s / (6 * h) + v / (16 * l * h))


def preset_for(row: dict) -> str:
    """The `megatron-*` zoo preset with this row's shape (layers, hidden, heads, vocab, seq)."""
    shape = (row["num_layers"], row["hidden_size"], row["attention_heads"], row["vocab_size"], row["seq_len"])
    for name, cfg in PRESETS.items():
        if name.startswith("megatron-") and (cfg.layers, cfg.hidden, cfg.heads, cfg.vocab, cfg.max_seq) == shape:
            return name
    raise SystemExit(f"no megatron-* preset in planner/zoo.py has the shape {shape}")


def cluster_of(row: dict) -> str:
    return f"dgx-a100:{row['num_gpus'] // GPUS_PER_NODE}"


def scored(row: dict, plan_text: str, result, plan_s: float) -> dict:
    """A simulated step of the row, with its TFLOP/s by the paper's count and its error."""
    tflops = paper_flops_per_iteration(row) / (result.step_time_s * row["num_gpus"]) / 1e12
    return dict(plan=plan_text, step_time_s=result.step_time_s, tokens_per_s=result.tokens_per_s,
                tflops_per_gpu=tflops, plan_s=plan_s, hfu=result.hfu, phases=result.phases,
                error_pct=100 * (tflops - row["achieved_tflops_per_gpu"]) / row["achieved_tflops_per_gpu"])


def timed_plan(model, row: dict, **pinned) -> dict:
    """The best plan for the row (with `pinned`) on meshplan's runtime, by `plan()`."""
    cluster = cluster_of(row)
    started = time.perf_counter()
    best = plan(model, cluster, row["global_batch_size"], row["seq_len"], top_k=1, **pinned)[0]
    return scored(row, summary(best), best.result, time.perf_counter() - started)


def cli(*args) -> str:
    """`meshplan ARGS` through the CLI's own entry point (in this process: no torch import per
    call); its stdout. Printed with --commands, to run by hand."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = meshplan([str(a) for a in args])
    if code:
        raise SystemExit(f"meshplan {' '.join(map(str, args))} exited {code}")
    return out.getvalue()


def paper_system(model_path: Path, row: dict, commands: list) -> dict:
    """`meshplan plan --engine megatron-lm@2021` with the paper's tp and pp and the 2021 system
    pinned (MEGATRON_2021_FLAGS): the search under Megatron-LM's own execution."""
    args = ["plan", "--model", model_path, "--cluster", cluster_of(row), "--global-batch", row["global_batch_size"],
            "--seq", row["seq_len"], "--tp", row["tensor_parallel"], "--pp", row["pipeline_parallel"],
            *MEGATRON_2021_FLAGS, "--top", "1", "--json"]
    commands.append("meshplan " + " ".join(map(str, args)))
    started = time.perf_counter()
    best = json.loads(cli(*args))["plans"][0]
    result = best.pop("result")
    best = Plan(**best)
    return scored(row, summary(best), _Result(result), time.perf_counter() - started)


def as_run_case(model: dict, row: dict) -> dict:
    """The paper's system with the artifact's micro-batch, interleaving and DDP (AS_RUN), as a
    `meshplan simulate --batch` case."""
    layers = row["num_layers"]
    global_batch, micro_batch, per_virtual_stage, ddp = AS_RUN[(layers, row["hidden_size"])]
    if global_batch != row["global_batch_size"]:
        raise SystemExit(f"run_table_1.sh's global batch {global_batch} is not the table's {row['global_batch_size']}")
    pp = row["pipeline_parallel"]
    chunks = layers // pp // per_virtual_stage if per_virtual_stage else 1
    return dict(model=model, cluster=cluster_of(row), dp=row["data_parallel"], tp=row["tensor_parallel"], pp=pp,
                micro_batch=micro_batch, global_batch=global_batch, seq=row["seq_len"], precision="fp16",
                interleave=chunks, schedule="interleaved" if chunks > 1 else "1f1b", checkpoint="full",
                engine="megatron-lm@2021", engine_options={"ddp_impl": ddp})


class _Result:
    """A SimResult's JSON (`to_dict`) read back with the attributes `scored` uses."""

    def __init__(self, data: dict):
        self.step_time_s, self.tokens_per_s = data["step_time_s"], data["tokens_per_s"]
        self.hfu, self.phases = data["hfu"], data["phases"]


def summary(p) -> str:
    text = f"dp{p.dp} tp{p.tp} pp{p.pp} z{p.zero} mb{p.micro_batch} {p.schedule}"
    text += f"x{p.interleave}" if p.interleave > 1 else ""
    text += " sp" if p.sequence_parallel else ""
    text += " off" if p.offload_optimizer else ""
    modes = [m for m in reversed(RECOMPUTE_MODES) if m in (p.checkpoint or [])]
    return text + (" ckpt:" + "+".join(modes) if modes else "")


def evaluate(row: dict, tmp: Path, commands: list) -> dict:
    model = preset_for(row)
    degrees = dict(tp=row["tensor_parallel"], pp=row["pipeline_parallel"])
    pinned = timed_plan(model, row, **degrees)
    megatron_model = {**PRESETS[model].to_dict(), **MEGATRON_2021_MODEL}
    model_path = tmp / f"{model}-2021.json"
    model_path.write_text(json.dumps(megatron_model))
    full = paper_system(model_path, row, commands)
    free = timed_plan(model, row)
    case = as_run_case(megatron_model, row)
    cases = tmp / f"{model}-as-run.jsonl"
    cases.write_text(json.dumps(case) + "\n")
    commands.append(f"meshplan simulate --batch {cases.name}   # {json.dumps(case)}")
    as_run = json.loads(cli("simulate", "--batch", cases))
    if "error" in as_run:
        raise SystemExit(f"{model} as run: {as_run['error']}")
    ran = Plan(**{k: v for k, v in case.items() if k not in ("model", "cluster", "checkpoint")})
    return dict(model=model, params_billion=row["params_billion"], gpus=row["num_gpus"],
                paper_tflops_per_gpu=row["achieved_tflops_per_gpu"], pinned=pinned, pinned_full=full,
                as_run=scored(row, summary(ran) + f" {case['engine_options']['ddp_impl']}-ddp", _Result(as_run), 0.0),
                unconstrained=free, plan_quality_ok=free["tokens_per_s"] >= pinned["tokens_per_s"] * (1 - 1e-9),
                unconstrained_speedup=free["tokens_per_s"] / pinned["tokens_per_s"])


def error_stats(results: list[dict], key: str) -> dict:
    errors = [abs(r[key]["error_pct"]) for r in results]
    worst = max(results, key=lambda r: abs(r[key]["error_pct"]))
    return dict(mean_abs_error_pct=statistics.fmean(errors), max_abs_error_pct=max(errors),
                max_error_model=worst["model"], rows_within_bar=sum(e <= BAR_PCT for e in errors))


def print_report(results: list[dict]) -> None:
    header = (f"{'model':<14}{'params':>8}{'GPUs':>6}{'paper':>7}{'pinned':>8}{'err%':>7}{'Megatron':>9}{'err%':>7}"
              f"{'as run':>8}{'err%':>7}"
              f"  {'pinned (tp,pp) plan':<58}  {'unconstrained plan':<58}{'TF/s':>6}{'x':>6}  ok")
    print("TFLOP/s per GPU (paper's FLOP count, recompute included) on dgx-a100 nodes")
    print(header)
    for r in results:
        p, f, u, a = r["pinned"], r["pinned_full"], r["unconstrained"], r["as_run"]
        print(f"{r['model']:<14}{r['params_billion']:>7.1f}B{r['gpus']:>6}{r['paper_tflops_per_gpu']:>7.0f}"
              f"{p['tflops_per_gpu']:>8.1f}{p['error_pct']:>+7.1f}{f['tflops_per_gpu']:>9.1f}{f['error_pct']:>+7.1f}"
              f"{a['tflops_per_gpu']:>8.1f}{a['error_pct']:>+7.1f}"
              f"  {p['plan']:<58}  {u['plan']:<58}{u['tflops_per_gpu']:>6.1f}{r['unconstrained_speedup']:>6.2f}"
              f"  {'yes' if r['plan_quality_ok'] else 'NO'}")
    for key, label in (("pinned", "pinned (tp, pp), checkpointing planned"),
                       ("pinned_full", "the paper's system (tp, pp, full recompute, no ZeRO, Megatron's kernels)"),
                       ("as_run", "the paper's system as run_table_1.sh ran it (its micro-batch, interleaving, DDP)")):
        s = error_stats(results, key)
        print(f"{label}: mean |error| {s['mean_abs_error_pct']:.1f} %, max {s['max_abs_error_pct']:.1f} % "
              f"({s['max_error_model']}), within {BAR_PCT:.0f} %: {s['rows_within_bar']}/{len(results)} rows")
    ok = sum(r["plan_quality_ok"] for r in results)
    print(f"plan quality (unconstrained tokens/s >= pinned (tp, pp) tokens/s): {ok}/{len(results)} rows")
    print("plan() seconds per row (pinned / pinned+full / unconstrained): " + ", ".join(
        f"{r['model'].removeprefix('megatron-')} {r['pinned']['plan_s']:.1f}/{r['pinned_full']['plan_s']:.1f}/"
        f"{r['unconstrained']['plan_s']:.1f}" for r in results))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reference", type=Path, default=DEFAULT_REFERENCE)
    parser.add_argument("--rows", type=int, default=0, help="evaluate only the first ROWS rows (default: all)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    parser.add_argument("--commands", action="store_true", help="also print the meshplan commands of the Megatron "
                                                                "columns (their files are temporary)")
    args = parser.parse_args(argv)
    rows = json.loads((args.reference / TABLE).read_text())["rows"]
    rows = rows[: args.rows] if args.rows > 0 else rows
    started = time.perf_counter()
    commands = []
    with tempfile.TemporaryDirectory() as tmp:
        results = [evaluate(row, Path(tmp), commands) for row in rows]
    elapsed_s = time.perf_counter() - started
    if args.json:
        print(json.dumps(dict(rows=results, pinned=error_stats(results, "pinned"),
                              pinned_full=error_stats(results, "pinned_full"), as_run=error_stats(results, "as_run"),
                              plan_quality_ok=sum(r["plan_quality_ok"] for r in results), elapsed_s=elapsed_s)))
    else:
        print_report(results)
        print(f"{len(results)} rows in {elapsed_s:.1f} s")
    if args.commands:
        print("\n".join(commands), file=sys.stderr if args.json else sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
