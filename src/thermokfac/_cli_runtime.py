"""What the command line checks and does around a command: flags given again on a resume,
the exit status of each kind of failure, and leaving a torchrun job (the run-folder
rules are in :mod:`.experiments.run_folder`)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path


def given(argv: Sequence[str], name: str) -> bool:
    """Whether the option of field ``name`` appears on the command line."""
    flag = "--" + name.replace("_", "-")
    return any(t == flag or t.startswith(flag + "=") or t == "--no-" + flag[2:] for t in argv)


def distributed() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def leave_distributed(code: int, release: Callable[[], None]) -> None:
    """Under torchrun: wait for every rank (after success), release the run folder, then
    exit without tearing the process group down (freeing DDP's reducer beside gloo's
    worker thread can deadlock at exit); a failed rank leaves at once, and its peers'
    collectives fail with an error."""
    import torch.distributed as dist

    if code == 0:
        dist.barrier()
    release()
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


#: Exit statuses (documented under Run safety in docs/cli.md): bad input (an
#: argument, a config file, a spec, a damaged checkpoint, a folder in use) 2; a fault
#: of the environment (a full disk, a read-only or missing folder, a size limit,
#: permissions, memory) 3; an interrupted run 128 + the signal; an unexpected error 1.
BAD_INPUT, ENVIRONMENT, UNEXPECTED = 2, 3, 1


def is_fault(err: BaseException, out: Path | None) -> bool:
    """Whether ``err`` is a fault of the machine (exit status 3) rather than bad input
    (2): an ``OSError`` or ``MemoryError``, except a missing file outside the run folder
    (a config file, a spec, a data set: the user's input)."""
    if isinstance(err, FileNotFoundError):
        if out is None or err.filename is None:
            return False
        folder = Path(out).resolve()
        path = Path(os.fsdecode(err.filename)).resolve()
        return path == folder or folder in path.parents
    return isinstance(err, (OSError, MemoryError))


def fault_message(command: str, err: OSError | MemoryError, out: Path | None) -> str:
    """One line for a fault of the environment: what failed, on which file, and the
    newest intact checkpoint of the run folder (when it is a folder)."""
    from .experiments.run_folder import intact_checkpoint

    if isinstance(err, MemoryError):
        what = "out of memory"
    else:
        reason = err.strerror or str(err) or type(err).__name__
        what = f"{err.filename}: {reason}" if err.filename else reason
    try:  # the message must not fail on a broken folder
        intact = intact_checkpoint(out) if out is not None and Path(out).is_dir() else ""
    except Exception:
        intact = ""
    if command != "train" and "is intact" not in intact:  # only train checkpoints
        intact = ""
    return f"thermokfac {command}: error: {what}" + (f"; {intact}" if intact else "")
