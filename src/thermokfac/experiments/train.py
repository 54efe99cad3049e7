"""``thermokfac train``: one model × data × optimizer (× optional K-FAC) run.

Writes into its run folder: ``config.json``; ``spectra.csv`` (thermodynamic solver: per
prepare and factor, the device matrix's α_min, α_max and κ); ``steps.csv`` (per step:
training loss and the timing breakdown — gradient, curvature, inversion, update, the
solves within it, modelled device time under each settle model);
``metrics.csv`` (per evaluation: step, training seconds, validation loss and metric);
``results.json`` (summary) and ``checkpoint.pt`` (everything needed to continue:
``--resume`` continues exactly, data order and random generators included).
"""

from __future__ import annotations

import csv
import errno
import io
import json
import math
import statistics
import time
from dataclasses import asdict, fields, replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from .. import KFACPreconditioner
from ..distributed import DistributedKFACPreconditioner
from ..solvers import HardwareModel, ThermodynamicSolver
from . import checkpoint as checkpoint_files
from . import denormals
from .config import TrainConfig
from .optimizers import make_optimizer, make_schedulers
from .processes import init_distributed, resolve_device
from .progress import Progress
from .resume import RESUMABLE, check_payload, report_resume
from .tasks import Task, build_model, load_task

STEP_FIELDS = ("step", "loss", "wall_s", "gradient_s", "curvature_s", "inversion_s",
               "update_s", "solve_s", "modeled_s", "modeled_rc_s",
               "modeled_rc_over_alpha_min_s", "modeled_target_error_s", "solve_rel_error")


def make_solver(cfg: TrainConfig):
    if cfg.solver != "thermodynamic":
        return cfg.solver
    # the link's bits come from the solver's (16 where it loads or reads exact values)
    hardware = HardwareModel(settle_model=cfg.settle_model, n_spus=cfg.n_spus)
    return ThermodynamicSolver(backend=cfg.backend, input_bits=cfg.input_bits,
                               output_bits=cfg.output_bits, quantizer=cfg.quantizer,
                               target_error=cfg.target_error, t0_rc=cfg.t0_rc,
                               window_rc=cfg.window_rc, warm_start=cfg.warm_start,
                               mitigation_samples=cfg.mitigation_samples, hardware=hardware)


def make_preconditioner(cfg: TrainConfig, model: nn.Module, task: Task,
                        opt: torch.optim.Optimizer, world: int = 1
                        ) -> KFACPreconditioner | None:
    if not cfg.kfac:
        return None
    extra: dict[str, Any] = {}
    cls = KFACPreconditioner
    if world > 1:  # FSDP2: owner-rank blocks, no strategy
        cls = DistributedKFACPreconditioner
        extra = {} if cfg.fsdp else {"strategy": cfg.dist_strategy}
    return cls(
        model, **extra, solver=make_solver(cfg), method=cfg.method, damping=cfg.damping,
        damping_split=cfg.damping_split,
        factor_decay=cfg.factor_decay, factor_update_steps=cfg.factor_update_steps,
        inv_update_steps=cfg.inv_update_steps, kl_clip=cfg.kl_clip, optimizer=opt,
        grafting=cfg.grafting, start_preconditioning_step=cfg.start_preconditioning_step,
        measure_solve_error_every=cfg.measure_solve_error_every,
        kfac_approx=cfg.kfac_approx or task.kfac_approx,
        loss_type="mse" if task.kind == "graph" else "cross_entropy",
        num_per_example_loss_terms=task.loss_terms_per_example, seed=cfg.seed)


