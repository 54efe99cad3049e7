"""``thermokfac <command>``: the commands' functions and ``main``; the options are in
:mod:`._cli_parser`, the run-folder, config-file and torchrun rules in
:mod:`._cli_runtime`, the work in :mod:`.experiments`.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from collections.abc import Sequence
from dataclasses import fields, replace

from ._cli_runtime import (
    BAD_INPUT,
    ENVIRONMENT,
    UNEXPECTED,
    WRITES_ARGS,
    OncePerCommand,
    apply_config_file,
    distributed,
    fault_message,
    given,
    is_fault,
    leave_distributed,
    write_args,
)

#: The command line's own dependencies (the ``cli`` extra); the library needs neither.
CLI_EXTRA = ("matplotlib", "tqdm")

try:
    from . import plots
    from ._cli_parser import build_parser
    from .distributed.launch import collective_timeout
    from .experiments import denormals
    from .experiments.breakeven import breakeven
    from .experiments.compare import compare, table
    from .experiments.config import TrainConfig, unused_settings
    from .experiments.frontier import load_frontier_spec, run_frontier, tolerated_schedule
    from .experiments.frontier import table as frontier_table
    from .experiments.plan import plan
    from .experiments.processes import launch_value, resolve_device
    from .experiments.profile import profile
    from .experiments.profile_dist import profile_nproc
    from .experiments.quantize import quantize_sweep
    from .experiments.run_folder import RunFolderLock, check_out
    from .experiments.scaling import scaling
    from .experiments.score import pilot_target, score_folders, target_folder
    from .experiments.score import table as score_table
    from .experiments.sweep import load_spec, sweep
    from .experiments.sweep import table as sweep_table
    from .experiments.tensorboard import TensorBoardLog
    from .experiments.train import Run
    from .solvers.quantize import check_bits
except ModuleNotFoundError as err:
    if err.name is None or err.name.split(".")[0] not in CLI_EXTRA:
        raise
    _MISSING: str | None = err.name.split(".")[0]
else:
    _MISSING = None


def _config(args: argparse.Namespace) -> TrainConfig:
    """The command's :class:`TrainConfig`. A flag that this configuration does not use is
    an error, and so is a ``--config`` setting that the file's own configuration does
    not use (flags may switch off what a shared file sets up: ``--no-kfac``)."""
    values = {f.name: getattr(args, f.name) for f in fields(TrainConfig)
              if hasattr(args, f.name)}
    cfg = TrainConfig(**values)
    flags = {name for name in values if given(args.argv, name)}
    problem = unused_settings(cfg, flags, args.command)
    from_file = set(getattr(args, "from_file", {})) - flags
    if problem is None and from_file:  # a file is a whole recipe: judged on its own
        own = TrainConfig(**{name: args.sub_parser.get_default(name) for name in values})
        problem = unused_settings(own, from_file, args.command)
        if problem is not None:
            problem = f"--config {args.config}: {problem}"
    if problem is not None:
        raise ValueError(problem)
    return cfg


def cmd_train(args: argparse.Namespace) -> None:
    if args.resume:  # only the flags given again are compared with the saved run
        changes = {f.name: getattr(args, f.name) for f in fields(TrainConfig)
                   if hasattr(args, f.name)
                   and (given(args.argv, f.name) or f.name in args.from_file)}
        run = Run.resume(args.out, changes=changes)
    else:
        run = Run(_config(args), args.out)
    if args.tensorboard is not None and run.rank == 0:
        run.tensorboard = TensorBoardLog(args.tensorboard)
    try:
        summary = run.train(progress=not args.no_progress)
    finally:
        if run.tensorboard is not None:
            run.tensorboard.close()
    if run.rank != 0:
        return
    figures = plots.plot_train(args.out)
    final = summary["final"]
    print(" ".join(f"{k}={v:.4g}" for k, v in final.items()))
    print(f"results in {args.out} ({', '.join(p.name for p in figures)})")


def cmd_compare(args: argparse.Namespace) -> None:
    base = replace(_config(args), kfac=True)
    methods = tuple(m for m in args.methods)
    summary = compare(base, args.out, args.baseline, args.baseline_lr, methods,
                      progress=not args.no_progress, rc_timed=args.rc_timed)
    figures = plots.plot_compare(args.out)
    print(table(summary))
    print(f"\nplot: {figures[0]}")


def cmd_profile(args: argparse.Namespace) -> None:
    import torch

    if args.nproc is not None:
        result = profile_nproc(args.out, nprocs=sorted({1, args.nproc}), widths=args.widths,
                               depth=args.depth, batch=args.mlp_batch, repeats=args.repeats,
                               total_threads=args.threads, strategy=args.strategy,
                               gpt={"vocab": args.vocab, "context": args.context,
                                    "n_layer": args.n_layer, "n_embd": args.n_embd},
                               gpt_batch=args.gpt_batch, progress=not args.no_progress)
        figures = plots.plot_profile_nproc(args.out)
        print("| model | processes | gradient s | curvature s | inversion s | update s | "
              "step s | inversion share |\n|---:|---:|---:|---:|---:|---:|---:|---:|")
        for r in result["rows"]:
            print(f"| {r['model']} | {r['nproc']} | {r['gradient']:.4f} | "
                  f"{r['curvature']:.4f} | {r['inversion']:.4f} | {r['update']:.4f} | "
                  f"{r['step']:.4f} | {100 * r['inversion_share']:.1f}% |")
        print(f"plot: {figures[0]}")
        return

    torch.set_num_threads(args.threads)
    result = profile(args.out, widths=args.widths, depth=args.depth, mlp_batch=args.mlp_batch,
                     embds=args.embds, vocabs=args.vocabs, gpt_batch=args.gpt_batch,
                     context=args.context, n_layer=args.n_layer, vocab=args.vocab,
                     n_embd=args.n_embd, repeats=args.repeats,
                     device=resolve_device(args.device))
    figures = plots.plot_profile(args.out)
    for key in ("mlp_width", "gpt_embd", "gpt_vocab"):
        for row in result[key]:
            print(key, " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                for k, v in row.items()))
    print(f"plot: {figures[0]}")


def cmd_scaling(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(args.threads)
    result = scaling(args.out, args.ns, args.repeats, args.batch)
    figures = plots.plot_scaling(args.out)
    print("| n | Cholesky+inverse (s) | Cholesky+n solves (s) | CG (s) | SPU model rc (s) |"
          " held matrix (MB) | held rows (MB) |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for r in result["rows"]:
        print(f"| {r['n']} | {r['cholesky_inverse_s']:.4g} | {r['cholesky_solve_s']:.4g} | "
              f"{r['cg_solve_s']:.4g} | {r['model_s']['rc']:.3g} | "
              f"{r['held_bytes_matrix'] / 2**20:.2f} | {r['held_bytes_rows'] / 2**20:.2f} |")
    print("log-log exponents:", {k: round(v, 2) for k, v in result["exponents"].items()})
    print(f"plot: {figures[0]}")


def cmd_quantize(args: argparse.Namespace) -> None:
    for b in args.bits:
        check_bits(b, "--bits")
    result = quantize_sweep(_config(args), args.out, args.bits, args.seeds, args.adam_lr,
                            progress=not args.no_progress)
    figures = plots.plot_quantize(args.out)
    print(f"| precision | final {result['metric']} (mean ± std over {len(args.seeds)} seeds) |")
    print("|---|---|")
    for name, v in result["final"].items():
        print(f"| {name} | {v['mean']:.4f} ± {v['std']:.4f} |")
    print(f"plot: {figures[0]}")


def cmd_plan(args: argparse.Namespace) -> None:
    result = plan(_config(args), args.out, args.bits, args.rcs_us, args.inv_update_steps,
                  record_steps=args.record_steps, progress=not args.no_progress)
    figures = plots.plot_plan(args.out)
    print("| layer | A dim | G dim |\n|---|---:|---:|")
    for layer in result["layers"]:
        a = "diag" if layer["diagonal_a"] else layer["a_dim"]
        print(f"| {layer['layer']} | {a} | {layer['g_dim']} |")
    print(f"\nSPUs needed: {result['spus_needed']} (largest factor {result['largest_factor']})")
    print(f"digital K-FAC work per step: {1e3 * result['digital_kfac_s']:.2f} ms; device: "
          f"{1e3 * result['device_s_per_spu_links']:.3f} ms (own links), "
          f"{1e3 * result['device_s_shared_link']:.3f} ms (shared link)")
    models = list(result["grid"][0]["speedup_by_settle"])
    print("\npredicted speed-up of the K-FAC work, per settle model (rc: the paper's "
          "convention, far shorter than the simulated time)")
    print("| bits | RC (µs) | " + " | ".join(models) + " |\n|---:|---:|"
          + "---:|" * len(models))
    for g in result["grid"]:
        cells = ["n/a" if v is None else f"{v:.3g}" for v in g["speedup_by_settle"].values()]
        print(f"| {g['bits']} | {g['rc_us']:g} | " + " | ".join(cells) + " |")
    if result["recorded_banks"] is None:
        print(f"n/a: {result['alpha_min_source']}")
    print(f"plot: {figures[0]}")


def cmd_breakeven(args: argparse.Namespace) -> None:
    schedule = tolerated_schedule(args.schedule_from) if args.schedule_from else None
    result = breakeven(_config(args), args.out, progress=not args.no_progress,
                       schedule=schedule)
    figures = plots.plot_breakeven(args.out)
    print(f"digital K-FAC step {1e3 * result['digital_step_s']:.1f} ms, of which the device "
          f"would take over {100 * result['taken_over_share']:.1f}%")
    print("| settle model | speed-up at the paper's device (1 µs, 50 Gb/s, 16 bits) |")
    print("|---|---:|")
    for model, value in result["speedup_at_paper_point"].items():
        print(f"| {model} | {value:.3g} |")
    if result["schedule"] is not None:
        value = result["schedule"]["speedup_at_paper_point"]["target_error"]
        print(f"| target_error, the tolerated device ({result['schedule']['name']}) | "
              f"{value:.3g} |")
    print(f"plot: {figures[0]}")


def _spec_for_run(spec: dict, args: argparse.Namespace) -> dict:
    """A sweep's or frontier's spec with the command line's seeds and threads, subnormal
    flushing set as its runs will have it (before any parallel work)."""
    if args.seeds is not None:
        spec["seeds"] = args.seeds
    spec["base"] = {**spec["base"], "threads": args.threads}
    denormals.request(spec["base"].get("flush_denormal", True))  # the runs' default
    return spec


def cmd_sweep(args: argparse.Namespace) -> None:
    spec = _spec_for_run(load_spec(args.spec), args)
    summary = sweep(spec, args.out, progress=not args.no_progress, resume=args.resume)
    figures = plots.plot_sweep(args.out)
    if summary["target"] is None:  # a pilot: what each arm reached, and the target
        found = pilot_target(summary)
        for name, arm in found["arms"].items():
            print(f"{name}: {found['metric']} {arm['value']:.6g} at {found['fraction']:g} "
                  f"of the budget (median over seeds; batch {arm['batch_size']}, "
                  f"lr {arm['lr']:g})")
        print(f"target: {found['target']:.6g} ({found['arm']}); thermokfac score --pilot "
              f"{args.out} writes it to target.json")
    else:
        print(sweep_table(summary))
    print(f"\nplot: {figures[0]}")


def cmd_frontier(args: argparse.Namespace) -> None:
    spec = _spec_for_run(load_frontier_spec(args.spec), args)
    result = run_frontier(spec, args.out, progress=not args.no_progress, resume=args.resume)
    (args.out / "frontier.md").write_text(frontier_table(result) + "\n")
    figures = plots.plot_frontier(args.out)
    print(frontier_table(result))
    print(f"\nplot: {figures[0]}")


def cmd_score(args: argparse.Namespace) -> None:
    if args.pilot:
        if len(args.sweeps) != 1:
            raise ValueError(f"--pilot reads one pilot sweep, got {len(args.sweeps)}")
        found = target_folder(args.sweeps[0], args.out, args.fraction)
        print(f"target {found['metric']} = {found['target']:.6g}: {found['arm']} (batch "
              f"{found['batch_size']}, lr {found['lr']:g}), median over seeds at "
              f"{found['fraction']:g} of the budget")
        print(f"written: {args.out / 'target.json'}")
        return
    result = score_folders(args.sweeps, args.out, args.tau_max)
    figures = plots.plot_score(args.out)
    print(score_table(result))
    for w in result["workloads"]:
        if not w["equal_trials"]:
            trials = ", ".join(f"{k}: {f['trials']}" for k, f in w["families"].items())
            print(f"warning: on {w['name']} the optimizers had unequal numbers of trials "
                  f"({trials})", file=sys.stderr)
    print(f"\nplot: {figures[0]}")


def cmd_plot(args: argparse.Namespace) -> None:
    for path in plots.redraw(args.folder):
        print(path)


def main(argv: Sequence[str] | None = None) -> int:
    if _MISSING is not None:
        print(f"thermokfac: the command line needs {_MISSING!r}, which is not installed: "
              "pip install 'thermokfac[cli]' (the preconditioner itself needs only torch "
              "and numpy)", file=sys.stderr)
        return 2
    parser = build_parser({"train": cmd_train, "compare": cmd_compare,
                           "profile": cmd_profile, "scaling": cmd_scaling,
                           "quantize": cmd_quantize, "plan": cmd_plan,
                           "breakeven": cmd_breakeven, "sweep": cmd_sweep,
                           "score": cmd_score, "frontier": cmd_frontier,
                           "plot": cmd_plot})
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    once = OncePerCommand()
    logging.getLogger("thermokfac").addFilter(once)
    debug = getattr(args, "debug", False)
    lock: RunFolderLock | None = None
    try:
        import torch

        args = apply_config_file(parser, args, argv)
        args.argv = argv
        # before any parallel torch work, so that every worker thread copies it
        denormals.request(getattr(args, "flush_denormal", True))
        if "THERMOKFAC_DIST_TIMEOUT" in os.environ:  # checked where it enters: here
            collective_timeout()
        out = getattr(args, "out", None)
        if out is not None and launch_value("RANK") == 0:  # rank 0 for all
            lock = _take_folder(args)
        if args.command in WRITES_ARGS and launch_value("RANK") == 0:
            write_args(args)
        torch.manual_seed(getattr(args, "seed", 0))
        args.func(args)
        code = 0
    except (ValueError, FileNotFoundError, FloatingPointError, OSError, MemoryError) as err:
        if debug:
            raise
        out = getattr(args, "out", None)
        if is_fault(err, out):  # the machine: disk, permissions, memory, a vanished --out
            print(fault_message(args.command, err, out), file=sys.stderr)
            code = ENVIRONMENT
        else:
            print(f"thermokfac {args.command}: error: {err}", file=sys.stderr)
            code = BAD_INPUT
    except KeyboardInterrupt:  # outside a training loop (which saves and exits itself)
        if debug:
            raise
        print(f"thermokfac {args.command}: interrupted", file=sys.stderr)
        code = 128 + signal.SIGINT
    except SystemExit as stopped:  # a run stopped by SIGINT/SIGTERM, its files written
        if not distributed():
            raise
        code = int(stopped.code or 0)
    except Exception as err:
        if debug:
            raise
        kind = "error" if distributed() and isinstance(err, RuntimeError) else \
            "unexpected error (--debug shows the traceback)"
        print(f"thermokfac {args.command}: {kind}: {type(err).__name__}: {err}",
              file=sys.stderr)
        code = UNEXPECTED
    finally:
        logging.getLogger("thermokfac").removeFilter(once)
        if lock is not None and not distributed():
            lock.release()
    if distributed():
        leave_distributed(code, lock.release if lock is not None else lambda: None)
    return code


def _take_folder(args: argparse.Namespace) -> RunFolderLock:
    """The run-folder rules before anything is written: ``--out`` is a folder, no live
    run holds it, and it is empty unless the command resumes or overwrites."""
    resume, overwrite = getattr(args, "resume", False), getattr(args, "overwrite", False)
    check_out(args.out, resume=True, overwrite=True)  # only: not a file
    lock = RunFolderLock(args.out, f"thermokfac {args.command}").acquire()
    try:
        check_out(args.out, resume=resume, overwrite=overwrite)
    except BaseException:
        lock.release()
        raise
    return lock


if __name__ == "__main__":
    raise SystemExit(main())
