"""Entry point of one worker process started by :func:`.launch.run_workers`:
``python -m thermokfac.distributed.worker TARGET RANK WORLD STORE BACKEND THREADS ARGS...``.
"""

from __future__ import annotations

import importlib
import os
import sys
import traceback

from .launch import collective_timeout


def _main(argv: list[str]) -> None:
    target, rank, world, store, backend, threads, *args = argv
    import torch
    import torch.distributed as dist

    torch.set_num_threads(int(threads))
    code = 0
    try:
        dist.init_process_group(backend, init_method=f"file://{store}", rank=int(rank),
                                world_size=int(world), timeout=collective_timeout())
        module, function = target.split(":")
        getattr(importlib.import_module(module), function)(*args)
    except BaseException:  # report, then leave without a teardown that could hang
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    _main(sys.argv[1:])