class Run:
    """A training run with its state; :meth:`train` continues from wherever it is."""

    def __init__(self, cfg: TrainConfig, out: Path, task: Task | None = None) -> None:
        torch.set_num_threads(cfg.threads)
        self.rank, self.world = init_distributed()
        self.device = resolve_device(cfg.device)
        if cfg.batch_size % self.world:
            raise ValueError(f"batch_size={cfg.batch_size} must be divisible by the number "
                             f"of processes ({self.world}): it is the global batch")
        self.cfg, self.out = cfg, Path(out)
        self.task = task or load_task(cfg.data, limit=cfg.limit, data_dir=cfg.data_dir,
                                      context=cfg.context, seed=cfg.seed)
        self.task.batch_size = cfg.batch_size // self.world
        self.task.device = self.device
        self.net = build_model(cfg.model, self.task, width=cfg.width, depth=cfg.depth,
                               heads=cfg.heads, seed=cfg.seed).to(self.device)
        if cfg.fsdp:
            if self.world == 1:
                raise ValueError("--fsdp shards the model over torchrun processes: run it "
                                 "under torchrun --nproc-per-node N with N >= 2")
            from torch.distributed.fsdp import fully_shard

            fully_shard(self.net)
            self.model = self.net
        else:
            self.model = self.net if self.world == 1 else nn.parallel.DistributedDataParallel(
                self.net,
                device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.opt = make_optimizer(cfg, self.net)
        self.schedulers = make_schedulers(cfg, self.opt)
        self.pre = make_preconditioner(cfg, self.model, self.task, self.opt, self.world)
        self.gen = torch.Generator().manual_seed(cfg.seed + 1 + 7919 * self.rank)
        #: How the CPU threads treated subnormal floats while training (None: a GPU run
        #: or not trained yet; see :mod:`.denormals`).
        self.subnormals: denormals.Subnormals | None = None
        self.step = 0
        self.train_s = 0.0
        self.steps: list[dict[str, float]] = []
        self.metrics: list[dict[str, float]] = []
        #: Set to a :class:`~.tensorboard.TensorBoardLog` to log scalars (rank 0 only).
        self.tensorboard: Any = None

    # ------------------------------------------------------------- checkpoint
    def state_dict(self) -> dict[str, Any]:
        """Everything to continue exactly; with several processes a collective (every
        rank's data order and random state are gathered)."""
        return {**self._progress(), "model": self.net.state_dict(),
                "opt": self.opt.state_dict(),
                "pre": self.pre.state_dict() if self.pre is not None else None}

    def _progress(self) -> dict[str, Any]:
        """The run's settings, position and every rank's random state (a collective with
        several processes)."""
        randomness = [self.gen.get_state(), torch.get_rng_state()]
        if self.world > 1:
            gathered: list[Any] = [None] * self.world
            dist.all_gather_object(gathered, randomness)
        else:
            gathered = [randomness]
        return {"config": asdict(self.cfg), "step": self.step, "train_s": self.train_s,
                "world_size": self.world, "gen": [g for g, _ in gathered],
                "torch_rng": [r for _, r in gathered], "steps": self.steps,
                "metrics": self.metrics}

    def _sharded_state(self, progress: dict[str, Any] | None = None) -> dict[str, Any]:
        """With ``--fsdp``: what ``torch.distributed.checkpoint`` saves — the model's and
        the optimizer's sharded state, K-FAC's (:class:`KFACState`) and each rank's
        progress as one serialized item of its own (``run<rank>``)."""
        from torch.distributed.checkpoint.state_dict import (
            get_model_state_dict,
            get_optimizer_state_dict,
        )

        from ..distributed.checkpoint import KFACState

        buffer = io.BytesIO()
        if progress is not None:
            torch.save(progress, buffer)
            buffer.seek(0)
        state = {"model": get_model_state_dict(self.net),
                 "optim": get_optimizer_state_dict(self.net, self.opt),
                 f"run{self.rank}": buffer}  # per rank: its own step records and clocks
        if self.pre is not None:
            state["kfac"] = KFACState(self.pre)
        return state

    def save(self) -> Path:
        """Write ``checkpoint.pt`` atomically, keeping the last one as
        ``checkpoint.prev.pt`` (:mod:`.checkpoint`; rank 0; every rank must call it);
        with ``--fsdp``, the folder ``checkpoint.dcp`` the same way (every rank
        writes).

        Raises:
            FileNotFoundError: The run folder was removed while the run trained.
            OSError: The write failed (full disk, size limit, permissions); the last
                checkpoint is intact.
        """
        if self.rank == 0 and not self.out.is_dir():  # not silently made again: say it
            raise FileNotFoundError(errno.ENOENT, "the run folder was removed while the run "
                                    "trained", str(self.out))
        if self.cfg.fsdp:
            return checkpoint_files.write_dcp(self.out, self._sharded_state(self._progress()),
                                              self.rank)
        state = self.state_dict()
        if self.rank == 0:
            return checkpoint_files.write(self.out, state)
        return self.out / checkpoint_files.NAME

    @classmethod
    def resume(cls, out: Path, steps: int | None = None,
               changes: dict[str, Any] | None = None) -> Run:
        """Continue the run saved in ``out`` (optionally to a new total of ``steps``).

        Args:
            out: The run folder.
            steps: New total of steps.
            changes: Settings given again on resuming (e.g. the command line's flags).
                :data:`RESUMABLE` ones are applied and recorded in ``config.json``; any
                other that differs from the saved run is an error.

        Raises:
            FileNotFoundError: No checkpoint in ``out``.
            ValueError: A damaged or foreign checkpoint, another number of processes, or
                changed settings that a resumed run cannot take (all listed).
        """
        found = checkpoint_files.resume_point(out)  # FileNotFoundError / ValueError
        sharded = found.state is None  # an --fsdp run: its progress first, to build the run
        if sharded:
            rank, _ = init_distributed()
            box = {f"run{rank}": io.BytesIO()}
            checkpoint_files.read_dcp(found.path, box)
            state = checkpoint_files.load_plain(box[f"run{rank}"].getvalue(),
                                                found.path / f"run{rank}")
        else:
            state = found.state
        check_payload(state, found.path, sharded)
        report_resume(Path(out), found, state)
        cfg = TrainConfig(**state["config"])  # validated by check_payload
        changes = dict(changes or {})
        if steps is not None:
            changes["steps"] = steps
        fixed = {k: (getattr(cfg, k), v) for k, v in changes.items()
                 if k not in RESUMABLE and getattr(cfg, k) != v}
        if fixed:
            listed = ", ".join(f"{k}: saved {a!r}, given {b!r}" for k, (a, b) in fixed.items())
            raise ValueError(f"cannot resume {out} with changed settings ({listed}); only "
                             f"{', '.join(sorted(RESUMABLE))} may change on resume")
        if cfg.schedule != "constant" and changes.get("steps", cfg.steps) != cfg.steps:
            raise ValueError(f"cannot resume {out} with steps={changes['steps']}: its "
                             f"{cfg.schedule} schedule ends at step {cfg.steps}, and another "
                             "length would change the rate mid-run; start a new run")
        cfg = replace(cfg, **{k: v for k, v in changes.items() if k in RESUMABLE})
        run = cls(cfg, out)
        if state["world_size"] != run.world:
            raise ValueError(f"the checkpoint in {out} was written by {state['world_size']} "
                             f"process(es); resume it with the same number, not {run.world}")
        if sharded:
            from torch.distributed.checkpoint.state_dict import (
                set_model_state_dict,
                set_optimizer_state_dict,
            )

            loaded = run._sharded_state()
            checkpoint_files.read_dcp(found.path, loaded)  # K-FAC's state loads in place
            set_model_state_dict(run.net, loaded["model"])
            set_optimizer_state_dict(run.net, run.opt, loaded["optim"])
        else:
            try:
                run.net.load_state_dict(state["model"])
                run.opt.load_state_dict(state["opt"])
            except (RuntimeError, ValueError, KeyError) as err:
                raise ValueError(f"{found.path} does not fit this run's model or "
                                 f"optimizer: {err}") from None
        if "lr" in changes:  # the saved optimizer state carries the old rate
            for group in run.opt.param_groups:
                group["lr"] = group["initial_lr"] = cfg.lr
        run.schedulers = make_schedulers(cfg, run.opt, step=state["step"])
        if run.pre is not None and not sharded:
            try:
                run.pre.load_state_dict(checkpoint_files.to_device(state["pre"], run.device))
            except ValueError as err:
                raise ValueError(f"{found.path}: {err}") from None
        run.gen.set_state(state["gen"][run.rank])
        torch.set_rng_state(state["torch_rng"][run.rank])
        run.step, run.train_s = state["step"], state["train_s"]
        run.steps, run.metrics = state["steps"], state["metrics"]
        return run

    # ----------------------------------------------------------------- train
    def reached(self, metrics: dict[str, float] | None = None) -> bool:
        """Whether an evaluation meets ``stop_at`` (accuracy ≥ it; RMSE ≤ it)."""
        if self.cfg.stop_at is None:
            return False
        value = (metrics or self.metrics[-1])[f"val_{self.task.metric}"]
        if self.task.metric == "rmse":
            return value <= self.cfg.stop_at
        return value >= self.cfg.stop_at

    def train(self, progress: bool = True, checkpoint: bool = True,
              label: str | None = None) -> dict[str, Any]:
        """Train to ``steps`` (or until ``stop_at`` is met); write the run's files.

        ``progress`` shows a bar named ``label`` (default: model/data) on a terminal, and
        one line per evaluation on stderr otherwise (a log file, CI).
        """
        cfg = self.cfg
        label = label or f"{cfg.model}/{cfg.data}"
        report = Progress(label, cfg.steps, self.step, progress and self.rank == 0)
        if self.rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)
            with checkpoint_files.naming(self.out / "config.json"):
                (self.out / "config.json").write_text(json.dumps(asdict(cfg), indent=2))
        if not self.metrics:
            self.metrics.append({"step": 0, "train_s": 0.0, **self.evaluate()})
        if self.device.type == "cpu":  # a CPU register: a GPU run leaves it alone
            self.subnormals = denormals.check(cfg.flush_denormal)  # warns on a mismatch
        with checkpoint_files.stop_on_signals() as stop:
            for _ in report.steps():
                record = self._one_step()
                self.steps.append(record)
                self.step += 1
                if self.tensorboard is not None:
                    self.tensorboard.step(self.step, record)
                if not all(map(_finite, [record["loss"]])):
                    raise FloatingPointError(f"training loss became {record['loss']} at "
                                             f"step {self.step}")
                evaluated = self.step % cfg.eval_every == 0 or self.step == cfg.steps
                if evaluated:
                    self.metrics.append({"step": self.step, "train_s": self.train_s,
                                         **self.evaluate()})
                    report.evaluated(self.step, record["loss"], self.metrics[-1])
                    if self.tensorboard is not None:
                        self.tensorboard.evaluation(self.step, self.metrics[-1])
                    self._write_logs()  # what a crash or Ctrl-C would otherwise lose
                    if self.reached():
                        break
                every = cfg.checkpoint_every
                if checkpoint and (self.step % every == 0 if every else evaluated):
                    self.save()
                signum = checkpoint_files.agreed_stop(stop, self.world, self.device)
                if signum:  # SIGINT/SIGTERM on any rank: all save, write, leave cleanly
                    report.close()
                    if checkpoint:
                        self.save()
                    self.write()
                    raise SystemExit(128 + signum)
        report.close()
        if checkpoint:
            self.save()
        return self.write()

    def evaluate(self) -> dict[str, float]:
        """Validation metrics (computed on rank 0 and shared, so every rank agrees)."""
        # FSDP2 gathers parameters in a forward: every rank runs it (rank 0's counts)
        metrics = self.task.evaluate(self.net) if self.rank == 0 or self.cfg.fsdp else None
        if self.world > 1:
            box = [metrics]
            dist.broadcast_object_list(box, src=0)
            metrics = box[0]
        return metrics

    def _one_step(self) -> dict[str, float]:
        task = self.task
        start = time.perf_counter()
        inputs, targets = task.batch(self.gen)
        self.opt.zero_grad()
        loss = task.loss(task.forward(self.model, inputs, self.pre), targets)
        loss.backward()
        grad_done = time.perf_counter()
        hooks = self.pre.pending_curvature_s if self.pre is not None else 0.0
        if self.pre is not None:
            self.pre.step()
        self.opt.step()
        for scheduler in self.schedulers:
            scheduler.step()
        wall = time.perf_counter() - start
        if self.pre is not None and self.pre.last_report is not None:
            wall -= self.pre.last_report.measure_s  # measuring errors is not training
        self.train_s += wall
        record = {"step": self.step, "loss": float(loss.detach()), "wall_s": wall,
                  "gradient_s": grad_done - start - hooks, "curvature_s": 0.0,
                  "inversion_s": 0.0, "update_s": 0.0, "solve_s": 0.0, "modeled_s": 0.0,
                  "modeled_rc_s": 0.0, "modeled_rc_over_alpha_min_s": 0.0,
                  "modeled_target_error_s": 0.0, "solve_rel_error": math.nan}
        if self.pre is not None:
            t = self.pre.last_timings
            record.update(curvature_s=t.curvature_s, inversion_s=t.inversion_s,
                          update_s=t.update_s, solve_s=t.solve_s,
                          modeled_s=t.modeled_hardware_s, modeled_rc_s=t.modeled_rc_s,
                          modeled_rc_over_alpha_min_s=t.modeled_rc_over_alpha_min_s,
                          modeled_target_error_s=t.modeled_target_error_s)
            report = self.pre.last_report
            error = None if report is None else report.max_solve_error
            if error is not None:
                record["solve_rel_error"] = error
                record["solve_errors"] = report.solve_errors  # solve_errors.csv
                record["predicted_solve_errors"] = report.predicted_solve_errors
        return record

    def _write_logs(self) -> None:
        """``steps.csv`` and ``metrics.csv`` so far (rank 0)."""
        if self.rank == 0:
            _write_csv(self.out / "steps.csv", STEP_FIELDS, self.steps)
            _write_csv(self.out / "metrics.csv", list(self.metrics[-1]), self.metrics)

    def write(self) -> dict[str, Any]:
        """The run's summary; rank 0 writes it and the CSV files."""
        self._write_logs()
        if self.rank == 0:
            spectra = list(self.pre.spectra.history) if self.pre is not None else []
            if spectra:  # the device matrices' α_min, α_max and κ per prepare
                _write_csv(self.out / "spectra.csv", list(spectra[0]), spectra)
            measured = solve_error_rows(self.steps)
            if measured:
                _write_csv(self.out / "solve_errors.csv", list(measured[0]), measured)
        final = self.metrics[-1]
        summary = {"config": asdict(self.cfg), "world_size": self.world, "steps": self.step,
                   "train_s": self.train_s,
                   "subnormals": self.subnormals,  # a str-Enum: its value in JSON
                   "final": final, "task": {"name": self.task.name, "kind": self.task.kind,
                                            "metric": self.task.metric}}
        errors = solve_error_summary(self.steps)
        if errors:
            summary["solve_rel_error"] = errors
        if self.pre is not None:
            summary["preconditioner"] = {"timing": self.pre.timing_summary(),
                                         "stats": dict(self.pre.stats),
                                         "layers": self.pre.layer_names}
        if self.rank == 0:
            with checkpoint_files.naming(self.out / "results.json"):
                (self.out / "results.json").write_text(json.dumps(summary, indent=2))
        return summary


