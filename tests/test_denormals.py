"""Subnormal floats in training: the flush reaches every worker thread when set first, the
probe reports what the threads do, flushing changes no gradient above float32's smallest
normal number, and a run records (and warns about) the state it trained under."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch

from thermokfac.experiments import denormals
from thermokfac.experiments.config import TrainConfig
from thermokfac.experiments.train import Run

# A fresh process (its thread pool not started yet): the confident classifier's gradient
# through a 512 x 512 product, in float32 with subnormals counted by their bits, and in
# float64 as the reference.
_SCRIPT = textwrap.dedent("""
    import json, sys, torch
    from thermokfac.experiments import denormals
    torch.set_num_threads(2)
    when = sys.argv[1]
    if when == "first":
        denormals.request(True)
    torch.manual_seed(0)
    w = torch.randn(512, 512, dtype=torch.float64) / 512 ** 0.5
    x = torch.randn(512, 512, dtype=torch.float64)
    logits = torch.randn(512, 10, dtype=torch.float64) * 60.0  # margins past exp(-87)
    target = logits.argmax(1)
    if when == "late":  # the pool starts before the setting
        (x @ w).sum()
        denormals.request(True)
    grads = {}
    for dtype in (torch.float32, torch.float64):
        z = logits.to(dtype).requires_grad_()
        torch.nn.functional.cross_entropy(z, target).backward()
        grads[dtype] = (z.grad @ w[:10].to(dtype)).t() @ x.to(dtype)  # 10 x 512 ... x 512
        grads[str(dtype) + "z"] = z.grad
    bits = grads[torch.float32].view(torch.int32) & 0x7FFFFFFF
    zbits = grads["torch.float32z"].view(torch.int32) & 0x7FFFFFFF
    subnormal = lambda b: int(((b > 0) & (b < 0x00800000)).sum())
    g32, g64 = grads[torch.float32].double(), grads[torch.float64]
    rel = ((g32 - g64).norm() / g64.norm()).item()
    print(json.dumps({"state": denormals.state().value, "subnormal_out": subnormal(bits),
                      "subnormal_logit_grad": subnormal(zbits), "rel": rel}))
""")


def _fresh(when: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", _SCRIPT, when], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_flush_set_first_reaches_every_thread_and_changes_nothing_above_normal():
    kept, first, late = _fresh("none"), _fresh("first"), _fresh("late")
    assert kept["state"] == "kept" and kept["subnormal_logit_grad"] > 0  # the slow path
    assert first["state"] == "flushed"
    assert first["subnormal_logit_grad"] == 0 and first["subnormal_out"] == 0
    # the pool started before the setting: only some threads flush, and the probe says so
    expected_late = "mixed" if torch.get_num_threads() > 1 else "flushed"
    assert late["state"] == expected_late
    # against float64: the same gradient either way, to float32's rounding
    assert kept["rel"] < 1e-5 and first["rel"] < 1e-5


def test_probe_reads_the_calling_thread_too():
    """The probe's answer follows the calling thread's switch (the pool here was started
    flushed by conftest): flushing off on this thread alone is 'mixed', not 'flushed'."""
    assert denormals.state() is denormals.Subnormals.FLUSHED
    try:
        denormals.request(False)
        if torch.get_num_threads() > 1:
            assert denormals.state() is denormals.Subnormals.MIXED
        value = torch.tensor([714], dtype=torch.int32).view(torch.float32) * 2.0
        assert int(value.view(torch.int32)) == 1428  # this thread keeps it: 2 x the bits
    finally:
        denormals.request(True)
    assert denormals.state() is denormals.Subnormals.FLUSHED


def _tiny(**kw) -> TrainConfig:
    return TrainConfig(model="mlp", data="digits", width=16, steps=3, eval_every=3,
                       batch_size=32, **kw)


def test_run_records_the_state_it_trained_under(tmp_path):
    summary = Run(_tiny(), tmp_path / "a").train(progress=False, checkpoint=False)
    assert summary["subnormals"] == "flushed"
    assert json.loads((tmp_path / "a" / "results.json").read_text())["subnormals"] == \
        "flushed"


@pytest.mark.skipif(torch.get_num_threads() < 2, reason="needs a worker thread")
def test_a_run_whose_threads_disagree_with_its_setting_warns(tmp_path):
    try:
        with pytest.warns(RuntimeWarning, match=r"flush_denormal=False .* mixed"):
            summary = Run(_tiny(flush_denormal=False), tmp_path / "b").train(
                progress=False, checkpoint=False)
        assert summary["subnormals"] == "mixed"
    finally:
        denormals.request(True)
