"""K-FAC as a gradient preconditioner in front of any ``torch.optim`` optimizer.

    loss.backward(); pre.step(); optimizer.step()

``step()`` rewrites each supported layer's ``.grad`` from DΘ to
U = (G + λ_G I)⁻¹ DΘ (A + λ_A I)⁻¹ (paper Eq. 15), so SGD turns into (damped) natural
gradient descent (Eq. 14) and Nesterov, Adam, AdamW... run on the preconditioned
gradient (the paper's Table 3 combinations). The step is a loop over Kronecker blocks
(:mod:`.blocks`); which rank does what, and every collective, are asked of the
injected :mod:`parallel plan <.parallel>`, so one process and data-parallel ranks run
this same step.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Iterable, Mapping
from contextlib import AbstractContextManager
from types import MappingProxyType
from typing import Any, cast

import torch
from torch import Tensor, nn

from .._invariants import required
from ..enums import FisherType, Grafting, RepeatedCalls
from ..solvers import LinearSolver, SolverError, all_finite
from ..timing import TimedSolves, TimingLog
from . import checks
from .blocks import KroneckerBlock, SolveErrors
from .capture import CurvatureCapture
from .config import KFACConfig
from .curvature import CurvatureSums, close_step, g_multiplier
from .curvature_backward import curvature
from .discovery import Discovery, announce, discover, unwrap
from .fisher import check_class_dim
from .guards import Reporter, check_model, check_setup, refuse_sharded, world_size
from .hyperparams import DECAY, INTERVAL, NON_NEGATIVE, POSITIVE, Schedule, resolve
from .inspection import Inspection
from .kl_clip import LayerRates, check_group_rates, kl_clip_scale, trainable_params
from .parallel import Parallelism, Plan, SingleProcess, Update
from .recipes import Recipe, defaults
from .records import LayerRecord
from .report import STAT_KEYS, StatsLedger, StepReport, device_time
from .spectra import SpectrumLog

logger = logging.getLogger("thermokfac")

#: Each factor's noise stream: preparing/inverting A or G, and the solves of U.
NOISE_PARTS = {"a": 0, "g": 1, "u": 2}
#: A block's prepare statistic ↦ the counter of ``stats`` it adds to.
PREPARE_STATS = (("float64_retries", "float64_retries"),
                 ("damping_increases", "damping_increases"), ("failed", "prepare_failures"),
                 ("solver_errors", "solver_errors"), ("ill_conditioned", "ill_conditioned_solves"))


def _structure(model: nn.Module) -> tuple[tuple[str, int], ...]:
    """The model's modules by name and identity (a changed layer changes it)."""
    return tuple((name, id(module)) for name, module in model.named_modules())


def _dot(u: Tensor, d: Tensor) -> float:
    """⟨U, DΘ⟩ of two contiguous matrices, in their dtype and again in float64 when that
    overflows (a huge but finite gradient must reach the KL clip, not count as
    non-finite)."""
    total = float(torch.dot(u.reshape(-1), d.reshape(-1)))
    if not math.isfinite(total):
        total = float(torch.dot(u.reshape(-1).double(), d.reshape(-1).double()))
    return total


def noise_generator(seed: int, step: int, index: int, device: torch.device) -> torch.Generator:
    """The generator of draw ``index`` (3·block + part) at ``step``: a function of
    (seed, step, index) alone, so every rank, one process and a resumed run agree."""
    value = seed * 1_000_003 + step * 7919 + index
    return torch.Generator(device=device).manual_seed(value % (2**63 - 1))


