"""Training-loop realities: accumulation, autocast/GradScaler, DDP no_sync, reuse, ties."""

from __future__ import annotations

import logging
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

from thermokfac import KFACPreconditioner

from .cases import classification_batch, grad_matrix, mlp, rel_err


def _factors_and_grads(model, pre):
    return pre.factors(), {n: grad_matrix(model.get_submodule(n)) for n in pre.layer_names}


def _assert_same(run_a, run_b, tol):
    (fa, ga), (fb, gb) = run_a, run_b
    assert set(fa) == set(fb)
    for name in fa:
        assert rel_err(fa[name][0], fb[name][0]) < tol
        assert rel_err(fa[name][1], fb[name][1]) < tol
        assert rel_err(ga[name], gb[name]) < tol


def test_gradient_accumulation_equals_full_batch():
    x, y = classification_batch(n=16)
    full_model = mlp()
    full = KFACPreconditioner(full_model, kl_clip=None)
    nn.functional.cross_entropy(full_model(x), y).backward()
    full.step()

    micro_model = mlp()
    micro = KFACPreconditioner(micro_model, kl_clip=None)
    for xs, ys in zip(x.chunk(4), y.chunk(4)):
        (nn.functional.cross_entropy(micro_model(xs), ys) / 4).backward()
    micro.step()
    _assert_same(_factors_and_grads(full_model, full), _factors_and_grads(micro_model, micro),
                 1e-12)


def test_grad_scaler_scale_is_divided_out():
    x, y = classification_batch(n=16, dtype=torch.float32)
    plain_model = mlp(dtype=torch.float32)
    plain = KFACPreconditioner(plain_model, kl_clip=None)
    nn.functional.cross_entropy(plain_model(x), y).backward()
    plain.step()

    model = mlp(dtype=torch.float32)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    pre = KFACPreconditioner(model, kl_clip=None, grad_scaler=scaler)
    scaler.scale(nn.functional.cross_entropy(model(x), y)).backward()
    scaler.unscale_(opt)
    pre.step()
    _assert_same(_factors_and_grads(plain_model, plain), _factors_and_grads(model, pre), 1e-6)


def test_autocast_bfloat16_accumulates_float32_factors():
    x, y = classification_batch(n=64, dtype=torch.float32)
    ref_model = mlp(dtype=torch.float32)
    ref = KFACPreconditioner(ref_model, kl_clip=None)
    nn.functional.cross_entropy(ref_model(x), y).backward()
    ref.step()

    model = mlp(dtype=torch.float32)
    pre = KFACPreconditioner(model, kl_clip=None)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    pre.step()
    for name, (a, g) in pre.factors().items():
        assert a.dtype == g.dtype == torch.float32
        a_ref, g_ref = ref.factors()[name]
        # bfloat16 keeps 8 bits of mantissa: relative error ~2⁻⁸ per entry.
        assert rel_err(a, a_ref) < 2e-2 and rel_err(g, g_ref) < 5e-2
        assert torch.isfinite(grad_matrix(model.get_submodule(name))).all()


def _ddp_worker(store: str, out: str) -> None:
    """Runs in a fresh process: DDP (gloo, one rank) with no_sync accumulation."""
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    x, y = classification_batch(n=16)
    inner = mlp()
    ddp = nn.parallel.DistributedDataParallel(inner)
    pre = KFACPreconditioner(ddp, kl_clip=None)
    with ddp.no_sync():
        (nn.functional.cross_entropy(ddp(x[:8]), y[:8]) / 2).backward()
    (nn.functional.cross_entropy(ddp(x[8:]), y[8:]) / 2).backward()
    pre.step()
    torch.save({"names": pre.layer_names, "run": _factors_and_grads(inner, pre)}, out)


@pytest.mark.distributed
def test_ddp_no_sync_accumulation(tmp_path):
    """DDP-wrapped model, gradient accumulation under no_sync: same as the bare model.

    The DDP part runs in a subprocess that exits without tearing the process group down:
    freeing DDP's reducer while gloo's worker thread frees its last work object can
    deadlock inside torch (both wait on the GIL), which must not hang the suite.
    """
    x, y = classification_batch(n=16)
    plain_model = mlp()
    plain = KFACPreconditioner(plain_model, kl_clip=None)
    for xs, ys in zip(x.chunk(2), y.chunk(2)):
        (nn.functional.cross_entropy(plain_model(xs), ys) / 2).backward()
    plain.step()
    out = tmp_path / "ddp.pt"
    code = ("import os, sys; sys.path.insert(0, sys.argv[1]); "
            "from tests.test_training_loop import _ddp_worker; "
            "_ddp_worker(sys.argv[2], sys.argv[3]); sys.stdout.flush(); os._exit(0)")
    root = str(Path(__file__).resolve().parents[1])
    subprocess.run([sys.executable, "-c", code, root, str(tmp_path / "store"), str(out)],
                   check=True, timeout=120)
    result = torch.load(out, weights_only=False)
    assert result["names"] == ["0", "2"]
    _assert_same(_factors_and_grads(plain_model, plain), result["run"], 1e-12)


