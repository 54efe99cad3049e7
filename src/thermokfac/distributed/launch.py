"""Start N local processes of a distributed job (gloo, file store) — for tests, the
``profile --nproc`` experiment and quick trials without ``torchrun``.

    run_workers("package.module:function", nproc=2, args=["out.pt"])

Each worker process initialises the default process group (rank, world size, a file
store in a fresh temporary folder), calls ``function(*args)`` and exits with
``os._exit`` — without tearing the process group down, which in torch's gloo backend
can deadlock at interpreter exit when DDP was used.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import tempfile
from datetime import timedelta
from pathlib import Path


def run_workers(target: str, nproc: int, args: list[str] | None = None, *,
                timeout: float = 300.0, threads: int = 1, backend: str = "gloo",
                extra_path: str | None = None) -> list[str]:
    """Run ``target`` (``"module:function"``) in ``nproc`` processes; raise on failure.

    Args:
        target: ``"module:function"``, called with ``*args`` (as strings) in each
            process once its process group is initialised.
        nproc: Processes to start.
        args: Extra command-line arguments handed to the function.
        timeout: Seconds before the job is killed.
        threads: Torch intra-op threads per process.
        backend: The process group's backend (``"gloo"`` or ``"nccl"``).
        extra_path: A folder prepended to the workers' ``PYTHONPATH``.

    Returns:
        Each rank's standard output.

    Raises:
        ValueError: If ``nproc`` < 1.
        RuntimeError: If a worker fails or the job exceeds ``timeout`` seconds (the
            workers' stderr is in the message).
    """
    if nproc < 1:
        raise ValueError(f"nproc={nproc!r} must be a positive integer")
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    if extra_path:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [extra_path, env.get("PYTHONPATH")]))
    with tempfile.TemporaryDirectory() as tmp:
        store = str(Path(tmp) / "store")
        procs = [subprocess.Popen(
            [sys.executable, "-m", "thermokfac.distributed.worker", target, str(rank),
             str(nproc), store, backend, str(threads), *(args or [])],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for rank in range(nproc)]
        errors, outputs = [], []
        for rank, proc in enumerate(procs):
            try:
                out, err = proc.communicate(timeout=timeout)
                outputs.append(out)
            except subprocess.TimeoutExpired:
                for p in procs:
                    p.kill()
                raise RuntimeError(f"distributed job {target} exceeded {timeout:g} s") from None
            if proc.returncode != 0:
                errors.append(f"rank {rank} exited {proc.returncode}:\n{err[-3000:]}")
        if errors:
            raise RuntimeError("\n".join(errors))
        return outputs


#: The longest collective timeout accepted (one week).
MAX_TIMEOUT_S = 7 * 24 * 3600


def collective_timeout() -> timedelta:
    """How long a collective waits for its peers before failing: ``THERMOKFAC_DIST_TIMEOUT``
    seconds (default 300), so that a failed rank cannot hang the others for long."""
    text = os.environ.get("THERMOKFAC_DIST_TIMEOUT", "300")
    try:
        seconds = float(text)
    except ValueError:
        seconds = math.nan
    if not 0 < seconds <= MAX_TIMEOUT_S:
        raise ValueError(f"THERMOKFAC_DIST_TIMEOUT={text!r} must be a number of seconds in "
                         f"(0, {MAX_TIMEOUT_S}]")
    return timedelta(seconds=seconds)
