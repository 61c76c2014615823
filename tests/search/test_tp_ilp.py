"""The intra-layer TP layout ILP (planner.search.tp_ilp) on real traces.

The oracle for "Megatron's layout" is the runtime's own `megatron_layout`, and every layout
the ILP returns must pass the runtime's `resolve_layout`; collective sizes are derived from
the model config (seq x hidden, bf16 linear outputs, fp32 norm outputs under autocast).
"""
import pytest

from cost_models import MeshplanError
from cost_models.cluster import parse_cluster
from cost_models.comm import CommModel
from cost_models.compute import ComputeModel
from planner.plan import Plan
from planner.search.tp_ilp import BlockLayouts, layouts_for, solve_tp_layout
from planner.trace import trace_model
from planner.zoo import PRESETS
from planner.arch import get_arch
from runtime.parallelize import megatron_layout, resolve_layout

SEQ = 2048
# (preset, attention input projections, attention output, mlp inputs, mlp output, norms)
ARCHS = {
    "gpt3-1.3b": (("qkv",), "proj", ("fc1",), "fc2", ("ln1", "ln2")),
    "llama3-8b": (("q", "k", "v"), "o", ("gate", "up"), "down", ("n1", "n2")),
}


@pytest.fixture(scope="module")
def traced():
    cache = {}

    def get(name, seq=SEQ):
        if (name, seq) not in cache:
            cache[name, seq] = trace_model(name, 1, seq)
        return cache[name, seq]

    return get


@pytest.fixture(scope="module")
def models():
    cluster = parse_cluster("a100-sxm-80gb:1x8")
    comm = CommModel(cluster)
    return ComputeModel(cluster.gpu), comm, lambda tp: comm.group({"tp": tp}, "tp")


def solve(traced_model, models, tp, **kw):
    compute, comm, group = models
    cost = traced_model.cost_of(traced_model.blocks[0])
    result = solve_tp_layout(cost, compute, comm, group(tp), traced_model.precision, **kw)
    print(f"{traced_model.name} tp {tp} {kw}: {result.status} by {result.solver} in {result.solve_s * 1e3:.1f} ms "
          f"({result.variables} variables, {result.constraints} constraints), "
          f"{result.objective_s * 1e3:.3f} ms a micro-batch, comm {result.comm_s * 1e3:.3f} ms")
    return result


def runtime_accepts(name, layout, tp, sp=False):
    plan = Plan(tp=tp, seq=SEQ, sequence_parallel=sp, tp_layout=layout)
    return resolve_layout(PRESETS[name], plan)


def megatron_block_layout(name, tp, sp=False):
    cfg = PRESETS[name]
    full = megatron_layout(cfg, Plan(tp=tp, seq=SEQ, sequence_parallel=sp))
    return {k: v for k, v in full.items() if k in get_arch(cfg.arch).block_roles}


# ----------------------------------------------------------------------------- Megatron, rediscovered

@pytest.mark.parametrize("name", ARCHS)
def test_block_rediscovers_megatron_with_one_all_reduce_per_region_each_way(name, traced, models):
    ins, out, mlp_ins, mlp_out, norms = ARCHS[name]
    tm = traced(name)
    result = solve(tm, models, 8)
    assert result.status == "optimal"
    assert result.layout == megatron_block_layout(name, 8)
    assert {result.layout[n] for n in ins + mlp_ins} == {"colwise"}
    assert result.layout[out] == result.layout[mlp_out] == "rowwise"
    # forward: the output projections' partial sums; backward: the gradient of the normed
    # input that the column-parallel projections (all of q, k and v together) return partial
    assert sorted((c.direction, c.kind, c.value) for c in result.collectives) == sorted(
        [("forward", "all_reduce", out), ("forward", "all_reduce", mlp_out),
         ("backward", "all_reduce", norms[0]), ("backward", "all_reduce", norms[1])])
    hidden = PRESETS[name].hidden
    sizes = {out: SEQ * hidden * 2, mlp_out: SEQ * hidden * 2, norms[0]: SEQ * hidden * 4, norms[1]: SEQ * hidden * 4}
    assert {c.value: c.nbytes for c in result.collectives} == sizes
    _, comm, group = models
    assert result.comm_s == pytest.approx(sum(comm.all_reduce_s(b, group(8)) for b in sizes.values()))
    runtime_accepts(name, result.layout, 8)


