"""``state_dict`` / ``load_state_dict`` of the preconditioner.

The state holds what is needed to continue bit-exactly: the moving-average factors,
what the solver prepared (or the inverses), the step counter, the statistics and the
random generator. Loading checks that the layers and factor shapes match the model.

Format versions: **2** (current) — one flat entry per block (:meth:`KroneckerBlock.state_dict
<thermokfac.kfac.blocks.KroneckerBlock.state_dict>`: ``a``, ``g``, ``a_prep``/``g_prep``,
``a_inv``/``g_inv``, ``a_rows``/``g_rows`` with their scales, ``damping``, ``failed``,
``stats``, ``layout``, ``prepared``); **1** — the same without ``prepared`` (derived on
load: a block was prepared if it holds a prepared state or an inverse, or failed; under
data parallelism from the ``distributed.prepared_once`` list it carried). Any other
version is refused, naming it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch

FORMAT_VERSION = 2
#: Versions :func:`unpack` reads (older ones are migrated).
READABLE_VERSIONS = (1, 2)


@dataclass
class Snapshot:
    """What a preconditioner saves and restores (the arguments of :func:`pack`).

    Attributes:
        steps: Steps taken.
        layers: Per-block state (:meth:`KroneckerBlock.state_dict`), in model order.
        shapes: ``name -> (A dimension, G dimension)`` of the model's layers now.
        layouts: ``name -> {(weight, bias) trainable: shape}``: the shape a layer's
            factors have under each trainable-parameter layout (a checkpoint saved with
            a frozen bias loads into the unfrozen model; the layer's factors restart at
            its next factor update).
        stats: The preconditioner's counters.
        generator_state: The state of its random generator.
        solver: The solver's registry name.
        method: ``"inverse"`` or ``"solve"``.
        solver_settings: The solver's configuration (its ``config`` dataclass, field by
            field as text; empty for a solver without one), e.g. the thermodynamic
            device's bits, backend and quantizer: a prepared state is only valid for it.
    """

    steps: int
    layers: dict[str, dict[str, Any]]
    shapes: dict[str, tuple[int, int]]
    stats: dict[str, float]
    generator_state: torch.Tensor
    solver: str
    method: str
    layouts: dict[str, dict[tuple[bool, bool], tuple[int, int]]] = field(default_factory=dict)
    solver_settings: dict[str, str] = field(default_factory=dict)


def solver_settings(solver: Any) -> dict[str, str]:
    """The fields of ``solver.config`` (a dataclass) as text; ``{}`` without one. The
    ``hardware`` model is the one the solver times with (a thermodynamic solver's, with
    its DAC/ADC bits)."""
    config = getattr(solver, "config", None)
    if config is None or not dataclasses.is_dataclass(config):
        return {}
    settings = {f.name: repr(getattr(config, f.name)) for f in dataclasses.fields(config)}
    if "hardware" in settings and getattr(solver, "hardware", None) is not None:
        settings["hardware"] = repr(solver.hardware)
    return settings


def pack(snap: Snapshot) -> dict[str, Any]:
    """The state dict of a preconditioner (plain tensors, numbers and strings)."""
    return {
        "format_version": FORMAT_VERSION,
        "steps": snap.steps,
        "layers": dict(snap.layers),
        "shapes": dict(snap.shapes),
        "stats": dict(snap.stats),
        "generator": snap.generator_state,
        "solver": snap.solver,
        "method": snap.method,
        "solver_settings": dict(snap.solver_settings),
    }


def unpack(snap: Snapshot, state: dict[str, Any]) -> Snapshot:
    """Check ``state`` against the live preconditioner ``snap`` and return the snapshot
    to restore (migrated to the current format version; nothing is changed).

    Raises:
        ValueError: If ``state`` is not a preconditioner state of a readable format
            version, comes from a model with other layers or factor shapes, or from
            another solver or method.
    """
    if not isinstance(state, dict) or state.get("format_version") not in READABLE_VERSIONS:
        raise ValueError("not a thermokfac preconditioner state (format_version "
                         f"{state.get('format_version') if isinstance(state, dict) else None!r}"
                         f", expected one of {READABLE_VERSIONS})")
    _check_layout(state)
    state = migrate(state)
    expected = {name: _pair(shape, name) for name, shape in snap.shapes.items()}
    saved = {name: _pair(shape, name) for name, shape in state["shapes"].items()}
    missing = sorted(set(expected) - set(saved))
    unexpected = sorted(set(saved) - set(expected))
    for name in set(expected) & set(saved):  # the shape of the layout it was saved with
        layer = state["layers"][name]
        layout = layer.get("layout")
        if layout is not None and tuple(layout) in snap.layouts.get(name, {}):
            expected[name] = snap.layouts[name][tuple(layout)]
        elif layer.get("a") is None and layer.get("a_rows") is None:
            expected[name] = saved[name]  # never captured (frozen): nothing to match
    wrong = sorted(n for n in set(expected) & set(saved) if expected[n] != saved[n])
    if missing or unexpected or wrong:
        details = []
        if missing:
            details.append(f"missing from the checkpoint: {missing}")
        if unexpected:
            details.append(f"not in this model: {unexpected}")
        if wrong:
            details.append("factor shapes differ: " + ", ".join(
                f"{n} (model {expected[n]}, checkpoint {saved[n]})" for n in wrong))
        raise ValueError("checkpoint is from a different model: " + "; ".join(details))
    if state["solver"] != snap.solver or state["method"] != snap.method:
        raise ValueError(f"checkpoint was written with solver={state['solver']!r}, method="
                         f"{state['method']!r}; this preconditioner uses solver="
                         f"{snap.solver!r}, method={snap.method!r} (pass solver="
                         f"{state['solver']!r}, method={state['method']!r} to load it; the "
                         "default method of the digital solvers was 'solve' before 'inverse')")
    saved_settings = state.get("solver_settings")  # absent in states of older versions
    if saved_settings is not None and saved_settings != snap.solver_settings:
        # the hardware model last: it repeats the solver's bits, named first
        changed = sorted((k for k in set(saved_settings) | set(snap.solver_settings)
                          if saved_settings.get(k) != snap.solver_settings.get(k)),
                         key=lambda k: (k == "hardware", k))
        raise ValueError("checkpoint was written with another solver configuration: " +
                         "; ".join(f"{k} (checkpoint {saved_settings.get(k)}, this solver "
                                   f"{snap.solver_settings.get(k)})" for k in changed) +
                         " — build the solver with the checkpoint's settings to load it")
    _check_tensor_shapes(state["layers"], expected)
    return Snapshot(
        steps=int(state["steps"]), layers=dict(state["layers"]), shapes=expected,
        stats=dict(state["stats"]), generator_state=state["generator"], solver=snap.solver,
        method=snap.method, layouts=snap.layouts, solver_settings=snap.solver_settings)


def migrate(state: dict[str, Any]) -> dict[str, Any]:
    """A state of format version 1 as version 2 (a new dict; version 2 is returned as
    it is): each layer gains ``prepared``, as the version-1 code decided it."""
    if state["format_version"] == FORMAT_VERSION:
        return state
    once = state.get("distributed", {}).get("prepared_once")
    layers = {}
    for name, layer in state["layers"].items():
        if once is not None:
            prepared = name in once
        else:
            prepared = bool(layer.get("failed")) or layer.get("a_prep") is not None \
                or layer.get("a_inv") is not None
        layers[name] = {**layer, "prepared": prepared}
    out = {k: v for k, v in state.items() if k != "distributed"}
    return {**out, "layers": layers, "format_version": FORMAT_VERSION}


def _pair(shape: Any, name: str) -> tuple[int, int]:
    """A block's (A, G) dimensions from a state.

    Raises:
        ValueError: ``shape`` is not two integers (a damaged state), naming the layer.
    """
    try:
        a_dim, g_dim = (int(d) for d in shape)
    except (TypeError, ValueError):
        raise ValueError(f"checkpoint entry shapes/{name} is {shape!r}, not the two "
                         "dimensions of a block's factors") from None
    return a_dim, g_dim


#: The parts of a state (every readable version) and their types.
_LAYOUT = {"steps": int, "layers": dict, "shapes": dict, "stats": dict, "solver": str,
           "method": str}


def _check_layout(state: dict[str, Any]) -> None:
    """The state has every part, of its type, and each layer entry is a table.

    Raises:
        ValueError: Naming the missing or mistyped part or layer.
    """
    missing = sorted(k for k in _LAYOUT if k not in state)
    if missing:
        raise ValueError(f"preconditioner state of format_version "
                         f"{state['format_version']} misses {missing}")
    for key, kind in _LAYOUT.items():
        if not isinstance(state[key], kind) or isinstance(state[key], bool):
            raise ValueError(f"preconditioner state entry {key!r} is a "
                             f"{type(state[key]).__name__}, not {kind.__name__}")
    for name, layer in state["layers"].items():
        if not isinstance(layer, dict):
            raise ValueError(f"preconditioner state of layer {name!r} is a "
                             f"{type(layer).__name__}, not a table")
    if set(state["layers"]) != set(state["shapes"]):
        raise ValueError("preconditioner state names other layers in 'layers' "
                         f"({sorted(state['layers'])}) than in 'shapes' "
                         f"({sorted(state['shapes'])})")


def first_non_finite(obj: Any) -> str | None:
    """The path (``"/key/0"``; ``""`` for ``obj`` itself) of the first floating-point
    tensor in the nested dicts, lists and tuples of ``obj`` that holds NaN or infinity,
    or None when every one is finite.

    Args:
        obj: A tensor, or a dict / list / tuple nesting them (other values are skipped).
    """
    if isinstance(obj, torch.Tensor):
        return "" if obj.is_floating_point() and not bool(torch.isfinite(obj).all()) \
            else None
    items = obj.items() if isinstance(obj, dict) else \
        enumerate(obj) if isinstance(obj, (list, tuple)) else ()
    for key, value in items:
        found = first_non_finite(value)
        if found is not None:
            return f"/{key}{found}"
    return None


def _check_tensor_shapes(layers: dict[str, Any], dims: dict[str, tuple[int, int]]) -> None:
    """Each saved factor, inverse and row block has the shape its layer needs, and no
    saved tensor holds NaN or infinity (every later step would fail without naming
    the layer or the checkpoint).

    Raises:
        ValueError: Naming the layer, the entry, its shape and the shape expected, or
            the entry that is not finite.
    """
    for name, layer in layers.items():
        bad = first_non_finite(layer)
        if bad is not None:
            raise ValueError(f"checkpoint entry {name}{bad} holds NaN or infinite values: "
                             "the saved K-FAC state is damaged")
        a_dim, g_dim = dims[name]
        rules = {"a": ((a_dim, a_dim), (a_dim,)), "a_inv": ((a_dim, a_dim), (a_dim,)),
                 "g": ((g_dim, g_dim),), "g_inv": ((g_dim, g_dim),)}
        for key, shapes in rules.items():
            t = layer.get(key)
            if t is not None and tuple(t.shape) not in shapes:
                raise ValueError(f"checkpoint entry {name}/{key} has shape {tuple(t.shape)}; "
                                 f"this model's layer needs {' or '.join(map(str, shapes))}")
        for key, width in (("a_rows", a_dim), ("g_rows", g_dim)):
            t = layer.get(key)
            if t is not None and (t.ndim != 2 or t.shape[1] != width):
                raise ValueError(f"checkpoint entry {name}/{key} has shape {tuple(t.shape)}; "
                                 f"this model's layer needs (rows, {width})")