class KFACPreconditioner(Inspection):
    """Kronecker-factored preconditioner that rewrites ``.grad`` in place.

    See the "Supported setups" page of the docs for what is preconditioned, what is left out
    and how each is reported.

    Args:
        model: The network (a ``DistributedDataParallel`` wrapper is unwrapped; layer
            names are those of the bare model).
        solver: A registered solver name (``"cholesky"``, ``"eigh"``, ``"cg"``...) or a
            :class:`~thermokfac.solvers.LinearSolver` instance.
        method: ``"inverse"`` (Method 1) or ``"solve"`` (Method 2), Sec. 4.1. None: the
            solver's ``default_method`` — Method 1 for the digital direct solvers
            (``cholesky``, ``eigh``: faster per step on CPU, see the docs' step-time
            benchmark), Method 2 for ``cg`` and ``thermodynamic`` (the device solves);
            Method 2 whenever ``factor_storage="rows"``.
        damping: λ ≥ 0, a value or a function of the step. None (default): the base
            optimizer's recipe — 10⁻³ on both factors in front of SGD; in front of an
            Adam-type optimizer 3 with ``damping_split="relative"`` (each factor damped
            by three times its own mean eigenvalue; :mod:`thermokfac.kfac.recipes`).
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
        damping_split: ``"equal"`` (λ on both factors), ``"pi"`` (π-split) or
            ``"relative"`` (λ times each factor's mean eigenvalue, tr F/dim F). None
            (default): the recipe's when ``damping`` is not given either, else equal.
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
        repeated_calls: A layer applied k times within one forward of the model, under
            ``kfac_approx="reduce"``: ``"shared"`` (default) — its calls with the same
            leading dimension N (the batch) form one weight-sharing dimension of size
            k·R (activations averaged, output gradients summed over all of them, exactly
            as one call on the stacked inputs; a call whose output gets no gradient adds
            nothing); ``"separate"`` — every call's rows are examples of their own.
            Expand takes every call's rows either way.
        grafting: ``"gradient"``: each block's U rescaled to the norm of its raw gradient
            DΘ (K-FAC's direction at the gradient's scale, as Distributed Shampoo
            grafts); ``"none"``: U as Eq. 15 gives it; ``"auto"`` (default): gradient in
            front of an Adam-type optimizer (``betas`` in its groups), else none
            (:mod:`thermokfac.kfac.recipes`).
        start_preconditioning_step: The first step whose gradient is preconditioned;
            earlier ones pass through unchanged while the factors accumulate (their
            curvature is captured). None (default): the base optimizer's recipe — 0 for
            SGD, more for Adam-type optimizers (:mod:`thermokfac.kfac.recipes`).
        measure_solve_error_every: Every this many steps (0, the default: never), each
            block's two solves of Eq. 15 are measured against a float64 solve of the
            same damped factor F + λI and right-hand side: ‖X̂ − X‖_F / ‖X‖_F per factor,
            in the step report's ``solve_errors``. While on, each prepared factor keeps a
            float64 copy (8n² bytes) on the rank that prepared it; a cache received from
            another rank, or loaded from a checkpoint before its next prepare, is not
            measured.
        parallel: How the work is spread over processes (:mod:`thermokfac.kfac.parallel`);
            default one process. :class:`~thermokfac.distributed.DistributedKFACPreconditioner`
            passes its data-parallel plan; the step itself is the same.

    The keywords are validated into :attr:`config`, a frozen
    :class:`~thermokfac.kfac.config.KFACConfig` grouped by concern.

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
        >>> report = pre.step(); opt.step()
        >>> report.prepared  # the first step prepares (here: inverts) every block
        ('0', '2')
        >>> a, g = pre.factors()["0"]
        >>> tuple(a.shape), tuple(g.shape)  # bias column appended to A (Eq. 4)
        ((5, 5), (8, 8))
    """

    def __init__(self, model: nn.Module, *, solver: str | LinearSolver = "cholesky",
                 method: str | None = None, damping: Schedule | None = None,
                 factor_decay: Schedule = 0.95, factor_update_steps: Schedule = 1,
                 inv_update_steps: Schedule = 10, fisher_type: str = "empirical",
                 kfac_approx: str = "expand", loss_reduction: str = "mean",
                 skip_layers: Iterable[str] = (), damping_split: str | None = None,
                 kl_clip: float | None = 1e-3, lr: Schedule | None = None,
                 optimizer: torch.optim.Optimizer | None = None, momentum: float | None = None,
                 loss_type: str = "cross_entropy", num_per_example_loss_terms: int = 1,
                 mc_samples: int = 1, factor_dtype: torch.dtype | None = None,
                 grad_scaler: Any = None, seed: int = 0, timing_history: int = 10_000,
                 factor_storage: str = "matrix", class_dim: int | None = None,
                 separate_weight_and_bias: bool = False, repeated_calls: str = "shared",
                 grafting: str = "auto", start_preconditioning_step: int | None = None,
                 measure_solve_error_every: int = 0,
                 parallel: Parallelism | None = None) -> None:
        parallel = SingleProcess() if parallel is None else parallel
        self.model = unwrap(model)
        check_model(model, self.model, parallel.averages_factors, parallel.shards_parameters)
        self.config = KFACConfig.from_keywords(
            solver=solver, method=method, damping=damping,
            factor_decay=factor_decay, factor_update_steps=factor_update_steps,
            inv_update_steps=inv_update_steps, fisher_type=fisher_type,
            kfac_approx=kfac_approx, loss_reduction=loss_reduction, skip_layers=skip_layers,
            damping_split=damping_split, kl_clip=kl_clip, lr=lr, momentum=momentum,
            loss_type=loss_type, num_per_example_loss_terms=num_per_example_loss_terms,
            mc_samples=mc_samples, factor_dtype=factor_dtype, factor_storage=factor_storage,
            class_dim=class_dim, separate_weight_and_bias=separate_weight_and_bias,
            repeated_calls=repeated_calls, grafting=grafting,
            start_preconditioning_step=start_preconditioning_step,
            measure_solve_error_every=measure_solve_error_every)
        self.solver: LinearSolver = self.config.solver
        self.optimizer = optimizer
        #: The grafting and first preconditioned step in effect (given, or the base
        #: optimizer's defaults: :mod:`thermokfac.kfac.recipes`).
        self.recipe: Recipe = defaults(optimizer, self.config.grafting,
                                       self.config.start_preconditioning_step,
                                       self.config.damping, self.config.damping_split)
        self.grad_scaler = grad_scaler
        self.discovery: Discovery = discover(self.model, self.config.skip_layers,
                                             self.config.separate_weight_and_bias)
        announce(self.discovery, logger)
        records = [LayerRecord(name, helper) for name, helper in self.discovery.layers]
        self._records = {r.name: r for r in records}
        self._blocks = self._new_blocks()
        self._capture = CurvatureCapture(
            self.model, records, self.config.kfac_approx, lambda: self.factor_dtype,
            keep_outputs=self.config.fisher_type is not FisherType.EMPIRICAL,
            grad_scale=self._loss_scale, keep_rows=self.config.factors.rows,
            share_calls=self.config.repeated_calls is RepeatedCalls.SHARED)
        device = next(self.model.parameters()).device
        self.generator = torch.Generator(device=device).manual_seed(int(seed))
        #: Per prepare and factor, the spectrum a thermodynamic solver's device matrix had
        #: (:class:`~thermokfac.kfac.spectra.SpectrumLog`; ``spectra.history`` rows).
        self.spectra = SpectrumLog(timing_history)
        self.timing = TimingLog(timing_history)
        self.timing.sync_cuda = self._capture.sync_cuda = device.type == "cuda"
        self._ledger = StatsLedger()
        self.steps = 0
        #: The :class:`~thermokfac.kfac.report.StepReport` of the latest step.
        self.last_report: StepReport | None = None
        self._reporter = Reporter(lambda: self._ledger.stats)
        self._ranks_checked = False
        self._sharding_checked = False  # (a resumed run too)
        self._capture.before_backward = self._backward_begins
        check_setup(records, self.config, optimizer)
        #: The work assignment, communicator and gradient access of the step
        #: (:class:`~thermokfac.kfac.parallel.Plan`).
        self._parallel = parallel
        self.plan: Plan = parallel.plan(list(self._blocks.values()), self.config, device,
                                        lambda: self.factor_dtype)
        self._structure = _structure(self.model)
        self._begin_step()

    # ------------------------------------------------------------------ public
    @property
    def layer_names(self) -> list[str]:
        """Names of the preconditioned blocks, in model order."""
        return list(self._blocks)

    @property
    def parallel(self) -> Parallelism:
        """How the step's work is spread (:class:`~thermokfac.kfac.parallel.Parallelism`):
        the one given (one process by default), or the plan a model sharded by FSDP2
        after building switched to at the first step."""
        return self._parallel

    @property
    def blocks(self) -> Mapping[str, KroneckerBlock]:
        """The Kronecker blocks by name, in model order (read-only mapping)."""
        return MappingProxyType(self._blocks)

    def block(self, name: str) -> KroneckerBlock:
        """One Kronecker block: its estimates, caches, damping and helper.

        Args:
            name: The block's name (a layer's qualified name; ``<layer>.group<j>`` for
                a grouped convolution's blocks).

        Returns:
            The block (live: its state is the preconditioner's).

        Raises:
            KeyError: Naming the valid block names.
        """
        if name not in self._blocks:
            raise KeyError(f"no block {name!r}; the blocks are {list(self._blocks)}")
        return self._blocks[name]

    @property
    def factor_dtype(self) -> torch.dtype:
        """The dtype of factors and solves now: ``factor_dtype`` if given, else that of
        the model (float64 when a preconditioned parameter is float64, else float32; a
        model cast after building is followed from its next step, its factors cast and
        prepared again)."""
        requested = self.config.factors.factor_dtype
        if requested is not None:
            return requested
        return torch.float64 if any(p.dtype == torch.float64 for b in self._blocks.values()
                                    for p in b.helper.parameters) else torch.float32

    @property
    def unsupported_layers(self) -> dict[str, str]:
        """Modules with parameters left to the base optimizer, with the reason."""
        return dict(self.discovery.unsupported)

    @property
    def stats(self) -> dict[str, float]:
        """Counters of every event so far (a live dict; restored from a checkpoint by
        :meth:`load_state_dict`), and the last step's ``kl_clip_scale``; each step
        report's ``counts`` are their increments over that step."""
        return self._ledger.stats

    @stats.setter
    def stats(self, value: dict[str, float]) -> None:
        self._ledger.restore(dict(value))

    def step(self, outputs: Tensor | None = None, *, lr: float | None = None,
             num_examples: int | None = None) -> StepReport:
        """Precondition every supported layer's ``.grad`` (call after the backward).

        1. Estimates: this step's A and G join their moving averages (Eqs. 12, 16–17).
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

        Returns:
            The step's :class:`~thermokfac.kfac.report.StepReport` (also kept as
            :attr:`last_report`).

        Raises:
            NotImplementedError: At the first step, if the model has been sharded (FSDP,
                DTensor parameters) since the preconditioner was built.
            RuntimeError: If no backward pass reached a preconditioned parameter since
                the previous step (``step()`` before ``backward()``, or twice after one
                backward), or if gradients arrived but no module hook ran at all (a
                ``torch.compile`` backend or tracer that bypasses module hooks); under
                data parallelism, if a collective failed (naming the step and rank).
            ValueError: If the number of examples is needed and cannot be counted
                unambiguously, or ``num_examples`` is not a positive integer. The
                step's curvature is kept for a retry on the same backward; if another
                backward comes first, it is discarded (warned, counted in
                ``stats["discarded_curvature"]``) rather than mixed in.
        """
        report = StepReport(self.steps)
        clock = self.timing.clock
        with self.plan.communicator.failing(self.steps):
            update = self._checked(outputs)                          # right or loud
            report.timings.curvature_s = self._capture.step_record.elapsed_s  # hooks' share
            with report.timed("curvature_s", clock):                 # Eqs. 12, 16–17
                if update:
                    self._update_estimates(num_examples, report)
            with report.timed("inversion_s", clock):                 # Sec. 4.1, periodic
                self._update_caches(report)
            with report.timed("update_s", clock):                    # Eq. 15, KL clip
                updates, vg = self._precondition(lr, report)          # U, Σ η²⟨U, DΘ⟩
                self._write(updates, self._kl_clip_scale(vg), report)
            report.timings.update_s -= report.measure_s  # measuring is not the step's
            self._model_device_time(report)
        return self._finish(report)

    def curvature_backward(self, outputs: Tensor) -> None:
        """Back-propagate the ``mc``/``type2`` vectors through ``outputs`` (no ``.grad``).

        Call it once per micro-batch, before or after ``loss.backward(retain_graph=True)``;
        the graph is kept for the user's own backward. Under data parallelism the ``mc``
        labels are drawn for the global batch (ranks' rows in rank order) and sliced, so
        each depends only on its global example index.

        Args:
            outputs: The model's outputs of this micro-batch, ``[N, C]`` (or with
                ``class_dim`` naming the class dimension), still attached to the graph.

        Raises:
            ValueError: With ``fisher_type="empirical"`` (it uses the user's backward).
            ValueError: If the same ``outputs`` come twice in a step, or they need a
                ``class_dim``.
            RuntimeError: If the graph of ``outputs`` was already freed.
        """
        if self.config.fisher_type is FisherType.EMPIRICAL:
            raise ValueError("outputs are only used with fisher_type 'mc' or 'type2'; the "
                             "empirical Fisher reads the gradients of your own backward")
        class_dim = check_class_dim(outputs, self.config.class_dim)
        window = self.plan.communicator.example_window(
            outputs.numel() // max(outputs.shape[class_dim], 1))
        curvature(self._capture, outputs, self.config, self.generator, window)

    def discard_unstepped(self) -> bool:
        """Forget the curvature of backwards whose gradients are dropped without a step
        (a step skipped by a GradScaler overflow, or by a framework), so it does not join
        the next step's factors; counted in ``stats['discarded_curvature']``. Called by
        :meth:`KFACOptimizer.zero_grad`. Returns whether anything was discarded."""
        if not checks.unstepped(self._capture.step_record):
            return False
        self._ledger.count("discarded_curvature")
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
            >>> pre.step().factors_updated
            True
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
        self._capture.remove()

    def noise(self, name: str, part: str) -> torch.Generator:
        """The generator of one (step, block, part) for a stochastic solver: ``part`` is
        ``"a"`` or ``"g"`` (preparing or inverting that factor) or ``"u"`` (the solves of
        U). Seeded from (``seed``, step, block index, part) alone, so the same on every
        rank and in one process, whoever does the work, and after a resume.

        Args:
            name: The block's name.
            part: ``"a"``, ``"g"`` or ``"u"``.

        Returns:
            A generator on the preconditioner's generator device.

        Raises:
            KeyError: An unknown block name or part.
        """
        return noise_generator(self.generator.initial_seed(), self.steps,
                               3 * self._blocks[name].index + NOISE_PARTS[part],
                               self.generator.device)

    # -------------------------------------------------------------- the phases
    def _checked(self, outputs: Tensor | None) -> bool:
        """Refuse a step that cannot be right; whether its curvature is to be used."""
        check_group_rates(self.optimizer)  # first: a refused step changes nothing
        if not self._sharding_checked:  # this process's first step (a resumed run too)
            self._follow_sharding()
            self._sharding_checked = True
        if outputs is not None:
            self.curvature_backward(outputs)
        if self._structure != _structure(self.model):
            self._rediscover()
        record = self._capture.step_record
        ranks = None
        if not self._ranks_checked:
            self._ranks_checked = True
            ranks = checks.multi_rank(self._parallel.averages_factors, world_size())
        order = checks.call_order(record, self.steps, self._capture.removed,
                                  any(b.helper.trainable for b in self._blocks.values()),
                                  unseen=not record.reached and self._capture.watch())
        record.added_onto_update = None  # refused once: the user zeroes and redoes it
        self._reporter.report(ranks, checks.changed_parameters(self._records), order)
        self._unscale_gradients()
        self._reporter.report(checks.fp16_without_scaler(record, self.grad_scaler is not None))
        refused = checks.refused_then_new_backward(record)
        self._reporter.report(refused)
        return self._capture.enabled and refused is None

    def _follow_sharding(self) -> None:
        """A framework may have sharded the model after the optimizer was built: take
        the plan the parallelism gives for the model as it is now (FSDP2's owner
        blocks; a loaded state keeps only this rank's blocks), or refuse a sharding
        no plan handles."""
        followed = self._parallel.follow(self.model)
        if followed is not self._parallel:
            self._parallel = followed
            self.plan = followed.plan(list(self._blocks.values()), self.config,
                                      next(self.model.parameters()).device,
                                      lambda: self.factor_dtype)
            for block in self._blocks.values():
                if not self.plan.assignment.holds_estimates(block.name):
                    block.restart(block.layout)
        refuse_sharded(self.model, self.model, self._parallel.shards_parameters)

    def _backward_begins(self) -> None:
        """A forward's backward begins (its first output gradient, before it is
        captured). If backwards ran since the last step and every gradient they left has
        been reset since (``zero_grad`` without a step: a step skipped by a GradScaler
        overflow, by Lightning or by the Hugging Face Trainer), their curvature is
        dropped, counted in ``stats['discarded_curvature']``: it must not join the next
        step's."""
        if self._capture.step_record.param_gradients and self._capture.gradients_reset():
            self._capture.discard_earlier_backwards()
            self._ledger.count("discarded_curvature")
            self._reporter.warn_once("reset", (
                "a backward began while every preconditioned gradient was zero or unset "
                "since the previous backward, without a step: taken as a skipped step (a "
                "GradScaler overflow, a framework zeroing the gradients) and its curvature "
                "dropped, counted in stats['discarded_curvature'] — if it was a micro-batch "
                "whose gradient is exactly zero (every label ignored), its examples are "
                "dropped too"))

    def _unscale_gradients(self) -> None:
        """With ``grad_scaler=`` and ``optimizer=``: divide the loss scale out of the
        gradients if the user has not (``GradScaler.unscale_`` runs once per optimizer
        step; a second call raises, which means it was done).

        Raises:
            RuntimeError: The scaler already stepped this optimizer (``pre.step()`` must
                come before ``scaler.step(optimizer)``).
        """
        if self.grad_scaler is None or self.optimizer is None:
            return
        try:
            self.grad_scaler.unscale_(self.optimizer)
        except RuntimeError as err:
            if "already been called" not in str(err):
                raise RuntimeError(f"{err} K-FAC preconditions before the optimizer step: "
                                   "call pre.step() before scaler.step(optimizer)") from err

    def _update_estimates(self, num_examples: int | None, report: StepReport) -> None:
        """This step's A and G over the global batch (Eq. 12) into every block's moving
        averages (Eqs. 16–17). A refused step (``ValueError``: an ambiguous example
        count) is noted, so that a later backward does not mix into its curvature."""
        record = self._capture.step_record
        try:
            sums = self._close_step(num_examples)
        except ValueError:
            record.refused_at = record.param_gradients
            raise
        sums = self.plan.communicator.reduce_curvature(sums, list(self._blocks.values()))
        decay = resolve("factor_decay", self.config.factor_decay, self.steps, DECAY)
        for name, block in self._blocks.items():
            if name not in sums:
                continue
            block.follow(sums[name].device, sums[name].dtype)  # a model cast or moved
            if not block.update_estimate(sums[name], decay):
                self._reporter.report(checks.nonfinite(name, self.steps))
        report.factors_updated = True

    def _close_step(self, num_examples: int | None) -> dict[str, CurvatureSums]:
        """This rank's sums, G scaled by c (examples and loss terms of the step)."""
        record = self._capture.step_record
        self._reporter.report(*checks.after_capture(record, self.steps,
                                                    self._capture.hooks_ran()))
        record.transformed_passes = record.repeated_gradients = 0  # reported once
        self._capture.require_curvature(self.config.fisher_type)
        self._capture.flush_shared()
        captured = any(r.sums.a_rows and r.sums.g_rows for r in self._records.values())
        multiplier = g_multiplier(self.config, record.loss_terms, num_examples,
                                  self._capture.example_count, self.steps) if captured else 1.0
        for name, block in self._blocks.items():
            if block.follow_layout(self._records[name].layout):
                self._ledger.count("trainable_changes")
        return close_step(self._records, multiplier, self.config.factors.rows,
                          lambda name: self._reporter.report(
                              checks.missing(record, self._records[name], self.steps)))

    def _update_caches(self, report: StepReport) -> None:
        """Damp and prepare (or invert) every block due — all every ``inv_update_steps``,
        and any never prepared — each factor by the rank the assignment names."""
        cfg, k, assignment = self.config, self.steps, self.plan.assignment
        if k < self.recipe.start_preconditioning_step:
            return  # the factors accumulate; nothing is applied yet
        due = k % int(resolve("inv_update_steps", cfg.inv_update_steps, k, INTERVAL)) == 0
        damping = resolve("damping", self.recipe.damping, k, NON_NEGATIVE)
        todo = [b for b in self._blocks.values() if b.has_estimate and (due or not b.prepared)]
        for block in todo:
            before = dict(block.stats)
            report.jobs += block.update_cache(
                self.solver, cfg.method, damping, self.recipe.damping_split,
                assignment.prepares(block.name),
                functools.partial(self.noise, block.name),
                keep_reference=cfg.measure_solve_error_every > 0)
            for key, stat in PREPARE_STATS:
                self._ledger.count(stat, block.stats.get(key, 0.0) - before.get(key, 0.0))
        self.plan.communicator.share_caches(todo, assignment)
        for block in todo:
            block.settle_cache()
            if not assignment.holds_cache(block.name):
                block.drop_cache()
        report.prepared = tuple(b.name for b in todo)
        self._warn_fallbacks()
        self.spectra.record(k, self._blocks)

    def _precondition(self, lr: float | None, report: StepReport
                      ) -> tuple[dict[str, Update], float | None]:
        """U of every block this rank computes (Eq. 15), then every block's U on every
        rank, and Σ η²⟨U, DΘ⟩ over them (None when a rate is unknown)."""
        # every attribute but ``solve`` passes through to the solver itself
        timed = TimedSolves(self.solver, self.timing.clock)
        solver = cast(LinearSolver, timed)
        if lr is None and self.config.lr is not None:
            lr = resolve("lr", self.config.lr, self.steps, POSITIVE)
        rates = LayerRates(lr, self.optimizer, self.config.momentum)  # each block's group's η
        updates: dict[str, Update] = {}
        warming = self.steps < self.recipe.start_preconditioning_step
        if not warming:
            self.plan.communicator.gather_gradients(list(self._blocks.values()),
                                                    self.plan.assignment, self.plan.gradients)
        for name, block in self._blocks.items():
            if not warming and self.plan.assignment.computes_update(name):
                update = self._apply(block, solver, rates, report)
                if update is not None:
                    updates[name] = update
        report.timings.solve_s = timed.seconds
        return self.plan.communicator.share_updates(updates, list(self._blocks.values()),
                                                    self.plan.assignment, self.plan.gradients)

    def _kl_clip_scale(self, vg: float | None) -> float:
        """ν = min(1, √(κ / Σ η²⟨U, DΘ⟩)) (Ba et al. 2017); 1 when off or undefined."""
        return 1.0 if vg is None else kl_clip_scale(self.config.kl_clip, vg, 1.0)

    def _write(self, updates: dict[str, Update], nu: float, report: StepReport) -> None:
        """ν·U in each block's gradient: U written there (unless the communicator wrote
        it already: a sharded engine's rows), then scaled by ν."""
        grads = self.plan.gradients
        for name, update in updates.items():
            helper = self._blocks[name].helper
            if update.u is not None:
                grads.write(helper, update.u.mul_(nu) if nu != 1.0 else update.u)
            elif nu != 1.0:
                grads.scale(helper, nu)
        self._capture.remember_updates([self._records[name] for name in updates])
        report.kl_clip_scale = nu

    def _apply(self, block: KroneckerBlock, solver: LinearSolver, rates: LayerRates,
               report: StepReport) -> Update | None:
        """One block's U, or None (its gradient passes through, counted in the report)."""
        grads, helper = self.plan.gradients, block.helper
        if not grads.has_grad(helper):
            return None
        if not (block.layout_matches and block.ready):  # nothing prepared, or other params
            self._skip(block, "passthrough_layers", report)
            return None
        d_theta = required(grads.read(helper), f"the gradient of {block.name}")
        if not all_finite(d_theta):
            self._skip(block, "nonfinite_grad_skips", report)
            return None
        graft = self.recipe.grafting is Grafting.GRADIENT
        norm = d_theta.norm() if graft else None  # before the solves work in d_theta
        every = self.config.measure_solve_error_every
        measure = SolveErrors(clock=self.timing.clock) \
            if every and self.steps % every == 0 else None
        try:
            u, jobs = block.apply(d_theta, solver, self.noise(block.name, "u"), measure)
        except SolverError:
            self._reporter.warn_once("solver_errors", (
                f"the solver failed on layer {block.name!r} (non-finite or unconverged "
                "solve): its gradient passes through unchanged, counted in "
                "stats['solver_errors']"))
            self._skip(block, "solver_errors", report)
            return None
        if graft:  # K-FAC's direction at the raw gradient's norm
            u.mul_(norm / u.norm().clamp_min(torch.finfo(u.dtype).tiny))
        # ⟨U, DΘ⟩ is non-finite whenever U is (DΘ is finite): one inner product checks U
        # and feeds the KL clip — one dot with DΘ's buffer when the solves left it alone.
        inner = _dot(u, d_theta) if block.keeps_input else grads.inner(helper, u)
        if not math.isfinite(inner):
            self._skip(block, "nonfinite_update_skips", report)
            return None
        report.jobs += jobs
        if measure is not None:
            report.measure_s += measure.seconds
            missed = [w for w, c in block.caches.items()
                      if c.kind != "diagonal" and w not in measure.errors]
            if missed:  # a cache received from another rank, or restored from a checkpoint
                self._reporter.warn_once("unmeasured_solves", (
                    f"solve errors of layer {block.name!r} ({', '.join(missed)}) are not "
                    "measured: its cache was prepared on another rank or restored from a "
                    "checkpoint, without the float64 factor (measured again after this "
                    "rank's next prepare)"))
            if measure.errors:
                report.solve_errors[block.name] = measure.errors
            if measure.predicted:
                report.predicted_solve_errors[block.name] = measure.predicted
        return Update(inner, rates(*trainable_params(helper)), u)

    def _skip(self, block: KroneckerBlock, why: str, report: StepReport) -> None:
        """Count ``why`` for a block whose gradient passes through this step."""
        report.skipped[block.name] = why
        self._ledger.count(why)

    def _model_device_time(self, report: StepReport) -> None:
        """The step's modelled device time (the busiest rank's) under every settle model."""
        times = device_time(self.solver, report.jobs)
        report.local_modeled_s = times[0]
        if getattr(self.solver, "hardware", None) is not None:
            times = self.plan.communicator.max_over_ranks(times)
        t = report.timings
        (t.modeled_hardware_s, t.modeled_rc_s, t.modeled_rc_over_alpha_min_s,
         t.modeled_target_error_s) = times

    def _finish(self, report: StepReport) -> StepReport:
        self.timing.append(report.timings)
        self._ledger.close(report)
        self.last_report = report
        self.steps += 1
        self._begin_step()
        return report

    # ----------------------------------------------------------------- private
    def _rediscover(self) -> None:
        """The model's modules changed since the last step (a layer replaced, added or
        removed: model surgery, pruning tools): find the layers again. Blocks whose
        module is unchanged keep their state and this step's capture; a new block starts
        empty — its gradient passes through this step, it is preconditioned from the
        next — and the change is warned about (once) and counted."""
        self._structure = _structure(self.model)
        discovery = discover(self.model, self.config.skip_layers,
                             self.config.separate_weight_and_bias)
        old = {(name, id(r.helper.module), r.helper.part): r
               for name, r in self._records.items()}
        records = {name: old.get((name, id(helper.module), helper.part),
                                 LayerRecord(name, helper))
                   for name, helper in discovery.layers}
        added = [n for n, r in records.items() if r is not self._records.get(n)]
        removed = [n for n, r in self._records.items() if records.get(n) is not r]
        self.discovery, self._records = discovery, records
        self._capture.set_records(list(records.values()))
        rows = self.config.factors.rows
        blocks = {}
        for i, (name, record) in enumerate(records.items()):
            block = self._blocks.get(name) if name not in added else None
            blocks[name] = block or KroneckerBlock(name, i, record.helper, rows=rows)
            blocks[name].index = i
        self._blocks = blocks
        self.plan = self._parallel.plan(list(blocks.values()), self.config,
                                        next(self.model.parameters()).device,
                                        lambda: self.factor_dtype)
        if added or removed:
            self._ledger.count("changed_layers", len(set(added) | set(removed)))
            self._reporter.warn_once(f"changed_layers {added} {removed}", (
                f"the model's layers changed after the preconditioner was built (added or "
                f"replaced: {added}; removed or replaced: {removed}): they were found "
                "again; a new layer's gradient passes through until its factors are "
                "captured at the next factor update, counted in stats['changed_layers']"))

    def _new_blocks(self) -> dict[str, KroneckerBlock]:
        rows = self.config.factors.rows
        return {name: KroneckerBlock(name, i, r.helper, rows=rows)
                for i, (name, r) in enumerate(self._records.items())}

    def _loss_scale(self) -> float:
        return 1.0 if self.grad_scaler is None else float(self.grad_scaler.get_scale())

    def _begin_step(self) -> None:
        self._capture.reset()
        self._capture.watch()  # parameters that became trainable
        name = "factor_update_steps"
        if self.config.factors.rows:
            name = "inv_update_steps"  # rows are only needed where a prepare uses them
        every = int(resolve(name, getattr(self.config, name), self.steps, INTERVAL))
        self._capture.enabled = self.steps % every == 0

    def _warn_fallbacks(self) -> None:
        """One-time warnings for the failure policy's events."""
        stats = self.stats
        if stats["damping_increases"] or stats["prepare_failures"]:
            self._reporter.warn_once("fallback", (
                "a damped factor could not be factorised as given (singular or too "
                "ill-conditioned even in float64): its damping was raised ×10 until it could "
                "(counted in stats['damping_increases']) or its gradient passes through "
                "(stats['prepare_failures']); the damping in effect is in "
                "pre.layer_state(name).damping — use more damping"))
        if stats["ill_conditioned_solves"] and self.factor_dtype != torch.float64:
            self._reporter.warn_once("ill_conditioned", (
                "a float32 factorisation was ill-conditioned (its solves could be far off a "
                "float64 solve): it was prepared and solved in float64 from the stored "
                "factor instead, counted in stats['ill_conditioned_solves']; "
                "factor_dtype=torch.float64 (or more damping) is the remedy"))


__all__ = ["STAT_KEYS", "KFACPreconditioner"]
