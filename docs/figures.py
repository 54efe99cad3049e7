"""The Explanations page's figures, drawn at each docs build from the library itself
(``docs/_figures/*.png``, not committed)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
from torch import nn

from thermokfac import KFACPreconditioner
from thermokfac.solvers import HardwareModel, ThermodynamicSolver
from thermokfac.solvers.quantize import quantize_conservative, quantize_nearest


def kronecker_block(path: Path) -> None:
    """One layer's empirical Fisher block (Eq. 10, from per-example gradients) beside
    K-FAC's A ⊗ G (Eqs. 11–12, from the preconditioner's factors)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3, bias=False), nn.Tanh(), nn.Linear(3, 3, bias=False))
    x, y = torch.randn(256, 4), torch.randint(0, 3, (256,))
    grads = []
    for i in range(len(x)):
        model.zero_grad()
        nn.functional.cross_entropy(model(x[i:i + 1]), y[i:i + 1]).backward()
        grads.append(model[0].weight.grad.T.reshape(-1).clone())  # vec(DΘ), column-major
    fisher = torch.stack(grads).T @ torch.stack(grads) / len(x)
    pre = KFACPreconditioner(model, factor_decay=0.0, loss_reduction="sum", kl_clip=None)
    model.zero_grad()
    nn.functional.cross_entropy(model(x), y, reduction="sum").backward()
    pre.step()
    a, g = pre.factors()["0"]
    kfac = torch.kron(a, g) / len(x)
    fig, axes = plt.subplots(1, 2, figsize=(7.5, 3.4))
    scale = float(fisher.abs().max())
    for ax, m, title in ((axes[0], fisher, "empirical Fisher block F (Eq. 10)"),
                         (axes[1], kfac, "K-FAC: A ⊗ G (Eqs. 11–12)")):
        image = ax.imshow(m, cmap="RdBu_r", vmin=-scale, vmax=scale)
        ax.set_title(title, fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.colorbar(image, ax=axes, shrink=0.8)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def ou_averaging(path: Path) -> None:
    """The device's relative error against float64 as its averaging window T grows, for
    two burn-ins t₀: after a short one the transient left in the window dominates
    (∝ 1/T); after a long one the thermal noise of the sample mean (Eq. 23) does
    (∝ 1/√T)."""
    torch.manual_seed(0)
    x = torch.randn(200, 32, dtype=torch.float64)
    m, b, damping = x.T @ x / 200, torch.randn(32, 1, dtype=torch.float64), 0.1
    exact = torch.linalg.solve(m + damping * torch.eye(32, dtype=torch.float64), b)
    windows = [10.0, 30.0, 100.0, 300.0, 1000.0, 3000.0]
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for t0, law, exponent in ((50.0, "∝ 1/T", 1.0), (400.0, "∝ 1/√T", 0.5)):
        errors = []
        for window in windows:
            solver = ThermodynamicSolver(t0_rc=t0, window_rc=window)
            runs = []
            for seed in range(8):
                generator = torch.Generator().manual_seed(seed)
                prepared = solver.prepare(m, damping=damping, generator=generator)
                result = solver.solve(prepared, b, generator=generator)
                runs.append(float((result.x - exact).norm() / exact.norm()))
            errors.append(sum(runs) / len(runs))
        line, = ax.loglog(windows, errors, "o-", label=f"t₀ = {t0:g} RC (mean of 8 runs)")
        ax.loglog(windows, [errors[0] * (windows[0] / w) ** exponent for w in windows],
                  "--", color=line.get_color(), alpha=0.6, label=law)
    ax.set_xlabel("averaging window T (RC)")
    ax.set_ylabel("relative error of x")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def quantizers(path: Path) -> None:
    """The smallest eigenvalue of a quantized positive definite factor: rounding to
    nearest can make it indefinite; the conservative quantizer (Sec. 4.5.1) never does,
    at the price of a diagonal shift."""
    torch.manual_seed(0)
    x = torch.randn(64, 48, dtype=torch.float64)
    m = x.T @ x / 64 + 1e-3 * torch.eye(48, dtype=torch.float64)
    bits = [4, 6, 8, 10, 12, 16]
    nearest = [float(torch.linalg.eigvalsh(quantize_nearest(m, b)).min()) for b in bits]
    conservative = [float(torch.linalg.eigvalsh(quantize_conservative(m, b)[0]).min())
                    for b in bits]
    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    ax.plot(bits, nearest, "o-", label="round to nearest")
    ax.plot(bits, conservative, "s-", label="conservative (diagonal-dominant)")
    ax.axhline(float(torch.linalg.eigvalsh(m).min()), color="gray", ls="--",
               label="unquantized")
    ax.axhline(0.0, color="black", lw=0.8)
    ax.set_xlabel("bits per programmed value")
    ax.set_ylabel("smallest eigenvalue")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def settle_models(path: Path) -> None:
    """Modelled seconds of one bank of k = n solves on an n-dimensional SPU under each
    settle model (App. E), for a damped factor with α_min = 10⁻² and the burn-in the
    target error 10⁻³ asks for."""
    hardware = HardwareModel()
    ns = [64, 128, 256, 512, 1024, 2048]
    solver = ThermodynamicSolver()
    schedule = {}
    for n in ns:
        m = torch.eye(n, dtype=torch.float64) * 1e-2
        schedule[n] = solver.schedule(solver.prepare(m, damping=0.0))
    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    for model in ("rc", "rc_over_alpha_min", "target_error"):
        seconds = [hardware.time_solve(n, n, alpha_min=1e-2, t0_rc=schedule[n].t0,
                                       window_rc=schedule[n].window,
                                       settle_model=model).total_s for n in ns]
        ax.loglog(ns, seconds, "o-", label=model)
    ax.set_xlabel("n")
    ax.set_ylabel("modelled seconds per bank of n solves")
    ax.legend(title="settle model")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def draw(folder: Path) -> None:
    """Draw every figure into ``folder``."""
    folder.mkdir(exist_ok=True)
    for function in (kronecker_block, ou_averaging, quantizers, settle_models):
        function(folder / f"{function.__name__}.png")


if __name__ == "__main__":
    draw(Path(__file__).resolve().parent / "_figures")
