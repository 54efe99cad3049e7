"""Which process and device a run is: torchrun's process group and the run's device."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from ..distributed.launch import collective_timeout

#: torchrun's variables this package reads, with their defaults outside torchrun.
LAUNCH_DEFAULTS = {"RANK": 0, "WORLD_SIZE": 1, "LOCAL_RANK": 0}


def launch_value(name: str) -> int:
    """torchrun's ``RANK``, ``WORLD_SIZE`` or ``LOCAL_RANK`` (:data:`LAUNCH_DEFAULTS`
    when unset), checked: integers, ``WORLD_SIZE`` >= 1, 0 <= ``RANK`` < ``WORLD_SIZE``,
    ``LOCAL_RANK`` >= 0, and ``MASTER_ADDR``/``MASTER_PORT`` set when ``WORLD_SIZE`` > 1.

    Raises:
        ValueError: Naming the variable, its value and what it must be.
    """
    values = {}
    for key, default in LAUNCH_DEFAULTS.items():
        text = os.environ.get(key)
        try:
            values[key] = default if text is None else int(text)
        except ValueError:
            raise ValueError(f"the environment variable {key}={text!r} must be an integer "
                             "(torchrun sets it; unset it outside torchrun)") from None
    world, rank = values["WORLD_SIZE"], values["RANK"]
    if world < 1 or not 0 <= rank < world or values["LOCAL_RANK"] < 0:
        raise ValueError(f"the environment variables WORLD_SIZE={world}, RANK={rank}, "
                         f"LOCAL_RANK={values['LOCAL_RANK']} are inconsistent: WORLD_SIZE "
                         ">= 1, 0 <= RANK < WORLD_SIZE, LOCAL_RANK >= 0 (torchrun sets them)")
    missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if world > 1 and missing:
        raise ValueError(f"WORLD_SIZE={world} asks for several processes but {missing} "
                         "not set: start the command with torchrun --nproc-per-node N")
    return values[name]


def init_distributed() -> tuple[int, int]:
    """(rank, world size); under ``torchrun`` (``WORLD_SIZE`` > 1) this initialises
    torch.distributed first — NCCL when CUDA is available, else gloo."""
    if dist.is_available() and not dist.is_initialized() and launch_value("WORLD_SIZE") > 1:
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
        name = f"cuda:{launch_value('LOCAL_RANK')}"
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
