"""Model families: one module each (gpt.py, llama.py, qwen3.py, gemma.py - Gemma and Gemma 2 -,
phi.py, moe.py), registered in `base`'s registry.

Importing this package registers every family; read them with `get_arch(name)`."""
from planner.arch.base import (ALLOWED_STYLES, TOP_ROLES, Architecture, arch_names, get_arch, head_norm_names,
                               module_roles, names_for, register, shared_input_outputs)
from planner.arch import gpt, llama  # noqa: F401  (registers the families, the zoo's first)
from planner.arch import gemma, moe, phi, qwen3  # noqa: F401,E402

__all__ = ["ALLOWED_STYLES", "TOP_ROLES", "Architecture", "arch_names", "get_arch", "head_norm_names", "module_roles",
           "names_for", "register", "shared_input_outputs"]
