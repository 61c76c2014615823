"""The supported torch range is declared once and enforced at import.

An older torch is simulated by overwriting torch.__version__ before meshplan is imported,
in a fresh interpreter: the gate reads nothing else, so this is what a user with that
release sees. The floor release itself runs the suite in .ci/run's second half."""
from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import torch

from helpers import REPO, assert_user_error
from planner.torch_compat import PLANNER_MIN_TORCH, RUNTIME_MIN_TORCH, UnsupportedTorch, require_torch, torch_release


def _as_torch(version: str, code: str):
    """Run `code` in a fresh interpreter whose torch claims to be `version`."""
    prelude = f"import torch; torch.__version__ = torch.torch_version.TorchVersion({version!r})\n"
    return subprocess.run([sys.executable, "-c", prelude + code], capture_output=True, text=True, cwd=REPO,
                          env=dict(os.environ, PYTHONPATH=str(REPO)), timeout=120)


def _cli(version: str, module: str, *argv):
    return _as_torch(version, f"import runpy, sys; sys.argv = ['meshplan', *{list(argv)!r}]\n"
                              f"runpy.run_module({module!r}, run_name='__main__', alter_sys=True)")


def test_pyproject_declares_the_planner_floor():
    pins = re.findall(r'"torch>=([0-9.]+)"', (REPO / "pyproject.toml").read_text())
    assert [tuple(map(int, p.split("."))) for p in pins] == [PLANNER_MIN_TORCH]


@pytest.mark.parametrize("version, release", [("2.7.0", (2, 7)), ("2.13.0+cpu", (2, 13)),
                                              ("2.12.0a0+git1f2e3d", (2, 12)), ("3.0.1+cu130", (3, 0))])
def test_release_reading(version, release):
    assert torch_release(version) == release


def test_require_torch_names_the_release_needed():
    require_torch((2, 7), "x", version="2.7.0")
    with pytest.raises(UnsupportedTorch, match=r"^x needs torch>=2\.12, but torch 2\.11\.0\+cu130 is installed"):
        require_torch((2, 12), "x", version="2.11.0+cu130")
    assert issubclass(UnsupportedTorch, ImportError)


def test_cli_on_a_torch_below_the_floor_says_so_in_one_line():
    proc = _cli("2.6.0", "planner.cli", "plan", "--model", "gpt-tiny", "--cluster", "cpu:1x1", "--global-batch", "2")
    assert_user_error(proc, "needs torch>=2.7", "torch 2.6.0 is installed")
    assert proc.stdout == ""


def test_library_import_below_the_floor_is_an_import_error():
    proc = _as_torch("2.6.0", "try:\n    import planner.simulate\nexcept ImportError as exc:\n    print(type(exc).__name__, exc)")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("UnsupportedTorch meshplan needs torch>=2.7, but torch 2.6.0"), proc.stdout


def test_runtime_below_its_floor_refuses_but_planning_works(tmp_path):
    below = f"{RUNTIME_MIN_TORCH[0]}.{RUNTIME_MIN_TORCH[1] - 1}.0"       # 2.9.0 while the floor is 2.10
    assert PLANNER_MIN_TORCH <= torch_release(below) < RUNTIME_MIN_TORCH
    plan = tmp_path / "plan.json"
    planned = _cli(below, "planner.cli", "plan", "--model", "gpt-tiny", "--cluster", "cpu:1x1", "--global-batch",
                   "2", "--seq", "32", "--top", "1", "--out", str(plan))
    assert planned.returncode == 0 and plan.exists(), planned.stderr
    assert_user_error(_cli(below, "runtime.train", "--model", "gpt-tiny", "--plan", str(plan), "--steps", "1"),
                      "training runtime needs torch>={}.{}".format(*RUNTIME_MIN_TORCH), f"torch {below} is installed")


def test_grouped_flash_matches_sdpa():
    """The tracer's GQA attention for torches whose CPU SDPA does not fuse it (2.7, 2.8):
    outputs and gradients equal SDPA's over repeated k/v; k/v gradients keep their heads."""
    import torch.nn.functional as F
    from planner.trace.kernels import GroupedFlash
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, h, 16, 8, dtype=torch.float64, requires_grad=True) for h in (4, 2, 2))
    out = GroupedFlash.apply(q, k, v, 0.0, True, None)
    grad = torch.randn_like(out)
    expected = F.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), is_causal=True)
    torch.testing.assert_close(out, expected)
    for got, want in zip(torch.autograd.grad(out, (q, k, v), grad), torch.autograd.grad(expected, (q, k, v), grad)):
        assert got.shape == want.shape
        torch.testing.assert_close(got, want)
