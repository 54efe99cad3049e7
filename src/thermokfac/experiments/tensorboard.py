"""``--tensorboard DIR``: a run's scalars through TensorBoard's ``SummaryWriter``.

Per step: the training loss and each part of the step's time (``train/loss``,
``time/wall_s``, ``time/curvature_s``, …, the modelled device time under each settle
model); per evaluation: the validation metrics (``val/loss``, ``val/accuracy``, …). Needs
the ``tensorboard`` extra (``pip install -c constraints.txt -e ".[tensorboard]"``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

INSTALL = 'pip install -c constraints.txt -e ".[tensorboard]"'


class TensorBoardLog:
    """Writes a run's scalars into ``log_dir`` (created if missing).

    Raises:
        ValueError: If the ``tensorboard`` package is not installed (the message gives
            the install command): asked-for logging is never skipped silently.
    """

    def __init__(self, log_dir: Path | str) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ValueError(f"--tensorboard needs the tensorboard package, which is not "
                             f"installed: {INSTALL}") from None
        self.log_dir = Path(log_dir)
        self.writer = SummaryWriter(log_dir=str(self.log_dir))

    def step(self, step: int, record: dict[str, float]) -> None:
        """One training step's loss and timings (seconds) at global step ``step``."""
        self.writer.add_scalar("train/loss", record["loss"], step)
        for key, value in record.items():
            if key not in ("step", "loss"):
                self.writer.add_scalar(f"time/{key}", value, step)

    def evaluation(self, step: int, metrics: dict[str, Any]) -> None:
        """The validation metrics of the evaluation at ``step``."""
        for key, value in metrics.items():
            if key.startswith("val_") and isinstance(value, (int, float)):
                self.writer.add_scalar(f"val/{key[4:]}", value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
