"""The run-folder rules, in one place: one run per folder (:class:`RunFolderLock`), what an
existing folder may hold before a command writes into it (:func:`check_out`), and which
checkpoint in it is intact (:func:`intact_checkpoint`, for fault messages).

The lock is an advisory ``flock`` on ``FOLDER/.thermokfac.lock``, whose text names the
owner (process id, host, command, start time). The kernel drops a ``flock`` when its
process dies, however it dies, so a lock file whose ``flock`` can be taken belongs to a
run that is gone: on the same host it is taken over with a message; a lock written on
another host is never taken over automatically (its owner may be alive on a file
system whose locks this host does not see). A lock whose owner is alive is never broken,
whatever the flags (``--overwrite`` and ``--resume`` included).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import Any

LOCK_NAME = ".thermokfac.lock"

log = logging.getLogger("thermokfac")


class FolderInUseError(ValueError):
    """Another live run holds the folder's lock (or a folder above it)."""


class RunFolderError(OSError):
    """The run folder cannot be created or locked (a fault of the machine: read-only,
    full, permissions, a path that cannot hold folders)."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        return True
    return True


def _owner(path: Path) -> dict[str, Any] | None:
    try:
        text = path.read_text()
    except (FileNotFoundError, IsADirectoryError):
        return None
    try:
        owner = json.loads(text) if text.strip() else None
    except json.JSONDecodeError:
        owner = {"unreadable": text[:80]}
    return owner if isinstance(owner, dict) else None


def _describe(owner: dict[str, Any] | None) -> str:
    if not owner:
        return "another process"
    if "unreadable" in owner:
        return f"an unreadable lock ({owner['unreadable']!r})"
    return (f"{owner.get('command', 'a thermokfac command')} (process {owner.get('pid')} on "
            f"host {owner.get('host')}, since {owner.get('since', '?')})")


def _held_elsewhere(path: Path) -> dict[str, Any] | None:
    """The owner of the lock file ``path`` if a live process holds it, else ``None``."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except (FileNotFoundError, NotADirectoryError):
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _owner(path) or {}
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


class RunFolderLock:
    """One run per folder: an advisory lock on ``folder/.thermokfac.lock``.

    Args:
        folder: The run folder (created if missing; it must not be a file).
        command: What holds it, for the message a second run gets (e.g. ``"train"``).

    Raises:
        FolderInUseError: (from :meth:`acquire`) A live process holds the folder, or a
            folder above it (a sweep's runs work under the sweep's lock), or the lock was
            written on another host; the message names the folder and the owner.
        RunFolderError: The folder or its lock file cannot be created (read-only,
            full, permissions).
    """

    def __init__(self, folder: Path, command: str) -> None:
        self.folder = Path(folder)
        self.command = command
        self.path = self.folder / LOCK_NAME
        self._fd: int | None = None
        self._created = False

    def acquire(self) -> RunFolderLock:
        """Take the lock (see the class); returns ``self``."""
        for parent in self.folder.resolve().parents:
            owner = _held_elsewhere(parent / LOCK_NAME)
            if owner is not None:
                raise FolderInUseError(
                    f"--out {self.folder} is inside {parent}, which {_describe(owner)} is "
                    "using; wait for it to finish or choose another --out")
        self._created = not self.folder.exists()
        host = socket.gethostname()
        while True:
            try:
                self.folder.mkdir(parents=True, exist_ok=True)
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as err:
                raise RunFolderError(err.errno, f"cannot create the run folder or its lock "
                                     f"({err.strerror})", str(err.filename or self.path)
                                     ) from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise FolderInUseError(
                    f"--out {self.folder} is in use by {_describe(_owner(self.path))}; "
                    "wait for it to finish or choose another --out") from None
            try:  # the file we locked may have been released and removed meanwhile
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        try:
            self._take_over(fd, host)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        return self

    def _take_over(self, fd: int, host: str) -> None:
        owner = _owner(self.path)
        if owner and owner.get("host") not in (None, host):
            raise FolderInUseError(
                f"--out {self.folder} is locked by {_describe(owner)}, another host; a "
                "lock from another host is never broken automatically: if no run uses "
                f"the folder, delete {self.path}")
        if owner and _alive(int(owner.get("pid", -1))) and owner.get("pid") != os.getpid() \
                and "unreadable" not in owner:
            raise FolderInUseError(
                f"--out {self.folder} is in use by {_describe(owner)}, which is still "
                "running; wait for it to finish or choose another --out")
        if owner:
            log.warning("thermokfac: taking over the stale lock of %s: %s is gone",
                        self.folder, _describe(owner))
        text = json.dumps({"pid": os.getpid(), "host": host, "command": self.command,
                           "since": time.strftime("%Y-%m-%dT%H:%M:%S")})
        os.ftruncate(fd, 0)
        os.pwrite(fd, text.encode(), 0)
        os.fsync(fd)

    def release(self) -> None:
        """Remove the lock file and drop the lock (idempotent); a folder that
        :meth:`acquire` created and nothing was written into is removed too."""
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            self.path.unlink()
        os.close(self._fd)
        self._fd = None
        if self._created:
            with contextlib.suppress(OSError):  # not empty: the run wrote its files
                self.folder.rmdir()

    def __enter__(self) -> RunFolderLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def check_out(out: Path, resume: bool, overwrite: bool) -> None:
    """What ``--out`` may be before a command writes into it.

    Raises:
        NotADirectoryError: ``out`` (or a folder above it) is a file (an environment
            fault, exit status 3).
        ValueError: ``out`` holds files (other than the lock) and neither ``resume`` nor
            ``overwrite`` is given.
    """
    out = Path(out)
    for path in (out, *out.parents):
        if path.exists() and not path.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, "a file, where --out needs a folder",
                                     str(path))
    if resume or overwrite or not out.is_dir():
        return
    if any(p.name != LOCK_NAME for p in out.iterdir()):
        raise ValueError(f"--out {out} is not empty: pass --overwrite to replace its "
                         "files, or --resume to continue the run saved there")


def intact_checkpoint(out: Path | None) -> str:
    """A sentence naming the newest verified checkpoint in ``out`` (for fault messages)."""
    if out is None:
        return ""
    from . import checkpoint

    found = checkpoint.newest_verified(Path(out))
    if found is None:
        return "no checkpoint of this run is on disk yet"
    step = "" if found.step is None else f" (step {found.step})"
    return f"the last checkpoint, {found.path}{step}, is intact"
