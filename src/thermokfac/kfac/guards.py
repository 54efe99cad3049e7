"""The checks that make a K-FAC step right or loud (never silently wrong).

:class:`StepGuard` watches which layers a backward reaches (post-accumulate-grad hooks),
refuses steps that cannot be right (no backward since the last step, a backward added
onto the preconditioned gradient, layers changed after the preconditioner was built),
and turns what the capture noticed into one-time warnings and counts in the
preconditioner's ``stats``.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.parameter import is_lazy

from .._stack import user_stacklevel
from .capture import CurvatureCapture
from .config import KFACConfig
from .discovery import is_ddp
from .kl_clip import effective_learning_rate
from .records import LayerRecord


class StepGuard:
    """Guards of one preconditioner.

    Args:
        records: The preconditioned layers by name.
        capture: Their hooks.
        stats: Returns the preconditioner's ``stats`` dict (it is replaced on load).
        averages_factors: The preconditioner averages factors over ranks (distributed).
    """

    def __init__(self, records: dict[str, LayerRecord], capture: CurvatureCapture,
                 stats: Callable[[], dict[str, float]], averages_factors: bool = False
                 ) -> None:
        self.averages_factors = averages_factors
        self.records = records
        self.capture = capture
        self._stats = stats
        self.fresh: set[str] = set()  # layers whose parameters a backward reached
        self.removed = False
        self._warned: set[str] = set()
        self._hooks: dict[int, Any] = {}
        # .grad tensors U was written into, with their version counters then. A backward
        # about to accumulate into the same tensor at the same version, still non-zero,
        # adds onto U: zero_grad() replaces the tensor, .zero_() bumps the version, and
        # .data.zero_() (no bump) leaves zeros.
        self._written: dict[int, tuple[Tensor, int]] = {}
        self._added_onto_update: str | None = None
        self._refused_at: int | None = None  # param_gradients when a step was refused
        self._checked_ranks = False
        self.watch()

    @property
    def stats(self) -> dict[str, float]:
        return self._stats()

    def new_step(self) -> None:
        self.fresh.clear()
        self._refused_at = None
        self.watch()

    def unstepped_backward(self) -> bool:
        """Whether the curvature captured since the last step belongs only to gradients
        that are being thrown away (``zero_grad`` with no step: a skipped step). After a
        forward that follows the last backward, the split waits for that forward's
        backward (:meth:`backward_begins`), which sees whether the gradients were reset."""
        if self.capture.param_gradients == 0:
            return False  # no backward since the last step
        if self.capture.forward_mark >= self.capture.param_gradients:
            return False  # decided when the next backward begins
        self.stats["discarded_curvature"] += 1
        return True

    def backward_begins(self) -> None:
        """A forward's backward begins (its first output gradient, before it is
        captured). If backwards ran since the last
        step and every gradient they left has been reset since (``zero_grad`` without a
        step: a step skipped by a GradScaler overflow, by Lightning or by the Hugging
        Face Trainer, which zero the gradients themselves), their curvature is dropped,
        counted in ``stats['discarded_curvature']``: it must not join the next step's."""
        if self.capture.param_gradients == 0 or not self.gradients_reset():
            return
        self.capture.discard_earlier_backwards()
        self.fresh.clear()
        self._refused_at = None
        self.stats["discarded_curvature"] += 1

    def gradients_reset(self) -> bool:
        """Whether no watched parameter holds a gradient (None or all zeros); stops at
        the first that does (one tensor read in the usual accumulation case)."""
        return all(p.grad is None or not bool(p.grad.any())
                   for record in self.records.values() for p in record.helper.parameters
                   if p.requires_grad)

    def check_amp(self, fp16_autocast: bool, grad_scaler: Any) -> None:
        """Warn (once) and count a float16-autocast forward without ``grad_scaler=``."""
        if fp16_autocast and grad_scaler is None:
            self.stats["fp16_without_grad_scaler"] += 1
            self.warn_once("fp16", (
                "the forward ran under float16 autocast but no grad_scaler= was given: if "
                "the loss is scaled (torch.amp.GradScaler), G carries the scale squared, "
                "which shrinks the damping; pass grad_scaler=scaler (counted in "
                "stats['fp16_without_grad_scaler'])"))

    def refusing(self, update: Callable[[], None]) -> None:
        """Run the factor update; if it refuses the step (``ValueError``), remember when,
        so that a later backward does not mix into this step's curvature."""
        try:
            update()
        except ValueError:
            self._refused_at = self.capture.param_gradients
            raise

    def refused_then_new_backward(self) -> bool:
        """After a refused step, whether another backward came before this ``step()``:
        then the captured curvature mixes two backwards and is discarded (warned)."""
        if self._refused_at is None or self.capture.param_gradients == self._refused_at:
            return False
        self.stats["discarded_curvature"] += 1
        self.warn_once("discarded", (
            "a step() was refused and another backward followed before the next step(): "
            "the curvature captured since then mixes both backwards and is discarded (no "
            "factor update this step), counted in stats['discarded_curvature']"))
        return True

    def remember_updates(self, layers: Iterable[LayerRecord]) -> None:
        """Note the ``.grad`` tensors the step just wrote U into."""
        self._written = {id(p): (p.grad, p.grad._version) for record in layers
                         for p in record.helper.parameters if p.grad is not None}

    def remove(self) -> None:
        self.removed = True
        for handles in self._hooks.values():
            for handle in handles:
                handle.remove()
        self._hooks.clear()

    def set_records(self, records: dict[str, LayerRecord]) -> None:
        """Watch these layers (after a change of the model's layers): hooks of
        parameters no longer preconditioned are removed, new ones added."""
        self.records = records
        for handles in self._hooks.values():
            for handle in handles:
                handle.remove()
        self._hooks.clear()
        self.watch()

    def watch(self) -> bool:
        """Note which layers a backward pass reaches (post-accumulate-grad hooks on every
        trainable parameter; hooks are added as parameters become trainable or are
        replaced). Returns whether a newly watched parameter already holds a gradient."""
        unseen = False
        names: dict[int, list[str]] = {}  # blocks of one module share a packed weight
        for name, record in self.records.items():
            for param in record.helper.parameters:
                names.setdefault(id(param), []).append(name)
        for record in self.records.values():
            for param in record.helper.parameters:
                if param.requires_grad and param.is_leaf and id(param) not in self._hooks:
                    sharing = tuple(names[id(param)])
                    self._hooks[id(param)] = (
                        param.register_hook(
                            lambda grad, param=param, sharing=sharing:
                            self._before_accumulation(sharing, param)),
                        param.register_post_accumulate_grad_hook(
                            lambda param, sharing=sharing: self._note_gradient(sharing)))
                    unseen = unseen or param.grad is not None
        return unseen

    def _before_accumulation(self, names: tuple[str, ...], param: Tensor) -> None:
        """A gradient is about to accumulate into ``param.grad``: is that still U?"""
        written = self._written.get(id(param))
        if written is not None and param.grad is written[0] \
                and param.grad._version == written[1] and bool(param.grad.any()):
            self._added_onto_update = names[0]

    def _note_gradient(self, names: tuple[str, ...]) -> None:
        self.fresh.update(names)
        self.capture.param_gradients += 1

    def before_step(self, step: int) -> None:
        """Refuse a step that cannot be right: after ``remove()``, with a layer changed
        after building (pruned, parametrized, tied), a backward added onto the
        preconditioned gradient, or no backward since the last step.

        Raises:
            RuntimeError: Naming the problem and what to do.
        """
        if self.removed:
            raise RuntimeError("this preconditioner was removed (pre.remove()): build a new "
                               "one to precondition again")
        if not self._checked_ranks:
            self._checked_ranks = True
            if self.averages_factors is False and world_size() > 1:
                self.stats["multi_rank_warnings"] += 1
                self.warn_once("ranks", (
                    f"torch.distributed runs {world_size()} ranks but this "
                    "KFACPreconditioner uses only this rank's factors: if the model is "
                    "DistributedDataParallel-wrapped the replicas drift apart; use "
                    "thermokfac.distributed.DistributedKFACPreconditioner"))
        owners: dict[int, tuple[str, nn.Module]] = {}
        for name, record in self.records.items():
            problem = record.helper.leaf_problem()
            module = record.helper.module
            for param in record.helper.parameters:
                owner, holder = owners.setdefault(id(param), (name, module))
                if holder is not module:  # blocks of one module share its packed weights
                    problem = f"a parameter shared with layer {owner!r} (tied)"
            if problem is not None:
                raise RuntimeError(
                    f"layer {name!r} now has {problem}; it changed after the preconditioner "
                    "was built (pruning, a parametrization, tying weights): build the "
                    "preconditioner after such changes")
        if self._added_onto_update is not None:
            name, self._added_onto_update = self._added_onto_update, None
            raise RuntimeError(
                f"step() at step {step}: the backward added to the preconditioned "
                f"gradient that the previous step left in layer {name!r}'s .grad (no "
                "zero_grad() since). Under gradient accumulation call pre.step() once, "
                "after the last micro-batch's backward, then optimizer.step() and "
                "zero_grad()")
        if self.fresh or not any(r.helper.trainable for r in self.records.values()):
            return
        if self.watch():  # parameters replaced (load_state_dict(assign=True))
            return
        raise RuntimeError(
            f"step() at step {step} found no gradient from a backward pass since the "
            "previous step: call loss.backward() before pre.step(), and pre.step() once per "
            "optimizer step, after all backwards of that step (a second step() would "
            "precondition the gradient twice)")

    def nonfinite(self, name: str, step: int) -> None:
        """Non-finite factors of one layer: its update is skipped, counted, warned once."""
        self.stats["nonfinite_factor_skips"] += 1
        self.warn_once("nonfinite", (
            f"non-finite activations or gradients in layer {name!r} at step {step}: its "
            "factor update is skipped (counted in stats['nonfinite_factor_skips'])"))

    def warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message + " (warned once)", stacklevel=user_stacklevel())

    def after_capture(self, step: int) -> None:
        """Loud, never silent: transformed passes, hooks that did not run."""
        capture = self.capture
        if capture.transformed_passes:
            self.stats["transformed_passes"] += capture.transformed_passes
            capture.transformed_passes = 0
            self.warn_once("transformed", (
                "forward passes under a torch.func transform (vmap/grad/jvp...) are not "
                "captured by K-FAC and not counted as examples; counted in "
                "stats['transformed_passes']"))
        if capture.problems:
            listing = "; ".join(f"{n}: {why}" for n, why in capture.problems.items())
            names = sorted(capture.problems)
            raise ValueError(
                f"K-FAC cannot capture layers {names} at step {step}: {listing}. Pass "
                f"skip_layers={names} to leave them to the base optimizer")
        if self.fresh and not capture.hooks_ran():
            raise RuntimeError(
                f"K-FAC captured nothing at step {step} although the backward reached "
                f"{len(self.fresh)} preconditioned layers: the module hooks did not run (a "
                "tracer or exported program that bypasses nn.Module hooks, or a model "
                "compiled and run before the preconditioner was built: call "
                "torch.compiler.reset() after building it)")
        if capture.repeated_gradients:
            self.stats["repeated_gradients"] += capture.repeated_gradients
            self.warn_once("repeated", (
                "a layer's output was back-propagated more than once in one step (e.g. "
                "torch.autograd.grad before loss.backward, or two backwards through one "
                "forward): only the first gradient enters G, which is right only when they "
                "are the same loss's; counted in stats['repeated_gradients']"))
        for key, found, text in (
                ("unbatched_layer_calls", capture.unbatched_calls,
                 "received an input whose leading dimension is not the model call's batch "
                 "(a batch-less input broadcast afterwards, e.g. a position embedding of "
                 "arange(T): only batch-summed gradients reach it — expand it to the batch "
                 "with pos.expand(N, T); or a sequence-first model: use batch-first inputs); "
                 "those calls are not captured"),
                ("group_mismatches", capture.group_mismatches,
                 "inside grouped_rows saw rows that do not match the membership; they were "
                 "treated one row per example"),
                ("layout_mismatches", capture.layout_mismatches,
                 "saw another batch than the model's call (the example count then needs "
                 "pre.step(num_examples=N); under kfac_approx='reduce' the Linear layers of "
                 "a sequence-first model average over the batch, not the sequence: use "
                 "batch-first inputs or kfac_approx='expand')")):
            if found:
                self.stats[key] += len(found)
                listing = "; ".join(f"{n}: {why}" for n, why in found.items())
                self.warn_once(key, f"layers {text}: {listing}; counted in stats[{key!r}]")

    def missing(self, name: str, step: int) -> None:
        """A layer the backward reached but whose factors were not captured: counted and
        warned once (it keeps its previous factors, or passes its gradient through)."""
        record = self.records[name]
        if name not in self.fresh or (record.sums.a_rows and record.sums.g_rows):
            return
        self.stats["missing_factor_skips"] += 1
        self.warn_once("missing", (
            f"layer {name!r} received a gradient at step {step} but its factors were "
            "not captured (its forward ran outside the model's forward hooks, under "
            "no_grad/eval, or its output was not used through autograd; with fisher_type "
            "'mc'/'type2', inside a reentrant activation checkpoint: use "
            "use_reentrant=False); its factor update is skipped, counted in "
            "stats['missing_factor_skips']"))


