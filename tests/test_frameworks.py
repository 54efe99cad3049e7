"""``KFACOptimizer`` inside training frameworks: each applied update equals a plain loop
with ``KFACPreconditioner`` on the same data, in the framework's own order of
accumulation, clipping and stepping; a framework resume equals the uninterrupted run.

Needs the ``frameworks`` extra (Accelerate); skipped where it is absent.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from thermokfac import KFACOptimizer, KFACPreconditioner

BATCHES = [(torch.randn(16, 6, generator=torch.Generator().manual_seed(i), dtype=torch.float64),
            torch.randint(0, 4, (16,), generator=torch.Generator().manual_seed(90 + i)))
           for i in range(4)]
OPTIONS = {"damping": 1e-2, "inv_update_steps": 2, "kl_clip": 1e-3}


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 4)).double()


def _sgd(params):
    return torch.optim.SGD(params, lr=0.05, momentum=0.9)


def _plain(batches, clip: float | None = None, options: dict = OPTIONS):
    """The reference: backward, (clip), precondition, step."""
    model = _net()
    opt = _sgd(model.parameters())
    pre = KFACPreconditioner(model, optimizer=opt, **options)
    for x, y in batches:
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        pre.step()
        opt.step()
    return model


def _close(a: nn.Module, b: nn.Module, tol: float = 1e-12) -> bool:
    return all(torch.allclose(p, q, rtol=tol, atol=tol)
               for p, q in zip(a.parameters(), b.parameters()))


# ------------------------------------------------------------------ Accelerate
def test_accelerate_accumulate_preconditions_once_per_optimizer_step():
    """Two micro-batches of 8 per optimizer step under ``accelerator.accumulate``: the
    wrapped optimizer steps (and preconditions) on the sync step only, with the factors
    of both micro-batches: the plain loop on the full batches of 16."""
    accelerate = pytest.importorskip("accelerate")
    accelerator = accelerate.Accelerator(gradient_accumulation_steps=2, cpu=True)
    model = _net()
    opt = KFACOptimizer(model, _sgd(model.parameters()), **OPTIONS)
    model, wrapped = accelerator.prepare(model, opt)
    for x, y in BATCHES:
        for half in (slice(0, 8), slice(8, 16)):
            with accelerator.accumulate(model):
                loss = nn.functional.cross_entropy(model(x[half]), y[half])
                accelerator.backward(loss)
                wrapped.step()
                wrapped.zero_grad()
    assert opt.preconditioner.steps == len(BATCHES)
    assert _close(model, _plain(BATCHES), tol=1e-10)


def _accelerate_run(accelerate, batches, save=None, load=None):
    accelerator = accelerate.Accelerator(cpu=True)
    model = _net()
    opt = KFACOptimizer(model, _sgd(model.parameters()), **OPTIONS)
    model, wrapped = accelerator.prepare(model, opt)
    if load is not None:
        accelerator.load_state(load)
    for x, y in batches:
        wrapped.zero_grad()
        accelerator.backward(nn.functional.cross_entropy(model(x), y))
        wrapped.step()
    if save is not None:
        accelerator.save_state(save)
    return model, opt


@pytest.mark.slow  # a framework resume: two trainings and a checkpoint round trip
def test_accelerate_resume_equals_the_uninterrupted_run(tmp_path):
    """``accelerator.save_state`` / ``load_state`` carry ``KFACOptimizer.state_dict()``
    (base and preconditioner): the resumed run continues exactly."""
    accelerate = pytest.importorskip("accelerate")
    whole, _ = _accelerate_run(accelerate, BATCHES)
    _accelerate_run(accelerate, BATCHES[:2], save=tmp_path / "state")
    resumed, opt = _accelerate_run(accelerate, BATCHES[2:], load=tmp_path / "state")
    assert opt.preconditioner.steps == len(BATCHES)
    assert _close(resumed, whole, tol=0.0)


# ------------------------------------------------------------------ Lightning
def _lightning():
    lightning = pytest.importorskip("lightning")

    class Module(lightning.LightningModule):
        def __init__(self, options: dict = OPTIONS):
            super().__init__()
            self.net, self.options = _net(), options

        def training_step(self, batch, batch_idx):
            x, y = batch
            return nn.functional.cross_entropy(self.net(x), y)

        def configure_optimizers(self):
            return KFACOptimizer(self.net, _sgd(self.net.parameters()), **self.options)

    def trainer(**kwargs):
        return lightning.Trainer(accelerator="cpu", devices=1, logger=False,
                                 enable_checkpointing=False, enable_progress_bar=False,
                                 enable_model_summary=False, **kwargs)
    return Module, trainer


def test_lightning_clips_before_preconditioning():
    """Lightning runs the closure (forward, backward, ``gradient_clip_val``) inside
    ``optimizer.step(closure)``: K-FAC preconditions the clipped gradient. (Without the
    KL clip here: a binding KL clip rescales U and undoes a norm clip's scale.)"""
    module_cls, trainer_of = _lightning()
    options = {**OPTIONS, "kl_clip": None}
    module = module_cls(options)
    trainer = trainer_of(max_epochs=1, gradient_clip_val=0.05)
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(BATCHES, batch_size=None))
    assert trainer.optimizers[0].preconditioner.steps == len(BATCHES)
    assert _close(module.net, _plain(BATCHES, clip=0.05, options=options))
    assert not _close(module.net, _plain(BATCHES, options=options), tol=1e-6)  # clip mattered


