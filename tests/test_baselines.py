"""The optimizers K-FAC is compared with, as the harness builds them: Muon's parameter
split, every setting reaching its optimizer, heavyball's compilation off, and the shared
warm-up + cosine schedule (against its closed form, through a checkpoint)."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
from torch import nn

from thermokfac.experiments.config import TrainConfig, unused_settings
from thermokfac.experiments.optimizers import (
    MatrixViewMuon,
    OptimizerSplit,
    make_optimizer,
    muon_split,
)
from thermokfac.experiments.tasks import build_model, load_task
from thermokfac.experiments.train import Run

heavyball = pytest.importorskip("heavyball", reason="needs the baselines extra")


def _model(name: str, data: str, **kw):
    task = load_task(data, limit=2000, seed=0, **kw)
    return build_model(name, task, width=16, depth=2, heads=2, seed=0)


# Hand-listed from the rule: 2-D weights of hidden Linear layers and attention
# projections on Muon; embeddings, the (tied) head, biases, norms, convolutions, class
# tokens on AdamW.
SPLITS = {
    "mlp": ("digits", {}, ["net.1.weight", "net.3.weight"]),
    "gpt": ("shakespeare", {"context": 8},
            [f"blocks.{i}.{p}.weight" for i in range(2)
             for p in ("attn.qkv", "attn.proj", "fc", "out")]),
    "torch-gpt": ("shakespeare", {"context": 8},
                  [f"blocks.layers.{i}.{p}" for i in range(2)
                   for p in ("self_attn.in_proj_weight", "self_attn.out_proj.weight",
                             "linear1.weight", "linear2.weight")]),
    "resnet": ("digits", {}, []),
    "vit": ("digits", {}, [f"blocks.{i}.{p}.weight" for i in range(2)
                           for p in ("attn.qkv", "attn.proj", "fc", "out")]),
}


@pytest.mark.parametrize("name", sorted(SPLITS))
def test_muon_takes_the_hidden_matrices_and_adamw_the_rest(name):
    data, kw, expected = SPLITS[name]
    model = _model(name, data, **kw)
    muon, adamw = muon_split(model)
    assert muon == expected
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert sorted(muon + adamw) == sorted(names)  # every parameter exactly once
    assert all(dict(model.named_parameters())[n].ndim == 2 for n in muon)


def test_a_tied_head_stays_on_adamw_with_its_embedding():
    model = _model("gpt", "shakespeare", context=8)
    assert model.lm_head.weight is model.wte.weight
    muon, adamw = muon_split(model)
    assert "wte.weight" in adamw and "wte.weight" not in muon


def test_muon_takes_the_hidden_convolution_kernels_when_asked():
    model = _model("resnet", "digits")
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    muon, adamw = muon_split(model, conv_kernels=True)
    # every convolution but the first (the stem reads the input); the head stays off
    assert muon == [f"{n}.weight" for n in convs[1:]]
    assert f"{convs[0]}.weight" in adamw and "head.weight" in adamw
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert sorted(muon + adamw) == sorted(names)
    # the other models' splits do not change (no convolutions, or only a patch stem)
    for name in ("mlp", "vit"):
        data, kw, expected = SPLITS[name]
        assert muon_split(_model(name, data, **kw), conv_kernels=True)[0] == expected


def test_matrix_view_muon_steps_a_kernel_as_muon_steps_its_matrix():
    torch.manual_seed(0)
    kernel = nn.Parameter(torch.randn(6, 3, 3, 3))
    matrix = nn.Parameter(kernel.detach().clone().reshape(6, 27))  # the reference
    ours = MatrixViewMuon([kernel], lr=0.05, weight_decay=0.1,
                          adjust_lr_fn="match_rms_adamw")
    ref = torch.optim.Muon([matrix], lr=0.05, weight_decay=0.1,
                           adjust_lr_fn="match_rms_adamw")
    start = kernel.detach().clone()
    for _ in range(3):  # momentum carries over steps
        grad = torch.randn(6, 3, 3, 3)
        kernel.grad, matrix.grad = grad.clone(), grad.reshape(6, 27).clone()
        ours.step()
        ref.step()
        ours.zero_grad()
        assert kernel.grad is None
    assert not torch.equal(kernel.detach(), start)
    torch.testing.assert_close(kernel.detach().reshape(6, 27), matrix.detach(),
                               rtol=0, atol=0)


def test_matrix_view_muon_refuses_what_it_cannot_step():
    with pytest.raises(ValueError, match="shape \\(4,\\)"):
        MatrixViewMuon([nn.Parameter(torch.zeros(4))], lr=0.01)
    kernel = nn.Parameter(torch.randn(4, 2, 3, 3))
    opt = MatrixViewMuon([kernel], lr=0.01)
    kernel.data = kernel.data.clone()  # storage replaced: the view no longer updates it
    kernel.grad = torch.ones_like(kernel)
    with pytest.raises(RuntimeError, match="no longer uses the storage"):
        opt.step()


def test_matrix_view_muon_takes_a_closure_and_shows_its_gradients_to_the_groups():
    torch.manual_seed(0)
    target = torch.randn(4, 2, 3, 3)
    kernel = nn.Parameter(torch.randn(4, 2, 3, 3))
    matrix = nn.Parameter(kernel.detach().clone().reshape(4, 18))  # the reference
    ours, ref = MatrixViewMuon([kernel], lr=0.05), torch.optim.Muon([matrix], lr=0.05)

    def closure(param, opt, shape):
        def run():
            opt.zero_grad()
            loss = ((param.reshape(shape) - target.reshape(shape)) ** 2).sum()
            loss.backward()
            return loss
        return run

    for _ in range(3):  # the closure recomputes the gradients before the step uses them
        ours.step(closure(kernel, ours, (4, 2, 3, 3)))
        ref.step(closure(matrix, ref, (4, 18)))
    torch.testing.assert_close(kernel.detach().reshape(4, 18), matrix.detach(),
                               rtol=0, atol=0)
    # after a backward the groups hold the kernel's gradient (same memory): clipping
    # over them (or a GradScaler's unscaling) reaches the kernel
    ours.zero_grad()
    ((kernel - target) ** 2).sum().backward()
    grouped = ours.param_groups[0]["params"][0].grad
    assert grouped is not None and grouped.data_ptr() == kernel.grad.data_ptr()
    before = kernel.grad.norm()
    torch.nn.utils.clip_grad_norm_([p for g in ours.param_groups for p in g["params"]],
                                   max_norm=float(before) / 2)
    assert float(kernel.grad.norm()) == pytest.approx(float(before) / 2, rel=1e-4)


def test_muon_conv_kernels_is_a_setting_of_muon_only():
    cfg = TrainConfig(optimizer="adamw", muon_conv_kernels=True)
    assert "muon-conv-kernels" in unused_settings(cfg, {"muon_conv_kernels"})
    cfg = TrainConfig(optimizer="muon", muon_conv_kernels=True)
    assert unused_settings(cfg, {"muon_conv_kernels"}) is None
    opt = make_optimizer(cfg, _model("resnet", "digits"))
    assert isinstance(opt.parts["muon"], MatrixViewMuon)


def test_muon_split_steps_each_part_with_its_own_optimizer():
    model = _model("mlp", "digits")
    cfg = TrainConfig(optimizer="muon", lr=0.02, weight_decay=0.03)
    opt = make_optimizer(cfg, model)
    assert isinstance(opt, OptimizerSplit)
    muon, adamw = opt.parts["muon"], opt.parts["adamw"]
    assert isinstance(muon, torch.optim.Muon) and isinstance(adamw, torch.optim.AdamW)
    by_name = dict(model.named_parameters())
    assert [id(p) for g in muon.param_groups for p in g["params"]] == \
        [id(by_name[n]) for n in muon_split(model)[0]]
    for group in opt.param_groups:
        assert group["lr"] == 0.02 and group["weight_decay"] == 0.03
    assert muon.param_groups[0]["adjust_lr_fn"] == "match_rms_adamw"


@pytest.mark.parametrize("name", ["sgd", "nesterov", "adam", "adamw", "nadamw", "muon",
                                  "soap", "klshampoo"])
def test_every_setting_reaches_its_optimizer(name):
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 5), nn.Tanh(),
                          nn.Linear(5, 3))
    extra = {"momentum": 0.8} if name in ("sgd", "nesterov") else {}
    if name in ("soap", "klshampoo"):
        extra["precondition_frequency"] = 7
    cfg = TrainConfig(optimizer=name, lr=0.0123, weight_decay=0.045, **extra)
    opt = make_optimizer(cfg, model)
    params = [p for g in opt.param_groups for p in g["params"]]
    assert sorted(map(id, params)) == sorted(map(id, model.parameters()))
    for group in opt.param_groups:
        assert group["lr"] == 0.0123
        assert group["weight_decay"] == 0.045
        if name in ("sgd", "nesterov"):
            assert group["momentum"] == 0.8
            assert group["nesterov"] is (name == "nesterov")
        if name == "nadamw":
            assert group["decoupled_weight_decay"] is True
    if name in ("soap", "klshampoo"):
        assert type(opt).__name__ == {"soap": "SOAP", "klshampoo": "KLShampoo"}[name]
        assert opt.precond_schedule == pytest.approx(1 / 7)  # heavyball's 1/frequency


@pytest.mark.parametrize("name", ["soap", "klshampoo"])
def test_heavyball_steps_without_compiling(name, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("torch.compile was called")

    monkeypatch.setattr(torch, "compile", refuse)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
    opt = make_optimizer(TrainConfig(optimizer=name, lr=1e-2, precondition_frequency=2),
                         model)
    assert heavyball.utils.compile_mode is None
    x, y = torch.randn(32, 6), torch.randint(0, 3, (32,))
    before = [p.detach().clone() for p in model.parameters()]
    losses = []
    for _ in range(4):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert all(math.isfinite(v) for v in losses)
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters()))


@pytest.mark.parametrize("name", ["soap", "klshampoo"])
def test_heavyball_steps_a_scalar_parameter_in_a_group_that_does_not_merge(name):
    """The GIN's ε is 0-d: heavyball 3.2.1 fails on it when merging dimensions, so it gets
    its own group; the matrices keep heavyball's default, and every parameter moves."""
    task = load_task("solubility", limit=64, seed=0)
    model = build_model("gin", task, width=8, depth=2, seed=0)
    opt = make_optimizer(TrainConfig(optimizer=name, lr=1e-2, precondition_frequency=2),
                         model)
    scalars = {id(p) for p in model.parameters() if p.ndim == 0}
    assert scalars  # the GIN has its ε
    for group in opt.param_groups:
        ids = {id(p) for p in group["params"]}
        assert ids <= scalars or not ids & scalars  # never mixed
        assert group["merge_dims"] is (not ids <= scalars)
    before = [p.detach().clone() for p in model.parameters()]
    inputs, targets = task.batch(torch.Generator().manual_seed(0))
    for _ in range(3):
        opt.zero_grad()
        task.loss(task.forward(model, inputs, None), targets).backward()
        opt.step()
    moved = [not torch.equal(a, p) for a, p in zip(before, model.parameters())]
    assert all(moved), [n for (n, _), m in zip(model.named_parameters(), moved) if not m]


