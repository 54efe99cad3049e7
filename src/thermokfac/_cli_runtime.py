"""What the command line checks and does around a command: flags given again on a resume,
the run-folder rule, and leaving a torchrun job."""

from __future__ import annotations

import argparse
import json
import logging
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


#: Commands whose folder gets the command line's settings as ``config.json`` (train and
#: sweep write their own: the merged training config, the sweep spec).
WRITES_ARGS = ("compare", "profile", "scaling", "quantize", "plan", "breakeven")


def apply_config_file(parser: argparse.ArgumentParser, args: argparse.Namespace,
                       argv: list[str]) -> argparse.Namespace:
    """Settings of ``--config FILE`` become the command's defaults; flags override them."""
    if getattr(args, "config", None) is None:
        args.from_file = {}
        return args
    from .experiments.config import read_config_file

    values = read_config_file(args.config, args.command_name)
    args.sub_parser.set_defaults(**values)
    args = parser.parse_args(argv)
    args.from_file = values
    return args


def write_args(args: argparse.Namespace) -> None:
    skip = {"func", "argv", "sub_parser", "from_file", "command_name"}
    values = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()
              if k not in skip}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "config.json").write_text(json.dumps(values, indent=2))


class OncePerCommand(logging.Filter):
    """Lets each distinct message through once (a sweep builds many preconditioners)."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if message in self.seen:
            return False
        self.seen.add(message)
        return True
