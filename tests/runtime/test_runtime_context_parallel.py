"""Context parallelism's attention and its refusals (runtime.context_parallel).

Training under cp plans is compared with one process in test_runtime_equivalence.py and
its bytes in tests/parity/test_comm_volume.py; here the attention itself: 4 gloo ranks
(cp 4) each hold two load-balanced chunks of the same random sequence, run
`ContextShard.attend` (the real K/V all-gather, its reduce-scatter backward and the
gather again when backward unpacks the keys and values), and their outputs and q/k/v
gradients must be the whole sequence's, at the same positions, to fp32 rounding - for the
fused and the unfused core, grouped-query heads, and a softcapped unfused core.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from runtime_helpers import read_jsonl, run_ranks, write_plan

pytestmark = [pytest.mark.runtime, pytest.mark.distributed]

CP = 4
CASES = {   # name: (attention kind, heads, kv_heads, softcap)
    "sdpa-gqa": ("sdpa", 4, 2, None),
    "sdpa": ("sdpa", 4, 4, None),
    "unfused-gqa": ("unfused", 4, 1, None),
    "unfused-softcap": ("unfused", 2, 2, 5.0),
}
B, T, D = 2, 32, 8


def _attend_rank(rank: int, out_dir: str):
    import torch.distributed as dist
    from planner.arch.layers import causal_attention
    from runtime.context_parallel import ContextShard
    shard = ContextShard(dist.group.WORLD, rank, CP)
    result = {"shard_is_positions": torch.equal(shard.shard(torch.arange(T).expand(B, T))[0],
                                                shard.positions(T // CP, "cpu"))}
    for name, (kind, heads, kv_heads, softcap) in CASES.items():
        gen = torch.Generator().manual_seed(7)   # the same sequence on every rank
        q, k, v = (torch.randn(B, h, T, D, generator=gen, requires_grad=True) for h in (heads, kv_heads, kv_heads))
        grad_out = torch.randn(B, heads, T, D, generator=gen)
        whole = causal_attention(q, k, v, kind, 0.0, True, softcap)
        whole.backward(grad_out)
        mine = shard.positions(T // CP, "cpu")
        ql, kl, vl = (t.detach()[:, :, mine].clone().requires_grad_() for t in (q, k, v))
        out = shard.attend(ql, kl, vl, kind, 0.0, True, softcap)
        out.backward(grad_out[:, :, mine])
        pairs = [(out, whole[:, :, mine]), (ql.grad, q.grad[:, :, mine]), (kl.grad, k.grad[:, :, mine]),
                 (vl.grad, v.grad[:, :, mine])]
        result[name] = [float((a - b).abs().max() / b.abs().max()) for a, b in pairs]
    Path(out_dir, f"attend-{rank}.json").write_text(json.dumps(result))


@pytest.fixture(scope="module")
def attended(tmp_path_factory):
    out = tmp_path_factory.mktemp("cp-attend")
    run_ranks(CP, _attend_rank, str(out), timeout=120)
    return [json.loads((out / f"attend-{r}.json").read_text()) for r in range(CP)]


def test_each_rank_keeps_its_two_chunks_at_their_positions(attended):
    assert all(r["shard_is_positions"] for r in attended)


@pytest.mark.parametrize("name", CASES)
def test_sharded_attention_is_the_whole_sequences(attended, name):
    for rank, result in enumerate(attended):
        # output, dq, dk, dv, relative to the largest entry
        assert max(result[name]) < 1e-5, (rank, name, result[name])


def test_cp_plans_pass_the_launch_check_and_mistakes_are_one_line(tmp_path, capsys, monkeypatch):
    from runtime.train import main, run
    monkeypatch.setenv("MESHPLAN_CHECK_ONLY", "1")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "0")
    base = ["--model", "llama-tiny", "--steps", "1", "--quiet"]
    ok = write_plan(tmp_path / "cp2xtp2.json", cp=2, tp=2, global_batch=4, seq=32)
    assert run([*base, "--plan", str(ok)]) == []

    def error(*argv) -> str:
        assert main([str(a) for a in argv]) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("meshplan: error: "), lines
        return lines[0]

    monkeypatch.setenv("WORLD_SIZE", "2")
    assert "dp x cp x tp x pp = 1 x 2 x 2 x 1 = 4" in error(*base, "--plan", ok)
    monkeypatch.setenv("WORLD_SIZE", "4")
    sp = write_plan(tmp_path / "sp.json", cp=2, tp=4, sequence_parallel=True, global_batch=4, seq=12)
    monkeypatch.setenv("WORLD_SIZE", "8")
    assert "make tp divide seq / cp" in error(*base, "--plan", sp)
    factory = write_plan(tmp_path / "factory.json", cp=2, dp=2, global_batch=4, seq=32)
    mlp = str(Path(__file__).resolve().parents[2] / "examples" / "mlp.py") + ":factory"
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert "file.py:factory model" in error("--model", mlp, "--steps", "1", "--plan", factory)


@pytest.mark.slow   # torchrun and two fresh interpreters: 50 s on 2 busy cores; the launch check above is CI's
def test_meshplan_train_runs_a_cp_plan(tmp_path):
    """`meshplan train --nproc-per-node 2` as a user runs it: cp 2 under torchrun."""
    plan = write_plan(tmp_path / "cp2.json", cp=2, global_batch=2, micro_batch=1, seq=32, precision="fp32")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for name in ("RANK", "WORLD_SIZE", "MESHPLAN_CHECK_ONLY"):
        env.pop(name, None)
    cmd = [sys.executable, "-m", "planner.cli", "train", "--nproc-per-node", "2", "--model", "llama-tiny",
           "--plan", str(plan), "--steps", "2", "--device", "cpu", "--log-json", str(tmp_path / "m.jsonl")]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "cp 2" in r.stdout, r.stdout
    records = read_jsonl(tmp_path / "m.jsonl")
    assert [rec["step"] for rec in records] == [1, 2]
    # tokens counted once per dp rank: the global batch's 2 x 32 a step, not per cp rank
    assert all(rec["tokens_per_s"] * rec["step_time_s"] == pytest.approx(2 * 32) for rec in records)
