"""`meshplan train --compile`: each block torch.compile'd (runtime.compiling), in this
interpreter. Compiling on CPU writes and builds C++ (about 30 s for gpt-tiny's one block
graph, which its four blocks share), so one run covers it: selective checkpointing inside
the compiled blocks, losses equal to eager's."""
from __future__ import annotations

import pytest

from runtime.train import main, run
from runtime_helpers import write_plan

pytestmark = pytest.mark.runtime
LAYERS = 4      # gpt-tiny's blocks


@pytest.fixture(autouse=True)
def one_process(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "MESHPLAN_CHECK_ONLY", "MESHPLAN_PREEMPTED_FILE", "MESHPLAN_ERROR_FILE"):
        monkeypatch.delenv(name, raising=False)


def test_compiled_blocks_train_to_eager_losses(tmp_path, monkeypatch):
    import torch._dynamo
    from torch._dynamo.utils import counters

    import runtime.engine
    from runtime.compiling import compile_blocks, compiled
    seen = []

    def recording(blocks):
        compile_blocks(blocks)
        seen.extend(blocks.values())
    monkeypatch.setattr(runtime.engine, "compile_blocks", recording)
    plan = write_plan(tmp_path / "plan.json", micro_batch=2, global_batch=4, seq=32, precision="fp32",
                      checkpoint=["selective"] * LAYERS)
    args = ["--model", "gpt-tiny", "--plan", str(plan), "--device", "cpu", "--steps", "3", "--quiet"]
    eager = run(args)
    assert not seen
    torch._dynamo.reset()
    counters.clear()
    compiled_run = run([*args, "--compile"])
    assert len(seen) == LAYERS and all(compiled(block) for block in seen)
    assert counters["stats"]["unique_graphs"] == 1         # one graph, shared by the four blocks
    assert counters["stats"]["calls_captured"] >= 1
    # fp32 on CPU: inductor's fused loops reorder a few sums, nothing more
    assert [r["loss"] for r in compiled_run] == pytest.approx([r["loss"] for r in eager], rel=1e-5)
    assert [r["grad_norm"] for r in compiled_run] == pytest.approx([r["grad_norm"] for r in eager], rel=1e-4)


def test_compile_refusals_are_one_line_before_any_process_group(tmp_path, monkeypatch, capsys):
    import shutil

    import torch.distributed as dist
    import torch.utils._triton
    plan = write_plan(tmp_path / "plan.json", micro_batch=2, global_batch=4, seq=32, precision="fp32")
    base = ["--model", "gpt-tiny", "--steps", "1"]
    monkeypatch.setattr(dist, "init_process_group", lambda *a, **k: pytest.fail("a process group started"))
    # tensor parallelism with recomputation: torch's AOTAutograd fails on it (runtime.compiling.check_plan)
    tp_ckpt = write_plan(tmp_path / "tp.json", micro_batch=2, global_batch=4, seq=32, precision="fp32", tp=2,
                         checkpoint=["full"] * LAYERS)
    assert main([*base, "--plan", str(tp_ckpt), "--device", "cpu", "--compile"]) == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert "--compile with tp 2 and full recomputation fails" in line and "use selective" in line
    cp = write_plan(tmp_path / "cp.json", micro_batch=2, global_batch=4, seq=32, precision="fp32", cp=2)
    assert main([*base, "--plan", str(cp), "--device", "cpu", "--compile"]) == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert "--compile with cp 2 is not supported" in line
    monkeypatch.setattr(shutil, "which", lambda name: None)
    assert main([*base, "--plan", str(plan), "--device", "cpu", "--compile"]) == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert "--compile on CPU needs a C++ compiler" in line and "install g++ or set CXX" in line
    # the plan's own "compile": true is checked the same way; on CUDA, triton is what it needs
    monkeypatch.setattr(torch.utils._triton, "has_triton", lambda: False)
    compiled_plan = write_plan(tmp_path / "compiled.json", micro_batch=2, global_batch=4, seq=32,
                               precision="fp32", compile=True)
    assert main([*base, "--plan", str(compiled_plan), "--device", "cuda"]) == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert "--compile on CUDA needs triton" in line
