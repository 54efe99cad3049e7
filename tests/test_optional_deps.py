"""The preconditioner works without the command line's dependencies (matplotlib, tqdm);
the command line then says what to install instead of failing with a traceback."""

from __future__ import annotations

import os
import subprocess
import sys

SCRIPT = r"""
import sys
import torch
from torch import nn
import thermokfac.distributed
from thermokfac import KFACOptimizer
from thermokfac.solvers import ThermodynamicSolver

torch.manual_seed(0)
model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))
opt = KFACOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.1),
                    solver=ThermodynamicSolver(), kl_clip=None)
x, y = torch.randn(16, 5), torch.randint(0, 3, (16,))
nn.functional.cross_entropy(model(x), y).backward()
opt.step()
print("library ok", opt.preconditioner.steps, "matplotlib" in sys.modules, "tqdm" in sys.modules)
from thermokfac.cli import main
print("cli code", main(["train", "--steps", "1"]))
"""


def test_library_without_cli_extra_and_cli_says_what_to_install(tmp_path):
    # Stand-ins first on the path that fail to import as a missing package does.
    for name in ("matplotlib", "tqdm"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text(
            f"raise ModuleNotFoundError(\"No module named '{name}'\", name='{name}')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True,
                         timeout=120, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "library ok 1 False False" in out.stdout
    assert "cli code 2" in out.stdout
    assert "pip install 'thermokfac[cli]'" in out.stderr
