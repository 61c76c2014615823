"""Regenerate planner/interop/data/torchtitan_recipes.json from torchtitan's own source.

    python3 tools/make_torchtitan_recipes.py TORCHTITAN_GIT_DIR > planner/interop/data/torchtitan_recipes.json
    python3 tools/make_torchtitan_recipes.py TORCHTITAN_GIT_DIR --check    # is the shipped table current?

TORCHTITAN_GIT_DIR is a clone (bare is fine) of pytorch/torchtitan; the files are read at
COMMIT with `git show`, never imported (torchtitan needs a CUDA torch and tyro to import).
What is read, by walking the AST:

- torchtitan/models/<module>/__init__.py: each flavor function of the `*_configs` dict.
  The keyword arguments of every call in it are evaluated (literals, local and module
  constants, arithmetic), and a call to a function of the same file is followed into its
  body with its defaults, so `_build_llama3_layers(n_heads=...)` or gpt_oss's attention
  helper's `n_heads=64` default are seen. `shape()` turns those into meshplan ModelConfig
  fields; compute_ffn_hidden_dim (models/common/feed_forward.py) is re-done here.
- torchtitan/models/<module>/config_registry.py: each recipe function returning
  Trainer.Config, stepped through statement by statement: the Trainer.Config(...) keywords,
  `config = other_recipe()` then `config.section.key = value`, `model_registry(flavor, ...,
  converters=[...])`. A statement it cannot follow is recorded under "unreadable" so the
  importer refuses that recipe instead of guessing.
- tests/unit_tests/test_no_new_cli_options.py: _FROZEN_CLI_OPTIONS, every `--section.key`
  the command line takes at this commit (the override keys the importer knows).

Nothing is typed by hand except shape()'s mapping, which cites where each field comes from.
Not a test: the JSON it writes is what planner/interop/torchtitan.py and tests/interop read.
"""
from __future__ import annotations

import ast
import copy
import json
import subprocess
import sys
from pathlib import Path

COMMIT = "b5bcd76c66d0acb1a08b176d9639425bc55e0b2a"
MODULES = ("llama3", "qwen3", "deepseek_v3", "gpt_oss")
CLI_FILE = "tests/unit_tests/test_no_new_cli_options.py"


class Unknown:
    """A value the walk cannot know (a loop variable, a call result): kept as its source text."""

    def __init__(self, text):
        self.text = text

    def __repr__(self):
        return f"Unknown({self.text})"


class Call:
    """A call whose result is not computed here: the callee's dotted name and its arguments."""

    def __init__(self, name, args, kwargs):
        self.name, self.args, self.kwargs = name, args, kwargs


def show(git_dir: str, path: str) -> str:
    return subprocess.run(["git", "--git-dir", git_dir, "show", f"{COMMIT}:{path}"], check=True,
                          capture_output=True, text=True).stdout


def dotted(node) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = dotted(node.value)
        return f"{base}.{node.attr}" if base else None
    return None


def evaluate(node, env: dict):
    """The value of an expression from constants and `env`; Unknown where it depends on more."""
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, ast.Name):
        return env.get(node.id, Unknown(node.id))
    if isinstance(node, (ast.List, ast.Tuple)):
        return [evaluate(e, env) for e in node.elts]
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        value = evaluate(node.operand, env)
        return -value if isinstance(value, (int, float)) else Unknown(ast.unparse(node))
    if isinstance(node, ast.BinOp):
        left, right = evaluate(node.left, env), evaluate(node.right, env)
        ops = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b, ast.Mult: lambda a, b: a * b,
               ast.FloorDiv: lambda a, b: a // b, ast.Div: lambda a, b: a / b}
        if type(node.op) in ops and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                        for v in (left, right)):
            return ops[type(node.op)](left, right)
        return Unknown(ast.unparse(node))
    if isinstance(node, ast.Call):
        name = dotted(node.func)
        args = [evaluate(a, env) for a in node.args]
        kwargs = {k.arg: evaluate(k.value, env) for k in node.keywords if k.arg}
        if name == "compute_ffn_hidden_dim" and all(isinstance(a, int) for a in args):
            return ffn_hidden_dim(args[0], **kwargs)
        return Call(name, args, kwargs)
    return Unknown(ast.unparse(node))


