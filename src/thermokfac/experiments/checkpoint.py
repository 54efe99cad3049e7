"""Checkpoint files that survive a kill mid-write and say when they are damaged.

A checkpoint is one JSON header line — format name, version, payload length and its
SHA-256 — followed by the payload, which is ``torch.save``'s output. Writing goes to a
temporary file in the same folder, flushed and fsynced, and is then renamed over the
old checkpoint (an atomic replace on POSIX), after the old one was renamed to
``checkpoint.prev.pt``: at every moment a complete checkpoint exists under one of the
names. Reading checks the header and the checksum before ``torch.load`` sees a byte,
so a truncated, empty, foreign or bit-flipped file is a ``ValueError`` naming the file,
what is wrong and the previous checkpoint when there is one.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

FORMAT = "thermokfac-checkpoint"
VERSION = 1
NAME = "checkpoint.pt"
PREVIOUS = "checkpoint.prev.pt"


def write(folder: Path, state: dict[str, Any],
          before_rename: Callable[[], None] | None = None) -> Path:
    """Write ``state`` as ``folder/checkpoint.pt`` atomically; returns its path.

    Args:
        folder: The run folder (created if missing).
        state: What ``torch.save`` can write.
        before_rename: Called after the new file is complete on disk and before any
            rename (tests inject a failure there).

    Raises:
        OSError: The write failed (a full disk, a size limit, a read-only folder); the
            partial temporary file is removed and the last checkpoint is untouched.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    payload = buffer.getvalue()
    header = {"format": FORMAT, "version": VERSION, "bytes": len(payload),
              "sha256": hashlib.sha256(payload).hexdigest()}
    path, temporary = folder / NAME, folder / (NAME + ".tmp")
    try:
        with open(temporary, "wb") as fh:
            fh.write(json.dumps(header).encode() + b"\n")
            fh.write(payload)
            fh.flush()
            os.fsync(fh.fileno())
    except OSError as err:  # full disk, size limit, read-only: the last one is untouched
        _remove(temporary)
        if err.filename is None:  # a failed write() names no file
            err.filename = str(temporary)
        raise
    if before_rename is not None:
        before_rename()
    if path.exists():
        os.replace(path, folder / PREVIOUS)
    os.replace(temporary, path)
    _sync_folder(folder)
    return path


DCP_NAME = "checkpoint.dcp"
DCP_PREVIOUS = "checkpoint.dcp.prev"


def write_dcp(folder: Path, state: dict[str, Any], rank: int) -> Path:
    """Save ``state`` with ``torch.distributed.checkpoint`` as ``folder/checkpoint.dcp``
    atomically (every rank calls it): into a temporary folder first; once its
    ``.metadata`` exists, rank 0 renames the last checkpoint to ``checkpoint.dcp.prev``
    (replacing an older one) and the new folder into place, so a complete checkpoint
    exists under one of the names at every moment. Returns the folder.

    Raises:
        RuntimeError: The save finished without its ``.metadata`` (a damaged save).
    """
    import shutil

    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    folder = Path(folder)
    path, temporary = folder / DCP_NAME, folder / (DCP_NAME + ".tmp")
    if rank == 0:
        folder.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(temporary, ignore_errors=True)  # a save killed half-way
    dist.barrier()
    dcp.save(state, checkpoint_id=str(temporary))
    dist.barrier()
    if rank == 0:
        if not (temporary / ".metadata").is_file():
            raise RuntimeError(f"the checkpoint saved in {temporary} has no .metadata")
        if path.exists():
            shutil.rmtree(folder / DCP_PREVIOUS, ignore_errors=True)
            os.replace(path, folder / DCP_PREVIOUS)
        os.replace(temporary, path)
        _sync_folder(folder)
    dist.barrier()
    return path


def read_dcp(path: Path, state: dict[str, Any]) -> None:
    """Load the DCP checkpoint folder ``path`` (from :func:`resume_point`) into ``state``
    in place (every rank calls it).

    Raises:
        ValueError: The folder has no ``.metadata`` (an incomplete save).
    """
    import torch.distributed.checkpoint as dcp

    path = Path(path)
    if not (path / ".metadata").is_file():
        raise ValueError(f"{path} has no .metadata: an incomplete save")
    dcp.load(state, checkpoint_id=str(path))


def read(folder: Path) -> dict[str, Any]:
    """The state saved in ``folder/checkpoint.pt`` (that file only; :func:`newest_verified`
    falls back to the others).

    Raises:
        FileNotFoundError: No checkpoint (naming a previous one if it exists).
        ValueError: The file is empty, truncated, foreign, of another version, or its
            checksum does not match.
    """
    folder = Path(folder)
    path = folder / NAME
    previous = folder / PREVIOUS
    hint = (f"; the previous checkpoint {previous} may be intact: rename it to {NAME} to "
            "resume from it") if previous.exists() else ""
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint to resume in {folder}{hint}")
    return _load(path, _payload(path, hint))


def _load(path: Path, payload: bytes) -> dict[str, Any]:
    return load_plain(payload, path)


def load_plain(payload: bytes, path: Path | str) -> Any:
    """``torch.load`` of ``payload`` restricted to tensors and plain values
    (``weights_only=True``): a file that passes its checksum but holds other objects —
    whose loading could run code — is refused, not loaded.

    Raises:
        ValueError: Naming ``path``: the payload cannot be read, or holds other objects.
    """
    try:
        return torch.load(io.BytesIO(payload), weights_only=True, map_location="cpu")
    except Exception as err:  # a verified payload that torch cannot (or may not) read
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise ValueError(f"{path} passed its checksum but holds what a checkpoint may not "
                         f"(only tensors and plain values load): {type(err).__name__}: "
                         f"{first}") from None


