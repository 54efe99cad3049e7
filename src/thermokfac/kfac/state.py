"""``state_dict`` / ``load_state_dict`` of the preconditioner.

The state holds what is needed to continue bit-exactly: the moving-average factors,
what the solver prepared (or the inverses), the step counter, the statistics and the
random generator. Loading checks that the layers and factor shapes match the model.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch

from .layer_state import LayerState

FORMAT_VERSION = 1


@dataclass
class Snapshot:
    """What a preconditioner saves and restores (the arguments of :func:`pack`).

    Attributes:
        steps: Steps taken.
        layers: Per-layer state, in model order.
        shapes: ``name -> (A dimension, G dimension)`` of the model's layers now.
        layouts: ``name -> {(weight, bias) trainable: shape}``: the shape a layer's
            factors have under each trainable-parameter layout (a checkpoint saved with
            a frozen bias loads into the unfrozen model; the layer's factors restart at
            its next factor update).
        stats: The preconditioner's counters.
        generator: Its random generator.
        solver: The solver's registry name.
        method: ``"inverse"`` or ``"solve"``.
        solver_settings: The solver's configuration (its ``config`` dataclass, field by
            field as text; empty for a solver without one), e.g. the thermodynamic
            device's bits, backend and quantizer: a prepared state is only valid for it.
    """

    steps: int
    layers: dict[str, LayerState]
    shapes: dict[str, tuple[int, int]]
    stats: dict[str, float]
    generator: torch.Generator
    solver: str
    method: str
    layouts: dict[str, dict[tuple[bool, bool], tuple[int, int]]] = field(default_factory=dict)
    solver_settings: dict[str, str] = field(default_factory=dict)


def solver_settings(solver: Any) -> dict[str, str]:
    """The fields of ``solver.config`` (a dataclass) as text; ``{}`` without one."""
    config = getattr(solver, "config", None)
    if config is None or not dataclasses.is_dataclass(config):
        return {}
    return {f.name: repr(getattr(config, f.name)) for f in dataclasses.fields(config)}


def pack(snap: Snapshot) -> dict[str, Any]:
    """The state dict of a preconditioner (plain tensors, numbers and strings)."""
    return {
        "format_version": FORMAT_VERSION,
        "steps": snap.steps,
        "layers": {name: state.state_dict() for name, state in snap.layers.items()},
        "shapes": dict(snap.shapes),
        "stats": dict(snap.stats),
        "generator": snap.generator.get_state(),
        "solver": snap.solver,
        "method": snap.method,
        "solver_settings": dict(snap.solver_settings),
    }


def unpack(snap: Snapshot, state: dict[str, Any]) -> Snapshot:
    """Check ``state`` against the live preconditioner ``snap`` and return the restored
    snapshot (``snap.generator`` is set to the saved state).

    Raises:
        ValueError: If ``state`` is not a preconditioner state, comes from a model with
            other layers or factor shapes, or from another solver or method.
    """
    if not isinstance(state, dict) or state.get("format_version") != FORMAT_VERSION:
        raise ValueError("not a thermokfac preconditioner state (format_version "
                         f"{state.get('format_version') if isinstance(state, dict) else None!r}"
                         f", expected {FORMAT_VERSION})")
    expected = {name: tuple(shape) for name, shape in snap.shapes.items()}
    saved = {name: tuple(shape) for name, shape in state["shapes"].items()}
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
        changed = sorted(k for k in set(saved_settings) | set(snap.solver_settings)
                         if saved_settings.get(k) != snap.solver_settings.get(k))
        raise ValueError("checkpoint was written with another solver configuration: " +
                         "; ".join(f"{k} (checkpoint {saved_settings.get(k)}, this solver "
                                   f"{snap.solver_settings.get(k)})" for k in changed) +
                         " — build the solver with the checkpoint's settings to load it")
    _check_tensor_shapes(state["layers"], expected)
    snap.generator.set_state(state["generator"])
    return Snapshot(
        steps=int(state["steps"]),
        layers={name: LayerState.from_state_dict(s) for name, s in state["layers"].items()},
        shapes=expected, stats=dict(state["stats"]), generator=snap.generator,
        solver=snap.solver, method=snap.method, layouts=snap.layouts,
        solver_settings=snap.solver_settings)


def _check_tensor_shapes(layers: dict[str, Any], dims: dict[str, tuple[int, int]]) -> None:
    """Each saved factor, inverse and row block has the shape its layer needs.

    Raises:
        ValueError: Naming the layer, the entry, its shape and the shape expected.
    """
    for name, layer in layers.items():
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
