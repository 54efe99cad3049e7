"""Sharded models that K-FAC does not precondition are refused with a clear error that
names the supported path, never a crash: an FSDP2 model in front of the one-process
``KFACPreconditioner`` (at construction, and at the first step when the model was
sharded after the preconditioner was built, as Accelerate does), FSDP1 and HSDP. FSDP2
with ``DistributedKFACPreconditioner``, built before or after ``fully_shard``, is
preconditioned exactly (``tests/test_fully_shard.py``); here the built-before order is
only checked to be accepted. Runs in a child process with a one-rank gloo group."""

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
from thermokfac.distributed import DistributedKFACPreconditioner

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

early = model()
pre = DistributedKFACPreconditioner(early, kl_clip=None)
fully_shard(early)
nn.functional.cross_entropy(early(x), y).backward()
try:
    pre.step()
    print("distributed, built before: accepted")
except NotImplementedError as e:
    print("distributed, built before:", e)

# FSDP1 cannot be built on a CPU-only machine: a bare instance stands in for its module
from torch.distributed.fsdp import FullyShardedDataParallel
fsdp1 = FullyShardedDataParallel.__new__(FullyShardedDataParallel)
nn.Module.__init__(fsdp1)
try:
    DistributedKFACPreconditioner(nn.Sequential(model(), fsdp1), kl_clip=None)
    print("fsdp1: accepted")
except NotImplementedError as e:
    print("fsdp1:", e)

from torch.distributed.device_mesh import init_device_mesh
hsdp = model()
fully_shard(hsdp, mesh=init_device_mesh("cpu", (1, 1), mesh_dim_names=("dp", "fs")))  # HSDP
try:
    DistributedKFACPreconditioner(hsdp, kl_clip=None)
    print("hsdp: accepted")
except NotImplementedError as e:
    print("hsdp:", e)
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
    assert lines["distributed, built before"] == "accepted", out.stdout  # its first step
    for when in ("construction", "first step", "fsdp1", "hsdp"):
        assert "not supported" in lines[when], out.stdout
        assert "DistributedKFACPreconditioner (built before or after fully_shard)" in \
            lines[when]
        assert "FSDP" in lines[when]
    assert "FSDP1" in lines["fsdp1"]
    assert "2-D device mesh" in lines["hsdp"]