def test_baselines_run_alone_and_their_settings_are_checked():
    with pytest.raises(ValueError, match="runs alone, as a baseline"):
        TrainConfig(optimizer="muon", kfac=True)
    with pytest.raises(ValueError, match=r"warmup_fraction=1\.0 is out of range; valid: "
                                         r"\[0, 1\)"):
        TrainConfig(schedule="warmup-cosine", warmup_fraction=1.0)
    with pytest.raises(ValueError, match="precondition_frequency=0 is out of range"):
        TrainConfig(optimizer="soap", precondition_frequency=0)
    why = unused_settings(TrainConfig(optimizer="adam"), {"precondition_frequency",
                                                          "warmup_fraction"})
    assert "precondition-frequency (used only with --optimizer soap or klshampoo)" in why
    assert "warmup-fraction (used only with --schedule warmup-cosine)" in why


def _closed_form(k: int, steps: int, fraction: float) -> float:
    """AlgoPerf-style warm-up + cosine, written out: W = round(f S) warm-up steps."""
    w = round(fraction * steps)
    if k < w:
        return (k + 1) / w
    return (1 + math.cos(math.pi * (k - w) / (steps - w))) / 2


def _lrs_of(run: Run, steps: int) -> list[float]:
    lrs = []
    for _ in range(steps):
        lrs.append(run.opt.param_groups[0]["lr"])
        run.steps.append(run._one_step())
        run.step += 1
    return lrs


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_the_warmup_cosine_rate_follows_its_closed_form_through_a_resume(tmp_path, optimizer):
    cfg = TrainConfig(optimizer=optimizer, lr=0.01, steps=20, schedule="warmup-cosine",
                      warmup_fraction=0.2, batch_size=32, limit=256, eval_every=10,
                      width=16)
    whole = Run(cfg, tmp_path / "whole")
    lrs = _lrs_of(whole, 20)
    assert lrs == pytest.approx([0.01 * _closed_form(k, 20, 0.2) for k in range(20)],
                                rel=1e-12)
    for group in whole.opt.param_groups:  # every part follows the schedule
        assert group["lr"] == pytest.approx(0.01 * _closed_form(20, 20, 0.2), abs=1e-12)
    first = Run(cfg, tmp_path / "split")
    first.out.mkdir()
    head = _lrs_of(first, 8)
    first.save()
    resumed = Run.resume(tmp_path / "split")
    tail = _lrs_of(resumed, 12)
    assert head + tail == lrs
    for a, b in zip(whole.net.parameters(), resumed.net.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_a_scheduled_run_cannot_resume_to_another_length(tmp_path):
    cfg = TrainConfig(lr=0.01, steps=10, schedule="warmup-cosine", batch_size=32,
                      limit=256, eval_every=5, width=16)
    run = Run(cfg, tmp_path / "r")
    run.out.mkdir()
    _lrs_of(run, 3)
    run.save()
    with pytest.raises(ValueError, match="warmup-cosine schedule ends at step 10"):
        Run.resume(tmp_path / "r", steps=20)
    assert replace(cfg, steps=10) == Run.resume(tmp_path / "r", steps=10).cfg
