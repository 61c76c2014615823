"""Describe a training job from Python: a model from the zoo (or your own config) and a cluster.

    python examples/describe_job.py                    # GPT-3 175B on 128 DGX-A100 nodes
    python examples/describe_job.py llama3-70b dgx-h100:16

Everything is built on the meta device, so a 175B model costs no memory here.
"""
import sys

from cost_models import parse_cluster
from cost_models.units import GIB
from planner import Plan, load_model
from planner.models import count_parameters


def main(model_name="gpt3-175b", cluster_text="a100-sxm-80gb:128x8"):
    spec = load_model(model_name)
    params = count_parameters(spec.build("meta"))
    cluster = parse_cluster(cluster_text)
    print(f"{spec.name}: {params / 1e9:.2f} B parameters, {spec.config.layers} layers")
    print(cluster.summary())
    # Weights alone in bf16, spread over the whole cluster: the floor any plan starts from.
    print(f"bf16 weights: {2 * params / GIB:,.0f} GiB in all, "
          f"{2 * params / cluster.world_size / GIB:.2f} GiB per device if fully sharded")
    # A hand-written plan, validated against the model and the cluster.
    plan = Plan(dp=cluster.world_size // 64, tp=8, pp=8, global_batch=1536, micro_batch=1,
                seq=2048, model=model_name, cluster=cluster_text)
    plan.check_fits(spec.config.layers, cluster.world_size, cluster.gpus_per_node)
    print(f"plan dp={plan.dp} tp={plan.tp} pp={plan.pp}: {plan.grad_accum} micro-batches per step")


if __name__ == "__main__":
    main(*sys.argv[1:3])