@pytest.mark.slow  # a framework resume: two trainings and a checkpoint round trip
def test_lightning_resume_equals_the_uninterrupted_run(tmp_path):
    """Epoch 1, checkpoint, a new Trainer resumes with ``ckpt_path`` for epoch 2: the
    preconditioner's factors and step count come back through ``load_state_dict``."""
    module_cls, trainer_of = _lightning()
    loader = torch.utils.data.DataLoader(BATCHES[:2], batch_size=None)
    whole = module_cls()
    trainer_of(max_epochs=2).fit(whole, train_dataloaders=loader)
    first = module_cls()
    trainer = trainer_of(max_epochs=1)
    trainer.fit(first, train_dataloaders=loader)
    trainer.save_checkpoint(tmp_path / "epoch1.ckpt")
    resumed = module_cls()
    trainer = trainer_of(max_epochs=2)
    trainer.fit(resumed, train_dataloaders=loader, ckpt_path=tmp_path / "epoch1.ckpt")
    assert trainer.optimizers[0].preconditioner.steps == 4
    assert _close(resumed.net, whole.net, tol=0.0)


# ------------------------------------------------------------- Hugging Face Trainer
class _Examples(torch.utils.data.IterableDataset):
    """The batches' examples in order (the Trainer does not shuffle an iterable)."""

    def __iter__(self):
        for x, y in BATCHES:
            for i in range(len(y)):
                yield {"x": x[i], "labels": y[i]}


class _HFNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = _net()

    def forward(self, x, labels=None):
        logits = self.net(x)
        return {"loss": nn.functional.cross_entropy(logits, labels), "logits": logits}


def test_hugging_face_trainer_clips_before_preconditioning(tmp_path):
    """``Trainer(optimizers=(KFACOptimizer, scheduler))``: the Trainer clips
    (``max_grad_norm``) and then calls ``optimizer.step()``, so K-FAC preconditions the
    clipped gradient, once per step."""
    transformers = pytest.importorskip("transformers")
    options = {**OPTIONS, "kl_clip": None}
    model = _HFNet()
    opt = KFACOptimizer(model.net, _sgd(model.net.parameters()), **options)
    constant = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=len(BATCHES), per_device_train_batch_size=16,
        max_grad_norm=0.05, report_to="none", save_strategy="no", logging_strategy="no",
        use_cpu=True, disable_tqdm=True, dataloader_num_workers=0, seed=0)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=_Examples(),
                                   optimizers=(opt, constant))
    trainer.train()
    assert opt.preconditioner.steps == len(BATCHES)
    assert _close(model.net, _plain(BATCHES, clip=0.05, options=options))
    assert not _close(model.net, _plain(BATCHES, options=options), tol=1e-6)  # clip mattered


def _hf_train(transformers, out, steps, options, save=False, resume=None):
    model = _HFNet()
    opt = KFACOptimizer(model.net, _sgd(model.net.parameters()), **options)
    constant = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    args = transformers.TrainingArguments(
        output_dir=str(out), max_steps=steps, per_device_train_batch_size=16,
        report_to="none", save_strategy="steps" if save else "no", save_steps=steps,
        logging_strategy="no", use_cpu=True, disable_tqdm=True, dataloader_num_workers=0,
        seed=0)
    transformers.Trainer(model=model, args=args, train_dataset=_Examples(),
                         optimizers=(opt, constant)).train(resume_from_checkpoint=resume)
    return model, opt


@pytest.mark.slow  # a framework resume: two trainings and a checkpoint round trip
def test_hugging_face_resume_equals_the_uninterrupted_run(tmp_path):
    """``resume_from_checkpoint``: the Trainer restores ``KFACOptimizer.state_dict()``
    (base and preconditioner) and continues exactly."""
    transformers = pytest.importorskip("transformers")
    whole, _ = _hf_train(transformers, tmp_path / "whole", 4, OPTIONS)
    _hf_train(transformers, tmp_path / "part", 2, OPTIONS, save=True)
    resumed, opt = _hf_train(transformers, tmp_path / "part", 4, OPTIONS,
                             resume=str(tmp_path / "part" / "checkpoint-2"))
    assert opt.preconditioner.steps == 4
    assert _close(resumed.net, whole.net, tol=0.0)


