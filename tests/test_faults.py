"""Runs that survive the machine and a careless user: one run per folder, faults of the
machine as one line with their exit status (bad input 2, environment 3, interrupted
128 + signal, unexpected 1), checkpoints loaded all-or-nothing with their content
checked, a resume from the newest intact checkpoint, and every setting range-checked
or refused when the run would not use it.

Real faults where the machine allows: a full disk (a small tmpfs, needs root), a file
size limit (``RLIMIT_FSIZE``: Python ignores SIGXFSZ, so the write fails with EFBIG);
a permission error is injected (CI runs as root, which writes into read-only folders).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from thermokfac import KFACPreconditioner
from thermokfac.cli import main
from thermokfac.experiments import checkpoint
from thermokfac.experiments.config import TrainConfig
from thermokfac.experiments.run_folder import LOCK_NAME, RunFolderLock

TINY = ["--data", "digits", "--width", "16", "--steps", "4", "--eval-every", "2",
        "--batch-size", "32", "--no-progress", "--checkpoint-every", "2"]
CLI = [sys.executable, "-m", "thermokfac.cli"]
HOLD = ("import sys; from thermokfac.experiments.run_folder import RunFolderLock; "
        "RunFolderLock(sys.argv[1], 'thermokfac train').acquire(); print('held', flush=True);"
        " sys.stdin.read()")


def _one_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


@pytest.fixture
def holder(tmp_path):
    """A live process holding ``tmp_path / "run"``'s lock until killed."""
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    yield out, proc
    proc.kill()
    proc.wait()


# ------------------------------------------------------------------ one run per folder
@pytest.mark.parametrize("flags", [[], ["--overwrite"], ["--resume"]])
def test_a_live_lock_is_never_broken(holder, capsys, flags):
    out, proc = holder
    assert main(["train", *TINY, "--out", str(out), *flags]) == 2
    line = _one_line(capsys)
    assert f"--out {out} is in use" in line and f"process {proc.pid}" in line
    assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME]  # nothing written


def test_a_folder_inside_a_locked_one_is_refused(holder, capsys):
    out, proc = holder
    assert main(["train", *TINY, "--out", str(out / "runs" / "a")]) == 2
    line = _one_line(capsys)
    assert f"inside {out.resolve()}" in line and f"process {proc.pid}" in line
    assert not (out / "runs").exists()


def test_a_stale_lock_is_taken_over_with_a_message(holder, capsys, caplog):
    out, proc = holder
    proc.kill()  # SIGKILL: no cleanup, the lock file stays with its owner's pid
    proc.wait()
    assert (out / LOCK_NAME).exists()
    assert main(["train", *TINY, "--out", str(out)]) == 0
    assert any("taking over the stale lock" in r.getMessage() and str(proc.pid)
               in r.getMessage() for r in caplog.records)
    assert not (out / LOCK_NAME).exists()  # released at exit
    assert checkpoint.read(out)["step"] == 4


def test_a_lock_from_another_host_is_not_taken_over(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / LOCK_NAME).write_text(json.dumps({"pid": 1, "host": "elsewhere.example",
                                             "command": "thermokfac train"}))
    assert main(["train", *TINY, "--out", str(out)]) == 2
    line = _one_line(capsys)
    assert "another host" in line and "elsewhere.example" in line
    assert str(out / LOCK_NAME) in line  # says what to delete if nothing runs there


