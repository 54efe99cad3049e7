"""Long command-line runs on real data (the slow suite: ``scripts/test.sh -m slow``)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from thermokfac.cli import main

FASHION = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")
CLI_GUIDE = Path(__file__).resolve().parents[1] / "docs" / "cli.md"


@pytest.mark.slow
def test_readme_config_file_trains_kfac_ahead_of_adam_per_step(tmp_path):
    """The command-line guide's ``run.toml`` (its Fashion-MNIST K-FAC settings, run shorter on a
    subset) against Adam from the same initialisation: K-FAC is ahead after as many
    steps, as the main job reports."""
    if not FASHION.exists():
        pytest.skip("Fashion-MNIST is not installed")
    block = re.search(r"```toml\n(.*?)```", CLI_GUIDE.read_text(), re.S).group(1)
    path = tmp_path / "run.toml"
    path.write_text(block)
    short = ["--steps", "40", "--eval-every", "40", "--limit", "8000", "--no-progress"]
    assert main(["train", "--config", str(path), *short, "--out", str(tmp_path / "k")]) == 0
    assert main(["train", "--config", str(path), *short, "--no-kfac", "--optimizer", "adam",
                 "--lr", "0.001", "--out", str(tmp_path / "a")]) == 0
    kfac, adam = (json.loads((tmp_path / n / "results.json").read_text()) for n in "ka")
    assert kfac["config"]["width"] == adam["config"]["width"] == 512
    assert kfac["config"]["kfac"] and not adam["config"]["kfac"]
    assert kfac["final"]["val_accuracy"] > adam["final"]["val_accuracy"] + 0.02
