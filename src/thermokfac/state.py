"""``state_dict`` / ``load_state_dict`` of the preconditioner.

The state holds what is needed to continue bit-exactly: the moving-average factors,
what the solver prepared (or the inverses), the step counter, the statistics and the
random generator. Loading checks that the layers and factor shapes match the model.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .layer_state import LayerState

if TYPE_CHECKING:
    from .preconditioner import KFACPreconditioner

FORMAT_VERSION = 1


def preconditioner_state(pre: KFACPreconditioner) -> dict[str, Any]:
    return {
        "format_version": FORMAT_VERSION,
        "steps": pre.steps,
        "layers": {name: state.state_dict() for name, state in pre._states.items()},
        "shapes": {name: (r.helper.a_dim, r.helper.d_out) for name, r in pre._records.items()},
        "stats": dict(pre.stats),
        "generator": pre.generator.get_state(),
        "solver": pre.solver.name,
        "method": pre.config.method.value,
    }


def load_preconditioner_state(pre: KFACPreconditioner, state: dict[str, Any]) -> None:
    if not isinstance(state, dict) or state.get("format_version") != FORMAT_VERSION:
        raise ValueError("not a thermokfac preconditioner state (format_version "
                         f"{state.get('format_version') if isinstance(state, dict) else None!r}"
                         f", expected {FORMAT_VERSION})")
    expected = {name: (r.helper.a_dim, r.helper.d_out) for name, r in pre._records.items()}
    saved = {name: tuple(shape) for name, shape in state["shapes"].items()}
    missing = sorted(set(expected) - set(saved))
    unexpected = sorted(set(saved) - set(expected))
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
    if state["solver"] != pre.solver.name or state["method"] != pre.config.method.value:
        raise ValueError(f"checkpoint was written with solver={state['solver']!r}, method="
                         f"{state['method']!r}; this preconditioner uses solver="
                         f"{pre.solver.name!r}, method={pre.config.method.value!r}")
    pre._states = {name: LayerState.from_state_dict(s) for name, s in state["layers"].items()}
    pre.steps = int(state["steps"])
    pre.stats = dict(state["stats"])
    pre.generator.set_state(state["generator"])