def test_two_runs_started_at_once_one_wins_whole(tmp_path):
    """Two ``train`` processes on one folder at the same moment: one trains, the other
    is refused in one line before writing; the folder holds the winner's files only."""
    out = tmp_path / "run"
    procs = [subprocess.Popen([*CLI, "train", *TINY, "--seed", str(seed), "--out", str(out)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for seed in (1, 2)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 2], results
    winner = next(seed for seed, (code, _) in zip((1, 2), results) if code == 0)
    loser_err = next(err for code, err in results if code == 2).strip().splitlines()
    assert len(loser_err) == 1 and ("is in use" in loser_err[0]
                                    or "is not empty" in loser_err[0])
    assert json.loads((out / "config.json").read_text())["seed"] == winner
    assert json.loads((out / "results.json").read_text())["config"]["seed"] == winner
    assert checkpoint.read(out)["config"]["seed"] == winner


def test_a_refused_run_leaves_no_new_folder(tmp_path, capsys):
    out = tmp_path / "new"
    assert main(["train", *TINY, "--lr", "nan", "--out", str(out)]) == 2
    assert "lr=nan" in _one_line(capsys)
    assert not out.exists()


def _tiny_sweep(tmp_path: Path, target: float) -> tuple[Path, Path]:
    """A one-run sweep spec (Adam on digits, 4 steps) and its output folder, run once."""
    spec = {"target": target, "seeds": [0],
            "base": {"data": "digits", "width": 16, "batch_size": 32, "steps": 4,
                     "eval_every": 2},
            "arms": [{"name": "adam", "lrs": [1e-2]}]}
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(spec))
    out = tmp_path / "sweep"
    assert main(["sweep", str(path), "--out", str(out), "--no-progress"]) == 0
    return path, out


def test_the_lock_is_released_after_a_sweep_and_its_runs_work_under_it(tmp_path):
    _, out = _tiny_sweep(tmp_path, target=0.5)
    assert (out / "runs" / "adam" / "lr0.01_seed0" / "result.json").exists()
    assert not list(out.rglob(LOCK_NAME))


def test_lock_api_is_exclusive_within_one_host(tmp_path):
    first = RunFolderLock(tmp_path / "a", "test").acquire()
    with pytest.raises(ValueError, match="is in use"):
        RunFolderLock(tmp_path / "a", "test").acquire()
    first.release()
    with RunFolderLock(tmp_path / "a", "test"):
        assert (tmp_path / "a" / LOCK_NAME).exists()
    assert not (tmp_path / "a" / LOCK_NAME).exists()


# --------------------------------------------------------------- faults of the machine
def _checkpoint_bytes(tmp_path: Path, width: int) -> int:
    probe = tmp_path / "probe"
    assert main(["train", *TINY, "--width", str(width), "--out", str(probe)]) == 0
    return (probe / checkpoint.NAME).stat().st_size


@pytest.fixture
def small_disk(tmp_path):
    """A real tmpfs of a given size (root only), unmounted afterwards."""
    mounted: list[Path] = []

    def mount(size: int) -> Path:
        where = tmp_path / f"disk{len(mounted)}"
        where.mkdir()
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs",
                               str(where)], capture_output=True, text=True)
        if proc.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
        mounted.append(where)
        return where
    try:
        yield mount
    finally:
        for where in mounted:
            subprocess.run(["umount", "-l", str(where)], check=False)


def test_a_full_disk_is_one_line_and_keeps_the_last_checkpoint(tmp_path, small_disk,
                                                                capsys):
    size = _checkpoint_bytes(tmp_path, 256)
    disk = small_disk(4096 * math.ceil((1.5 * size + 65536) / 4096))  # one checkpoint
    out = disk / "run"
    capsys.readouterr()
    assert main(["train", *TINY, "--width", "256", "--out", str(out)]) == 3
    line = _one_line(capsys)
    assert "No space left on device" in line and str(out / "checkpoint.pt.tmp") in line
    assert f"the last checkpoint, {out / checkpoint.NAME} (step 2), is intact" in line
    assert checkpoint.read(out)["step"] == 2
    assert not (out / "checkpoint.pt.tmp").exists()  # the partial file is removed
    assert not (out / LOCK_NAME).exists()
    moved = tmp_path / "moved"  # on a disk with room, the run continues
    shutil.copytree(out, moved)
    assert main(["train", "--out", str(moved), "--resume", "--no-progress"]) == 0
    assert json.loads((moved / "results.json").read_text())["steps"] == 4


