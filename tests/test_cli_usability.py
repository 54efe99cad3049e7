"""The command line as a new user reads it: help, choices and defaults per command, only
a command's own options, config files, progress off a terminal, TensorBoard, --data-dir,
config.json for every command, and figures in percent with no ``None`` in them."""

from __future__ import annotations

import gzip
import json
import logging
import re
import shutil
import sys
from pathlib import Path

import matplotlib.pyplot as plt
import pytest

from thermokfac import plots
from thermokfac._cli_parser import build_parser
from thermokfac.cli import main
from thermokfac.experiments.config import NOT_TAKEN, TrainConfig, read_config_file
from thermokfac.experiments.tasks import load_task

TINY = ["--data", "digits", "--width", "32", "--steps", "12", "--eval-every", "6",
        "--batch-size", "64"]
COMMANDS = ("train", "compare", "profile", "scaling", "quantize", "plan", "breakeven",
            "sweep", "score", "frontier", "plot")


def _help(capsys, *argv: str) -> str:
    with pytest.raises(SystemExit) as done:
        main([*argv, "--help"])
    assert done.value.code == 0
    return capsys.readouterr().out


def _options(text: str) -> str:
    """The options part of a help text (after the usage), on one line."""
    return " ".join(text[text.index("options:"):].split())


def test_top_level_help_says_what_the_tool_does_and_lists_every_command(capsys):
    text = _help(capsys)
    assert text.splitlines()[0].startswith("usage: thermokfac")
    assert "train with K-FAC whose inversions and solves run on exact digital solvers" in text
    for command in COMMANDS:  # one entry each under "commands", with its line of help
        assert re.search(rf"\n    {command}\s+\S", text), command


@pytest.mark.parametrize("command", [c for c in COMMANDS if c != "plot"])
def test_every_option_has_help_and_enumerated_ones_list_their_choices(capsys, command):
    parser_text = _help(capsys, command)
    parser = build_parser({c: None for c in COMMANDS})
    sub = parser._subparsers._group_actions[0].choices[command]
    for action in sub._actions:
        if action.option_strings and action.dest != "help":
            assert action.help, f"{command} {action.option_strings} has no help"
    for flag, values in (("--model", ("mlp", "resnet", "gpt")),
                         ("--solver", ("cholesky", "eigh", "cg", "thermodynamic")),
                         ("--method", ("none", "inverse", "solve")),
                         ("--backend", ("closed-form", "trajectory", "euler-maruyama")),
                         ("--quantizer", ("nearest", "conservative", "stochastic")),
                         ("--settle-model", ("rc", "rc_over_alpha_min", "target_error"))):
        options = parser_text[parser_text.index("options:"):]
        if flag + " " in options:
            line = options[options.index(flag + " "):].split("\n")[0]
            assert all(v in line for v in values), (command, flag, line)


def test_each_command_shows_its_own_defaults(capsys):
    text = _options(_help(capsys, "quantize"))
    for flag, default in (("--model", "resnet"), ("--data", "fashion-mnist"),
                          ("--optimizer", "sgd"), ("--lr", "0.05")):
        block = text[text.index(flag + " "):]
        assert f"(default: {default})" in block[:400], flag
    text = _options(_help(capsys, "train"))
    assert "(default: digits)" in text[text.index("--data "):][:200]


@pytest.mark.parametrize("argv", [["plan", "--steps", "5"], ["plan", "--lr", "7", "--steps", "5"],
                                  ["compare", "--no-kfac"], ["compare", "--solver", "eigh"],
                                  ["quantize", "--input-bits", "8"]])
def test_commands_refuse_options_they_would_ignore(tmp_path, capsys, argv):
    with pytest.raises(SystemExit) as done:  # argparse's exit, status 2
        main([*argv, "--out", str(tmp_path / "o")])
    assert done.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unrecognized arguments" in err[0]
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("suffix", [".json", ".toml"])
def test_config_file_sets_options_flags_override_and_the_merge_is_saved(tmp_path, suffix):
    values = {"data": "digits", "width": 16, "steps": 4, "eval_every": 2, "batch_size": 32,
              "lr": 0.01, "kfac": True}
    path = tmp_path / f"run{suffix}"
    if suffix == ".json":
        path.write_text(json.dumps(values))
    else:
        path.write_text("\n".join(f"{k.replace('_', '-')} = {json.dumps(v)}"
                                  for k, v in values.items()))
    out = tmp_path / "run"
    assert main(["train", "--config", str(path), "--lr", "0.02", "--no-progress",
                 "--out", str(out)]) == 0
    saved = json.loads((out / "config.json").read_text())
    assert {k: saved[k] for k in values} == {**values, "lr": 0.02}  # the flag wins
    assert json.loads((out / "results.json").read_text())["steps"] == 4