@pytest.mark.parametrize("name", ARCHS)
def test_megatron_is_the_unique_optimum(name, traced, models):
    """The runner-up (the best layout other than Megatron's) is clearly worse: no tie for the
    solver to break arbitrarily."""
    tm = traced(name)
    for tp in (2, 8):
        best = solve(tm, models, tp)
        runner_up = solve(tm, models, tp, exclude=(best.layout,))
        assert best.layout == megatron_block_layout(name, tp)
        assert runner_up.layout != best.layout
        assert runner_up.objective_s > 1.02 * best.objective_s
        runtime_accepts(name, runner_up.layout, tp)


@pytest.mark.parametrize("name", ARCHS)
def test_sequence_parallel_turns_each_all_reduce_into_reduce_scatter_plus_all_gather(name, traced, models):
    ins, out, mlp_ins, mlp_out, norms = ARCHS[name]
    result = solve(traced(name), models, 8, sequence_parallel=True)
    assert result.status == "optimal"
    assert result.layout == megatron_block_layout(name, 8, sp=True)
    assert {result.layout[n] for n in norms} == {"sequence"}
    expected = []
    for norm, proj in zip(norms, (out, mlp_out)):
        expected += [("forward", "all_gather", norm), ("backward", "reduce_scatter", norm),
                     ("forward", "reduce_scatter", proj), ("backward", "all_gather", proj)]
    assert sorted((c.direction, c.kind, c.value) for c in result.collectives) == sorted(expected)
    assert result.count(kind="all_reduce") == 0
    runtime_accepts(name, result.layout, 8, sp=True)


def test_tp1_replicates_everything_without_communication(traced, models):
    for name in ARCHS:
        result = solve(traced(name), models, 1)
        assert set(result.layout.values()) == {"replicate"}
        assert result.collectives == [] and result.comm_s == 0.0
        assert result.status == "optimal"
        with pytest.raises(MeshplanError, match="exclude fewer layouts"):
            solve(traced(name), models, 1, exclude=(result.layout,))


# ----------------------------------------------------------------------------- memory

def test_memory_budget_forces_sharding_and_an_impossible_one_says_what_to_change(traced, models):
    tm = traced("gpt-tiny", 64)
    free = solve(tm, models, 8)
    # a 64-wide block: collectives cost more than the compute they save, so nothing is split
    assert set(free.layout.values()) == {"replicate"} and free.comm_s == 0.0
    budget = free.memory_bytes - 1
    tight = solve(tm, models, 8, memory_budget_bytes=budget)
    assert tight.memory_bytes <= budget
    assert {"colwise", "rowwise"} & set(tight.layout.values())
    assert tight.objective_s > free.objective_s
    runtime_accepts("gpt-tiny", tight.layout, 8)
    cbc = solve(tm, models, 8, memory_budget_bytes=budget, solver="PULP_CBC_CMD")
    assert cbc.solver == "PULP_CBC_CMD" and cbc.status == "optimal"
    assert cbc.objective_s == pytest.approx(tight.objective_s, rel=1e-9)
    with pytest.raises(MeshplanError) as err:
        solve(tm, models, 8, memory_budget_bytes=free.memory_bytes / 10)
    message = str(err.value)
    assert "\n" not in message and "raise the budget or the tp degree" in message


# ----------------------------------------------------------------------------- once per signature

def test_96_identical_blocks_are_solved_once(traced, models):
    compute, comm, group = models
    tm = traced("gpt3-175b")
    layouts = layouts_for(tm, compute, comm, group(8))
    assert len(layouts.layer_signature) == 96
    assert layouts.solves == 1
    (result,) = layouts.by_signature.values()
    print(f"gpt3-175b block: {result.status} in {result.solve_s * 1e3:.1f} ms")
    assert result.status == "optimal"
    assert layouts.plan_layout() == megatron_block_layout("gpt3-175b", 8)
    runtime_accepts("gpt3-175b", layouts.plan_layout(), 8)


