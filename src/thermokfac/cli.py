"""``thermokfac <command>``: argument parsing only; the work is in :mod:`.experiments`.

Commands: ``train``, ``compare``, ``sweep``, ``profile``, ``scaling``,
``quantize``, ``plan``, ``plot``. Every command takes ``--seed``,
``--threads`` and ``--out``, shows progress bars, and writes ``config.json``, its results
and PNG plots into its run folder. Bad arguments exit with status 2 and a one-line
message, never a traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

from ._cli_runtime import distributed, given, leave_distributed, refuse_nonempty

#: The command line's own dependencies (the ``cli`` extra); the library needs neither.
CLI_EXTRA = ("matplotlib", "tqdm")

try:
    from . import plots
    from .experiments.breakeven import breakeven
    from .experiments.compare import compare, table
    from .experiments.plan import plan
    from .experiments.processes import resolve_device
    from .experiments.profile import profile
    from .experiments.profile_dist import profile_nproc
    from .experiments.quantize import quantize_sweep
    from .experiments.scaling import scaling
    from .experiments.sweep import load_spec, sweep
    from .experiments.sweep import table as sweep_table
    from .experiments.tasks import MODELS, TASKS
    from .experiments.train import OPTIMIZERS, Run, TrainConfig
    from .solvers.quantize import check_bits
except ModuleNotFoundError as err:
    if err.name is None or err.name.split(".")[0] not in CLI_EXTRA:
        raise
    _MISSING: str | None = err.name.split(".")[0]
else:
    _MISSING = None

_SKIP = {"seed", "threads"}


def _parse_optional(kind: Callable[[str], Any]) -> Callable[[str], Any]:
    def parse(text: str):
        return None if text.lower() in ("none", "") else kind(text)
    return parse


def _add_train_options(parser: argparse.ArgumentParser) -> None:
    for f in fields(TrainConfig):
        if f.name in _SKIP:
            continue
        flag = "--" + f.name.replace("_", "-")
        if f.type in ("bool",) or isinstance(f.default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default)
            continue
        base = {"int": int, "float": float, "str": str}
        text = str(f.type)
        kind = next((v for k, v in base.items() if text.startswith(k)), str)
        if "None" in text:
            kind = _parse_optional(kind)
        choices = {"optimizer": OPTIMIZERS, "model": MODELS, "data": TASKS,
                   "dist_strategy": ("comm-opt", "mem-opt")}.get(f.name)
        parser.add_argument(flag, type=kind, default=f.default, choices=choices,
                            help=f"(default: {f.default})")


def _common(parser: argparse.ArgumentParser, out: str) -> None:
    parser.add_argument("--seed", type=int, default=0, help="seed of every random source")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--out", type=Path, default=Path("runs") / out, help="run folder")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    parser.add_argument("--overwrite", action="store_true",
                        help="write into a non-empty --out, replacing the files this "
                             "command writes (without it a non-empty --out is refused)")


def _config(args: argparse.Namespace) -> TrainConfig:
    values = {f.name: getattr(args, f.name) for f in fields(TrainConfig)
              if hasattr(args, f.name)}
    return TrainConfig(**values)


def cmd_train(args: argparse.Namespace) -> None:
    if args.resume:  # only the flags given again are compared with the saved run
        changes = {f.name: getattr(args, f.name) for f in fields(TrainConfig)
                   if hasattr(args, f.name) and given(args.argv, f.name)}
        run = Run.resume(args.out, changes=changes)
    else:
        run = Run(_config(args), args.out)
    summary = run.train(progress=not args.no_progress)
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
    result = breakeven(_config(args), args.out, progress=not args.no_progress)
    figures = plots.plot_breakeven(args.out)
    print(f"digital K-FAC step {1e3 * result['digital_step_s']:.1f} ms, of which the device "
          f"would take over {100 * result['taken_over_share']:.1f}%")
    print("| settle model | speed-up at the paper's device (1 µs, 50 Gb/s, 16 bits) |")
    print("|---|---:|")
    for model, value in result["speedup_at_paper_point"].items():
        print(f"| {model} | {value:.3g} |")
    print(f"plot: {figures[0]}")


def cmd_sweep(args: argparse.Namespace) -> None:
    spec = load_spec(args.spec)
    if args.seeds is not None:
        spec["seeds"] = args.seeds
    spec["base"] = {**spec["base"], "threads": args.threads}
    summary = sweep(spec, args.out, progress=not args.no_progress)
    figures = plots.plot_sweep(args.out)
    print(sweep_table(summary))
    print(f"\nplot: {figures[0]}")


def cmd_plot(args: argparse.Namespace) -> None:
    for path in plots.redraw(args.folder):
        print(path)


class _Parser(argparse.ArgumentParser):
    """Argument errors as one line on stderr and exit status 2 (no usage dump)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="thermokfac", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    train = sub.add_parser("train", help="train one model × data × optimizer (± K-FAC)")
    _add_train_options(train)
    _common(train, "train")
    train.add_argument("--resume", action="store_true",
                       help="continue the run saved in --out: --steps (a new total), --lr, "
                            "--eval-every and --threads may change; any other flag given "
                            "must match the saved run")
    train.set_defaults(func=cmd_train)

    comp = sub.add_parser("compare", help="baseline vs K-FAC vs Thermodynamic K-FAC (Fig. 3)")
    _add_train_options(comp)
    _common(comp, "compare")
    comp.add_argument("--baseline", choices=OPTIMIZERS, default="adam")
    comp.add_argument("--baseline-lr", type=float, default=1e-3)
    comp.add_argument("--methods", nargs="+", choices=("m2", "m1"), default=["m2", "m1"],
                      help="device accountings to run (Method 2 and/or Method 1)")
    comp.add_argument("--rc-timed", action="store_true",
                      help="also simulate the device only as long as the RC convention "
                           "charges (t0 = 1 RC, one read): the accuracy that timing buys")
    comp.set_defaults(func=cmd_compare)

    prof = sub.add_parser("profile", help="K-FAC update time by part vs width / vocab (Fig. 2)")
    _common(prof, "profile")
    prof.add_argument("--widths", type=int, nargs="+", default=[64, 128, 256, 512, 1024, 2048])
    prof.add_argument("--depth", type=int, default=50)
    prof.add_argument("--mlp-batch", type=int, default=512)
    prof.add_argument("--embds", type=int, nargs="+", default=[64, 128, 256, 512])
    prof.add_argument("--vocabs", type=int, nargs="+",
                      default=[1000, 2000, 4000, 8000, 16000])
    prof.add_argument("--gpt-batch", type=int, default=64)
    prof.add_argument("--context", type=int, default=64)
    prof.add_argument("--n-layer", type=int, default=3)
    prof.add_argument("--vocab", type=int, default=10_000, help="vocabulary of the width sweep")
    prof.add_argument("--n-embd", type=int, default=256, help="width of the vocabulary sweep")
    prof.add_argument("--repeats", type=int, default=10)
    prof.add_argument("--nproc", type=int, default=None,
                      help="instead of the sweeps: an MLP of --depth × each of --widths, "
                           "batch --mlp-batch, on 1 and NPROC processes (gloo), --threads "
                           "divided among them")
    prof.add_argument("--strategy", choices=("comm-opt", "mem-opt"), default="comm-opt",
                      help="work distribution with --nproc")
    prof.add_argument("--device", default="cpu",
                      help="where the sweeps run: cpu (default), cuda, cuda:N or auto")
    prof.set_defaults(func=cmd_profile)

    scal = sub.add_parser("scaling", help="measured and modelled cost vs n (Tables 1-2)")
    _common(scal, "scaling")
    scal.add_argument("--ns", type=int, nargs="+", default=[64, 128, 256, 512, 1024, 2048])
    scal.add_argument("--repeats", type=int, default=5)
    scal.add_argument("--batch", type=int, default=32,
                      help="batch of the memory comparison (resistor-array rows)")
    scal.set_defaults(func=cmd_scaling)

    quant = sub.add_parser("quantize", help="input / output quantization sweeps (Fig. 4)")
    _add_train_options(quant)
    _common(quant, "quantize")
    quant.set_defaults(model="resnet", data="fashion-mnist", optimizer="sgd", lr=0.05)
    quant.add_argument("--bits", type=int, nargs="+", default=[6, 8, 12, 16])
    quant.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    quant.add_argument("--adam-lr", type=float, default=1e-3)
    quant.set_defaults(func=cmd_quantize)

    pln = sub.add_parser("plan", help="SPUs, predicted digital vs device time, speed-up")
    _add_train_options(pln)
    _common(pln, "plan")
    pln.add_argument("--bits", type=int, nargs="+", default=[6, 8, 12, 16])
    pln.add_argument("--rcs-us", type=float, nargs="+", default=[0.1, 1.0, 10.0])
    pln.add_argument("--record-steps", type=int, default=5,
                     help="steps of a short thermodynamic run that records the factors' "
                          "α_min for the rc_over_alpha_min and target_error settle models "
                          "(0: skip them)")
    pln.set_defaults(func=cmd_plan)

    brk = sub.add_parser("breakeven", help="device speed-up map over RC × link, per settle "
                         "model and bits, from two short training runs")
    _add_train_options(brk)
    _common(brk, "breakeven")
    brk.set_defaults(model="mlp", data="fashion-mnist", width=512, depth=2, batch_size=512,
                     steps=31, optimizer="sgd", lr=0.1, damping=0.01, func=cmd_breakeven)

    swp = sub.add_parser("sweep", help="time to a target metric per optimizer, lr-tuned")
    swp.add_argument("spec", type=Path, help="sweep spec (JSON; see configs/)")
    _common(swp, "sweep")
    swp.add_argument("--seeds", type=int, nargs="+", default=None,
                     help="override the spec's seeds")
    swp.set_defaults(func=cmd_sweep)

    plot = sub.add_parser("plot", help="redraw the figures of a saved run folder")
    plot.add_argument("folder", type=Path)
    plot.set_defaults(func=cmd_plot)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    if _MISSING is not None:
        print(f"thermokfac: the command line needs {_MISSING!r}, which is not installed: "
              "pip install 'thermokfac[cli]' (the preconditioner itself needs only torch "
              "and numpy)", file=sys.stderr)
        return 2
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    args.argv = argv
    try:
        import torch

        refuse_nonempty(args)
        torch.manual_seed(getattr(args, "seed", 0))
        args.func(args)
        code = 0
    except (ValueError, FileNotFoundError, FloatingPointError) as err:
        print(f"thermokfac {args.command}: error: {err}", file=sys.stderr)
        code = 2
    except RuntimeError as err:  # under torchrun: a failed peer or collective
        if not distributed():
            raise
        print(f"thermokfac {args.command}: error: {err}", file=sys.stderr)
        code = 1
    if distributed():
        leave_distributed(code)
    return code


if __name__ == "__main__":
    raise SystemExit(main())