@pytest.mark.parametrize("content, match", [
    ({"widht": 16}, "'widht' is not a setting"),
    ({"steps": "ten"}, "steps='ten' must be of type int"),
    ({"kfac": 1}, "kfac=1 must be of type bool"),
    ({"solver": "lu"}, "solver='lu' is not one of"),
    ([1, 2], "must hold a table"),
])
def test_bad_config_file_is_a_one_line_error(tmp_path, capsys, content, match):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(content))
    with pytest.raises(ValueError, match=match):
        read_config_file(path)
    assert main(["train", "--config", str(path), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(path) in err[0]


def test_config_file_refuses_what_the_command_sets_itself(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"kfac": True}))
    assert "kfac" in NOT_TAKEN["compare"]
    with pytest.raises(ValueError, match="'kfac' is set by this command"):
        read_config_file(path, "compare")
    (tmp_path / "c.yaml").write_text("kfac: true")
    with pytest.raises(ValueError, match=r"must be \.json or \.toml"):
        read_config_file(tmp_path / "c.yaml")


def test_progress_off_a_terminal_is_one_line_per_evaluation(tmp_path, capsys):
    assert not sys.stderr.isatty()  # pytest captures stderr
    assert main(["train", *TINY, "--out", str(tmp_path / "r")]) == 0
    lines = capsys.readouterr().err.strip().splitlines()
    assert [ln.split(":")[0] for ln in lines] == ["mlp/digits", "mlp/digits"]
    assert "step 6/12 loss" in lines[0] and "val_accuracy" in lines[0]
    assert "\r" not in "".join(lines) and "it/s" not in "".join(lines)  # no bar
    assert main(["train", *TINY, "--no-progress", "--out", str(tmp_path / "q")]) == 0
    assert capsys.readouterr().err == ""


def test_sweep_names_each_run_and_announces_left_out_modules_once(tmp_path, capsys, caplog):
    spec = {"target": 0.99, "seeds": [0, 1],
            "base": {"data": "digits", "model": "resnet", "width": 4, "depth": 1,
                     "batch_size": 32, "steps": 2, "eval_every": 2, "limit": 200},
            "arms": [{"name": "kfac", "lrs": [0.01, 0.02],
                      "set": {"optimizer": "sgd", "kfac": True}}]}
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(spec))
    with caplog.at_level(logging.WARNING, logger="thermokfac"):
        assert main(["sweep", str(path), "--out", str(tmp_path / "s")]) == 0
    err = capsys.readouterr().err
    assert "sweep 1/4: kfac, batch 32, lr 0.01, seed 0" in err
    assert "sweep 4/4: kfac, batch 32, lr 0.02, seed 1" in err
    notices = [r for r in caplog.records if "leaves these modules" in r.getMessage()]
    assert len(notices) == 1  # four preconditioners built, one notice
    assert logging.getLogger("thermokfac").filters == []  # the filter left with the command


def test_tensorboard_logs_scalars(tmp_path):
    event_accumulator = pytest.importorskip(
        "tensorboard.backend.event_processing.event_accumulator")
    logs = tmp_path / "tb"
    assert main(["train", *TINY, "--kfac", "--no-progress", "--tensorboard", str(logs),
                 "--out", str(tmp_path / "r")]) == 0
    acc = event_accumulator.EventAccumulator(str(logs))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "val/loss", "val/accuracy", "time/curvature_s"} <= tags
    assert [e.step for e in acc.Scalars("train/loss")] == list(range(1, 13))
    metrics = json.loads((tmp_path / "r" / "results.json").read_text())["final"]
    assert acc.Scalars("val/accuracy")[-1].value == pytest.approx(metrics["val_accuracy"])