def test_a_file_size_limit_is_one_line_with_status_3(tmp_path):
    import resource

    size = _checkpoint_bytes(tmp_path, 64)
    out = tmp_path / "run"

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (size // 2, size // 2))
    proc = subprocess.run([*CLI, "train", *TINY, "--width", "64", "--out", str(out)],
                          capture_output=True, text=True, preexec_fn=limit, timeout=300)
    assert proc.returncode == 3, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "File too large" in lines[0], proc.stderr
    assert "no checkpoint of this run is on disk yet" in lines[0]
    assert not (out / "checkpoint.pt.tmp").exists()


@pytest.mark.parametrize("error", [PermissionError(13, "Permission denied"),
                                   OSError(30, "Read-only file system")])
def test_an_injected_write_fault_is_one_line(tmp_path, capsys, monkeypatch, error):
    out = tmp_path / "run"
    real_open = open

    def failing_open(path, mode="r", *args, **kwargs):
        if "w" in mode and str(path).endswith(".tmp"):
            error.filename = str(path)
            raise error
        return real_open(path, mode, *args, **kwargs)
    monkeypatch.setattr(checkpoint, "open", failing_open, raising=False)
    assert main(["train", *TINY, "--out", str(out)]) == 3
    line = _one_line(capsys)
    assert error.strerror in line and "checkpoint.pt.tmp" in line
    assert "Traceback" not in line and not (out / LOCK_NAME).exists()


def test_out_that_is_a_file_is_status_3(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    for out in (tmp_path / "file", tmp_path / "file" / "run"):
        assert main(["train", *TINY, "--out", str(out)]) == 3
        line = _one_line(capsys)
        assert f"{tmp_path / 'file'}: a file, where --out needs a folder" in line


def test_debug_shows_the_traceback(tmp_path):
    with pytest.raises(ValueError, match="lr=nan"):
        main(["train", *TINY, "--lr", "nan", "--debug", "--out", str(tmp_path / "r")])


def test_interrupt_outside_the_loop_and_unexpected_errors(tmp_path, capsys, monkeypatch):
    from thermokfac.experiments import train

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(train, "load_task", interrupted)
    assert main(["train", *TINY, "--out", str(tmp_path / "a")]) == 128 + signal.SIGINT
    assert "interrupted" in _one_line(capsys)

    def broken(*args, **kwargs):
        raise RuntimeError("a bug")
    monkeypatch.setattr(train, "load_task", broken)
    assert main(["train", *TINY, "--out", str(tmp_path / "b")]) == 1
    line = _one_line(capsys)
    assert "RuntimeError: a bug" in line and "--debug" in line


# ------------------------------------------------------ loading checks content, resumes
@pytest.fixture
def saved_run(tmp_path):
    out = tmp_path / "run"
    assert main(["train", *TINY, "--kfac", "--optimizer", "sgd", "--lr", "0.05",
                 "--out", str(out)]) == 0
    (out / checkpoint.PREVIOUS).unlink()
    return out


def _damage(state: dict, how: str) -> object:
    if how == "non-dict":
        return [state]
    if how == "missing part":
        return {k: v for k, v in state.items() if k != "opt"}
    if how == "field of another version":
        return {**state, "schema": 2}
    if how == "unknown setting":
        return {**state, "config": {**state["config"], "warmup": 5}}
    if how == "setting out of range":
        return {**state, "config": {**state["config"], "lr": -1.0}}
    if how == "nan factor":
        name = next(iter(state["pre"]["layers"]))
        state["pre"]["layers"][name]["a"][0, 0] = float("nan")
        return state
    if how == "nan weight":
        key = next(iter(state["model"]))
        state["model"][key].view(-1)[0] = float("inf")
        return state
    raise AssertionError(how)


@pytest.mark.parametrize(("how", "message"), [
    ("non-dict", "holds a list, not a training run's state"),
    ("missing part", "missing ['opt']"),
    ("field of another version", "parts of another version ['schema']"),
    ("unknown setting", "settings ['warmup'] are not settings"),
    ("setting out of range", "lr=-1.0 must be positive"),
    ("nan factor", "K-FAC layer"),
    ("nan weight", "NaN or infinite"),
])
def test_a_plausible_but_wrong_payload_is_a_named_refusal(saved_run, capsys, how, message):
    state = checkpoint.read(saved_run)
    checkpoint.write(saved_run, _damage(state, how))  # a valid header and checksum
    (saved_run / checkpoint.PREVIOUS).unlink()
    before = (saved_run / checkpoint.NAME).read_bytes()
    capsys.readouterr()
    assert main(["train", "--out", str(saved_run), "--resume", "--no-progress"]) == 2
    line = _one_line(capsys)
    assert message in line and str(saved_run / checkpoint.NAME) in line, line
    assert (saved_run / checkpoint.NAME).read_bytes() == before


def test_a_nan_factor_is_refused_by_the_preconditioner_changing_nothing():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 2))
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    pre = KFACPreconditioner(net, optimizer=opt)
    for _ in range(2):
        opt.zero_grad()
        net(torch.randn(8, 4)).pow(2).mean().backward()
        pre.step()
        opt.step()
    state = pre.state_dict()
    before = [t.clone() for t in pre.factors()["2"]]
    state["layers"]["2"]["g_inv"] = state["layers"]["2"]["g_inv"].clone()
    state["layers"]["2"]["g_inv"][0, 0] = float("inf")
    with pytest.raises(ValueError, match=r"checkpoint entry 2/g_inv holds NaN or infinite"):
        pre.load_state_dict(state)
    assert all(torch.equal(b, t) for b, t in zip(before, pre.factors()["2"]))
    broken = {k: v for k, v in pre.state_dict().items() if k != "shapes"}
    with pytest.raises(ValueError, match=r"misses \['shapes'\]"):
        pre.load_state_dict(broken)