def test_blocks_that_differ_get_per_layer_keys_the_runtime_accepts(traced, models):
    """Two block signatures with different layouts: the plan names each layer's modules."""
    sharded = solve(traced("gpt3-1.3b"), models, 8)
    replicated = solve(traced("gpt-tiny", 64), models, 8)
    layouts = BlockLayouts({"a": sharded, "b": replicated},
                           {"blocks.0": "a", "blocks.1": "b", "blocks.2": "a", "blocks.3": "b"}, solves=2)
    plan_layout = layouts.plan_layout()
    assert plan_layout["blocks.0.qkv"] == "colwise" and plan_layout["blocks.1.qkv"] == "replicate"
    resolved = runtime_accepts("gpt3-1.3b", plan_layout, 8)
    assert resolved["blocks.2.fc2"] == "rowwise" and resolved["blocks.3.fc2"] == "replicate"


def test_hugging_face_gpt2_block_gets_megatron_with_one_key_for_its_two_c_proj(models):
    """HF GPT-2 names both output projections c_proj (attn.c_proj, mlp.c_proj): the layout,
    keyed by module name like the cost model, holds one style for both."""
    pytest.importorskip("transformers")
    config = dict(model_type="gpt2", n_embd=1024, n_layer=2, n_head=16, n_positions=1024, vocab_size=256,
                  bos_token_id=0, eos_token_id=1)
    result = solve(trace_model(config, 1, 1024), models, 8, sequence_parallel=True)
    assert result.layout == {"ln_1": "sequence", "c_attn": "colwise", "c_proj": "rowwise",
                             "ln_2": "sequence", "c_fc": "colwise"}
    assert result.strategies["attn.c_proj"] == result.strategies["mlp.c_proj"] == "rowwise"
    assert result.strategies["attn"] == "heads"
    assert result.count("forward", "reduce_scatter") == result.count("forward", "all_gather") == 2


def test_memory_counts_each_parameter_as_the_runtime_shards_it(traced, models):
    """The parameter bytes the ILP charges one GPU under Megatron's layout equal the block's own
    parameters split as the runtime splits them: colwise weight and bias, and rowwise weight,
    by tp; a rowwise bias (added after the reduction) and the norms whole."""
    import torch
    from planner.arch.gpt import GPTBlock
    tp = 8
    tm = traced("gpt3-1.3b")
    layout = megatron_block_layout("gpt3-1.3b", tp)
    one, two = (solve(tm, models, tp, param_state_factor=f) for f in (1.0, 2.0))
    assert one.layout == two.layout == layout
    block = GPTBlock(PRESETS["gpt3-1.3b"], device="meta")
    expected = 0.0
    for name, param in block.named_parameters():
        module, kind = name.rsplit(".", 1)
        split = layout.get(module) == "colwise" or (layout.get(module) == "rowwise" and kind == "weight")
        expected += param.numel() * param.element_size() / (tp if split else 1)
    assert param.dtype == torch.float32
    assert two.memory_bytes - one.memory_bytes == pytest.approx(expected, rel=1e-12)


def test_solver_chatter_on_file_descriptor_1_never_reaches_stdout():
    """What a solver's C++ code writes to fd 1 while it runs (highspy >= 1.16 prints a banner
    before PuLP can turn its output off) must not corrupt `meshplan plan --json`."""
    import subprocess
    import sys
    import textwrap
    script = textwrap.dedent("""
        import ctypes, os
        from planner.search.tp_ilp import _native_stdout_silenced
        print("before", flush=True)
        with _native_stdout_silenced():
            os.write(1, b"raw banner\\n")
            ctypes.CDLL(None).printf(b"buffered banner\\n")
        print("after")
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "before\nafter\n"
