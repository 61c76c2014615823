"""What every reader of user input shares: the bounds on every size, number checks that
fail in one line, guarded reading of JSON/YAML files, and the check of an output path.

Bounds are what can exist, generously: a size beyond them is a typo or an attack, and
would otherwise make the search, the tracer or the printer run for hours or exhaust memory
(a 10^9-node cluster, a 10^12-sequence batch, a YAML alias bomb). Every check raises
`MeshplanError` with one line that names the field, the allowed range and the value.
"""
from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path

from cost_models.errors import MeshplanError

# Clusters: the largest machines built hold ~2 x 10^5 GPUs; an NVLink domain (a "node"
# here) holds at most a few hundred (NVL576).
MAX_GPUS = 1 << 18
MAX_GPUS_PER_NODE = 1024
# Jobs: sequences per optimizer step, and tokens per sequence.
MAX_GLOBAL_BATCH = 1 << 24
MAX_SEQ = 1 << 24
# Tokens per optimizer step (global batch x seq): 60x Llama 3 405B's 16M.
MAX_TOKENS_PER_STEP = 1 << 30
# Micro-batches per data-parallel rank per step (gradient accumulation): the simulator plays
# each one through FSDP and the pipeline; real jobs run tens to hundreds.
MAX_MICRO_BATCHES = 4096
# Models: 10-100x the largest published dense transformer in each dimension.
MAX_LAYERS = 2048
MAX_HIDDEN = 1 << 20
MAX_FFN = 1 << 22
MAX_EXPERTS = 1 << 12   # routed experts of one MoE block (DeepSeek-V3 has 256)
MAX_VOCAB = 1 << 24
# Files: a config or plan is a few KB; a larger one (or one that expands to more values
# through YAML aliases, or nests deeper) is not one.
MAX_FILE_BYTES = 32 << 20
MAX_VALUES = 200_000
MAX_DEPTH = 64


def check_tokens_per_step(global_batch: int, seq: int) -> None:
    """global_batch x seq within MAX_TOKENS_PER_STEP (each already a whole number in bounds)."""
    if global_batch * seq > MAX_TOKENS_PER_STEP:
        raise MeshplanError(f"global_batch x seq = {global_batch:,} x {seq:,} = {global_batch * seq:,} tokens per "
                            f"step; meshplan plans at most {MAX_TOKENS_PER_STEP:,}: lower the batch or seq")


def shown(value) -> str:
    """A value for an error message, short and cheap to print whatever it is (a 5000-digit
    int, an alias-expanded list of 10^9 items)."""
    if isinstance(value, bool) or value is None or isinstance(value, float):
        return repr(value)
    if isinstance(value, int):
        if value.bit_length() > 60:
            return f"a {'negative ' if value < 0 else ''}number of about 10^{int(value.bit_length() * 0.30103)}"
        return repr(value)
    if isinstance(value, str):
        return repr(value[:60] + ("..." if len(value) > 60 else ""))
    if isinstance(value, (list, tuple, dict, set)):
        return f"a {type(value).__name__} of {len(value)} item(s)"
    return f"a {type(value).__name__}"


