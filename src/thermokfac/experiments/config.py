"""The settings of one training run (:class:`TrainConfig`), what each means and accepts,
which commands take which of them, and config files (JSON or TOML) that set them.

Every field carries its command-line help and, where the values are a fixed set, its
choices (``metadata={"help": ..., "choices": ...}``), so ``thermokfac <command> --help``
and this module say the same thing.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from ..distributed.assignment import Strategy
from ..enums import DampingSplit, Grafting, KFACApprox, Method
from ..solvers import available_solvers
from ..solvers.hardware import SettleModel
from ..solvers.quantize import check_bits
from ..solvers.thermo.config import Backend, Quantizer
from .optimizers import BASELINES, OPTIMIZERS, SCHEDULES
from .processes import launch_value
from .tasks import MODELS, TASKS


def _values(enum) -> tuple[str, ...]:
    return tuple(m.value for m in enum)


def _opt(default: Any, help: str, choices: tuple | None = None) -> Any:
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass(frozen=True)
class TrainConfig:
    """One training run; every field is a command-line option of ``thermokfac train``
    (``--batch-size`` for ``batch_size``) and a key of a ``--config`` file."""

    model: str = _opt("mlp", "network to train", MODELS)
    data: str = _opt("digits", "data set", TASKS)
    optimizer: str = _opt("adam", "base optimizer (K-FAC preconditions the gradients it "
                          "steps with; muon, soap and klshampoo run alone)", OPTIMIZERS)
    lr: float = _opt(1e-3, "learning rate of the base optimizer (the peak of a schedule)")
    momentum: float = _opt(0.9, "momentum of sgd and nesterov, in [0, 1)")
    weight_decay: float = _opt(0.0, "weight decay of the base optimizer")
    schedule: str = _opt("constant", "learning-rate schedule: constant, or warmup-cosine "
                         "(linear warm-up, then cosine decay to 0 at the last step)",
                         SCHEDULES)
    warmup_fraction: float = _opt(0.05, "fraction of the steps the warmup-cosine schedule "
                                  "warms up over, in [0, 1)")
    precondition_frequency: int = _opt(10, "steps between preconditioner updates of soap "
                                       "and klshampoo")
    muon_conv_kernels: bool = _opt(False, "muon: also step the hidden convolution "
                                   "kernels, each viewed as an (out channels, in "
                                   "channels x kernel size) matrix (default: on AdamW)")
    batch_size: int = _opt(128, "examples per step (under torchrun: the global batch)")
    steps: int = _opt(300, "optimizer steps")
    eval_every: int = _opt(50, "steps between validation evaluations")
    seed: int = _opt(0, "seed of every random source")
    width: int = _opt(256, "hidden width (mlp), base channels (resnet), embedding width "
                      "(gpt, torch-gpt, vit) or hidden width (gin)")
    depth: int = _opt(2, "hidden layers (mlp, gin), blocks per stage (resnet) or "
                      "transformer layers (gpt, torch-gpt, vit)")
    heads: int = _opt(4, "attention heads (gpt, torch-gpt, vit)")
    context: int = _opt(64, "characters per sequence (shakespeare)")
    limit: int | None = _opt(None, "train on the first N examples only (none: all)")
    data_dir: str | None = _opt(None, "folder holding the data set's files, read instead "
                                "of the installed copy (cifar10: required)")
    kfac: bool = _opt(False, "precondition the base optimizer with K-FAC")
    solver: str = _opt("cholesky", "linear solver of K-FAC's inversions and solves",
                       tuple(available_solvers()))
    method: str | None = _opt(None, "inverse (Method 1: multiply by stored inverses) or "
                              "solve (Method 2: solve two banks each step); none: the "
                              "solver's default", (None, *_values(Method)))
    damping: float | None = _opt(None, "damping λ of the Kronecker factors (none: the base "
                                 "optimizer's recipe — 0.001 on both for sgd/nesterov, 3 "
                                 "relative for the adam family)")
    damping_split: str | None = _opt(None, "how λ reaches the two factors: equal (λ on "
                                     "both), pi (π-split), relative (λ times each "
                                     "factor's mean eigenvalue); none: the recipe's",
                                     (None, *_values(DampingSplit)))
    factor_decay: float = _opt(0.95, "moving-average decay of the Kronecker factors "
                               "(Eqs. 16-17), in [0, 1)")
    factor_update_steps: int = _opt(1, "steps between Kronecker-factor updates")
    inv_update_steps: int = _opt(10, "steps between inversions (Method 1) or prepares "
                                 "(Method 2)")
    kl_clip: float | None = _opt(1e-3, "KL clip κ of the preconditioned step (none: off)")
    grafting: str = _opt("auto", "scale of each block's update: gradient (the raw "
                         "gradient's norm), none (Eq. 15's), auto (gradient in front of an "
                         "Adam-type optimizer)", _values(Grafting))
    measure_solve_error_every: int = _opt(0, "every this many steps, measure each "
                                          "K-FAC solve against a float64 solve of the "
                                          "same damped factor (0: never); steps.csv's "
                                          "solve_rel_error")
    start_preconditioning_step: int | None = _opt(
        None, "first preconditioned step, the factors accumulating before it (none: the "
        "base optimizer's recipe)")
    kfac_approx: str | None = _opt(None, "weight-sharing approximation (Eqs. 18-21); none: "
                                   "the task's", (None, *_values(KFACApprox)))
    backend: str = _opt("closed-form", "how the thermodynamic device is simulated",
                        _values(Backend))
    input_bits: int | None = _opt(None, "DAC bits of the matrix and right-hand side loaded "
                                  "into the device (none: exact)")
    output_bits: int | None = _opt(None, "ADC bits of the device's read-out (none: exact)")
    quantizer: str = _opt("conservative", "how the matrix is quantized (Sec. 4.5.1)",
                          _values(Quantizer))
    settle_model: str = _opt("rc", "how the device clock counts settling (App. E)",
                             _values(SettleModel))
    n_spus: int = _opt(1, "stochastic processing units of the device model")
    target_error: float = _opt(1e-3, "relative error the simulated device runs for "
                               "(sets its burn-in and averaging window)")
    t0_rc: float | None = _opt(None, "device burn-in in RC (none: from --target-error)")
    warm_start: bool = _opt(False, "the device is not reset between solves: each starts "
                            "from the previous one's end state")
    mitigation_samples: int = _opt(1, "independent stochastic roundings of the matrix "
                                   "averaged per solve (needs --input-bits and --quantizer "
                                   "stochastic)")
    window_rc: float | None = _opt(None, "device averaging window in RC (none: from "
                                   "--target-error)")
    threads: int = _opt(2, "torch intra-op threads")
    flush_denormal: bool = _opt(True, "treat subnormal floats (below 1.2e-38 in float32) "
                                "as zero while training on the CPU: a confident "
                                "classifier's softmax puts them in the backward pass, where "
                                "they can double its time")
    checkpoint_every: int = _opt(0, "steps between checkpoints (0: at each evaluation)")
    stop_at: float | None = _opt(None, "stop at the first evaluation whose validation "
                                 "metric reaches this (none: run every step)")
    device: str = _opt("auto", "cpu, cuda, cuda:N or auto (the rank's GPU under torchrun "
                       "when there is one)")
    dist_strategy: str = _opt("comm-opt", "how work is spread over torchrun ranks",
                              _values(Strategy))
    fsdp: bool = _opt(False, "shard the model with FSDP2 (fully_shard) over the torchrun "
                      "processes instead of DDP; checkpoints go through "
                      "torch.distributed.checkpoint")

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer={self.optimizer!r} is not valid; choose one of "
                             f"{list(OPTIMIZERS)}")
        for f in fields(self):
            _check_type(f, getattr(self, f.name))
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit={self.limit!r} must be a positive number of training "
                             "examples, or None for all of them")
        for name in ("steps", "batch_size", "eval_every", "threads", "width", "depth"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)!r} must be a positive integer")
        if not self.lr > 0:
            raise ValueError(f"lr={self.lr!r} must be positive")
        for name in ("input_bits", "output_bits"):
            if getattr(self, name) is not None:
                check_bits(getattr(self, name), name)
        for f in fields(self):
            valid = RANGES.get(f.name)
            if valid is not None:
                valid.check(f.name, getattr(self, f.name))
        if self.optimizer in BASELINES and (self.kfac or self.fsdp):
            raise ValueError(f"optimizer={self.optimizer!r} runs alone, as a baseline: "
                             f"{'--kfac' if self.kfac else '--fsdp'} needs one of sgd, "
                             "nesterov, adam, adamw, nadamw")


@dataclass(frozen=True)
class Range:
    """The valid values of a numeric setting: from ``low`` to ``high``, each end
    inclusive unless ``open_low`` / ``open_high``, always finite (NaN and infinity are
    refused); ``None`` passes where the setting allows it."""

    low: float
    high: float
    open_low: bool = False
    open_high: bool = False

    def check(self, name: str, value: Any) -> None:
        """Raises ``ValueError`` naming ``name``, ``value`` and the valid range."""
        if value is None:
            return
        try:
            number = float(value)
        except OverflowError:
            number = math.inf
        above = number > self.low if self.open_low else number >= self.low
        below = number < self.high if self.open_high else number <= self.high
        if not (math.isfinite(number) and above and below):
            text = repr(value) if len(repr(value)) <= 40 else repr(value)[:37] + "..."
            raise ValueError(f"{name}={text} is out of range; valid: {self.text()}")

    def text(self) -> str:
        """The range in interval notation, e.g. ``[0, 1)``."""
        def show(x: float) -> str:
            if math.isinf(x):
                return "inf"
            return str(int(x)) if x == int(x) and abs(x) < 1e15 else f"{x:g}"
        return (("(" if self.open_low else "[") + f"{show(self.low)}, {show(self.high)}" +
                (")" if self.open_high or math.isinf(self.high) else "]"))


#: The valid range of every numeric :class:`TrainConfig` setting, checked wherever one
#: enters (flags, config files, sweep specs, checkpoints, the API).
RANGES = {
    "lr": Range(0, math.inf, open_low=True), "momentum": Range(0, 1, open_high=True),
    "weight_decay": Range(0, math.inf), "batch_size": Range(1, 2**24), "steps": Range(1, 2**40),
    "eval_every": Range(1, 2**40), "seed": Range(0, 2**32 - 1), "width": Range(1, 2**20),
    "depth": Range(1, 10_000), "heads": Range(1, 4096), "context": Range(1, 2**20),
    "limit": Range(1, 2**40), "damping": Range(0, 1e6, open_low=True),
    "factor_decay": Range(0, 1, open_high=True), "factor_update_steps": Range(1, 2**40),
    "inv_update_steps": Range(1, 2**40), "kl_clip": Range(0, 1e12, open_low=True),
    "start_preconditioning_step": Range(0, 2**40), "input_bits": Range(2, 32),
    "output_bits": Range(2, 32), "n_spus": Range(1, 2**20),
    "target_error": Range(1e-12, 1, open_high=True), "t0_rc": Range(0, 1e9, open_low=True),
    "window_rc": Range(0, 1e9, open_low=True), "threads": Range(1, 4096),
    "checkpoint_every": Range(0, 2**40), "stop_at": Range(-1e12, 1e12),
    "warmup_fraction": Range(0, 1, open_high=True),
    "measure_solve_error_every": Range(0, 2**40), "mitigation_samples": Range(1, 4096),
    "precondition_frequency": Range(1, 2**40),
}

#: Which settings only some configurations use: (what they need, whether ``cfg`` has it).
#: Giving one of them to a configuration that does not use it is an error, as a
#: setting that does nothing would be recorded as used.
_KFAC = ("solver", "method", "damping", "damping_split", "factor_decay",
         "factor_update_steps", "inv_update_steps", "kl_clip", "grafting",
         "start_preconditioning_step", "kfac_approx", "measure_solve_error_every")
_THERMO = ("backend", "input_bits", "output_bits", "quantizer", "settle_model", "n_spus",
           "target_error", "t0_rc", "window_rc", "warm_start", "mitigation_samples")
USED_WHEN = {
    **{name: ("--kfac", lambda c: c.kfac) for name in _KFAC},
    **{name: ("--kfac --solver thermodynamic",
              lambda c: c.kfac and c.solver == "thermodynamic") for name in _THERMO},
    "momentum": ("--optimizer sgd or nesterov", lambda c: c.optimizer in ("sgd", "nesterov")),
    "warmup_fraction": ("--schedule warmup-cosine", lambda c: c.schedule == "warmup-cosine"),
    "precondition_frequency": ("--optimizer soap or klshampoo",
                               lambda c: c.optimizer in ("soap", "klshampoo")),
    "muon_conv_kernels": ("--optimizer muon", lambda c: c.optimizer == "muon"),
    "heads": ("--model gpt, torch-gpt or vit", lambda c: c.model in ("gpt", "torch-gpt", "vit")),
    "context": ("--data shakespeare", lambda c: c.data == "shakespeare"),
    "dist_strategy": ("torchrun (two or more processes) without --fsdp",
                      lambda c: not c.fsdp and launch_value("WORLD_SIZE") > 1),
}


def unused_settings(cfg: TrainConfig, given: set[str], command: str = "train") -> str | None:
    """Why some of the settings ``given`` (on the command line or in a config file) do
    nothing under ``cfg``, or ``None`` if all are used. ``compare``, ``quantize``,
    ``plan`` and ``breakeven`` run K-FAC and the thermodynamic solver themselves, so
    their K-FAC and device settings are always used."""
    unused = []
    for name in sorted(given):
        rule = USED_WHEN.get(name)
        if rule is None or (command != "train" and name in _KFAC + _THERMO):
            continue
        needs, used = rule
        if not used(cfg):
            unused.append(f"{name.replace('_', '-')} (used only with {needs})")
    if not unused:
        return None
    return ("settings that this run would not use: " + ", ".join(unused) +
            "; leave them out")


#: Settings each command sets itself, and so does not accept (it would ignore them).
NOT_TAKEN = {
    "train": frozenset(),
    "compare": frozenset({"kfac", "solver"}),
    "quantize": frozenset({"kfac", "solver", "input_bits", "output_bits"}),
    "plan": frozenset({"kfac", "solver", "method", "steps", "eval_every", "checkpoint_every",
                       "stop_at", "input_bits", "output_bits"}),
    "breakeven": frozenset({"kfac", "solver", "method", "eval_every", "checkpoint_every",
                            "stop_at"}),
}


def taken_fields(command: str) -> list[str]:
    """The :class:`TrainConfig` fields ``command`` takes (see :data:`NOT_TAKEN`)."""
    return [f.name for f in fields(TrainConfig) if f.name not in NOT_TAKEN[command]]


def read_input_text(path: Path, what: str) -> str:
    """The text of an input file (a config file, a sweep spec).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: ``path`` is a folder or not UTF-8 text (naming ``what`` and it).
    """
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{what} {path} is a folder, not a file")
    try:
        return path.read_text()
    except UnicodeDecodeError:
        raise ValueError(f"{what} {path} is not a text file (not UTF-8)") from None


def read_config_file(path: Path, command: str = "train") -> dict[str, Any]:
    """Settings from a JSON (``.json``) or TOML (``.toml``) file: a flat table whose keys
    are :class:`TrainConfig` fields that ``command`` takes (``batch_size`` or
    ``batch-size``).

    Raises:
        FileNotFoundError: If ``path`` does not exist.
        ValueError: If the file cannot be parsed, is not a table, has another suffix, or
            names a key that is not a field (or that ``command`` does not take); the
            message names the file and the key.
    """
    path = Path(path)
    text = read_input_text(path, "--config")
    try:
        if path.suffix == ".json":
            values = json.loads(text)
        elif path.suffix == ".toml":
            if sys.version_info >= (3, 11):
                import tomllib
            else:  # pragma: no cover - Python 3.10
                import tomli as tomllib
            values = tomllib.loads(text)
        else:
            raise ValueError(f"--config {path}: the suffix must be .json or .toml")
    except (json.JSONDecodeError, ValueError) as err:
        if "suffix" in str(err):
            raise
        raise ValueError(f"--config {path} could not be parsed: {err}") from None
    if not isinstance(values, dict):
        raise ValueError(f"--config {path} must hold a table of settings, not "
                         f"{type(values).__name__}")
    values = {key.replace("-", "_"): value for key, value in values.items()}
    taken = taken_fields(command)
    kinds = {f.name: f for f in fields(TrainConfig)}
    for key, value in values.items():
        if key not in taken:
            where = "is set by this command" if key in NOT_TAKEN[command] else "is not a setting"
            raise ValueError(f"--config {path}: {key!r} {where}; {command} takes "
                             f"{', '.join(taken)}")
        _check_value(path, kinds[key], value)
    return values


_KINDS = {"bool": (bool,), "int": (int,), "float": (int, float), "str": (str,)}


def _check_type(f: Any, value: Any) -> None:
    """``value`` is of the field's type (None where the field allows it), a bool only
    where the field is one, and among the field's choices.

    Raises:
        ValueError: Naming the setting, the value and what it must be.
    """
    text = str(f.type)
    kinds = next(v for k, v in _KINDS.items() if text.startswith(k))
    if value is None and "None" in text:
        return
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        raise ValueError(f"{f.name}={value!r} must be of type {text}")
    choices = f.metadata["choices"]
    if choices is not None and value not in choices:
        raise ValueError(f"{f.name}={value!r} is not one of "
                         f"{[c for c in choices if c is not None]}")


def _check_value(path: Path, f: Any, value: Any) -> None:
    """A config-file value of the field's type, among its choices and in its range."""
    try:
        _check_type(f, value)
        if f.name in RANGES:
            RANGES[f.name].check(f.name, value)
    except ValueError as err:
        raise ValueError(f"--config {path}: {err}") from None
