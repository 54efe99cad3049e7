"""What a saved training run must hold before ``--resume`` builds anything from it, and
which checkpoint a resume continues from (the file rules are in :mod:`.checkpoint`)."""

from __future__ import annotations

import json
import sys
from dataclasses import fields
from pathlib import Path
from typing import Any

from ..kfac.state import first_non_finite
from . import checkpoint as checkpoint_files
from .config import TrainConfig
from .processes import launch_value

#: Settings a resumed run may change (more steps, a new rate, another evaluation period,
#: the threads it runs on, whether subnormal floats are flushed).
RESUMABLE = frozenset({"steps", "lr", "eval_every", "threads", "flush_denormal"})

#: The parts of a ``checkpoint.pt`` payload (format version 1) and their types; a
#: ``checkpoint.dcp`` progress item has all but the last three.
PAYLOAD = {"config": dict, "step": int, "train_s": (int, float), "world_size": int,
           "gen": list, "torch_rng": list, "steps": list, "metrics": list,
           "model": dict, "opt": dict, "pre": (dict, type(None))}


def check_payload(state: Any, path: Path, sharded: bool = False) -> None:
    """A checkpoint's payload has this version's layout, settings and finite tensors.

    Checked before anything is built or changed, so a checkpoint from another version
    or a damaged-but-plausible one (its checksum matches what was written) is a
    one-line error naming the file.

    Args:
        state: The loaded payload (or, with ``sharded``, a DCP checkpoint's progress
            item).
        path: The checkpoint, for the messages.
        sharded: ``state`` is an ``--fsdp`` progress item (no model, optimizer or
            K-FAC parts: those are in the DCP folder).

    Raises:
        ValueError: The payload is not a dict, misses a part or has one of another type
            or another version's, its settings are not this version's
            :class:`TrainConfig` or out of range, or a model, optimizer or K-FAC tensor
            holds NaN or infinity (named).
    """
    expected = {k: v for k, v in PAYLOAD.items()
                if not sharded or k not in ("model", "opt", "pre")}
    if not isinstance(state, dict):
        raise ValueError(f"{path} holds a {type(state).__name__}, not a training run's "
                         "state")
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    if missing or extra:
        parts = ([f"missing {missing}"] if missing else []) + \
            ([f"parts of another version {extra}"] if extra else [])
        raise ValueError(f"{path} is not a checkpoint of this thermokfac version: "
                         f"{'; '.join(parts)}")
    for key, kind in expected.items():
        if not isinstance(state[key], kind) or isinstance(state[key], bool):
            raise ValueError(f"{path}: its {key!r} is a {type(state[key]).__name__}, not "
                             f"{getattr(kind, '__name__', kind)}")
    known = {f.name for f in fields(TrainConfig)}
    unknown = sorted(set(state["config"]) - known)
    if unknown:
        raise ValueError(f"{path}: its settings {unknown} are not settings of this "
                         "thermokfac version")
    try:
        TrainConfig(**state["config"])
    except (TypeError, ValueError) as err:
        raise ValueError(f"{path}: its settings are not valid: {err}") from None
    if state["step"] < 0 or len(state["gen"]) != state["world_size"]:
        raise ValueError(f"{path}: step {state['step']} with {len(state['gen'])} random "
                         f"states for {state['world_size']} process(es) is inconsistent")
    parts_to_check = {part: state[part] for part in ("model", "opt") if part in expected}
    if expected.get("pre") and state["pre"] is not None:
        parts_to_check.update({f"K-FAC layer {name!r}": layer for name, layer in
                               (state["pre"].get("layers") or {}).items()})
    for where, part in parts_to_check.items():
        bad = first_non_finite(part)
        if bad is not None:
            raise ValueError(f"{path}: {where}{bad} holds NaN or infinite values: the "
                             "checkpoint is damaged")


def report_resume(out: Path, found: checkpoint_files.Found, state: dict[str, Any]) -> None:
    """Say which checkpoint a resume continues from (rank 0, on stderr); a fallback (the
    newest one was damaged or never renamed into place) must hold the settings of
    ``config.json``.

    Args:
        out: The run folder.
        found: The checkpoint :func:`.checkpoint.resume_point` chose.
        state: Its payload (checked by :func:`check_payload`).

    Raises:
        ValueError: A fallback checkpoint whose settings differ from ``config.json``
            (it is not this run's).
    """
    step = state["step"]
    notes = [reason for _, reason in found.skipped]
    if found.path.name not in (checkpoint_files.NAME, checkpoint_files.DCP_NAME):
        recorded = out / "config.json"
        try:
            saved = json.loads(recorded.read_text())
        except (OSError, ValueError):
            saved = None
        if not isinstance(saved, dict):  # nothing to compare with: say so
            notes.append(f"{recorded} is missing or unreadable, so this checkpoint's "
                         "settings were not compared with the run's")
        else:
            differ = sorted(k for k in set(saved) | set(state["config"])
                            if k not in RESUMABLE and saved.get(k) != state["config"].get(k))
            if differ:
                raise ValueError(f"{found.path} (step {step}) is the newest intact "
                                 f"checkpoint in {out}, but its settings differ from "
                                 f"{recorded} in {differ}: it is not this run's; refusing "
                                 "to resume from it")
    if launch_value("RANK") == 0:
        why = "".join(f"; {note}" for note in notes)
        print(f"thermokfac: resuming {out} from {found.path} (step {step}){why}",
              file=sys.stderr)