def test_tensorboard_missing_is_a_one_line_error(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails
    assert main(["train", *TINY, "--tensorboard", str(tmp_path / "tb"),
                 "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "tensorboard package" in err[0] and "pip install" in err[0]


def test_data_dir_is_read_for_every_file_backed_data_set(tmp_path):
    import sklearn

    folder = tmp_path / "digits"
    folder.mkdir()
    shutil.copy(Path(sklearn.__file__).parent / "datasets" / "data" / "digits.csv.gz", folder)
    ours, installed = load_task("digits", data_dir=str(folder)), load_task("digits")
    assert ours.train[0].equal(installed.train[0]) and ours.val[1].equal(installed.val[1])
    texts = tmp_path / "texts"
    texts.mkdir()
    (texts / "play.txt").write_text("to be or not to be " * 50)
    corpus = load_task("shakespeare", data_dir=str(texts))
    assert corpus.meta["vocab"] == len(set("to be or not to be "))
    with pytest.raises(FileNotFoundError, match="--data-dir"):
        load_task("fashion-mnist", data_dir=str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="apt-get install"):
        load_task("fashion-mnist", data_dir=str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match=r"mnist_5k\.csv\.gz"):
        load_task("mnist5k", data_dir=str(tmp_path / "nowhere"))


def test_data_dir_reads_fashion_mnist_from_a_copy(tmp_path):
    source = Path("/usr/share/datasets/fashion-mnist")
    if not (source / "t10k-labels-idx1-ubyte.gz").exists():
        pytest.skip("Fashion-MNIST is not installed")
    copy = tmp_path / "fm"
    shutil.copytree(source, copy)
    with gzip.open(copy / "t10k-labels-idx1-ubyte.gz", "rb") as fh:
        raw = bytearray(fh.read())
    raw[8] = (raw[8] + 1) % 10  # the copy's first validation label differs
    with gzip.open(copy / "t10k-labels-idx1-ubyte.gz", "wb") as fh:
        fh.write(bytes(raw))
    ours = load_task("fashion-mnist", data_dir=str(copy), limit=100)
    installed = load_task("fashion-mnist", limit=100)
    assert int(ours.val[1][0]) == (int(installed.val[1][0]) + 1) % 10


@pytest.mark.parametrize("argv", [
    ["compare", *TINY, "--optimizer", "sgd", "--methods", "m2"],
    ["scaling", "--ns", "8", "16", "--repeats", "1"],
    ["plan", "--data", "digits", "--width", "16", "--record-steps", "0"],
])
def test_every_command_writes_its_settings(tmp_path, argv):
    out = tmp_path / "o"
    assert main([*argv, "--no-progress", "--out", str(out)]) == 0
    saved = json.loads((out / "config.json").read_text())
    assert saved["command"] == argv[0] and saved["out"] == str(out)
    if argv[0] != "scaling":
        assert saved["data"] == "digits"


def test_figures_show_accuracy_in_percent_and_never_none(tmp_path, monkeypatch):
    out = tmp_path / "r"
    assert main(["train", *TINY, "--no-progress", "--out", str(out)]) == 0
    seen = []
    original = plots._save

    def keep(fig, path, *args, **kwargs):
        texts = plots.figure_texts(fig)
        axis = next((a for a in fig.axes if "accuracy" in a.get_ylabel()), None)
        ticks = [] if axis is None else [float(t.get_text().replace("−", "-"))
                                         for t in axis.get_yticklabels() if t.get_text()]
        seen.append((texts, ticks))
        return original(fig, path, *args, **kwargs)

    monkeypatch.setattr(plots, "_save", keep)
    plots.plot_train(out)
    texts, ticks = seen[0]
    accuracy = json.loads((out / "results.json").read_text())["final"]["val_accuracy"]
    assert "val accuracy (%)" in texts
    assert min(ticks) <= 100 * accuracy <= max(ticks) and max(ticks) > 1.0  # percent
    assert not any("None" in t for t in texts)
    compare = tmp_path / "c"  # the comparison's curves, labels and caption too
    assert main(["compare", *TINY, "--optimizer", "sgd", "--methods", "m2", "--no-progress",
                 "--out", str(compare)]) == 0
    seen.clear()
    plots.plot_compare(compare)
    texts, ticks = seen[0]  # compare.png (spectra.png follows)
    assert "val accuracy (%)" in texts and max(ticks) > 1.0
    assert not any("None" in t or "nan" in t.lower().split() for t in texts), texts
    plt.close("all")


def test_train_config_fields_all_have_help():
    from dataclasses import fields
    for f in fields(TrainConfig):
        assert f.metadata.get("help"), f.name