def test_a_kill_between_the_renames_resumes_from_the_complete_temporary(saved_run, capsys):
    """The save wrote ``checkpoint.pt.tmp`` whole, renamed the last checkpoint to
    ``checkpoint.prev.pt`` and was killed before the second rename: the resume uses the
    temporary file (the newest) and says so."""
    state = checkpoint.read(saved_run)

    def killed():
        raise KeyboardInterrupt
    newer = {**state, "step": 4}
    with pytest.raises(KeyboardInterrupt):
        checkpoint.write(saved_run, newer, before_rename=killed)
    os.replace(saved_run / checkpoint.NAME, saved_run / checkpoint.PREVIOUS)
    capsys.readouterr()
    assert main(["train", "--out", str(saved_run), "--resume", "--steps", "6",
                 "--no-progress"]) == 0
    line = _one_line(capsys)
    assert f"from {saved_run / 'checkpoint.pt.tmp'} (step 4)" in line
    assert json.loads((saved_run / "results.json").read_text())["steps"] == 6


def test_a_fallback_from_another_run_is_refused(saved_run, capsys):
    state = checkpoint.read(saved_run)
    other = {**state, "config": {**state["config"], "width": 32}}
    checkpoint.write(saved_run, other)
    checkpoint.write(saved_run, state)  # now: previous = the other run's, then damage
    path = saved_run / checkpoint.NAME
    path.write_bytes(path.read_bytes()[:-50])
    capsys.readouterr()
    assert main(["train", "--out", str(saved_run), "--resume", "--no-progress"]) == 2
    line = _one_line(capsys)
    assert "settings differ" in line and "['width']" in line


def test_newest_verified_prefers_complete_dcp_folders(tmp_path):
    for name in checkpoint.DCP_CANDIDATES:
        (tmp_path / name).mkdir()
    assert checkpoint.newest_verified(tmp_path) is None  # none has its .metadata
    (tmp_path / "checkpoint.dcp.prev" / ".metadata").write_bytes(b"x")
    found = checkpoint.newest_verified(tmp_path)
    assert found.path.name == "checkpoint.dcp.prev"
    assert any("no .metadata" in why for _, why in found.skipped)
    (tmp_path / "checkpoint.dcp.tmp" / ".metadata").write_bytes(b"x")
    assert checkpoint.newest_verified(tmp_path).path.name == "checkpoint.dcp.tmp"
    shutil.rmtree(tmp_path / "checkpoint.dcp.prev")
    shutil.rmtree(tmp_path / "checkpoint.dcp.tmp")
    with pytest.raises(ValueError, match=r"no intact checkpoint.*no \.metadata"):
        checkpoint.resume_point(tmp_path)


# ------------------------------------------------------------------ validated settings
@pytest.mark.parametrize(("argv", "message"), [
    (["--damping", "-1"], "damping=-1.0 is out of range"),
    (["--damping", "0.1"], "damping (used only with --kfac)"),
    (["--kfac", "--input-bits", "8"], "input-bits (used only with --kfac --solver "
     "thermodynamic)"),
    (["--momentum", "0.5"], "momentum (used only with --optimizer sgd or nesterov)"),
    (["--heads", "2"], "heads (used only with --model gpt, torch-gpt or vit)"),
    (["--dist-strategy", "mem-opt"], "dist-strategy (used only with torchrun"),
    (["--lr", "inf"], "lr=inf is out of range"),
    (["--kfac", "--factor-decay", "nan"], "factor_decay=nan is out of range"),
    (["--seed", "-3"], "seed=-3 is out of range"),
    (["--steps", str(10**30)], "steps=1000000000000000000000000000000 is out of range"),
    (["--kfac", "--kl-clip", "-1"], "kl_clip=-1.0 is out of range"),
    (["--checkpoint-every", "-1"], "checkpoint_every=-1 is out of range"),
])
def test_settings_are_range_checked_and_used(tmp_path, capsys, argv, message):
    out = tmp_path / "run"
    assert main(["train", "--data", "digits", "--no-progress", *argv, "--out", str(out)]) == 2
    assert message in _one_line(capsys)
    assert not out.exists()