def solve_error_summary(steps: list[dict[str, Any]]) -> dict[str, Any]:
    """The largest measured solve error of each measured step, summarised over a run's
    step records (median, max, last, how many steps), with the median of each step's
    largest predicted error where the solver predicted every measured solve (None
    otherwise: a maximum over some of them would not compare); empty when nothing was
    measured."""
    errors = [r["solve_rel_error"] for r in steps if _finite(r.get("solve_rel_error", math.nan))]
    if not errors:
        return {}
    measured = [r for r in steps if r.get("solve_errors")]
    complete = all(  # a prediction of every measured solve, or none is summarised
        set(errors) <= set(r.get("predicted_solve_errors", {}).get(block, {}))
        for r in measured for block, errors in r["solve_errors"].items())
    predicted = [max(e for b in r["predicted_solve_errors"].values() for e in b.values())
                 for r in measured] if complete and measured else []
    return {"measured_steps": len(errors), "median": statistics.median(errors),
            "max": max(errors), "last": errors[-1],
            "predicted_median": statistics.median(predicted) if predicted else None}


def solve_error_rows(steps: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row (step, block, factor, rel_error, predicted) per measured solve of a run's
    step records (``measure_solve_error_every``), in step order; ``predicted`` is the
    solver's prediction (NaN where it has no model)."""
    return [{"step": r["step"], "block": block, "factor": which, "rel_error": error,
             "predicted": r.get("predicted_solve_errors", {}).get(block, {}).get(
                 which, math.nan)}
            for r in steps for block, errors in r.get("solve_errors", {}).items()
            for which, error in sorted(errors.items())]


def _finite(value: float) -> bool:
    return value == value and abs(value) != float("inf")


def _write_csv(path: Path, keys, rows) -> None:
    with checkpoint_files.naming(path), open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(keys), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def config_fields() -> list[tuple[str, Any, Any]]:
    """(name, default, type) of every :class:`TrainConfig` field, for the CLI."""
    return [(f.name, f.default, f.type) for f in fields(TrainConfig)]
