"""Offline data loaders on real files (and the CIFAR loader on generated files); the
reference models under K-FAC, including ragged graph batches."""

from __future__ import annotations

import gzip
import pickle

import numpy as np
import pytest
import torch
from torch import nn

from thermokfac import KFACPreconditioner, data
from thermokfac.enums import KFACApprox
from thermokfac.experiments.tasks import build_model, load_task
from thermokfac.kfac.factors import activation_rows, gradient_rows


def test_idx_reader_round_trip(tmp_path):
    array = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    header = bytes([0, 0, 8, 3]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    path = tmp_path / "x-idx3-ubyte.gz"
    with gzip.open(path, "wb") as fh:
        fh.write(header + array.tobytes())
    assert np.array_equal(data.read_idx(path), array)
    bad = tmp_path / "bad"
    bad.write_bytes(b"\x00\x00\x0d\x01\x00\x00\x00\x01\x00")
    with pytest.raises(ValueError, match="not an unsigned-byte IDX"):
        data.read_idx(bad)


def test_fashion_mnist_real_files():
    x, _y, xv, yv = data.fashion_mnist(limit=1000)
    assert x.shape == (1000, 1, 28, 28) and xv.shape == (10000, 1, 28, 28)
    assert float(x.min()) >= 0 and float(x.max()) <= 1
    assert set(yv.tolist()) == set(range(10))


def test_missing_data_names_install_command(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install -y dataset-fashion-mnist"):
        data.fashion_mnist(root=tmp_path)


def test_cifar_loader_on_files_in_the_standard_layout(tmp_path):
    base = tmp_path / "cifar-10-batches-py"
    base.mkdir()
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": rng.integers(0, 256, (4, 3072), dtype=np.uint8),
                 b"labels": list(rng.integers(0, 10, 4))}
        with open(base / name, "wb") as fh:
            pickle.dump(batch, fh)
    x, _y, xv, _yv = data.cifar10(tmp_path)
    assert x.shape == (20, 3, 32, 32) and xv.shape == (4, 3, 32, 32)
    with open(base / "test_batch", "rb") as fh:
        raw = pickle.load(fh)[b"data"]
    assert torch.allclose(xv[0], torch.from_numpy(raw[0].reshape(3, 32, 32) / 255.0).float())
    with pytest.raises(FileNotFoundError, match="missing data_batch_1"):
        (base / "data_batch_1").unlink() or data.cifar10(tmp_path)


def test_shakespeare_and_molecules_load():
    corpus = data.shakespeare(max_chars=20_000)
    assert corpus.vocab_size > 40 and len(corpus.train) == 18_000
    x, t = data.sample_windows(corpus.train, 4, 16, torch.Generator().manual_seed(0))
    assert x.shape == t.shape == (4, 16) and torch.equal(x[:, 1:], t[:, :-1])
    train, _test = data.solubility(limit=20)
    batch = data.collate(train[:5])
    assert batch.num_graphs == 5 and batch.nodes.shape[1] == 9
    assert int(batch.membership.max()) == 4 and batch.edges.max() < batch.nodes.shape[0]


def test_grouped_reduce_rows_match_manual_sums():
    membership = torch.tensor([0, 0, 1, 2, 2, 2])
    x = torch.randn(6, 1, 3)
    rows = activation_rows(x, KFACApprox.REDUCE, (membership, 3))
    assert torch.allclose(rows[2], x[3:, 0].mean(0)) and rows.shape == (3, 3)
    g = gradient_rows(x, KFACApprox.REDUCE, (membership, 3))
    assert torch.allclose(g[0], x[:2, 0].sum(0))
    assert gradient_rows(x, KFACApprox.EXPAND, (membership, 3)).shape == (6, 3)


@pytest.mark.parametrize(("model", "dataset", "limit"), [
    ("mlp", "digits", 256), ("resnet", "digits", 256), ("vit", "digits", 256),
    ("gpt", "shakespeare", 5000), ("gin", "solubility", 64),
])
def test_reference_models_train_under_kfac(model, dataset, limit):
    task = load_task(dataset, limit=limit, context=16)
    task.batch_size = 16
    net = build_model(model, task, width=16, depth=1, heads=2)
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    pre = KFACPreconditioner(net, kfac_approx=task.kfac_approx, optimizer=opt, damping=1e-2,
                             num_per_example_loss_terms=task.loss_terms_per_example,
                             loss_type="mse" if task.kind == "graph" else "cross_entropy")
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        inputs, targets = task.batch(gen)
        opt.zero_grad()
        task.loss(task.forward(net, inputs, pre), targets).backward()
        pre.step()
        opt.step()
    factors = pre.factors()
    assert factors and all(torch.isfinite(a).all() and torch.isfinite(g).all()
                           for a, g in factors.values())
    assert pre.stats["missing_factor_skips"] == 0
    assert pre.stats["nonfinite_factor_skips"] == 0
    if model == "gpt":
        assert pre.discovery.tied == {"lm_head": "wte"}
    if model == "gin":  # examples are graphs, not atoms
        assert pre.pending_step().examples == 0  # reset after the step
    metrics = task.evaluate(net)
    assert all(np.isfinite(v) for v in metrics.values())


def test_gin_reduce_counts_graphs_as_examples():
    task = load_task("solubility", limit=32)
    task.batch_size = 8
    net = build_model("gin", task, width=8, depth=1)
    pre = KFACPreconditioner(net, kfac_approx="reduce", kl_clip=None, loss_type="mse")
    inputs, targets = task.batch(torch.Generator().manual_seed(1))
    nn.functional.mse_loss(task.forward(net, inputs, pre), targets).backward()
    pending = pre.pending_step()
    assert (pending.examples, pending.examples_problem) == (8, None)
    assert pending.rows["head"][0] == 8
    assert pending.rows["layers.0.fc1"][0] == 8  # atoms averaged per molecule
