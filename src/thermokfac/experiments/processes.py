"""Which process and device a run is: torchrun's process group and the run's device."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from ..distributed.launch import collective_timeout


def init_distributed() -> tuple[int, int]:
    """(rank, world size); under ``torchrun`` (``WORLD_SIZE`` > 1) this initialises
    torch.distributed first — NCCL when CUDA is available, else gloo."""
    if dist.is_available() and not dist.is_initialized() and \
            int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo",
                                timeout=collective_timeout())
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def resolve_device(name: str) -> torch.device:
    """``"auto"``: this process's GPU (``LOCAL_RANK``) when CUDA is available, else CPU."""
    if name == "auto":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        name = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"device={name!r} is not valid; use 'auto', 'cpu', 'cuda' or "
                         "'cuda:N'") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device={name!r} is not available: this torch has no CUDA device")
        if device.index is None:  # plain "cuda": the current GPU, named by its index
            device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)
    return device
