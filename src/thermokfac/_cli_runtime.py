"""What the command line checks and does around a command: flags given again on a resume,
the run-folder rule, and leaving a torchrun job."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path


def given(argv: Sequence[str], name: str) -> bool:
    """Whether the option of field ``name`` appears on the command line."""
    flag = "--" + name.replace("_", "-")
    return any(t == flag or t.startswith(flag + "=") or t == "--no-" + flag[2:] for t in argv)


def refuse_nonempty(args: argparse.Namespace) -> None:
    """A non-empty ``--out`` is refused unless the run resumes or ``--overwrite`` says
    to replace it (checked on rank 0 only, before anything is written)."""
    out = getattr(args, "out", None)
    if out is None or getattr(args, "resume", False) or getattr(args, "overwrite", False) \
            or int(os.environ.get("RANK", "0")) != 0:
        return
    if Path(out).is_dir() and any(Path(out).iterdir()):
        raise ValueError(f"--out {out} is not empty: pass --overwrite to replace its "
                         "files, or --resume to continue the run saved there")


def distributed() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def leave_distributed(code: int) -> None:
    """Under torchrun: wait for every rank (after success), then exit without tearing the
    process group down (freeing DDP's reducer beside gloo's worker thread can deadlock at
    exit); a failed rank leaves at once, and its peers' collectives fail with an error."""
    import torch.distributed as dist

    if code == 0:
        dist.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
