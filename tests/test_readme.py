"""Every Python block of the README and of the documentation pages (``docs/*.md``) runs
verbatim, each in a fresh interpreter in an empty folder; a block that starts a process
group runs through ``torchrun`` on two ranks, as the page tells its reader to run it."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
README = ROOT / "README.md"
#: The README and every page of the documentation site (their blocks run the same way).
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
BLOCKS = [(f"{page.relative_to(ROOT)}:{page.read_text()[:m.start()].count(chr(10)) + 1}",
           m.group(1))
          for page in PAGES for m in re.finditer(r"```python\n(.*?)```", page.read_text(), re.S)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_readme_has_python_blocks():
    assert len(BLOCKS) >= 8


@pytest.mark.parametrize("line,code", BLOCKS, ids=[line for line, _ in BLOCKS])
def test_readme_block_runs(line, code, tmp_path):
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-c", code]
    if "init_process_group" in code:  # the README says: run the file with torchrun
        script = tmp_path / "block.py"
        script.write_text(code)
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                   "--master-addr", "127.0.0.1", "--master-port", str(_free_port()),
                   str(script)]
    out = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, f"the block at {line} failed:\n{out.stderr[-3000:]}"
