"""
Two processes with DDP
======================

:class:`~thermokfac.distributed.DistributedKFACPreconditioner` runs the same lines on
every rank of a ``torch.distributed`` job: the factors are reduced over the ranks, the
prepares are split between them, and every rank ends with the same parameters. The
gallery runs scripts in one process, so this one writes the training script to a
file and starts it with ``torchrun`` on two gloo processes.
"""

# %%
import os
import pathlib
import socket
import subprocess
import sys
import tempfile

SCRIPT = '''
import gc
import torch
import torch.distributed as dist
from torch import nn
from thermokfac.distributed import DistributedKFACPreconditioner

dist.init_process_group("gloo")
rank = dist.get_rank()
torch.manual_seed(0)                                   # the same weights on every rank
net = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 3))
model = nn.parallel.DistributedDataParallel(net)
opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
pre = DistributedKFACPreconditioner(model, strategy="comm-opt", optimizer=opt)
data = torch.Generator().manual_seed(1 + rank)         # each rank its own batches
for step in range(5):
    x, y = torch.randn(32, 10, generator=data), torch.randint(0, 3, (32,), generator=data)
    opt.zero_grad()
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    pre.step()
    opt.step()
checksum = sum(p.detach().double().sum().item() for p in net.parameters())
with open(f"rank{rank}.txt", "w") as fh:  # one file per rank: printed lines may interleave
    fh.write(f"rank {rank}: last local loss {loss.item():.4f}, parameter checksum "
             f"{checksum!r}")
del pre, opt, model, loss
gc.collect()
dist.destroy_process_group()
'''

with tempfile.TemporaryDirectory() as folder:
    script = pathlib.Path(folder) / "train.py"
    script.write_text(SCRIPT)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node",
                           "2", "--master-addr", "127.0.0.1", "--master-port", str(port),
                           str(script)], capture_output=True, text=True, timeout=300,
                          cwd=folder, env={**os.environ, "OMP_NUM_THREADS": "1",
                                           "PYTHONWARNINGS": "ignore"})
    assert done.returncode == 0, done.stderr[-2000:]
    lines = [(pathlib.Path(folder) / f"rank{r}.txt").read_text() for r in (0, 1)]
print("\n".join(lines))
checksums = {line.rsplit(" ", 1)[1] for line in lines}
print("both ranks hold the same parameters:", len(checksums) == 1)
assert len(checksums) == 1, (lines, done.stdout[-1000:])