def ffn_hidden_dim(dim: int, multiple_of: int = 1, ffn_dim_multiplier=None) -> int:
    """torchtitan/models/common/feed_forward.py compute_ffn_hidden_dim."""
    hidden = int(2 * 4 * dim / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def module_constants(tree) -> dict:
    env = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            value = evaluate(node.value, env)
            if isinstance(value, (int, float, str)):
                env[node.targets[0].id] = value
    return env


def defaults(func: ast.FunctionDef, env: dict) -> dict:
    out = {}
    positional = func.args.posonlyargs + func.args.args
    for arg, default in zip(positional[len(positional) - len(func.args.defaults):], func.args.defaults):
        out[arg.arg] = evaluate(default, env)
    for arg, default in zip(func.args.kwonlyargs, func.args.kw_defaults):
        if default is not None:
            out[arg.arg] = evaluate(default, env)
    return out


def bindings(func: ast.FunctionDef, env: dict, functions: dict, out: dict, depth: int = 0) -> dict:
    """{callee name: its keyword arguments (first call seen)} over `func`'s body, following
    calls into the file's own functions with their defaults and the arguments given."""
    local = dict(env)
    for node in ast.walk(func):
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            value = evaluate(node.value, local)
            if not isinstance(value, (Unknown, Call)):
                local[node.targets[0].id] = value
    for node in ast.walk(func):
        if not isinstance(node, ast.Call):
            continue
        name = dotted(node.func)
        kwargs = {k.arg: evaluate(k.value, local) for k in node.keywords if k.arg}
        for k in node.keywords:      # `**kwargs` passed on: the caller's extra keywords
            if k.arg is None and isinstance(k.value, ast.Name) and isinstance(local.get(k.value.id), dict):
                kwargs = {**local[k.value.id], **kwargs}
        if name in functions and depth < 4:
            callee = functions[name]
            params = [a.arg for a in callee.args.posonlyargs + callee.args.args]
            given = dict(zip(params, [evaluate(a, local) for a in node.args]))
            bound = {**defaults(callee, env), **given, **kwargs}
            if callee.args.kwarg is not None:
                named = set(params) | {a.arg for a in callee.args.kwonlyargs}
                bound[callee.args.kwarg.arg] = {k: v for k, v in kwargs.items() if k not in named}
            out.setdefault(name, bound)
            bindings(callee, {**env, **bound}, functions, out, depth + 1)
        elif name is not None:
            out.setdefault(name, kwargs)
    return out


def flavor_functions(tree) -> dict:
    """{flavor: function name} of the module's `*_configs` dict."""
    for node in tree.body:
        if (isinstance(node, ast.Assign) and isinstance(node.value, ast.Dict)
                and isinstance(node.targets[0], ast.Name) and node.targets[0].id.endswith("_configs")):
            return {k.value: v.id for k, v in zip(node.value.keys, node.value.values)}
    raise SystemExit("no *_configs dict found")


def shape(module: str, b: dict) -> dict:
    """meshplan ModelConfig fields (and what meshplan does not model) from a flavor's bindings."""
    def model(cls):
        return b[cls]
    if module == "llama3":
        m, layers, rope = model("Llama3Model.Config"), b["_build_llama3_layers"], b["ComplexRoPE.Config"]
        heads = layers["n_heads"]
        kv = layers.get("n_kv_heads")
        return dict(arch="llama", layers=layers["n_layers"], hidden=m["dim"], heads=heads,
                    kv_heads=heads if kv is None else kv, vocab=m["vocab_size"], ffn=layers["hidden_dim"],
                    tie_embeddings=bool(m.get("enable_weight_tying", False)), rope_theta=float(rope["theta"]))
    if module == "qwen3":
        m, rope = model("Qwen3Model.Config"), b["CosSinRoPE.Config"]
        moe = "_build_qwen3_moe_layers" in b
        layers = b["_build_qwen3_moe_layers" if moe else "_build_qwen3_layers"]
        out = dict(arch="moe" if moe else "qwen3", layers=layers["n_layers"], hidden=m["dim"],
                   heads=layers["n_heads"], kv_heads=layers["n_kv_heads"], head_dim=layers["head_dim"],
                   vocab=m["vocab_size"], tie_embeddings=bool(m.get("enable_weight_tying", False)),
                   rope_theta=float(rope["theta"]), norm_eps=b["_qwen3_norm"]["_EPS"] if "_EPS" in b["_qwen3_norm"]
                   else 1e-6)
        if moe:
            router = b["make_router_config"]
            out.update(ffn=layers["moe_hidden_dim"], experts=layers["num_experts"], top_k=layers["top_k"],
                       expert_ffn=layers["moe_hidden_dim"], router=router["score_func"],
                       router_normalize=bool(router["route_norm"]))
            out["differs"] = ("Qwen3's per-head RMSNorm of q and k (qk_norm) is not in meshplan's moe family "
                              "(two small elementwise ops per block).")
        else:
            out["ffn"] = layers["hidden_dim"]
        return out
    if module == "deepseek_v3":
        m, layers, rope = model("DeepSeekV3Model.Config"), b["build_mla_moe_layers"], b["ComplexRoPE.Config"]
        heads, shared = layers["n_heads"], layers["num_shared_experts"]
        out = dict(arch="moe", layers=layers["n_layers"], hidden=m["dim"], heads=heads,
                   # meshplan has no multi-head latent attention: it stands in as grouped-query
                   # attention with v_head_dim-sized heads and 8 kv heads, the stand-in of
                   # benchmarks/data/moe_runs.json's deepseek-v3-gqa, so both price the same model.
                   kv_heads=min(8, heads), head_dim=layers["v_head_dim"], vocab=m["vocab_size"],
                   tie_embeddings=False, rope_theta=float(rope["theta"]), ffn=layers["dense_hidden_dim"],
                   experts=layers["num_experts"], top_k=layers["router_top_k"],
                   expert_ffn=layers["moe_hidden_dim"],
                   # torchtitan builds the shared experts as one FFN of moe_hidden_dim x their count
                   shared_experts=1 if shared else 0,
                   shared_expert_ffn=layers["moe_hidden_dim"] * shared if shared else None,
                   dense_layers=layers["n_dense_layers"], dense_ffn=layers["dense_hidden_dim"],
                   router=layers["router_score_func"], router_normalize=bool(layers["router_route_norm"]))
        mla = {k: layers[k] for k in ("q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim",
                                       "v_head_dim")}
        out["differs"] = (f"Multi-head latent attention ({', '.join(f'{k} {v}' for k, v in mla.items())}) stands "
                          f"in as grouped-query attention ({heads} heads of {layers['v_head_dim']}, "
                          f"{min(8, heads)} kv heads)"
                          + ("; the router's group-limited top-k and route scale are not modelled."
                             if layers["router_num_expert_groups"] else "."))
        return {k: v for k, v in out.items() if v is not None}
    if module == "gpt_oss":
        m, layers, attn = model("GptOssModel.Config"), b["_build_gptoss_layers"], b["_make_gptoss_attn_config"]
        router, rope = b["TokenChoiceTopKRouter.Config"], b["CosSinRoPE.Config"]
        return dict(arch="moe", layers=layers["n_layers"], hidden=m["dim"], heads=attn["n_heads"],
                    kv_heads=attn["n_kv_heads"], head_dim=attn["head_dim"], vocab=m["vocab_size"],
                    tie_embeddings=False, rope_theta=float(rope["theta"]),
                    # wqkv and wo are Linear.Config(bias=True) in _make_gptoss_attn_config
                    qkv_bias=True, out_bias=True, ffn=layers["hidden_dim"], experts=layers["num_experts"],
                    top_k=layers["top_k"], expert_ffn=layers["hidden_dim"], router=router["score_func"],
                    router_normalize=bool(router["route_norm"]),
                    differs="Sliding-window attention (128 tokens) on every second layer is priced as full "
                            "causal attention; attention sinks, expert biases and clamped SwiGLU are not "
                            "modelled.")
    raise SystemExit(f"no shape mapping for {module}")


def flavors(git_dir: str, module: str) -> dict:
    tree = ast.parse(show(git_dir, f"torchtitan/models/{module}/__init__.py"))
    env = module_constants(tree)
    functions = {n.name: n for n in tree.body if isinstance(n, ast.FunctionDef)}
    out = {}
    for flavor, name in flavor_functions(tree).items():
        b = bindings(functions[name], env, functions, {})
        b.setdefault("_qwen3_norm", {}).update({"_EPS": env["_EPS"]} if "_EPS" in env else {})
        out[flavor] = shape(module, b)
    return out


# Trainer.Config keywords that carry no cost meshplan prices (data, logging, optimizer
# hyper-parameters, checkpoint files): read past.
NO_COST = {"loss", "hf_assets_path", "profiler", "metrics", "optimizer", "lr_scheduler", "dataloader", "checkpoint",
           "validator", "comm", "debug", "tokenizer", "dump_folder"}
SECTIONS = {"TrainingConfig": "training", "ParallelismConfig": "parallelism", "CompileConfig": "compile"}


def _plain(value):
    """A JSON value, or None when the walk could not know it."""
    if isinstance(value, (Unknown, Call)):
        return None
    if isinstance(value, list):
        items = [_plain(v) for v in value]
        return None if any(i is None for i in items) else items
    return value


def _section(call: Call, cls: str, unreadable: list) -> dict:
    out = {}
    for key, value in call.kwargs.items():
        plain = _plain(value)
        if plain is None and value is not None:
            unreadable.append(f"{cls}({key}={value!r})")
        else:
            out[key] = plain
    return out


def _ac(value, unreadable: list):
    if value is None:
        return None
    if isinstance(value, Call) and value.name in ("FullAC.Config", "SelectiveAC.Config") and not value.kwargs:
        return "full" if value.name == "FullAC.Config" else "selective"
    unreadable.append(f"activation_checkpoint={getattr(value, 'name', value)!r}")
    return None


def _model(call: Call, unreadable: list) -> dict:
    options = {k: _plain(v) for k, v in call.kwargs.items() if k != "converters"}
    converters = [c.name.removesuffix(".Config") for c in call.kwargs.get("converters") or []
                  if isinstance(c, Call)]
    flavor = call.args[0] if call.args else None
    if not isinstance(flavor, str):
        unreadable.append("model_registry flavor")
    return {"flavor": flavor, "options": {k: v for k, v in options.items() if v is not None},
            "converters": converters}


def recipe(name: str, functions: dict, env: dict, memo: dict, given: dict | None = None) -> dict:
    """One recipe function stepped through: model, the four costed sections, unreadable."""
    if name in memo and not given:
        return copy.deepcopy(memo[name])
    func = functions[name]
    local = {**env, **defaults(func, env), **(given or {})}
    state = None
    unreadable: list = []

    def trainer_config(call: Call) -> dict:
        out = {"model": None, "training": {}, "parallelism": {}, "compile": {},
               # Trainer.Config's default activation_checkpoint is SelectiveAC.Config() (trainer.py)
               "activation_checkpoint": "selective", "unreadable": unreadable}
        for key, value in call.kwargs.items():
            if key == "model_spec":
                out["model"] = value
            elif key in ("training", "parallelism", "compile"):
                if isinstance(value, Call) and SECTIONS.get(value.name) == key:
                    out[key] = _section(value, value.name, unreadable)
                else:
                    unreadable.append(f"{key}={value!r}")
            elif key == "activation_checkpoint":
                out[key] = _ac(value, unreadable)
            elif key not in NO_COST:
                unreadable.append(f"Trainer.Config({key}=...)")
        return out

    for stmt in func.body:
        if isinstance(stmt, (ast.Assert, ast.FunctionDef, ast.Pass)) or (
                isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant)):
            continue
        if isinstance(stmt, ast.Assign) and len(stmt.targets) == 1:
            target = stmt.targets[0]
            value = evaluate(stmt.value, local)
            if isinstance(value, Call) and value.name == "model_registry":
                value = _model(value, unreadable)
            if isinstance(target, ast.Name):
                if isinstance(value, Call) and value.name in functions:
                    state = recipe(value.name, functions, env, memo,
                                   dict(zip([a.arg for a in functions[value.name].args.args], value.args),
                                        **value.kwargs))
                    unreadable = state["unreadable"]
                    local[target.id] = "config"
                else:
                    local[target.id] = value
                continue
            path = dotted(target)
            if path and path.startswith("config.") and state is not None:
                parts = path.split(".")[1:]
                if parts == ["model_spec"]:
                    state["model"] = value
                elif parts[0] in ("training", "parallelism", "compile") and len(parts) == 2:
                    plain = _plain(value)
                    if plain is None and value is not None:
                        unreadable.append(f"{path} = {ast.unparse(stmt.value)}")
                    state[parts[0]][parts[1]] = plain
                elif len(parts) == 1 and isinstance(value, Call) and SECTIONS.get(value.name) == parts[0]:
                    state[parts[0]] = _section(value, value.name, unreadable)
                elif parts == ["activation_checkpoint"]:
                    state["activation_checkpoint"] = _ac(value, unreadable)
                elif parts[0] not in NO_COST:
                    unreadable.append(f"{path} = {ast.unparse(stmt.value)}")
                continue
        if isinstance(stmt, ast.Return):
            value = evaluate(stmt.value, local)
            if isinstance(value, Call) and value.name == "Trainer.Config":
                state = trainer_config(value)
            elif isinstance(value, Call) and value.name in functions:
                params = [a.arg for a in functions[value.name].args.args]
                state = recipe(value.name, functions, env, memo, dict(zip(params, value.args), **value.kwargs))
            elif value != "config":
                unreadable.append(f"return {ast.unparse(stmt.value)}")
            break
        if isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Call):
            # e.g. enable_fused_swiglu(config): swaps kernels through config.override.imports
            unreadable.append(ast.unparse(stmt.value))
            continue
        unreadable.append(ast.unparse(stmt).splitlines()[0])
    if state is None:
        raise SystemExit(f"{name}: no Trainer.Config found")
    state["unreadable"] = sorted(set(state["unreadable"]) | set(unreadable))
    if not given:
        memo[name] = copy.deepcopy(state)
    return state


