"""Tasks: a data set, how to batch it, the loss, the metric, and the models that fit it.

A task hides the differences between image classification, character-level language
modelling and molecular regression behind one interface used by every experiment:
``batch(generator)``, ``loss(outputs, targets)``, ``evaluate(model)`` and
``forward(model, inputs, pre)`` (which wraps graph batches in the preconditioner's
grouped rows).
"""

from __future__ import annotations

import gzip
import pickle
import struct
import zlib
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from .. import data as datasets
from ..models import GIN, GPT, MLP, ResNet, TorchGPT, ViT


@dataclass
class Task:
    """Everything an experiment needs to train and evaluate on one data set."""

    name: str
    kind: str  # "image", "text" or "graph"
    models: tuple[str, ...]
    metric: str  # "accuracy" or "rmse"
    train: Any
    val: Any
    meta: dict[str, Any] = field(default_factory=dict)
    batch_size: int = 128
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def kfac_approx(self) -> str:
        """Classification reduces over the shared dimension; a sequence loss expands."""
        return "expand" if self.kind == "text" else "reduce"

    @property
    def loss_terms_per_example(self) -> int:
        return self.meta.get("context", 1) if self.kind == "text" else 1

    def batch(self, generator: torch.Generator) -> tuple[Any, Tensor]:
        """A training batch of ``batch_size`` examples drawn with ``generator``, on
        ``device``."""
        inputs, targets = self._batch(generator)
        return to_device(inputs, self.device), targets.to(self.device)

    def _batch(self, generator: torch.Generator) -> tuple[Any, Tensor]:
        if self.kind == "image":
            x, y = self.train
            idx = torch.randint(0, len(x), (self.batch_size,), generator=generator)
            return x[idx], y[idx]
        if self.kind == "text":
            return datasets.sample_windows(self.train, self.batch_size, self.meta["context"],
                                           generator)
        idx = torch.randint(0, len(self.train), (self.batch_size,), generator=generator)
        batch = datasets.collate([self.train[i] for i in idx.tolist()])
        return batch, batch.targets

    def loss(self, outputs: Tensor, targets: Tensor) -> Tensor:
        if self.kind == "graph":
            return nn.functional.mse_loss(outputs, targets)
        return nn.functional.cross_entropy(outputs.reshape(-1, outputs.shape[-1]),
                                           targets.reshape(-1))

    def forward(self, model: nn.Module, inputs: Any, pre=None) -> Tensor:
        grouped = pre is not None and self.kind == "graph"
        with pre.grouped_rows(inputs.membership, inputs.num_graphs) if grouped \
                else nullcontext():
            return model(inputs)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, max_batches: int = 20) -> dict[str, float]:
        """Validation loss and metric (accuracy, or RMSE for regression)."""
        was_training = model.training
        model.eval()
        try:
            if self.kind == "image":
                x, y = self.val
                chunks = [(x[i:i + 1000], y[i:i + 1000]) for i in range(0, len(x), 1000)]
            elif self.kind == "text":
                gen = torch.Generator().manual_seed(1234)
                chunks = [datasets.sample_windows(self.val, 64, self.meta["context"], gen)
                          for _ in range(max_batches)]
            else:
                graphs = self.val
                chunks = [(b, b.targets) for b in (datasets.collate(graphs[i:i + 256])
                                                   for i in range(0, len(graphs), 256))]
            total, correct, count, sq = 0.0, 0.0, 0, 0.0
            for inputs, targets in chunks:
                inputs, targets = to_device(inputs, self.device), targets.to(self.device)
                out = model(inputs)
                n = targets.numel()
                total += float(self.loss(out, targets)) * n
                count += n
                if self.kind == "graph":
                    sq += float((out - targets).pow(2).sum())
                else:
                    correct += float((out.argmax(-1) == targets).float().sum())
            result = {"val_loss": total / count}
            if self.kind == "graph":
                result["val_rmse"] = (sq / count) ** 0.5
            else:
                result["val_accuracy"] = correct / count
            return result
        finally:
            model.train(was_training)


def to_device(inputs: Any, device: torch.device) -> Any:
    """A tensor or a :class:`~thermokfac.data.GraphBatch` on ``device``."""
    return inputs.to(device)


