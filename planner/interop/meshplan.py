"""Export a plan to meshplan's own runtime on many nodes: plan.json, the model (model.json
unless it is a preset), a torchrun launch script to run on every node and a Slurm batch
script for the plan's node count, each starting `python -m runtime.train` (what
`meshplan train` runs; runtime/train.py documents the many-node torchrun form)."""
from __future__ import annotations

import json
import shlex
from pathlib import Path

from cost_models.errors import MeshplanError
from planner.interop.base import ExportFolder

FILES = ("plan.json", "model.json", "launch.sh", "slurm.sbatch")


def model_argument(spec, model_text) -> tuple[str, dict | None]:
    """(what `--model` gets, the model.json to write or None)."""
    from planner.zoo import PRESETS
    if spec.config is not None and spec.name in PRESETS and PRESETS[spec.name] == spec.config:
        return spec.name, None
    if spec.config is not None:
        return "model.json", spec.config.to_dict()
    text = str(model_text)
    file_part, _, func = text.rpartition(":")
    return f"{Path(file_part).resolve()}:{func}", None


def nodes_of(plan, cluster) -> tuple[int, int]:
    """(nodes, GPUs per node) the plan's world takes on the cluster."""
    per_node = min(plan.world_size, cluster.gpus_per_node)
    if plan.world_size % per_node:
        raise MeshplanError(f"the plan's {plan.world_size} GPUs are not whole nodes of {cluster.gpus_per_node}")
    return plan.world_size // per_node, per_node


def write(plan, spec, cluster, out: ExportFolder, model_text=None) -> None:
    if plan.engine != "meshplan":
        raise MeshplanError(f"the plan runs on {plan.engine}; --export meshplan writes plans of meshplan's runtime "
                            f"(--engine meshplan)")
    model, config = model_argument(spec, model_text)
    out.add("plan.json", plan.to_json() + "\n")
    if config is not None:
        out.add("model.json", json.dumps(config, indent=2) + "\n")
    nodes, per_node = nodes_of(plan, cluster)
    here = 'DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"'
    model_arg = f'"$DIR/{model}"' if config is not None else shlex.quote(model)
    train = f'--model {model_arg} --plan "$DIR/plan.json" --steps "${{STEPS:-100}}" "$@"'
    summary = (f"# meshplan's runtime running dp {plan.dp} x tp {plan.tp} x pp {plan.pp} on {cluster.name}: "
               f"{nodes} node(s) x {per_node} GPUs.\n# Extra arguments go to runtime.train "
               f"(`python -m runtime.train --help`: --data, --checkpoint-dir, --log-json, ...).")
    if nodes == 1:
        launch = f"meshplan train --nproc-per-node {per_node} {train}"
        where = "# Run it on the machine; meshplan must be installed there."
    else:
        launch = (f"torchrun --nnodes {nodes} --nproc-per-node {per_node} --rdzv-backend c10d \\\n"
                  f"    --rdzv-endpoint \"${{MASTER_ADDR:?set MASTER_ADDR to the address of node 0}}:${{MASTER_PORT:-29500}}\""
                  f" --rdzv-id \"${{RDZV_ID:-meshplan}}\" \\\n    -m runtime.train {train}")
        where = "# Run it on each node with the same MASTER_ADDR (node 0) and RDZV_ID; meshplan installed on all."
    out.add("launch.sh", f"#!/bin/bash\n{summary}\n{where}\nset -euo pipefail\n{here}\n{launch}\n", executable=True)
    out.add("slurm.sbatch", f"""#!/bin/bash
{summary}
# Submit from this folder: sbatch slurm.sbatch [runtime.train arguments]
#SBATCH --job-name=meshplan
#SBATCH --nodes={nodes}
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node={per_node}
#SBATCH --exclusive
set -euo pipefail
DIR="${{SLURM_SUBMIT_DIR:-$(pwd)}}"
MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
srun torchrun --nnodes "$SLURM_NNODES" --nproc-per-node {per_node} --rdzv-backend c10d \\
    --rdzv-endpoint "$MASTER_ADDR:${{MASTER_PORT:-29500}}" --rdzv-id "$SLURM_JOB_ID" \\
    -m runtime.train {train}
""")