class Twice(nn.Module):
    def __init__(self):
        super().__init__()
        self.shared = nn.Linear(3, 3)
        self.head = nn.Linear(3, 2)

    def forward(self, x):
        return self.head(torch.tanh(self.shared(torch.tanh(self.shared(x)))))


def test_module_called_twice_contributes_both_calls():
    torch.manual_seed(0)
    model = Twice().double()
    x, y = classification_batch(n=5, d=3, classes=2)
    inputs = []
    handle = model.shared.register_forward_pre_hook(lambda m, a: inputs.append(a[0].detach()))
    pre = KFACPreconditioner(model, kl_clip=None)
    nn.functional.cross_entropy(model(x), y).backward()
    handle.remove()
    pre.step()
    rows = torch.cat([torch.cat([i, torch.ones(5, 1, dtype=i.dtype)], 1) for i in inputs])
    a, _ = pre.factors()["shared"]
    assert len(inputs) == 2
    assert rel_err(a, rows.mT @ rows / 10) < 1e-12


class TiedLM(nn.Module):
    def __init__(self, vocab=11, dim=4):
        super().__init__()
        self.wte = nn.Embedding(vocab, dim)
        self.mix = nn.Linear(dim, dim)
        self.lm_head = nn.Linear(dim, vocab, bias=False)
        self.lm_head.weight = self.wte.weight

    def forward(self, idx):
        return self.lm_head(torch.tanh(self.mix(self.wte(idx))))


def test_tied_parameter_preconditioned_once(caplog):
    torch.manual_seed(0)
    model = TiedLM().double()
    with caplog.at_level(logging.INFO, logger="thermokfac"):
        pre = KFACPreconditioner(model, kl_clip=None, num_per_example_loss_terms=6)
    assert pre.layer_names == ["wte", "mix"]
    assert pre.discovery.tied == {"lm_head": "wte"}
    assert "lm_head -> wte" in caplog.text
    idx = torch.randint(0, 11, (3, 6))
    logits = model(idx)
    nn.functional.cross_entropy(logits.reshape(-1, 11), idx.roll(1, 1).reshape(-1)).backward()
    raw = model.wte.weight.grad.clone()
    pre.step()
    a, g = pre.factors()["wte"]
    lam = pre.layer_state("wte").damping
    expected = torch.linalg.solve(g + lam[1] * torch.eye(4, dtype=g.dtype), raw.mT) / (a + lam[0])
    assert rel_err(model.wte.weight.grad.mT, expected) < 1e-12

    other = KFACPreconditioner(TiedLM(), kl_clip=None, skip_layers=["wte"])
    assert other.layer_names == ["mix", "lm_head"]


def test_unsupported_layers_listed_once(caplog):
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Embedding(4, 4, sparse=True))
    with caplog.at_level(logging.WARNING, logger="thermokfac"):
        pre = KFACPreconditioner(model, kl_clip=None)
    assert pre.unsupported_layers == {
        "1": "no helper for LayerNorm",
        "2": "Embedding with sparse=True (sparse gradients are not supported)"}
    assert caplog.text.count("leaves these modules") == 1


def test_kl_clip_scales_every_update():
    x, y = classification_batch(n=16)
    runs = {}
    for clip in (None, 1e-6):
        model = mlp()
        pre = KFACPreconditioner(model, kl_clip=clip, lr=0.5)
        nn.functional.cross_entropy(model(x), y).backward()
        raw = {n: grad_matrix(model.get_submodule(n)) for n in pre.layer_names}
        pre.step()
        runs[clip] = (raw, {n: grad_matrix(model.get_submodule(n)) for n in pre.layer_names},
                      pre.stats["kl_clip_scale"])
    raw, unclipped, _ = runs[None]
    _, clipped, nu = runs[1e-6]
    vg = sum(float((unclipped[n] * raw[n]).sum()) for n in raw) * 0.5**2
    assert nu == pytest.approx(min(1.0, math.sqrt(1e-6 / vg)), rel=1e-12) and nu < 1
    for name in raw:
        assert rel_err(clipped[name], nu * unclipped[name]) < 1e-12


