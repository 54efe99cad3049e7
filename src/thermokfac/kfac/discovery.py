"""Find the layers K-FAC preconditions, and say which it leaves to the base optimizer.

Rules, applied in ``model.named_modules()`` order:

1. A module named in ``skip_layers`` (by its name, e.g. ``"net.0"``, or its class name,
   e.g. ``"Embedding"``) is skipped, with every module inside it (a container's name
   skips its whole subtree).
2. A module whose kind has no registered helper, or whose configuration the helper does
   not support (e.g. a sparse embedding), is *unsupported*: its parameters are left to
   the base optimizer. Unsupported modules that own parameters are listed once. So are
   modules K-FAC cannot precondition correctly although their kind is registered:

   * a weight or bias that is not the module's own leaf parameter (parametrizations
     such as ``weight_norm`` / ``spectral_norm``: the gradient lands on the
     parametrization's parameters, not on the computed weight);
   * a subclass with its own ``forward`` (e.g. a LoRA-style adapter), unless a helper
     is registered for the subclass itself;
   * the children of a module that applies their weights functionally (the
     ``out_proj`` of an ``nn.MultiheadAttention`` K-FAC cannot handle, e.g. a subclass
     with its own ``forward``): their module hooks never run.

   A module with several weight matrices gets one Kronecker block each, named
   ``<module>.<block>``: ``nn.MultiheadAttention`` has ``q_proj``, ``k_proj``,
   ``v_proj`` and ``out_proj`` (its ``out_proj`` child is that block, not a layer of its
   own). ``skip_layers`` may name a single block.
3. Frozen parameters are followed as ``requires_grad`` changes, at every step: a layer
   preconditions exactly its trainable parameters (weight-only A when the bias is
   frozen, the bias alone with A = 1 when the weight is frozen, nothing when both are).
4. **Tied parameters**: a parameter shared by several modules (nanoGPT ties the token
   embedding to the output head) is preconditioned once, by the *first* module that
   holds it in this order; later modules holding an already-claimed parameter are
   listed as tied and not preconditioned. To let the later module precondition it
   instead, name the earlier one in ``skip_layers``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from torch import nn

from .layers import LAYER_HELPERS, LayerHelper, helper_for, subclass_problem, untapped

#: Modules that apply their children's weights functionally (their hooks never run).
FUNCTIONAL_PARENTS: tuple[type[nn.Module], ...] = (nn.MultiheadAttention,)


@dataclass
class Discovery:
    """Outcome of scanning a model.

    Attributes:
        layers: ``(name, helper)`` for each preconditioned module.
        unsupported: ``name -> reason`` for modules with parameters K-FAC leaves alone.
        tied: ``name -> owner`` for modules whose parameters another layer preconditions.
        skipped: Names skipped by ``skip_layers``.
    """

    layers: list[tuple[str, LayerHelper]] = field(default_factory=list)
    unsupported: dict[str, str] = field(default_factory=dict)
    tied: dict[str, str] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside ``DistributedDataParallel`` / ``DataParallel`` wrappers and
    ``torch.compile``'s ``OptimizedModule`` (in any nesting)."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif isinstance(inner := getattr(model, "_orig_mod", None), nn.Module):  # compile
            model = inner
        else:
            return model


def is_ddp(model: nn.Module) -> bool:
    """Whether ``model`` is (or wraps, under ``torch.compile``) a DDP module."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            return True
        inner = getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return False
        model = inner


def _add_block(found: Discovery, owners: dict[int, tuple[str, nn.Module]], name: str,
               module: nn.Module, helper: LayerHelper) -> None:
    """Add one Kronecker block, unless its parameters are computed or another module
    already claimed them (blocks of one module share its packed parameters)."""
    problem = helper.leaf_problem()
    if problem is not None:
        found.unsupported[name] = f"{type(module).__name__} with {problem}"
        return
    params = helper.parameters
    claimed = [owners[id(p)][0] for p in params
               if id(p) in owners and owners[id(p)][1] is not module]
    if claimed:
        found.tied[name] = claimed[0]
        untied = [n for n, p in module.named_parameters()
                  if any(p is q for q in params) and id(p) not in owners]
        if untied:
            found.unsupported[name] = (
                f"{type(module).__name__} whose {', '.join(untied)} is its own while its "
                f"other parameters are tied to {claimed[0]!r} (preconditioned there)")
        return
    for p in params:
        owners.setdefault(id(p), (name, module))
    found.layers.append((name, helper))


def _block_hits(name: str, suffix: str, helper: LayerHelper,
                skip_layers: tuple[str, ...]) -> set[str]:
    """The ``skip_layers`` entries that name one block of a module: the block's name or
    one above it inside the module (``attn.q_proj`` covers ``attn.q_proj.weight``), or
    the class name of a child module the block stands for (``out_proj``'s class)."""
    hits: set[str] = set()
    parts = suffix.split(".")[1:]
    for i in range(1, len(parts) + 1):
        candidate = ".".join([name, *parts[:i]]) if name else ".".join(parts[:i])
        if candidate in skip_layers:
            hits.add(candidate)
    child = helper.submodule
    if child is not None and type(child).__name__ in skip_layers:
        hits.add(type(child).__name__)
    return hits