def recipes(git_dir: str, module: str) -> dict:
    tree = ast.parse(show(git_dir, f"torchtitan/models/{module}/config_registry.py"))
    env = module_constants(tree)
    functions = {n.name: n for n in tree.body if isinstance(n, ast.FunctionDef)}
    memo: dict = {}
    out = {}
    for name, func in functions.items():
        returns = ast.unparse(func.returns) if func.returns else ""
        if name.startswith("_") or returns != "Trainer.Config":
            continue
        state = recipe(name, functions, env, memo)
        if not isinstance(state["model"], dict):
            state["unreadable"].append("model_spec")
            state["model"] = None
        if state["compile"].get("components") is None:
            state["compile"].pop("components", None)
        state["unreadable"] = sorted(set(state["unreadable"]))
        out[name] = state
    return out


def cli_options(git_dir: str) -> list:
    tree = ast.parse(show(git_dir, CLI_FILE))
    for node in tree.body:
        if isinstance(node, ast.Assign) and dotted(node.targets[0]) == "_FROZEN_CLI_OPTIONS":
            return sorted(e.value for e in node.value.args[0].elts)
    raise SystemExit("no _FROZEN_CLI_OPTIONS")


def main(git_dir: str) -> dict:
    return {
        "about": ("torchtitan's --module/--config recipes and model flavors, read from its source by "
                  "tools/make_torchtitan_recipes.py (AST, nothing imported); shape fields are meshplan "
                  "ModelConfig keys, 'differs' says what meshplan does not model. Regenerate with that "
                  "script; do not edit by hand."),
        "source": {"repo": "pytorch/torchtitan", "commit": COMMIT,
                   "files": [f"torchtitan/models/{m}/{f}" for m in MODULES for f in ("__init__.py",
                                                                                     "config_registry.py")]
                   + [CLI_FILE]},
        "models": {m: flavors(git_dir, m) for m in MODULES},
        "recipes": {m: recipes(git_dir, m) for m in MODULES},
        "cli_options": cli_options(git_dir),
    }


SHIPPED = Path(__file__).resolve().parent.parent / "planner" / "interop" / "data" / "torchtitan_recipes.json"

if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if a != "--check"]
    if len(args) != 1:
        raise SystemExit(__doc__.split("\n\n")[1])
    table = main(args[0])
    if "--check" in sys.argv:   # the shipped table is this script's output (a maintainer's check; needs the clone)
        same = table == json.loads(SHIPPED.read_text())
        print(f"{SHIPPED}: {'matches' if same else 'DIFFERS FROM'} the source at {COMMIT}")
        raise SystemExit(0 if same else 1)
    print(json.dumps(table, indent=1, sort_keys=True))
