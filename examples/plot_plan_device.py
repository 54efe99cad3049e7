"""
Planning a device from Python
=============================

:func:`thermokfac.experiments.plan.plan` prices a model's K-FAC work on a thermodynamic
device: the SPUs its factors need, the modelled device time per step under each settle
model (App. E) and the speed-up over the measured digital K-FAC work, over a grid of
precisions and RC time constants. ``thermokfac plan`` is the same from the command
line.
"""

# %%
import tempfile

import matplotlib.pyplot as plt

from thermokfac.experiments.config import TrainConfig
from thermokfac.experiments.plan import plan

cfg = TrainConfig(model="mlp", data="digits", width=256, depth=2, kfac=True)
with tempfile.TemporaryDirectory() as out:
    result = plan(cfg, out, bits=[8, 16], rcs_us=[0.1, 1.0, 10.0], inv_update_steps=10,
                  record_steps=3)
print(f"SPUs needed: {result['spus_needed']} (largest factor {result['largest_factor']})")
print(f"digital K-FAC work per step: {result['digital_kfac_s'] * 1e3:.2f} ms")
for row in result["grid"]:
    speedups = ", ".join(f"{model} {value:.3g}" for model, value in
                         row["speedup_by_settle"].items())
    print(f"{row['bits']:2d} bits, RC {row['rc_us']:4g} µs: speed-up {speedups}")

# %%
# The speed-up at 16 bits as the RC time constant grows, under each settle model:
fig, ax = plt.subplots(figsize=(6, 3.5))
rows = [r for r in result["grid"] if r["bits"] == 16]
for model in rows[0]["speedup_by_settle"]:
    ax.loglog([r["rc_us"] for r in rows], [r["speedup_by_settle"][model] for r in rows],
              "o-", label=model)
ax.axhline(1.0, color="gray", ls="--")
ax.set_xlabel("RC time constant (µs)")
ax.set_ylabel("speed-up of the K-FAC work")
ax.legend(title="settle model")
fig.tight_layout()
