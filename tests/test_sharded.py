"""FSDP / FSDP2 models are refused with a clear error, never a crash: at construction,
and at the first step when the model was sharded after the preconditioner was built
(as Accelerate does). Runs in a child process with a one-rank gloo group."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest

pytestmark = pytest.mark.distributed

SCRIPT = r"""
import os, sys, torch, torch.distributed as dist
from torch import nn
os.environ["MASTER_ADDR"] = "127.0.0.1"
os.environ["MASTER_PORT"] = sys.argv[1]
dist.init_process_group("gloo", rank=0, world_size=1)
from torch.distributed.fsdp import fully_shard
from thermokfac import KFACPreconditioner

def model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))

sharded = model()
fully_shard(sharded)
try:
    KFACPreconditioner(sharded, kl_clip=None)
    print("construction: accepted")
except NotImplementedError as e:
    print("construction:", e)

late = model()
pre = KFACPreconditioner(late, kl_clip=None)
fully_shard(late)
x, y = torch.randn(8, 4), torch.randint(0, 2, (8,))
nn.functional.cross_entropy(late(x), y).backward()
try:
    pre.step()
    print("first step: accepted")
except NotImplementedError as e:
    print("first step:", e)
dist.destroy_process_group()
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_fsdp2_is_refused_clearly():
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(_free_port())],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = dict(line.split(": ", 1) for line in out.stdout.splitlines() if ": " in line)
    for when in ("construction", "first step"):
        assert "not supported yet" in lines[when], out.stdout
        assert "DistributedKFACPreconditioner" in lines[when]
    assert all("FSDP" in lines[when] for when in ("construction", "first step"))