def world_size() -> int:
    """Ranks of the default process group (1 without torch.distributed)."""
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def sharded(wrapper: nn.Module, model: nn.Module) -> str | None:
    """What makes the model sharded (FSDP, FSDP2 ``fully_shard``, DTensor parameters),
    or None."""
    try:
        from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch built without distributed support
        return None
    for module in (wrapper, *model.modules()):
        if isinstance(module, (FSDPModule, FullyShardedDataParallel)):
            return f"module {type(module).__name__} is FSDP-wrapped"
    for name, p in model.named_parameters():
        if isinstance(p, DTensor) or isinstance(getattr(p, "data", None), DTensor):
            return f"parameter {name!r} is a DTensor (sharded)"
    return None


def refuse_sharded(wrapper: nn.Module, model: nn.Module) -> None:
    """Raise NotImplementedError for a sharded model (see :func:`sharded`)."""
    reason = sharded(wrapper, model)
    if reason is not None:
        raise NotImplementedError(
            f"FSDP / sharded parameters are not supported yet ({reason}): K-FAC needs each "
            "layer's whole weight gradient and input on one rank. Use DistributedDataParallel "
            "with thermokfac.distributed.DistributedKFACPreconditioner instead")


def check_model(wrapper: nn.Module, model: nn.Module, averages_factors: bool) -> None:
    """Refuse what cannot be preconditioned: a DDP model on several ranks for a
    preconditioner that keeps each rank's own factors, a sharded model, lazy or meta
    parameters. (Nothing else happens at construction but registering hooks: a model
    compiled *and run* before building has graphs without them, refused at the first
    step; a compiled submodule reports through its wrapper's hooks.)

    Raises:
        NotImplementedError: The model is FSDP-wrapped or has DTensor parameters.
        RuntimeError: DDP-wrapped, more than one rank, and not ``averages_factors``.
        ValueError: Lazy parameters not yet materialised, or parameters on the meta
            device.
    """
    refuse_sharded(wrapper, model)
    if is_ddp(wrapper) and not averages_factors and world_size() > 1:
        raise RuntimeError(
            f"the model is DistributedDataParallel-wrapped on {world_size()} ranks: "
            "KFACPreconditioner would use each rank's own factors and the replicas "
            "would drift apart; use thermokfac.distributed.DistributedKFACPreconditioner")
    meta = [n for n, p in model.named_parameters() if p.is_meta]
    if meta:
        shown = ", ".join(meta[:4]) + (f" and {len(meta) - 4} more" if len(meta) > 4 else "")
        raise ValueError(f"parameters {shown} are on the meta device (no values yet): "
                         "materialise the model first (model.to_empty(device=...), then "
                         "initialise or load its weights) and build the preconditioner after")
    if any(is_lazy(p) for p in model.parameters()):
        raise ValueError("the model has uninitialised lazy parameters (nn.LazyLinear, "
                         "nn.LazyConv2d, ...): run one forward pass to materialise them, "
                         "then build the preconditioner")


