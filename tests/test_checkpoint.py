"""Checkpoints that lose nothing: a failure between writing and renaming leaves the last
good checkpoint, and a damaged, empty, truncated or foreign file is a one-line error
naming the file (and the previous checkpoint), never a traceback or a silent load."""

from __future__ import annotations

import io
import json
import random

import pytest
import torch

from thermokfac.cli import main
from thermokfac.experiments import checkpoint
from thermokfac.experiments.train import Run, TrainConfig

TINY = ["--data", "digits", "--width", "16", "--steps", "4", "--eval-every", "2",
        "--batch-size", "32", "--no-progress", "--checkpoint-every", "2"]


def _state(value: float) -> dict:
    return {"weights": torch.full((3,), value), "step": int(value)}


def test_round_trip_keeps_the_previous_checkpoint(tmp_path):
    checkpoint.write(tmp_path, _state(1.0))
    checkpoint.write(tmp_path, _state(2.0))
    assert torch.equal(checkpoint.read(tmp_path)["weights"], torch.full((3,), 2.0))
    previous = tmp_path / checkpoint.PREVIOUS
    assert previous.exists() and not (tmp_path / (checkpoint.NAME + ".tmp")).exists()


def test_failure_between_write_and_rename_leaves_the_last_good_checkpoint(tmp_path):
    checkpoint.write(tmp_path, _state(1.0))

    def killed():
        raise KeyboardInterrupt("killed between write and rename")
    with pytest.raises(KeyboardInterrupt):
        checkpoint.write(tmp_path, _state(2.0), before_rename=killed)
    assert checkpoint.read(tmp_path)["step"] == 1  # the old one, whole
    checkpoint.write(tmp_path, _state(3.0))       # and the next save works
    assert checkpoint.read(tmp_path)["step"] == 3


@pytest.mark.parametrize("damage", ["empty", "truncated", "foreign", "torch-file", "version"])
def test_damaged_files_are_named_errors(tmp_path, damage):
    checkpoint.write(tmp_path, _state(1.0))
    checkpoint.write(tmp_path, _state(2.0))
    path = tmp_path / checkpoint.NAME
    data = path.read_bytes()
    if damage == "empty":
        path.write_bytes(b"")
    elif damage == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "foreign":
        path.write_bytes(b"PK\x03\x04 something else entirely")
    elif damage == "torch-file":
        torch.save(_state(5.0), path)  # a plain torch.save: no header
    else:
        path.write_bytes(data.replace(b'"version": 1', b'"version": 9', 1))
    with pytest.raises(ValueError, match=str(path)) as err:
        checkpoint.read(tmp_path)
    assert checkpoint.PREVIOUS in str(err.value)


def test_every_single_byte_flip_is_caught(tmp_path):
    """Flip one byte anywhere (header or payload): never a silent load."""
    checkpoint.write(tmp_path, _state(1.0))
    path = tmp_path / checkpoint.NAME
    data = bytearray(path.read_bytes())
    rng = random.Random(0)
    for position in rng.sample(range(len(data)), 60):
        flipped = bytearray(data)
        flipped[position] ^= 1 << rng.randrange(8)
        path.write_bytes(bytes(flipped))
        with pytest.raises(ValueError):
            checkpoint.read(tmp_path)


def test_cli_resume_falls_back_to_the_newest_intact_checkpoint(tmp_path, capsys):
    """A damaged ``checkpoint.pt`` beside an intact previous one: the resume continues
    from the previous one and says so in one line naming both; when both are damaged,
    a one-line error naming both (exit status 2)."""
    out = tmp_path / "run"
    assert main(["train", *TINY, "--out", str(out)]) == 0
    path, previous = out / checkpoint.NAME, out / checkpoint.PREVIOUS
    saved_step = checkpoint.read(out)["step"]
    step_before = torch.load(io.BytesIO(previous.read_bytes().partition(b"\n")[2]),
                             weights_only=False)["step"]
    path.write_bytes(path.read_bytes()[:-100])
    capsys.readouterr()
    assert main(["train", *TINY, "--out", str(out), "--resume", "--steps", "6"]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"from {previous} (step {step_before})" in err[0]
    assert f"{path} is truncated or damaged" in err[0]
    assert json.loads((out / "results.json").read_text())["steps"] == 6 > saved_step - 1
    for name in (checkpoint.NAME, checkpoint.PREVIOUS):
        (out / name).write_bytes((out / name).read_bytes()[:-100])
    assert main(["train", *TINY, "--out", str(out), "--resume"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no intact checkpoint" in err[0]
    assert str(path) in err[0] and str(previous) in err[0]


def test_run_resume_uses_the_checked_file(tmp_path):
    cfg = TrainConfig(data="digits", width=16, steps=4, eval_every=2, batch_size=32, seed=1)
    run = Run(cfg, tmp_path / "run")
    run.train(progress=False)
    resumed = Run.resume(tmp_path / "run", steps=6)
    assert resumed.step == 4
    for p, q in zip(run.model.parameters(), resumed.model.parameters()):
        assert torch.equal(p, q)


def test_non_empty_out_needs_overwrite_or_resume(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", *TINY, "--out", str(out)]) == 0
    before = (out / checkpoint.NAME).read_bytes()
    capsys.readouterr()
    assert main(["train", *TINY, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is not empty" in err[0] and "--overwrite" in err[0]
    assert (out / checkpoint.NAME).read_bytes() == before  # nothing was touched
    assert main(["train", *TINY, "--out", str(out), "--overwrite", "--seed", "5"]) == 0
    assert json.loads((out / "config.json").read_text())["seed"] == 5


def test_resume_applies_resumable_flags_and_refuses_the_others(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", *TINY, "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["train", "--out", str(out), "--resume", "--width", "64", "--solver",
                 "eigh", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "width: saved 16, given 64" in err and "solver: saved 'cholesky', given 'eigh'" in err
    assert main(["train", "--out", str(out), "--resume", "--steps", "6", "--lr", "0.0005",
                 "--no-progress"]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["steps"] == 6 and config["lr"] == 0.0005 and config["width"] == 16
    assert json.loads((out / "results.json").read_text())["steps"] == 6


def test_ctrl_c_saves_and_leaves_cleanly(tmp_path):
    """SIGINT mid-run: the run stops at the next step boundary, writes its checkpoint,
    logs and summary, exits with 128 + SIGINT, and resumes from there."""
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "run"
    code = "import sys; from thermokfac.cli import main; sys.exit(main(sys.argv[1:]))"
    proc = subprocess.Popen([sys.executable, "-c", code, "train", "--data", "digits",
                             "--width", "16", "--steps", "100000", "--eval-every", "5",
                             "--batch-size", "32", "--no-progress", "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (out / checkpoint.NAME).exists() and time.time() < deadline:
        time.sleep(0.2)
    assert (out / checkpoint.NAME).exists(), proc.stderr.read() if proc.poll() else ""
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGINT, err[-2000:]
    results = json.loads((out / "results.json").read_text())
    assert 5 <= results["steps"] < 100000
    assert len((out / "metrics.csv").read_text().splitlines()) >= 2
    resumed = Run.resume(out, steps=results["steps"] + 2)
    assert resumed.step == results["steps"]


def test_limit_zero_is_a_one_line_error(tmp_path, capsys):
    assert main(["train", "--data", "digits", "--limit", "0", "--no-progress", "--out",
                 str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "limit=0 must be a positive number" in err[0]