def _image_task(name: str, loader: Callable, limit: int | None, **kw) -> Task:
    x, y, xv, yv = loader(**kw)
    if limit is not None:
        x, y = x[:limit], y[:limit]
        xv, yv = xv[: max(limit // 5, 200)], yv[: max(limit // 5, 200)]
    shape = tuple(x.shape[1:])
    if len(shape) == 1:  # flat pixels: make them images when the side is a square
        side = round(shape[0] ** 0.5)
        if side * side == shape[0]:
            x, xv, shape = x.view(-1, 1, side, side), xv.view(-1, 1, side, side), (1, side, side)
    meta = {"shape": shape, "classes": int(y.max()) + 1}
    return Task(name, "image", ("mlp", "resnet", "vit"), "accuracy", (x, y), (xv, yv), meta)


#: What reading a damaged or foreign data file raises (gzip, pickle, text, array shapes).
_DAMAGED_DATA = (EOFError, zlib.error, gzip.BadGzipFile, pickle.UnpicklingError,
                 UnicodeDecodeError, struct.error, IndexError, KeyError, TypeError)


def load_task(name: str, *, limit: int | None = None, data_dir: str | None = None,
              context: int = 64, seed: int = 0) -> Task:
    """Build the task named ``name`` (see :data:`TASKS`); ``limit`` caps the examples;
    ``data_dir`` is a folder to read the data set's files from instead of its installed
    copy (every data set; required for cifar10).

    Raises:
        FileNotFoundError: If the data is missing; the message names the install command
            and ``--data-dir``.
        ValueError: If ``name`` is not a data set, or a data file is damaged or foreign
            (truncated, not gzip, not the format expected), naming where it was read.
    """
    try:
        return _load_task(name, limit=limit, data_dir=data_dir, context=context, seed=seed)
    except _DAMAGED_DATA as err:
        where = f"--data-dir {data_dir}" if data_dir is not None else "its installed copy"
        raise ValueError(f"the {name} data in {where} could not be read (a damaged or "
                         f"foreign file): {type(err).__name__}: {err}") from None


def _load_task(name: str, *, limit: int | None = None, data_dir: str | None = None,
               context: int = 64, seed: int = 0) -> Task:
    """:func:`load_task` without the check of damaged files."""
    if name == "digits":
        return _image_task(name, datasets.digits, limit, seed=seed, root=data_dir)
    if name == "mnist5k":
        return _image_task(name, datasets.mnist5k, limit, seed=seed, root=data_dir)
    if name == "fashion-mnist":
        return _image_task(name, datasets.fashion_mnist, limit, root=data_dir, seed=seed)
    if name == "cifar10":
        if data_dir is None:
            raise FileNotFoundError("cifar10 needs --data-dir with cifar-10-batches-py")
        return _image_task(name, datasets.cifar10, limit, root=data_dir, seed=seed)
    if name == "shakespeare":
        corpus = datasets.shakespeare(max_chars=limit, root=data_dir)
        shortest = min(len(corpus.train), len(corpus.val))
        if shortest <= context:
            where = f" in --data-dir {data_dir}" if data_dir else ""
            raise ValueError(f"the shakespeare text{where} gives a split of {shortest} "
                             f"characters: each split needs more than --context {context} "
                             "(use more text, a larger --limit or a shorter --context)")
        return Task(name, "text", ("gpt", "torch-gpt"), "accuracy", corpus.train, corpus.val,
                    {"vocab": corpus.vocab_size, "context": context})
    if name == "solubility":
        train, val = datasets.solubility(limit=limit, root=data_dir)
        return Task(name, "graph", ("gin",), "rmse", train, val, {})
    raise ValueError(f"unknown data set {name!r}; choose one of {sorted(TASKS)}")


TASKS = ("digits", "mnist5k", "fashion-mnist", "cifar10", "shakespeare", "solubility")
MODELS = ("mlp", "resnet", "vit", "gpt", "torch-gpt", "gin")


def build_model(name: str, task: Task, *, width: int = 256, depth: int = 2,
                heads: int = 4, seed: int = 0) -> nn.Module:
    """A reference model for ``task``; ``width``/``depth`` mean units/layers (MLP), base
    channels/blocks per stage (ResNet), embedding/blocks (ViT, GPT) or hidden/layers (GIN)."""
    if name not in task.models:
        raise ValueError(f"model {name!r} does not fit {task.name}; choose one of "
                         f"{list(task.models)}")
    torch.manual_seed(seed)
    meta = task.meta
    if name == "mlp":
        c, h, w = meta["shape"]
        return MLP(c * h * w, width, depth, meta["classes"])
    if name == "resnet":
        return ResNet(meta["shape"][0], meta["classes"], width=width, blocks=depth)
    if name == "vit":
        c, h, _ = meta["shape"]
        patch = 4 if h % 4 == 0 else 2
        return ViT(c, h, meta["classes"], patch=patch, dim=width, depth=depth, heads=heads)
    if name == "gpt":
        return GPT(meta["vocab"], meta["context"], n_layer=depth, n_embd=width, n_head=heads)
    if name == "torch-gpt":
        return TorchGPT(meta["vocab"], meta["context"], n_layer=depth, n_embd=width,
                        n_head=heads)
    return GIN(width=width, layers=depth)
