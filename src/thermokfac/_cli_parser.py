"""The command line's parser: every command, option, help text, choice and default."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path
from typing import Any

from .experiments.config import OPTIMIZERS, TrainConfig, taken_fields

_SKIP = {"seed", "threads"}


def _parse_optional(kind: Callable[[str], Any]) -> Callable[[str], Any]:
    def parse(text: str):
        return None if text.lower() in ("none", "") else kind(text)
    return parse


def _add_train_options(parser: argparse.ArgumentParser, command: str) -> None:
    """One option per :class:`TrainConfig` field the command takes, with the field's help
    and choices; ``--config FILE`` sets any of them from a file, flags override it."""
    parser.add_argument("--config", type=Path, default=None, metavar="FILE",
                        help="read settings from a JSON or TOML file of option names "
                             "(batch_size = 512); flags given as well override it")
    parser.set_defaults(command_name=command, sub_parser=parser)
    for f in fields(TrainConfig):
        if f.name in _SKIP or f.name not in taken_fields(command):
            continue
        flag = "--" + f.name.replace("_", "-")
        help_text = f.metadata["help"]
        if isinstance(f.default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default,
                                help=help_text)
            continue
        base = {"int": int, "float": float, "str": str}
        text = str(f.type)
        kind = next((v for k, v in base.items() if text.startswith(k)), str)
        if "None" in text:
            kind = _parse_optional(kind)
        choices = f.metadata["choices"]
        metavar = None if choices is None else \
            "{" + ",".join("none" if c is None else str(c) for c in choices) + "}"
        parser.add_argument(flag, type=kind, default=f.default, choices=choices,
                            metavar=metavar, help=help_text)


def _common(parser: argparse.ArgumentParser, out: str) -> None:
    parser.add_argument("--seed", type=int, default=0, help="seed of every random source")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--out", type=Path, default=Path("runs") / out, help="run folder")
    parser.add_argument("--no-progress", action="store_true",
                        help="no progress output (bars on a terminal; otherwise one line "
                             "per evaluation)")
    parser.add_argument("--debug", action="store_true",
                        help="show the traceback of an error (without it: one line and "
                             "the exit status)")
    parser.add_argument("--overwrite", action="store_true",
                        help="write into a non-empty --out, replacing the files this "
                             "command writes (without it a non-empty --out is refused)")


def _spec_runs(parser: argparse.ArgumentParser, what: str) -> None:
    """The options of a command that runs a spec's runs (``sweep``, ``frontier``)."""
    _common(parser, what)
    parser.add_argument("--seeds", type=int, nargs="+", default=None,
                        help="override the spec's seeds")
    parser.add_argument("--resume", action="store_true",
                        help=f"continue the {what} saved in --out: runs with a result.json "
                             "are read back, the others run (the spec must be the saved one)")


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Help that shows every option's default (the command's own) and keeps line breaks."""


class _Parser(argparse.ArgumentParser):
    """Argument errors as one line on stderr and exit status 2 (no usage dump)."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", _Formatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


_EPILOG = """examples:
  thermokfac train --kfac --optimizer sgd --lr 0.1          # digits, MLP, K-FAC + SGD
  thermokfac compare --data fashion-mnist --width 512 --batch-size 512 --steps 240
  thermokfac sweep configs/fashion_mnist_mlp.json --out results/fashion_mnist_mlp
  thermokfac plan --model resnet --data fashion-mnist      # SPUs and device time

'thermokfac COMMAND --help' lists a command's options with their defaults."""


_DESCRIPTION = """\
thermokfac: train with K-FAC whose inversions and solves run on exact digital solvers
or on a simulated thermodynamic (analog) device, and measure what each costs.

Every command writes its settings (config.json), results (JSON/CSV) and figures (PNG)
into its --out folder, which it locks (one run per folder). Errors are one line on
stderr and an exit status: 2 bad input, 3 a fault of the machine (disk full, read-only,
permissions), 128 + N a signal, 1 anything else (--debug shows the traceback).
Training commands also read their options from --config FILE (JSON or TOML)."""