def test_config_file_values_are_range_checked_and_used(tmp_path, capsys):
    for values, message in (({"damping": float("inf"), "kfac": True}, "damping=inf"),
                            ({"input_bits": 8}, "input-bits (used only with"),
                            ({"weight_decay": -0.1}, "weight_decay=-0.1 is out of range")):
        path = tmp_path / "run.json"
        path.write_text(json.dumps(values))
        assert main(["train", "--config", str(path), "--no-progress", "--out",
                     str(tmp_path / "run")]) == 2
        assert message in _one_line(capsys)


@pytest.mark.parametrize(("change", "message"), [
    ({"arms": [{"name": "a", "lrs": [float("inf")]}]}, "lrs=[inf] must be a non-empty"),
    ({"seeds": ["x"]}, "seeds=['x'] must be a non-empty list of integers"),
    ({"target": float("nan")}, "target=nan must be a finite number"),
    ({"base": {"data": "digits", "momentum": 2.0}}, "momentum=2.0 is out of range"),
    ({"arms": [{"name": "a", "lrs": [0.1], "set": {"steps": 0}}]},
     "arm 'a': steps=0 must be a positive integer"),
])
def test_sweep_specs_are_checked_before_any_run(tmp_path, capsys, change, message):
    spec = {"target": 0.5, "seeds": [0], "base": {"data": "digits", "steps": 4},
            "arms": [{"name": "a", "lrs": [0.1]}], **change}
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(spec))
    out = tmp_path / "sweep"
    assert main(["sweep", str(path), "--out", str(out), "--no-progress"]) == 2
    assert message in _one_line(capsys)
    assert not (out / "runs").exists()


def test_a_damaged_sweep_result_is_run_again(tmp_path, capsys):
    path, out = _tiny_sweep(tmp_path, target=0.99)
    result = out / "runs" / "adam" / "lr0.01_seed0" / "result.json"
    whole = json.loads(result.read_text())
    result.write_text(result.read_text()[:40])
    capsys.readouterr()
    assert main(["sweep", str(path), "--out", str(out), "--no-progress", "--resume"]) == 0
    assert f"{result} is damaged" in capsys.readouterr().err
    again = json.loads(result.read_text())["final"]
    assert {k: v for k, v in again.items() if k != "train_s"} == \
        {k: v for k, v in whole["final"].items() if k != "train_s"}  # the same run again


@pytest.mark.parametrize("value", ["nan", "inf", "-5", "0", "soon", "1e9"])
def test_the_collective_timeout_variable_is_range_checked(monkeypatch, value):
    from thermokfac.distributed.launch import collective_timeout

    monkeypatch.setenv("THERMOKFAC_DIST_TIMEOUT", value)
    with pytest.raises(ValueError, match=rf"THERMOKFAC_DIST_TIMEOUT='{value}' must be a "
                       r"number of seconds in \(0, 604800\]"):
        collective_timeout()


def test_train_config_refuses_wrong_types_and_ranges_from_the_api():
    for values, message in (({"steps": True}, "steps=True must be of type int"),
                            ({"lr": "0.1"}, "lr='0.1' must be of type float"),
                            ({"momentum": 1.0}, r"momentum=1.0 is out of range; valid: \[0, 1\)"),
                            ({"target_error": 0.0}, "target_error=0.0 is out of range")):
        with pytest.raises(ValueError, match=message):
            TrainConfig(**values)


def test_input_files_that_are_folders_or_binary_and_unusable_out(tmp_path, capsys):
    folder = tmp_path / "folder"
    folder.mkdir()
    binary = tmp_path / "b.json"
    binary.write_bytes(bytes(range(128, 256)))
    cases = ((["train", *TINY, "--config", str(folder)], 2, "is a folder, not a file"),
             (["train", *TINY, "--config", str(binary)], 2, "is not a text file"),
             (["sweep", str(folder)], 2, "sweep spec"),
             (["train", *TINY, "--out", "/proc/thermokfac-run"], 3,
              "cannot create the run folder"))
    for argv, code, message in cases:
        if "--out" not in argv:
            argv = [*argv, "--out", str(tmp_path / "out")]
        assert main(argv) == code, argv
        assert message in _one_line(capsys)