def check_setup(records: list[LayerRecord], cfg: KFACConfig,
                optimizer: torch.optim.Optimizer | None) -> None:
    """Construction-time warnings and checks: every layer frozen, a KL clip without a
    learning rate, an optimizer momentum the KL clip cannot use (``ValueError``)."""
    if not any(r.helper.trainable for r in records):
        warnings.warn("every preconditioned layer is frozen (requires_grad=False): K-FAC "
                      "does nothing until one is trainable", stacklevel=3)
    if cfg.kl_clip is not None and optimizer is not None:
        effective_learning_rate(None, optimizer, cfg.momentum)  # momentum < 1
    if cfg.kl_clip is not None and cfg.lr is None and optimizer is None:
        warnings.warn("kl_clip is inactive: it needs the learning rate (pass lr= or "
                      "optimizer=, or kl_clip=None to silence this)", stacklevel=3)
    if cfg.kl_clip is not None and cfg.lr is not None and optimizer is None \
            and cfg.momentum is None:
        warnings.warn("kl_clip uses lr= as the step size, assuming no momentum: under SGD "
                      "momentum μ the step is lr/(1 − μ), and a clip sized for lr lets it "
                      "overshoot (pass momentum=μ, or optimizer=, the base optimizer)",
                      stacklevel=3)