def _split(suffix: str, helper: LayerHelper) -> list[tuple[str, LayerHelper]]:
    """``separate_weight_and_bias``: a block with a bias becomes ``<block>.weight`` (A
    without the bias column) and ``<block>.bias`` (A = 1, the same G)."""
    if helper.bias_param is None or helper.diagonal_a:
        return [(suffix, helper)]
    return [(f"{suffix}.weight", helper.only("weight")), (f"{suffix}.bias", helper.only("bias"))]


def discover(model: nn.Module, skip_layers: tuple[str, ...] = (),
             separate_weight_and_bias: bool = False) -> Discovery:
    """Scan ``model`` by the rules above (with ``separate_weight_and_bias``, each layer
    with a bias gets a weight block and a bias block, see :func:`_split`).

    Raises:
        ValueError: If an entry of ``skip_layers`` matches no module name or class, or
            if no layer can be preconditioned.
    """
    found = Discovery()
    owners: dict[int, tuple[str, nn.Module]] = {}
    matched: set[str] = set()
    skipped_trees: list[str] = []  # a skipped container skips everything inside it
    functional = {f"{name}.{child}" if name else child: (name, type(parent).__name__)
                  for name, parent in model.named_modules()
                  if isinstance(parent, FUNCTIONAL_PARENTS)
                  for child, _ in parent.named_children()}
    handled: set[str] = set()  # functional parents whose blocks K-FAC took over
    wrappers = {id(m._orig_mod): m for m in model.modules()  # torch.compile(submodule)
                if isinstance(getattr(m, "_orig_mod", None), nn.Module)}
    for name, module in model.named_modules():
        kind = untapped(type(module)).__name__
        hit = {name, kind} & set(skip_layers)
        own = list(module.parameters(recurse=False))
        helper_cls = helper_for(module)
        inside = any(name.startswith(tree + ".") or tree == "" for tree in skipped_trees)
        if name in functional and functional[name][0] in handled:
            matched |= hit  # a block of its parent (named, skipped or not, there)
            continue
        if hit or inside:
            matched |= hit
            if hit:
                skipped_trees.append(name)
            if helper_cls is not None or own:
                found.skipped.append(name)
            continue
        if helper_cls is None:
            if own:
                found.unsupported[name] = f"no helper for {kind}"
            continue
        reason = helper_cls.unsupported_reason(module) or subclass_problem(module)
        if reason is None and name in functional:
            reason = (f"its weights applied functionally by the parent "
                      f"{functional[name][1]} (its module hooks never run)")
        if reason is not None:
            found.unsupported[name] = f"{kind} with {reason}"
            continue
        if isinstance(module, FUNCTIONAL_PARENTS):
            handled.add(name)
        blocks = helper_cls.blocks(module)
        covered = {id(p) for _, helper in blocks for p in helper.parameters}
        extra = [n for n, p in module.named_parameters(recurse=False) if id(p) not in covered]
        if extra and len(blocks) > 1:  # e.g. attention's bias_k/bias_v
            found.unsupported[name] = (f"{kind} parameters {', '.join(extra)} (not weights "
                                       "of a Kronecker block; the other blocks are "
                                       "preconditioned)")
        if separate_weight_and_bias:
            blocks = [split for suffix, helper in blocks for split in _split(suffix, helper)]
        for suffix, helper in blocks:
            helper.hook_module = wrappers.get(id(module), helper.hook_module)
            block = (name + suffix).lstrip(".")
            named = _block_hits(name, suffix, helper, skip_layers)
            if named:
                matched |= named
                found.skipped.append(block)
                continue
            _add_block(found, owners, block, module, helper)
    unknown = sorted(set(skip_layers) - matched)
    if unknown:
        raise ValueError(f"skip_layers entries {unknown} match no module name or class name")
    if not found.layers:
        kinds = ", ".join(sorted(t.__name__ for t in LAYER_HELPERS))
        raise ValueError(f"the model has no layer K-FAC can precondition (supported: {kinds})")
    return found


def announce(found: Discovery, logger: logging.Logger) -> None:
    """Log, once, the modules left to the base optimizer and the tied parameters."""
    if found.unsupported:
        listing = "; ".join(f"{n or '<root>'}: {why}" for n, why in found.unsupported.items())
        logger.warning("K-FAC leaves these modules to the base optimizer: %s", listing)
    if found.tied:
        logger.info("tied parameters preconditioned once: %s",
                    ", ".join(f"{n} -> {o}" for n, o in found.tied.items()))