def test_the_timeout_variable_is_checked_without_torchrun(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("THERMOKFAC_DIST_TIMEOUT", "-1")
    assert main(["train", *TINY, "--out", str(tmp_path / "run")]) == 2
    assert "THERMOKFAC_DIST_TIMEOUT='-1'" in _one_line(capsys)


class _Trap:
    """Unpickling this object would create ``path`` (code a checkpoint must not run)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


def test_a_checkpoint_holding_other_objects_is_refused_unrun(saved_run, capsys, tmp_path):
    marker = tmp_path / "ran"
    state = checkpoint.read(saved_run)
    checkpoint.write(saved_run, {**state, "steps": [_Trap(marker)]})  # checksum valid
    (saved_run / checkpoint.PREVIOUS).unlink()
    capsys.readouterr()
    assert main(["train", "--out", str(saved_run), "--resume", "--no-progress"]) == 2
    line = _one_line(capsys)
    assert "only tensors and plain values load" in line and str(saved_run) in line
    assert not marker.exists()


@pytest.mark.parametrize(("key", "value", "message"), [
    ("momentum", float("nan"), "momentum of parameter group 0 is nan"),
    ("weight_decay", -1.0, "weight_decay of parameter group 0 is -1.0"),
    ("betas", (0.9, 1.5), r"betas\[1\] of parameter group 0 is 1.5: it must be \[0, 1\)"),
    ("eps", float("inf"), "eps of parameter group 0 is inf"),
])
def test_base_optimizer_hyperparameters_are_checked_before_a_step(key, value, message):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 2))
    kind = torch.optim.SGD if key in ("momentum",) else torch.optim.AdamW
    opt = kind(net.parameters(), lr=0.01, **({"momentum": 0.9} if key == "momentum" else {}))
    pre = KFACPreconditioner(net, optimizer=opt)
    before = [p.detach().clone() for p in net.parameters()]
    opt.zero_grad()
    net(torch.randn(8, 4)).pow(2).mean().backward()
    grads = [p.grad.clone() for p in net.parameters()]
    opt.param_groups[0][key] = value  # as a scheduler or a loaded state could
    with pytest.raises(ValueError, match=message):
        pre.step()
    assert all(torch.equal(g, p.grad) for g, p in zip(grads, net.parameters()))
    assert all(torch.equal(b, p) for b, p in zip(before, net.parameters()))


@pytest.mark.parametrize(("env", "message"), [
    ({"RANK": "abc"}, "RANK='abc' must be an integer"),
    ({"WORLD_SIZE": "2", "RANK": "5"}, "WORLD_SIZE=2, RANK=5, LOCAL_RANK=0 are inconsistent"),
    ({"WORLD_SIZE": "0"}, "are inconsistent"),
    ({"WORLD_SIZE": "2", "RANK": "0"}, "MASTER_ADDR', 'MASTER_PORT'] not set"),
])
def test_torchrun_variables_are_checked(tmp_path, capsys, monkeypatch, env, message):
    for key in ("MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert main(["train", *TINY, "--out", str(tmp_path / "run")]) == 2
    assert message in _one_line(capsys)
    assert not (tmp_path / "run").exists()


def test_a_run_folder_removed_mid_run_is_a_fault_not_bad_input(tmp_path, capsys,
                                                                monkeypatch):
    from thermokfac.experiments import train

    out = tmp_path / "run"
    real_save = train.Run.save

    def save_after_removal(self):
        shutil.rmtree(self.out)  # someone deletes the folder while the run trains
        return real_save(self)
    monkeypatch.setattr(train.Run, "save", save_after_removal)
    assert main(["train", *TINY, "--out", str(out)]) == 3
    line = _one_line(capsys)
    assert f"{out}: the run folder was removed while the run trained" in line


def test_damaged_or_too_small_data_folders_are_bad_input(tmp_path, capsys):
    import gzip

    digits = tmp_path / "digits"
    digits.mkdir()
    (digits / "digits.csv.gz").write_bytes(gzip.compress(b"1,2,3\n"))
    truncated = tmp_path / "truncated"
    truncated.mkdir()
    (truncated / "digits.csv.gz").write_bytes(gzip.compress(b"1,2,3\n" * 100)[:30])
    text = tmp_path / "text"
    text.mkdir()
    (text / "a.txt").write_text("To be, or not to be." * 2)
    cases = ((["--data", "digits", "--data-dir", str(digits)], "could not be read"),
             (["--data", "digits", "--data-dir", str(truncated)], "could not be read"),
             (["--data", "shakespeare", "--model", "gpt", "--data-dir", str(text)],
              "each split needs more than --context 64"))
    for argv, message in cases:
        out = tmp_path / "run"
        assert main(["train", "--steps", "2", "--no-progress", *argv, "--out", str(out)]) == 2
        line = _one_line(capsys)
        assert message in line and argv[argv.index("--data-dir") + 1] in line, line
        assert not out.exists()