# ------------------------------------------------------------------ torch.amp
def _amp_run(scale: float | None, pass_scaler: bool, dtype=torch.float16):
    """float16 autocast on the CPU; the loss scaled by a fixed power of two (or not)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 4))
    scaler = None if scale is None else torch.amp.GradScaler(
        "cpu", init_scale=scale, growth_interval=10**6)
    opt = KFACOptimizer(model, _sgd(model.parameters()), damping=1e-2, kl_clip=None,
                        grad_scaler=scaler if pass_scaler else None)
    for x, y in BATCHES:
        opt.zero_grad()
        with torch.autocast("cpu", dtype=dtype):
            loss = nn.functional.cross_entropy(model(x.float()), y)
        if scaler is None:
            loss.backward()
            opt.step()
        else:  # scaler.step unscales the gradients before KFACOptimizer.step runs
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
    return model, opt


def test_grad_scaler_cancels_exactly():
    """A power-of-two loss scale is exact in floating point: with ``grad_scaler=`` the
    run equals the unscaled one; without it, G carries the scale² (a different run),
    which is warned and counted."""
    plain, _ = _amp_run(None, False)
    scaled, _ = _amp_run(2.0**12, True)
    assert all(torch.allclose(p, q, rtol=1e-6, atol=1e-7)
               for p, q in zip(plain.parameters(), scaled.parameters()))
    with pytest.warns(UserWarning, match="float16 autocast but no grad_scaler"):
        forgot, opt = _amp_run(2.0**12, False)
    assert opt.preconditioner.stats["fp16_without_grad_scaler"] == len(BATCHES)
    assert not all(torch.allclose(p, q, rtol=1e-3, atol=1e-4)
                   for p, q in zip(plain.parameters(), forgot.parameters()))
    _, bf16 = _amp_run(None, False, dtype=torch.bfloat16)  # no scaler needed: no warning
    assert bf16.preconditioner.stats["fp16_without_grad_scaler"] == 0


def test_overflowed_step_leaves_no_curvature_behind():
    """A float16 overflow makes ``scaler.step`` skip the step; ``zero_grad`` then drops
    that backward's curvature with its gradients: the run equals one that never saw the
    overflowing batch (float32 reference without a scaler)."""
    def run(batches, scaler_scale):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 4))
        scaler = torch.amp.GradScaler("cpu", init_scale=scaler_scale, growth_interval=10**6)
        opt = KFACOptimizer(model, _sgd(model.parameters()), damping=1e-2, kl_clip=None,
                            grad_scaler=scaler, factor_decay=0.5)
        for x, y in batches:
            opt.zero_grad()
            with torch.autocast("cpu", dtype=torch.float16):
                loss = nn.functional.cross_entropy(model(x.float()), y)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        return model, opt
    overflow = (BATCHES[1][0] * 1e6, BATCHES[1][1])  # float16 overflows in the forward
    seen, opt = run([BATCHES[0], overflow, BATCHES[2], BATCHES[3]], 2.0**8)
    never, _ = run([BATCHES[0], BATCHES[2], BATCHES[3]], 2.0**8)
    assert opt.preconditioner.steps == 3
    assert opt.preconditioner.stats["discarded_curvature"] == 1
    assert opt.preconditioner.stats["nonfinite_factor_skips"] == 0
    assert all(torch.allclose(p, q, rtol=1e-6, atol=1e-7)
               for p, q in zip(seen.parameters(), never.parameters()))


def test_bare_preconditioner_unscales_when_the_user_forgot():
    """With ``grad_scaler=`` and ``optimizer=``, a bare ``KFACPreconditioner`` unscales
    the gradients itself when ``scaler.unscale_`` was not called: the KL clip (which
    reads ⟨U, DΘ⟩) then sees the true gradient, as with the call."""
    def run(unscale_first: bool):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 4))
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12, growth_interval=10**6)
        opt = _sgd(model.parameters())
        pre = KFACPreconditioner(model, optimizer=opt, grad_scaler=scaler, damping=1e-2,
                                 kl_clip=1e-4)
        for x, y in BATCHES:
            opt.zero_grad()
            with torch.autocast("cpu", dtype=torch.float16):
                loss = nn.functional.cross_entropy(model(x.float()), y)
            scaler.scale(loss).backward()
            if unscale_first:
                scaler.unscale_(opt)
            pre.step()
            scaler.step(opt)
            scaler.update()
        return model, pre
    careful, pre = run(True)
    forgot, _ = run(False)
    assert pre.stats["kl_clip_scale"] < 1  # the clip binds: a scaled ⟨U, DΘ⟩ would show
    assert all(torch.equal(p, q) for p, q in zip(careful.parameters(), forgot.parameters()))


def test_preconditioning_after_the_scaler_step_is_refused():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 4))
    scaler = torch.amp.GradScaler("cpu")
    opt = _sgd(model.parameters())
    pre = KFACPreconditioner(model, optimizer=opt, grad_scaler=scaler, kl_clip=None)
    x, y = BATCHES[0]
    with torch.autocast("cpu", dtype=torch.float16):
        loss = nn.functional.cross_entropy(model(x.float()), y)
    scaler.scale(loss).backward()
    scaler.step(opt)
    with pytest.raises(RuntimeError, match=r"call pre\.step\(\) before scaler\.step"):
        pre.step()
