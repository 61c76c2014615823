"""Model families: one module each (gpt.py, llama.py), registered in `base`'s registry.

Importing this package registers every family; read them with `get_arch(name)`."""
from planner.arch.base import (ALLOWED_STYLES, TOP_ROLES, Architecture, arch_names, get_arch, module_roles,
                               names_for, register)
from planner.arch import gpt, llama  # noqa: F401  (registers the families)

__all__ = ["ALLOWED_STYLES", "TOP_ROLES", "Architecture", "arch_names", "get_arch", "module_roles", "names_for",
           "register"]