def whole_number(value, what: str, low: int = 1, high: int | None = None) -> int:
    """`value` as an int in [low, high]; bools, floats and strings are refused."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        bound = f"from {low:,} to {high:,}" if high is not None else f">= {low:,}"
        raise MeshplanError(f"{what} must be a whole number {bound}, got {shown(value)}")
    return value


def finite_number(value, what: str, low: float | None = None, high: float | None = None,
                  low_open: bool = False) -> float:
    """`value` as a finite float in [low, high] ((low, high] with low_open); no bools, NaN or inf."""
    ok = not isinstance(value, bool) and isinstance(value, (int, float))
    number = float(value) if ok and (not isinstance(value, int) or value.bit_length() < 1000) else math.inf
    if ok and math.isfinite(number) and (low is None or number > low or (number == low and not low_open)) \
            and (high is None or number <= high):
        return number
    if low is None:
        bound = "a finite number"
    elif low == 0:
        bound = "positive and finite" if low_open else "a finite number >= 0"
    else:
        bound = f"a finite number {'>' if low_open else '>='} {low:g}"
    if high is not None:
        bound += f", at most {high:g}"
    raise MeshplanError(f"{what} must be {bound}, got {shown(value)}")


# --------------------------------------------------------------------------- reading files

def read_text(path, what: str) -> str:
    """A user's text file, bounded in size; missing, unreadable or non-UTF-8 -> one line."""
    path = Path(path)
    if not path.is_file():
        raise MeshplanError(f"{what} {str(path)!r} does not exist" + (" (it is a folder)" if path.is_dir() else ""))
    try:
        size = path.stat().st_size
        if size > MAX_FILE_BYTES:
            raise MeshplanError(f"{what} {str(path)!r} is {size:,} bytes; a meshplan file is at most "
                                f"{MAX_FILE_BYTES:,}")
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise MeshplanError(f"{what} {str(path)!r} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise MeshplanError(f"cannot read {what} {str(path)!r}: {exc.strerror or exc}") from None


def parse_json(text: str, what: str):
    """JSON text -> data, bounded in nesting and size; any malformation -> one line."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise MeshplanError(f"{what} is not valid JSON: {exc}") from None
    except RecursionError:
        raise MeshplanError(f"{what} nests deeper than {MAX_DEPTH} levels") from None
    except ValueError as exc:   # e.g. an integer of more than 4300 digits
        raise MeshplanError(f"{what} is not valid JSON: {str(exc).splitlines()[0]}") from None
    check_structure(data, what)
    return data


def parse_yaml(text: str, what: str):
    """YAML text -> data (safe loader), bounded in nesting and in values after alias expansion."""
    import yaml
    try:
        data = yaml.safe_load(text)
    except RecursionError:
        raise MeshplanError(f"{what} nests deeper than {MAX_DEPTH} levels") from None
    except (yaml.YAMLError, ValueError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise MeshplanError(f"{what} is not valid YAML: {first}") from None
    check_structure(data, what)
    return data


def check_structure(data, what: str) -> None:
    """Refuse data nested deeper than MAX_DEPTH or holding more than MAX_VALUES values once
    YAML aliases are expanded (an alias bomb loads in milliseconds and prints for hours).
    Iterative, and stops at the first bound it passes."""
    stack, count = [(data, 1)], 0
    while stack:
        value, depth = stack.pop()
        count += 1
        if count > MAX_VALUES:
            raise MeshplanError(f"{what} holds more than {MAX_VALUES:,} values (YAML aliases expanded): "
                                f"it is not a meshplan file")
        if depth > MAX_DEPTH:
            raise MeshplanError(f"{what} nests deeper than {MAX_DEPTH} levels")
        if isinstance(value, dict):
            stack.extend((v, depth + 1) for v in value.values())
            stack.extend((k, depth + 1) for k in value)
        elif isinstance(value, (list, tuple)):
            stack.extend((v, depth + 1) for v in value)


def load_file(path, what: str):
    """A JSON (.json) or YAML (anything else) file -> data, every failure one line."""
    path = Path(path)
    text = read_text(path, what)
    where = f"{what} {str(path)!r}"
    return parse_json(text, where) if path.suffix.lower() == ".json" else parse_yaml(text, where)


# --------------------------------------------------------------------------- writing files

def check_output_path(path, overwrite: bool = False, force_hint: bool = False,
                      suffixes: tuple | None = None) -> Path:
    """Before any work: refuse to overwrite a user's file (unless `overwrite`), a folder, a
    missing or unwritable folder, and (with `suffixes`) a file type nothing can write."""
    target = Path(path)
    if str(path).strip() == "" or target.name in ("", ".", ".."):
        raise MeshplanError(f"{str(path)!r} is not a file name")
    if target.is_dir():
        raise MeshplanError(f"{str(path)!r} is a folder: give a file name")
    if target.exists() and not overwrite:
        raise MeshplanError(f"{str(path)!r} already exists: choose another path"
                            + (" or pass --force" if force_hint else ""))
    if suffixes is not None and target.suffix.lower().lstrip(".") not in suffixes:
        raise MeshplanError(f"cannot write {str(path)!r}: give a file name ending in one of "
                            f"{', '.join('.' + s for s in suffixes)}")
    parent = target.parent
    if not parent.is_dir():
        raise MeshplanError(f"directory {str(parent)!r} does not exist")
    refused = refuses_new_files(parent)
    if refused:
        raise MeshplanError(f"cannot write into directory {str(parent)!r}: {refused}")
    return target


def refuses_new_files(directory) -> str | None:
    """Why `directory` refuses a new file (the OS's reason), or None when it takes one. Tried,
    not asked: os.access says yes to root on a read-only mount. The probe is an unnamed
    temporary file, gone at once."""
    try:
        with tempfile.TemporaryFile(dir=directory):
            return None
    except OSError as exc:
        return exc.strerror or os.strerror(exc.errno or 0)