def test_kl_clip_reads_optimizer_learning_rate():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.3)
    pre = KFACPreconditioner(model, kl_clip=1e-9, optimizer=opt)
    x, y = classification_batch()
    nn.functional.cross_entropy(model(x), y).backward()
    pre.step()
    assert pre.stats["kl_clip_scale"] < 1.0


def test_remove_detaches_hooks_and_timings_are_recorded():
    model = mlp(dtype=torch.float32)
    pre = KFACPreconditioner(model, kl_clip=None, inv_update_steps=2)
    x, y = classification_batch(dtype=torch.float32)
    for _ in range(3):
        model.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        pre.step()
    history = list(pre.timing.history)
    assert [t.step for t in history] == [0, 1, 2]
    assert all(t.curvature_s > 0 and t.update_s > 0 for t in history)
    assert pre.timing_summary()["steps"] == 3
    pre.remove()
    model(x).sum().backward()
    assert pre.pending_step().buffers == ()
    assert all(len(m._forward_pre_hooks) == 0 for m in model.modules())


def test_schedules_are_read_every_step():
    """factor_decay(k) = k/(k+1) turns the moving average into the running mean."""
    x, _ = classification_batch(n=12)
    model = mlp()
    pre = KFACPreconditioner(model, kl_clip=None, factor_decay=lambda k: k / (k + 1),
                             inv_update_steps=lambda k: 1 if k < 2 else 3,
                             damping=lambda k: 1e-3 * (k + 1))
    singles = []
    for k in range(4):
        single = KFACPreconditioner(mlp(), kl_clip=None)
        xs = x.roll(k, 0)[:6]
        for net, p in ((model, pre), (single.model, single)):
            net.zero_grad()
            nn.functional.cross_entropy(net(xs), torch.zeros(6, dtype=torch.long)).backward()
            p.step()  # no optimizer step: both networks keep the same weights
        single.remove()
        singles.append(single.factors())
    for name, (a, g) in pre.factors().items():
        mean_a = sum(s[name][0] for s in singles) / 4
        mean_g = sum(s[name][1] for s in singles) / 4
        assert rel_err(a, mean_a) < 1e-12 and rel_err(g, mean_g) < 1e-12
    # inverse updates at steps 0, 1, then every 3rd: step 3 used the damping of step 3
    assert pre.layer_state("0").damping == (pytest.approx(4e-3), pytest.approx(4e-3))


def test_kl_clip_uses_momentum_effective_learning_rate():
    x, y = classification_batch(n=16)
    nus = {}
    for momentum in (0.0, 0.9):
        model = mlp()
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=momentum)
        pre = KFACPreconditioner(model, kl_clip=1e-7, optimizer=opt)
        nn.functional.cross_entropy(model(x), y).backward()
        pre.step()
        nus[momentum] = pre.stats["kl_clip_scale"]
    assert nus[0.9] == pytest.approx(nus[0.0] * (1 - 0.9), rel=1e-9)


def test_a_prepare_that_raised_is_retried_at_the_next_step():
    """A solver that raises inside a due prepare (a lost device): the step raises
    without advancing, the block it failed on holds nothing prepared, and the next
    step prepares every block again from its own batch's factors alone."""
    model = mlp(dtype=torch.float64)
    pre = KFACPreconditioner(model, kl_clip=None, inv_update_steps=2, factor_decay=0.0)
    original, calls = pre.solver.prepare, []

    def flaky(*args, **kwargs):
        calls.append(pre.steps)
        if pre.steps == 2 and calls.count(2) == 1:
            raise RuntimeError("device lost")
        return original(*args, **kwargs)

    pre.solver.prepare = flaky
    x, y = classification_batch(dtype=torch.float64)
    for step in range(4):
        model.zero_grad()
        batch = slice(0, 8 - step)
        nn.functional.cross_entropy(model(x[batch]), y[batch]).backward()
        if step == 2:
            with pytest.raises(RuntimeError, match="device lost"):
                pre.step()
            assert not pre.block("0").ready and pre.steps == 2
            model.zero_grad()
            nn.functional.cross_entropy(model(x[batch]), y[batch]).backward()
            continue
        report = pre.step()
    assert report.step == 2 and report.prepared == tuple(pre.layer_names)
    assert not report.skipped and all(b.ready for b in pre.blocks.values())
    reference = mlp(dtype=torch.float64)
    ref = KFACPreconditioner(reference, kl_clip=None, factor_decay=0.0)
    reference.load_state_dict(model.state_dict())
    nn.functional.cross_entropy(reference(x[:5]), y[:5]).backward()
    ref.step()
    for (a, g), (ra, rg) in zip(pre.factors().values(), ref.factors().values()):
        torch.testing.assert_close(a, ra, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(g, rg, rtol=1e-12, atol=1e-14)