@dataclass(frozen=True)
class Found:
    """A verified checkpoint: its path, the step it holds (``None`` for a DCP folder
    until its progress is read) and, for a file, its state."""

    path: Path
    step: int | None
    state: dict[str, Any] | None
    #: Why each newer candidate was passed over (``(path, reason)``).
    skipped: tuple[tuple[Path, str], ...] = ()


#: Where a checkpoint may be, newest first: a temporary file or folder that is complete
#: (a kill between the renames of a save leaves it so), the checkpoint, the previous one.
CANDIDATES = (NAME + ".tmp", NAME, PREVIOUS)
DCP_CANDIDATES = ("checkpoint.dcp.tmp", "checkpoint.dcp", "checkpoint.dcp.prev")


def newest_verified(folder: Path) -> Found | None:
    """The newest checkpoint in ``folder`` that passes every check: a file whose header,
    length and SHA-256 match and whose payload loads, or a DCP folder with its
    ``.metadata`` (files first: a folder holds one kind). ``None`` if there is none.

    Args:
        folder: The run folder.
    """
    folder = Path(folder)
    skipped: list[tuple[Path, str]] = []
    for name in CANDIDATES:
        path = folder / name
        if not path.is_file():
            continue
        try:
            state = _load(path, _payload(path, ""))
            step = state.get("step") if isinstance(state, dict) else None
        except (OSError, ValueError) as err:
            if name != CANDIDATES[0]:  # a partial temporary file is no news
                skipped.append((path, str(err)))
            continue
        return Found(path, step if isinstance(step, int) else None, state, tuple(skipped))
    for name in DCP_CANDIDATES:
        path = folder / name
        if not path.is_dir():
            continue
        if (path / ".metadata").is_file():
            return Found(path, None, None, tuple(skipped))
        if name != DCP_CANDIDATES[0]:
            skipped.append((path, f"{path} has no .metadata: an incomplete save"))
    return None


def _payload(path: Path, hint: str) -> bytes:
    data = path.read_bytes()
    first, _, payload = data.partition(b"\n")
    try:
        header = json.loads(first.decode())
    except (UnicodeDecodeError, json.JSONDecodeError):
        header = None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        what = "is empty" if not data else "is not a thermokfac checkpoint"
        raise ValueError(f"{path} {what}{hint}")
    if header.get("version") != VERSION:
        raise ValueError(f"{path} has checkpoint format version {header.get('version')!r}; "
                         f"this thermokfac reads version {VERSION}{hint}")
    if len(payload) != header.get("bytes"):
        raise ValueError(f"{path} is truncated or damaged ({len(payload)} of "
                         f"{header.get('bytes')} bytes){hint}")
    if hashlib.sha256(payload).hexdigest() != header.get("sha256"):
        raise ValueError(f"{path} is damaged (its SHA-256 does not match){hint}")
    return payload


@contextmanager
def naming(path: Path) -> Iterator[None]:
    """Writes within name ``path`` in the ``OSError`` they raise (``write()`` and
    ``flush()`` of an open file name none), for the command line's one-line message."""
    try:
        yield
    except OSError as err:
        if err.filename is None:
            err.filename = str(path)
        raise


def _remove(path: Path) -> None:
    with suppress(OSError):
        path.unlink()


def _sync_folder(folder: Path) -> None:
    """Make the renames durable (a no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def stop_on_signals(enabled: bool = True) -> Iterator[list[int]]:
    """While training, SIGINT and SIGTERM only set a flag (the signal's number in the
    yielded list), so the loop can save and leave between steps; under several
    processes the ranks first agree (:func:`agreed_stop`). Outside the main thread the
    default handlers stay."""
    stop: list[int] = []
    if not enabled or threading.current_thread() is not threading.main_thread():
        yield stop
        return
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}

    def handler(signum, frame):
        stop.append(signum)
    try:
        for sig in previous:
            signal.signal(sig, handler)
        yield stop
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def agreed_stop(stop: list[int], world: int, device: torch.device) -> int:
    """The signal that stops the run (0: none): this rank's, or under several processes
    the largest any rank received (one all-reduce per step), so every rank saves at the
    same step or none does (torchrun forwards a Ctrl-C to each worker)."""
    local = stop[0] if stop else 0
    if world == 1:
        return local
    import torch.distributed as dist

    flag = torch.tensor([local], dtype=torch.int64, device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return int(flag.item())


def to_device(obj: Any, device: torch.device) -> Any:
    """Every tensor of a nested dict / list / tuple on ``device``."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_device(v, device) for v in obj)
    return obj


def resume_point(folder: Path) -> Found:
    """The checkpoint ``--resume`` continues from: :func:`newest_verified`.

    Raises:
        FileNotFoundError: ``folder`` holds no checkpoint at all.
        ValueError: It holds checkpoints, none of them intact (each named with what is
            wrong with it).
    """
    folder = Path(folder)
    found = newest_verified(folder)
    if found is not None:
        return found
    damaged = [folder / n for n in (NAME, PREVIOUS) if (folder / n).is_file()]
    damaged += [folder / n for n in DCP_CANDIDATES[1:] if (folder / n).is_dir()]
    if not damaged:
        raise FileNotFoundError(f"no checkpoint to resume in {folder}")
    reasons = []
    for path in damaged:
        try:
            if path.is_dir():
                read_dcp(path, {})
            else:
                _load(path, _payload(path, ""))
        except (OSError, ValueError) as err:
            reasons.append(str(err))
    raise ValueError(f"no intact checkpoint to resume in {folder}: " + "; ".join(reasons))
