"""K-FAC as a gradient preconditioner in front of any ``torch.optim`` optimizer.

    loss.backward(); pre.step(); optimizer.step()

``step()`` rewrites each supported layer's ``.grad`` from DΘ to
U = (G + λ_G I)⁻¹ DΘ (A + λ_A I)⁻¹ (paper Eq. 15), so SGD turns into (damped) natural
gradient descent (Eq. 14) and Nesterov, Adam, AdamW... run on the preconditioned
gradient (the paper's Table 3 combinations).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from contextlib import AbstractContextManager
from typing import Any

import torch
from torch import Tensor, nn

from ..enums import FactorStorage, FisherType
from ..solvers import LinearSolver, TimeBreakdown
from ..timing import StepTimings, TimingLog
from .capture import CurvatureCapture
from .config import KFACConfig
from .curvature_backward import curvature
from .discovery import Discovery, announce, discover, unwrap
from .factor_update import commit_factors, follow_layouts, fresh_factors, g_multiplier
from .guards import StepGuard, check_model, check_setup, refuse_sharded
from .hyperparams import DECAY, INTERVAL, Schedule, resolve
from .inspection import Inspection
from .layer_state import LayerState
from .records import LayerRecord
from .solving import (
    NOISE_PARTS,
    modeled_time,
    noise_generator,
    precondition_all,
    prepare_due,
    warn_fallbacks,
)
from .spectra import SpectrumLog

logger = logging.getLogger("thermokfac")



STAT_KEYS = ("nonfinite_factor_skips", "missing_factor_skips", "nonfinite_grad_skips",
             "nonfinite_update_skips", "solver_errors", "passthrough_layers",
             "float64_retries", "damping_increases", "prepare_failures", "kl_clip_scale",
             "transformed_passes", "trainable_changes", "ill_conditioned_solves",
             "repeated_gradients", "unbatched_layer_calls", "group_mismatches",
             "discarded_curvature", "multi_rank_warnings", "layout_mismatches",
             "fp16_without_grad_scaler")


class KFACPreconditioner(Inspection):
    """Kronecker-factored preconditioner that rewrites ``.grad`` in place.

    See the README's "Supported setups" for what is preconditioned, what is left out
    and how each is reported.

    Args:
        model: The network (a ``DistributedDataParallel`` wrapper is unwrapped; layer
            names are those of the bare model).
        solver: A registered solver name (``"cholesky"``, ``"eigh"``, ``"cg"``...) or a
            :class:`~thermokfac.solvers.LinearSolver` instance.
        method: ``"inverse"`` (Method 1) or ``"solve"`` (Method 2), Sec. 4.1. None: the
            solver's ``default_method`` — Method 1 for the digital direct solvers
            (``cholesky``, ``eigh``: faster per step on CPU, see the README's step-time
            benchmark), Method 2 for ``cg`` and ``thermodynamic`` (the device solves);
            Method 2 whenever ``factor_storage="rows"``.
        damping: λ ≥ 0, a value or a function of the step.
        factor_decay: Weight of the *old* average in Eqs. 16–17, in [0, 1); 0 keeps only
            the current batch. (ASDL's ``ema_decay`` is the weight of the new factor:
            the paper's Table 3 value 0.999 is ``factor_decay=0.001`` here.)
        factor_update_steps: Capture factors every this many steps (value or schedule).
        inv_update_steps: Prepare/invert every this many steps (value or schedule).
        fisher_type: ``"empirical"`` (the user's backward), ``"mc"`` or ``"type2"``;
            the last two need the model outputs, see :meth:`step`.
        kfac_approx: ``"expand"`` or ``"reduce"`` for weight-sharing layers (Sec. 3.3).
        loss_reduction: How the user's loss was reduced over its terms, ``"mean"`` or
            ``"sum"``. With ``"mean"``, G = (1/K) Σ ggᵀ over the rows of the step, with
            g the gradient of the *summed* loss and K = examples × loss terms per example.
        skip_layers: Module names or class names to leave to the base optimizer.
        damping_split: ``"equal"`` (λ on both factors) or ``"pi"`` (π-split).
        kl_clip: Bound on the step of the local quadratic model, κ: every U is scaled by
            ν = min(1, √(κ / (η² Σ⟨U, DΘ⟩))) (Ba et al. 2017), with η the effective
            learning rate lr/(1 − μ) under heavy-ball momentum μ (the steady-state step of
            momentum SGD). ``None`` disables it. It needs the learning rate: give ``lr``
            or ``optimizer`` (else it is inactive, with a warning at construction).
        lr: Learning rate for ``kl_clip`` (value or schedule); overrides ``optimizer``.
        optimizer: Read ``param_groups[0]['lr']`` (and ``'momentum'``, for SGD) at every
            step for ``kl_clip``.
        momentum: Momentum μ for ``kl_clip``'s effective rate; default: the optimizer's
            SGD momentum if an optimizer is given, else 0.
        loss_type: ``"cross_entropy"``, ``"mse"`` or ``"bce"`` (sigmoid likelihood per
            output, as ``BCEWithLogitsLoss``) — the likelihood used by ``mc`` and ``type2``.
        class_dim: Where the classes (outputs of one prediction) lie in the outputs given
            to ``mc``/``type2``; required when they have more than 2 dimensions (1 for
            ``[N, C, T]``, the layout ``nn.CrossEntropyLoss`` takes; -1 for ``[N, T, C]``).
        num_per_example_loss_terms: Loss terms per example for the empirical Fisher
            (e.g. the sequence length R when a language-model loss averages over N·R
            tokens: then G = (1/(N·R)) Σ_{n,r} g gᵀ; for ``MSELoss(reduction='mean')``,
            which also averages over the C outputs, use C).
        mc_samples: Sampled labels per prediction for ``fisher_type="mc"``.
        factor_dtype: dtype of factors and solves (default float32, or float64 when the
            model is float64).
        grad_scaler: A ``torch.amp.GradScaler`` whose loss scale is divided out of G; with
            ``optimizer=`` each step also unscales the gradients first when they are
            still scaled (``scaler.unscale_(optimizer)``, once per step as torch allows).
        seed: Seed of the preconditioner's random draws: its own ``torch.Generator``
            (``mc`` labels; its state is saved in :meth:`state_dict`), and the noise of
            stochastic solvers, drawn from a generator per (seed, step, layer, factor)
            (:meth:`noise`) so that a run on several ranks draws what one process draws.
        factor_storage: ``"matrix"`` (form the factors) or ``"rows"`` (keep the
            activation/gradient rows and let the solver realise aaᵀ/b + λI from them, the
            resistor-array mode of App. E: memory O(b·n); needs ``factor_decay=0`` and
            ``method="solve"``; rows are captured on prepare steps only).
        timing_history: Number of per-step :class:`StepTimings` kept.
        separate_weight_and_bias: Precondition each layer's weight and bias as two
            blocks (curvlinops' option of this name): ``<layer>.weight`` with A of the
            inputs alone (no column of ones) and ``<layer>.bias`` with A = 1, both with the
            layer's G. Default False: one block [W | b] with the bias as A's last column
            (Eq. 4).

    Raises:
        ValueError: On any invalid argument (naming it and its valid values/range), or
            if the model has no supported layer.
        RuntimeError: If the model is ``DistributedDataParallel``-wrapped and the world
            size is above 1: each rank would use its own factors and the replicas would
            drift apart; use :class:`~thermokfac.distributed.DistributedKFACPreconditioner`.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> pre = KFACPreconditioner(model, optimizer=opt)
        >>> x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
        >>> nn.functional.cross_entropy(model(x), y).backward()
        >>> pre.step(); opt.step()
        >>> a, g = pre.factors()["0"]
        >>> tuple(a.shape), tuple(g.shape)  # bias column appended to A (Eq. 4)
        ((5, 5), (8, 8))
    """

    _averages_factors = False  # the distributed subclass averages factors over ranks

    def __init__(self, model: nn.Module, *, solver: str | LinearSolver = "cholesky",
                 method: str | None = None, damping: Schedule = 1e-3,
                 factor_decay: Schedule = 0.95, factor_update_steps: Schedule = 1,
                 inv_update_steps: Schedule = 10, fisher_type: str = "empirical",
                 kfac_approx: str = "expand", loss_reduction: str = "mean",
                 skip_layers: Iterable[str] = (), damping_split: str = "equal",
                 kl_clip: float | None = 1e-3, lr: Schedule | None = None,
                 optimizer: torch.optim.Optimizer | None = None, momentum: float | None = None,
                 loss_type: str = "cross_entropy", num_per_example_loss_terms: int = 1,
                 mc_samples: int = 1, factor_dtype: torch.dtype | None = None,
                 grad_scaler: Any = None, seed: int = 0, timing_history: int = 10_000,
                 factor_storage: str = "matrix", class_dim: int | None = None,
                 separate_weight_and_bias: bool = False) -> None:
        self.model = unwrap(model)
        check_model(model, self.model, self._averages_factors)
        self.config = KFACConfig.build(
            solver=solver, method=method, damping=damping, factor_decay=factor_decay,
            factor_update_steps=factor_update_steps, inv_update_steps=inv_update_steps,
            fisher_type=fisher_type, kfac_approx=kfac_approx, loss_reduction=loss_reduction,
            skip_layers=skip_layers, damping_split=damping_split, kl_clip=kl_clip, lr=lr,
            loss_type=loss_type, num_per_example_loss_terms=num_per_example_loss_terms,
            mc_samples=mc_samples, factor_dtype=factor_dtype, momentum=momentum,
            factor_storage=factor_storage, model=self.model, class_dim=class_dim,
            separate_weight_and_bias=separate_weight_and_bias)
        self.solver = self.config.solver
        self.optimizer = optimizer
        self.grad_scaler = grad_scaler
        self.discovery: Discovery = discover(self.model, self.config.skip_layers,
                                             self.config.separate_weight_and_bias)
        announce(self.discovery, logger)
        records = [LayerRecord(name, helper) for name, helper in self.discovery.layers]
        self._records = {r.name: r for r in records}
        self._states = {r.name: LayerState() for r in records}
        self._capture = CurvatureCapture(
            self.model, records, self.config.kfac_approx, self.config.factor_dtype,
            keep_outputs=self.config.fisher_type is not FisherType.EMPIRICAL,
            grad_scale=self._loss_scale,
            keep_rows=self.config.factor_storage is FactorStorage.ROWS)
        device = next(self.model.parameters()).device
        self.generator = torch.Generator(device=device).manual_seed(int(seed))
        self._index = {name: i for i, name in enumerate(self._records)}
        #: Per prepare and factor, the spectrum a thermodynamic solver's device matrix had
        #: (:class:`~thermokfac.kfac.spectra.SpectrumLog`; ``spectra.history`` rows).
        self.spectra = SpectrumLog(timing_history)
        self.timing = TimingLog(timing_history)
        self.timing.sync_cuda = self._capture.sync_cuda = device.type == "cuda"
        self.stats: dict[str, float] = {**dict.fromkeys(STAT_KEYS, 0.0), "kl_clip_scale": 1.0}
        self.steps = 0
        self._window: tuple[int, int] | None = None
        self._guard = StepGuard(self._records, self._capture, lambda: self.stats,
                                averages_factors=self._averages_factors)
        self._capture.before_backward = self._guard.backward_begins
        check_setup(records, self.config, optimizer)
        self._begin_step()

    # ------------------------------------------------------------------ public
    @property
    def layer_names(self) -> list[str]:
        """Names of the preconditioned modules, in model order."""
        return list(self._records)

    @property
    def unsupported_layers(self) -> dict[str, str]:
        """Modules with parameters left to the base optimizer, with the reason."""
        return dict(self.discovery.unsupported)

    def step(self, outputs: Tensor | None = None, *, lr: float | None = None,
             num_examples: int | None = None) -> None:
        """Precondition every supported layer's ``.grad`` (call after the backward).

        1. Factors: this step's A and G join their moving averages (Eqs. 12, 16–17).
        2. Every ``inv_update_steps``: prepare (Method 2) or invert (Method 1).
        3. U = (G+λI)⁻¹ DΘ (A+λI)⁻¹ (Eq. 15), scaled by the KL clip, into ``.grad``.

        Args:
            outputs: Model outputs, required by ``fisher_type`` ``"mc"``/``"type2"``
                when :meth:`curvature_backward` was not called for this step; their graph
                must still exist (``loss.backward(retain_graph=True)``).
            lr: Learning rate for ``kl_clip`` this step (overrides ``lr``/``optimizer``).
            num_examples: Examples in this step, for ``loss_reduction="mean"`` with the
                empirical Fisher (default: counted from the root module's calls, see
                :mod:`thermokfac.capture`; required when that count is ambiguous).

        Raises:
            NotImplementedError: At the first step, if the model has been sharded (FSDP,
                DTensor parameters) since the preconditioner was built.
            RuntimeError: If no backward pass reached a preconditioned parameter since
                the previous step (``step()`` before ``backward()``, or twice after one
                backward), or if gradients arrived but no module hook ran at all (a
                ``torch.compile`` backend or tracer that bypasses module hooks).
            ValueError: If the number of examples is needed and cannot be counted
                unambiguously, or ``num_examples`` is not a positive integer. The
                step's curvature is kept for a retry on the same backward; if another
                backward comes first, it is discarded (warned, counted in
                ``stats["discarded_curvature"]``) rather than mixed in.
        """
        if self.steps == 0:  # a framework may shard the model after building the optimizer
            refuse_sharded(self.model, self.model)
        if outputs is not None:
            self.curvature_backward(outputs)
        self._guard.before_step(self.steps)
        self._guard.check_amp(self._capture.fp16_autocast, self.grad_scaler, self.optimizer)
        update = self._capture.enabled and not self._guard.refused_then_new_backward()
        timings = StepTimings(step=self.steps, curvature_s=self._capture.elapsed_s)
        with self.timing.measure(timings, "curvature_s"):
            if update:
                self._guard.refusing(lambda: self._update_factors(num_examples))
        with self.timing.measure(timings, "inversion_s"):
            jobs = self._prepare_due()
        self.spectra.record(self.steps, self._states)
        with self.timing.measure(timings, "update_s"):
            more, timings.solve_s = self._precondition_all(lr)
            jobs += more
        (timings.modeled_hardware_s, timings.modeled_rc_s, timings.modeled_rc_over_alpha_min_s,
         timings.modeled_target_error_s) = self._modeled_time(jobs)
        self.timing.append(timings)
        self.steps += 1
        self._begin_step()

    def curvature_backward(self, outputs: Tensor) -> None:
        """Back-propagate the ``mc``/``type2`` vectors through ``outputs`` (no ``.grad``).

        Call it once per micro-batch, before or after ``loss.backward(retain_graph=True)``;
        the graph is kept for the user's own backward.

        Raises:
            ValueError: With ``fisher_type="empirical"`` (it uses the user's backward).
            ValueError: If the same ``outputs`` come twice in a step, or they need a
                ``class_dim``.
            RuntimeError: If the graph of ``outputs`` was already freed.
        """
        if self.config.fisher_type is FisherType.EMPIRICAL:
            raise ValueError("outputs are only used with fisher_type 'mc' or 'type2'; the "
                             "empirical Fisher reads the gradients of your own backward")
        curvature(self._capture, outputs, self.config, self.generator, self._window)

    def discard_unstepped(self) -> bool:
        """Forget the curvature of backwards whose gradients are dropped without a step
        (a step skipped by a GradScaler overflow, or by a framework), so it does not join
        the next step's factors; counted in ``stats['discarded_curvature']``. Called by
        :meth:`KFACOptimizer.zero_grad`. Returns whether anything was discarded."""
        if not self._guard.unstepped_backward():
            return False
        self._begin_step()
        return True

    def paused(self) -> AbstractContextManager[None]:
        """Passes inside this block are not part of the step: forwards in it are not
        captured nor counted as examples (their later backwards add nothing either),
        and gradients that backwards in it send through earlier forwards are ignored.
        For auxiliary passes between two steps: crafting adversarial examples, a
        saliency map, a GAN generator step through the discriminator, evaluation in
        train mode.

        Example:
            >>> import torch
            >>> from torch import nn
            >>> model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
            >>> pre = KFACPreconditioner(model, kl_clip=None)
            >>> x = torch.randn(8, 3, requires_grad=True)
            >>> with pre.paused():  # the pass that crafts the example
            ...     (g,) = torch.autograd.grad(model(x).sum(), x)
            >>> model(x + 0.1 * g.sign()).pow(2).mean().backward()
            >>> pre.step()
        """
        return self._capture.pausing()

    def grouped_rows(self, membership: Tensor, num_groups: int | None = None
                     ) -> AbstractContextManager[None]:
        """Forward passes inside this block have ragged examples: the rows of 2-D layer
        inputs belong to groups (e.g. the atoms of each molecule in a graph batch).

        K-FAC-reduce then averages activations and sums output gradients per group
        (Eqs. 20–21 with a ragged shared dimension), and the number of examples of the
        step is the number of groups. Expand is unchanged (every row counts).

        Args:
            membership: ``[rows]`` group index of each row (graph membership).
            num_groups: Number of groups (default: ``membership.max() + 1``).
        """
        return self._capture.grouping(membership, num_groups)

    def remove(self) -> None:
        """Detach every hook; the preconditioner stops capturing (a later ``step()``
        raises)."""
        self._guard.remove()
        self._capture.remove()

    # ----------------------------------------------------------------- private
    def _loss_scale(self) -> float:
        return 1.0 if self.grad_scaler is None else float(self.grad_scaler.get_scale())

    def _begin_step(self) -> None:
        self._capture.reset()
        self._guard.new_step()
        name = "factor_update_steps"
        if self.config.factor_storage is FactorStorage.ROWS:
            name = "inv_update_steps"  # rows are only needed where a prepare uses them
        every = int(resolve(name, getattr(self.config, name), self.steps, INTERVAL))
        self._capture.enabled = self.steps % every == 0

    def _update_factors(self, num_examples: int | None) -> None:
        cfg = self.config
        self._guard.after_capture(self.steps)
        self._capture.require_curvature(cfg.fisher_type)
        decay = resolve("factor_decay", cfg.factor_decay, self.steps, DECAY)
        captured = any(r.sums.a_rows and r.sums.g_rows for r in self._records.values())
        multiplier = g_multiplier(cfg, self._capture.loss_terms, num_examples,
                                  self._capture.example_count, self.steps) if captured else 1.0
        follow_layouts(self._records, self._states, self.stats)
        commit_factors(self._records, self._states, multiplier, decay,
                       cfg.factor_storage is FactorStorage.ROWS, self._fresh_factors,
                       lambda name: self._guard.missing(name, self.steps),
                       lambda name: self._guard.nonfinite(name, self.steps))

    def _fresh_factors(self, multiplier: float) -> dict[str, tuple[Tensor, Tensor]]:
        """This step's A and G per layer (Eq. 12); a layer without rows is skipped."""
        return fresh_factors(self._records, multiplier,
                             lambda name: self._guard.missing(name, self.steps))

    def _modeled_time(self, jobs: list[TimeBreakdown]) -> list[float]:
        """The step's device time: its own settle model's, then rc, rc/α_min, target."""
        return modeled_time(self.solver, jobs)

    def _prepare_due(self) -> list[TimeBreakdown]:
        return prepare_due(self._states, self.solver, self.config, self.steps,
                           self.noise, self.stats, self._guard.warn_once)

    def _warn_ill_conditioned(self) -> None:
        warn_fallbacks(self.stats, self.config.factor_dtype, self._guard.warn_once)

    def noise(self, name: str, part: str) -> torch.Generator:
        """The generator of one (step, layer, part) for a stochastic solver: ``part`` is
        ``"a"`` or ``"g"`` (preparing or inverting that factor) or ``"u"`` (the solves of
        U). Seeded from (``seed``, step, layer index, part) alone, so the same on every
        rank and in one process, whoever does the work, and after a resume."""
        return noise_generator(self.generator.initial_seed(), self.steps,
                               3 * self._index[name] + NOISE_PARTS[part],
                               self.generator.device)

    def _precondition_all(self, lr: float | None) -> tuple[list[TimeBreakdown], float]:
        """(device jobs, seconds inside the solver's solves) of preconditioning."""
        jobs, written, solve_s = precondition_all(
            self._records, self._states, self.solver, self.config, self.steps,
            self.noise, self.stats, lr, self.optimizer, self._guard.warn_once,
            self.timing.clock)
        self._guard.remember_updates(written)
        return jobs, solve_s