def build_parser(handlers: dict[str, Callable[[argparse.Namespace], None]]
                 ) -> argparse.ArgumentParser:
    """The ``thermokfac`` parser; ``handlers`` maps each command to the function that
    runs it."""
    from . import __version__

    parser = _Parser(prog="thermokfac", description=_DESCRIPTION, epilog=_EPILOG)
    parser.add_argument("--version", action="version", version=f"thermokfac {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser,
                                title="commands", metavar="COMMAND")

    train = sub.add_parser("train", help="train one model on one data set, with or "
                           "without K-FAC; checkpoints, resumable",
                           description="Train one model × data × optimizer (± K-FAC).")
    _add_train_options(train, "train")
    _common(train, "train")
    train.add_argument("--resume", action="store_true",
                       help="continue the run saved in --out: --steps (a new total), --lr, "
                            "--eval-every and --threads may change; any other flag given "
                            "must match the saved run")
    train.add_argument("--tensorboard", type=Path, default=None, metavar="DIR",
                       help="also log the loss, step timings and validation metrics to "
                            "TensorBoard event files in DIR (needs the tensorboard extra)")
    train.set_defaults(func=handlers["train"])

    comp = sub.add_parser("compare", help="baseline vs K-FAC vs Thermodynamic K-FAC from one "
                          "initialisation, with the device's estimated clock (Fig. 3)",
                          description="The baseline optimizer, K-FAC in front of "
                          "--optimizer (Cholesky), and Thermodynamic K-FAC (Method 2 and/or "
                          "1), from one initialisation and batch order.")
    _add_train_options(comp, "compare")
    _common(comp, "compare")
    comp.add_argument("--baseline", choices=OPTIMIZERS, default="adam",
                      help="optimizer of the baseline arm (no K-FAC)")
    comp.add_argument("--baseline-lr", type=float, default=1e-3,
                      help="learning rate of the baseline arm")
    comp.add_argument("--methods", nargs="+", choices=("m2", "m1"), default=["m2", "m1"],
                      help="device accountings to run (Method 2 and/or Method 1)")
    comp.add_argument("--rc-timed", action="store_true",
                      help="also simulate the device only as long as the RC convention "
                           "charges (t0 = 1 RC, one read): the accuracy that timing buys")
    comp.set_defaults(func=handlers["compare"])

    prof = sub.add_parser("profile", help="K-FAC update time by part vs width and "
                          "vocabulary (Fig. 2), or vs processes (--nproc)")
    _common(prof, "profile")
    prof.add_argument("--widths", type=int, nargs="+", default=[64, 128, 256, 512, 1024, 2048],
                      help="MLP widths of the width sweep")
    prof.add_argument("--depth", type=int, default=50, help="MLP hidden layers")
    prof.add_argument("--mlp-batch", type=int, default=512, help="MLP batch size")
    prof.add_argument("--embds", type=int, nargs="+", default=[64, 128, 256, 512],
                      help="GPT embedding widths of the width sweep")
    prof.add_argument("--vocabs", type=int, nargs="+",
                      default=[1000, 2000, 4000, 8000, 16000],
                      help="GPT vocabularies of the vocabulary sweep")
    prof.add_argument("--gpt-batch", type=int, default=64, help="GPT batch (sequences)")
    prof.add_argument("--context", type=int, default=64, help="GPT context length")
    prof.add_argument("--n-layer", type=int, default=3, help="GPT layers")
    prof.add_argument("--vocab", type=int, default=10_000, help="vocabulary of the width sweep")
    prof.add_argument("--n-embd", type=int, default=256, help="width of the vocabulary sweep")
    prof.add_argument("--repeats", type=int, default=10, help="timed steps per point (median)")
    prof.add_argument("--nproc", type=int, default=None,
                      help="instead of the sweeps: an MLP of --depth × each of --widths, "
                           "batch --mlp-batch, on 1 and NPROC processes (gloo), --threads "
                           "divided among them")
    prof.add_argument("--strategy", choices=("comm-opt", "mem-opt"), default="comm-opt",
                      help="work distribution with --nproc")
    prof.add_argument("--device", default="cpu",
                      help="where the sweeps run: cpu, cuda, cuda:N or auto")
    prof.set_defaults(func=handlers["profile"])

    scal = sub.add_parser("scaling", help="measured and modelled solve cost vs matrix size n "
                          "(Tables 1-2)")
    _common(scal, "scaling")
    scal.add_argument("--ns", type=int, nargs="+", default=[64, 128, 256, 512, 1024, 2048],
                      help="matrix sizes")
    scal.add_argument("--repeats", type=int, default=5, help="timed repeats per size (median)")
    scal.add_argument("--batch", type=int, default=32,
                      help="batch of the memory comparison (resistor-array rows)")
    scal.set_defaults(func=handlers["scaling"])

    quant = sub.add_parser("quantize", help="accuracy vs the device's input / output bits, "
                           "over seeds (Fig. 4)")
    _add_train_options(quant, "quantize")
    _common(quant, "quantize")
    quant.set_defaults(model="resnet", data="fashion-mnist", optimizer="sgd", lr=0.05)
    quant.add_argument("--bits", type=int, nargs="+", default=[6, 8, 12, 16],
                       help="precisions, each run once as input and once as output bits")
    quant.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4],
                       help="seeds of every precision and of the Adam reference")
    quant.add_argument("--adam-lr", type=float, default=1e-3,
                       help="learning rate of the Adam reference arm")
    quant.set_defaults(func=handlers["quantize"])

    pln = sub.add_parser("plan", help="SPUs needed, predicted digital vs device time per "
                         "step and the speed-up, per bits × RC and settle model")
    _add_train_options(pln, "plan")
    _common(pln, "plan")
    pln.add_argument("--bits", type=int, nargs="+", default=[6, 8, 12, 16],
                     help="device precisions to price")
    pln.add_argument("--rcs-us", type=float, nargs="+", default=[0.1, 1.0, 10.0],
                     help="RC time constants to price (µs)")
    pln.add_argument("--record-steps", type=int, default=5,
                     help="steps of a short thermodynamic run that records the factors' "
                          "α_min for the rc_over_alpha_min and target_error settle models "
                          "(0: skip them)")
    pln.set_defaults(func=handlers["plan"])

    brk = sub.add_parser("breakeven", help="device speed-up map over RC × link, per settle "
                         "model and bits, from two short training runs")
    _add_train_options(brk, "breakeven")
    _common(brk, "breakeven")
    brk.add_argument("--schedule-from", type=Path, default=None,
                     help="a frontier's frontier.json (or its folder): also map the "
                          "cheapest Method 2 device schedule within its tolerance of "
                          "digital K-FAC — the device time training tolerates")
    brk.set_defaults(model="mlp", data="fashion-mnist", width=512, depth=2, batch_size=512,
                     steps=31, optimizer="sgd", lr=0.1, damping=0.01, func=handlers["breakeven"])

    swp = sub.add_parser("sweep", help="time to a target metric per optimizer, each tuned "
                         "over its learning rates (and batch sizes) and seeds")
    swp.add_argument("spec", type=Path, help="sweep spec (JSON; see configs/)")
    _spec_runs(swp, "sweep")
    swp.set_defaults(func=handlers["sweep"])

    frt = sub.add_parser("frontier", help="Thermodynamic K-FAC across device schedules: "
                         "device time per step against the metric and the time to target",
                         description="Trains Thermodynamic K-FAC on one workload across "
                         "device schedules (one knob at a time around a default, and a 2-D "
                         "grid), with digital K-FAC and a first-order optimizer as "
                         "references, and writes frontier.json, frontier.md and "
                         "frontier.png (the Pareto fronts) beside the sweep's files.")
    frt.add_argument("spec", type=Path, help="frontier spec (JSON; see configs/frontier_*)")
    _spec_runs(frt, "frontier")
    frt.set_defaults(func=handlers["frontier"])

    sc = sub.add_parser("score", help="each optimizer's time-to-target ratio to the best "
                        "baseline per workload and its performance-profile score "
                        "(AlgoPerf); or, with --pilot, the target a pilot sweep sets",
                        description="Reads sweep folders (one timed sweep per workload) and "
                        "writes score.json, score.md and score.png to --out; with --pilot, "
                        "reads one pilot sweep (target null) and writes target.json.")
    sc.add_argument("sweeps", type=Path, nargs="+", help="sweep folders (with sweep.json)")
    sc.add_argument("--tau-max", type=float, default=4.0,
                    help="largest performance ratio counted (a miss counts as it)")
    sc.add_argument("--pilot", action="store_true",
                    help="read the target off one pilot sweep instead of scoring")
    sc.add_argument("--fraction", type=float, default=0.5,
                    help="with --pilot: the share of the step budget the metric is read at")
    sc.add_argument("--out", type=Path, default=Path("runs") / "score", help="run folder")
    sc.add_argument("--overwrite", action="store_true",
                    help="write into a non-empty --out, replacing the files this command "
                         "writes")
    sc.add_argument("--debug", action="store_true", help="show the traceback of an error")
    sc.set_defaults(func=handlers["score"])

    plot = sub.add_parser("plot", help="redraw the figures of a saved run folder")
    plot.add_argument("folder", type=Path, help="a folder written by any command")
    plot.add_argument("--debug", action="store_true",
                      help="show the traceback of an error")
    plot.set_defaults(func=handlers["plot"])
    return parser


