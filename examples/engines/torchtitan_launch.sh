#!/bin/bash
# A torchtitan (b5bcd76) launch line as `meshplan simulate --from torchtitan` reads it: the
# llama3_8b recipe of torchtitan/models/llama3/config_registry.py with two overrides
# (tensor parallelism 2, 128 sequences of 8192 tokens a step) on 2 nodes of 8 GPUs.
torchrun --nnodes 2 --nproc_per_node 8 -m torchtitan.train --module llama3 --config llama3_8b \
    --parallelism.tensor_parallel_degree 2 --training.num_tokens_per_train_step 1048576
