"""
The thermodynamic solver alone
==============================

:class:`~thermokfac.solvers.ThermodynamicSolver` simulates coupled RC oscillators
relaxing under noise (an Ornstein–Uhlenbeck process whose stationary mean is the
solution of the damped system, Sec. 4.2 of the paper), with the DAC quantization of
what is loaded into the device and the ADC quantization of what is read out. Here it
solves one damped Kronecker factor, against float64 ``torch.linalg.solve``, at several
input precisions.
"""

# %%
import matplotlib.pyplot as plt
import torch

from thermokfac.solvers import HardwareModel, ThermodynamicSolver

torch.manual_seed(0)
X = torch.randn(400, 64)
M = X.T @ X / 400                      # a symmetric factor, like A or G
B = torch.randn(64, 8)                 # right-hand sides (columns of a gradient)
damping = 1e-2
exact = torch.linalg.solve(M.double() + damping * torch.eye(64, dtype=torch.float64),
                           B.double())


def relative_error(solver: ThermodynamicSolver) -> tuple[float, float]:
    prepared = solver.prepare(M, damping=damping)
    result = solver.solve(prepared, B)
    error = (result.x.double() - exact).norm() / exact.norm()
    return float(error), result.modeled_time_s


bits = [6, 8, 10, 12, 16]
errors = [relative_error(ThermodynamicSolver(input_bits=b, output_bits=b))[0] for b in bits]
exact_device, device_s = relative_error(ThermodynamicSolver())
for b, e in zip(bits, errors):
    print(f"{b:2d} bits in and out: relative error {e:.2e}")
print(f"no quantization: relative error {exact_device:.2e} (the device's sampling noise)")
print(f"modelled device time of one solve (rc settle model): {device_s * 1e6:.2f} µs")

# %%
# The modelled time depends on how settling is counted (App. E of the paper): the
# paper's RC convention, RC scaled by the factor's smallest eigenvalue, or the time
# to reach a target error.
for model in ("rc", "rc_over_alpha_min", "target_error"):
    solver = ThermodynamicSolver(hardware=HardwareModel(settle_model=model))
    print(f"settle model {model:18s}: {relative_error(solver)[1] * 1e6:10.2f} µs")

# %%
fig, ax = plt.subplots(figsize=(6, 3.5))
ax.semilogy(bits, errors, "o-", label="DAC and ADC at this precision")
ax.axhline(exact_device, color="gray", ls="--", label="no quantization")
ax.set_xlabel("bits")
ax.set_ylabel("relative error vs float64 solve")
ax.legend()
fig.tight_layout()
