"""Planner: model zoo, Plan schema, tracing, search and simulation; the `meshplan` CLI.

The Python API, the functions behind `meshplan plan`, `simulate` and `compare`:

    from planner import plan, simulate, compare, Plan, load_model, MeshplanError

Every public function checks its arguments and raises `MeshplanError` with the one-line
message the CLI prints. `planner.plan` and `planner.simulate` are also the names of a
module and a package (the Plan vocabulary; the simulator): they are imported here first,
so the attributes end up the functions while `import planner.simulate.step` and
`from planner.plan import Plan` still reach the modules (through sys.modules).

Depends on `cost_models`; never on `runtime`.
"""
from planner import torch_compat  # noqa: F401  first: on a torch older than the floor, stop in one line
from cost_models import MeshplanError, parse_cluster
from planner.plan import Plan
from planner.zoo import PRESETS, ModelSpec, load_model
from planner.models import Decoder, ModelConfig
# Import every submodule that shares a name with a function before binding the functions:
# importing a submodule later would set the package attribute back to the module.
import planner.simulate  # noqa: E402,F401
import planner.search  # noqa: E402,F401
import planner.compare  # noqa: E402,F401
from planner.simulate.step import prepare, simulate  # noqa: E402
from planner.search.ranking import plan  # noqa: E402
from planner.compare import compare  # noqa: E402

__all__ = ["plan", "simulate", "prepare", "compare", "Plan", "PRESETS", "ModelSpec", "load_model", "parse_cluster",
           "Decoder", "ModelConfig", "MeshplanError"]
