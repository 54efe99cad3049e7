"""K-FAC on torch.distributed: averaged factors, and the solver work spread over ranks.

    dist.init_process_group("gloo")            # or "nccl"; e.g. under torchrun
    model = DistributedDataParallel(model)
    pre = DistributedKFACPreconditioner(model, strategy="comm-opt", optimizer=opt)
    loss.backward(); pre.step(); opt.step()    # the same three lines on every rank

Per step, on top of :class:`~thermokfac.KFACPreconditioner`:

1. Factor-update steps: every layer's A and G of this step are averaged over the ranks
   (bucketed asynchronous all-reduces; a rank where a layer saw no rows contributes
   nothing to that layer's average) before they join the moving averages — so every
   rank holds identical factors.
2. Prepare steps: the work is split by an :class:`~.assignment.Assignment` computed the
   same way on every rank (greedy, cost n³ digital or the hardware model's time).
   ``comm-opt``: the owner of each factor prepares (and, for Method 1, inverts) it and
   broadcasts the result; ``mem-opt``: the owner of each layer prepares both factors.
3. ``comm-opt``: every rank preconditions every layer itself; ``mem-opt``: the owner
   preconditions its layer and broadcasts U. The KL clip uses the global ⟨U, DΘ⟩.
4. With the thermodynamic solver each rank models the SPUs of its own work; the step's
   modelled time is the busiest rank's (all-reduce max).

The gradients must already be averaged over ranks (``DistributedDataParallel``), so
that DΘ is the same everywhere. Stochastic solvers draw from generators seeded by
(seed, step, layer, factor), identical on every rank and independent of the assignment.
``stats`` count this rank's work. The resistor-array mode (rows) is not supported here.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..enums import FactorStorage, Method, parse_enum
from ..kfac.fisher import check_class_dim
from ..kfac.hyperparams import INTERVAL, NON_NEGATIVE, POSITIVE, resolve
from ..kfac.kl_clip import LayerRates, kl_clip_scale, trainable_params
from ..kfac.layer_state import (
    count_stats,
    job,
    note_spectrum,
    precondition_layer,
    prepare_factor,
    prepare_layer,
    split_damping,
)
from ..kfac.preconditioner import KFACPreconditioner
from ..kfac.solving import PREPARE_STATS
from ..solvers import Prepared, SolverError, TimeBreakdown
from ..timing import TimedSolves
from .assignment import Assignment, Strategy, cubic_cost, hardware_cost, work_items
from .comm import (
    all_reduce_mean,
    all_reduce_scalars,
    broadcast_from_owners,
    check_same_setup,
    share_objects,
)
from .rows import gather_rows


class DistributedKFACPreconditioner(KFACPreconditioner):
    """:class:`~thermokfac.KFACPreconditioner` for data-parallel training (see module doc).

    Args:
        model: The ``DistributedDataParallel``-wrapped model (or the bare one, whose
            gradients you average yourself).
        strategy: ``"comm-opt"`` (factor owners broadcast prepared factors; every rank
            preconditions every layer) or ``"mem-opt"`` (layer owners precondition and
            broadcast the gradient).
        group: Process group (default: the world).
        bucket_mb: Size of the flattened buffers of the factor all-reduce.
        **kwargs: Everything :class:`~thermokfac.KFACPreconditioner` takes.

    Raises:
        RuntimeError: If torch.distributed is not initialised.
        ValueError: On a bad ``strategy`` or ``bucket_mb``, or with ``factor_storage="rows"``.
    """

    _averages_factors = True

    def __init__(self, model: nn.Module, *, strategy: Strategy | str = "comm-opt",
                 group: Any = None, bucket_mb: float = 32.0, **kwargs: Any) -> None:
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("DistributedKFACPreconditioner needs torch.distributed: call "
                               "torch.distributed.init_process_group first (or use "
                               "KFACPreconditioner in a single process)")
        if not bucket_mb > 0:
            raise ValueError(f"bucket_mb={bucket_mb!r} must be positive")
        self.strategy = parse_enum(Strategy, strategy, "strategy")
        super().__init__(model, **kwargs)
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        check_same_setup(";".join(
            [f"solver {self.solver.name}, method {self.config.method.value}, strategy "
             f"{self.strategy.value}"]
            + [f"{name}: A {r.helper.a_dim}, G {r.helper.d_out}"
               for name, r in self._records.items()]), group)
        self.bucket_bytes = int(bucket_mb * 2**20)
        self.device = next(self.model.parameters()).device
        self.collectives = 0
        self.local_modeled_s = 0.0  # this rank's modelled device time of the last step
        hardware = getattr(self.solver, "hardware", None)
        cost = hardware_cost(hardware) if hardware is not None else cubic_cost
        dims = [(name, None if r.helper.diagonal_a else r.helper.a_dim, r.helper.d_out)
                for name, r in self._records.items()]
        self.assignment = Assignment.greedy(work_items(dims, self.strategy, cost),
                                            self.world_size)
        self._prepared_once: set[str] = set()

    def step(self, outputs: Tensor | None = None, **kwargs: Any) -> None:
        """:meth:`KFACPreconditioner.step` on every rank; a collective that fails (a
        peer raised, died, or exceeded the process group's timeout) becomes a
        ``RuntimeError`` naming the step and this rank."""
        try:
            super().step(outputs, **kwargs)
        except RuntimeError as err:
            raise RuntimeError(f"distributed K-FAC step {self.steps} failed on rank "
                               f"{self.rank} of {self.world_size} (where a collective failed: "
                               f"a peer rank raised, exited or timed out): {err}") from err

    # ------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """The full state on every rank — a collective: call it on every rank (rank 0
        usually saves it). Under ``mem-opt`` each layer's state comes from its owner."""
        state = super().state_dict()
        if self.strategy is Strategy.MEM_OPT:
            owned = {n: s for n, s in state["layers"].items()
                     if self.assignment.owner(n) == self.rank}
            merged = share_objects(owned, self.group)
            state["layers"] = {n: merged[n] for n in self._records}
        state["distributed"] = {"strategy": self.strategy.value,
                                "prepared_once": sorted(self._prepared_once)}
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` on every rank (each keeps only its own prepared
        layers under ``mem-opt``)."""
        super().load_state_dict(state)
        self._prepared_once = set(state.get("distributed", {}).get("prepared_once", []))
        if self.strategy is Strategy.MEM_OPT:
            for name, layer in self._states.items():
                if self.assignment.owner(name) != self.rank:
                    layer.a_prep = layer.g_prep = layer.a_inv = layer.g_inv = None

    # ----------------------------------------------------------------- helpers
    def _src(self, rank: int) -> int:
        return rank if self.group is None else dist.get_global_rank(self.group, rank)

    def _add_stats(self, stats: dict[str, float]) -> None:
        for key, stat in PREPARE_STATS:
            self.stats[stat] += stats.get(key, 0.0)
        self._warn_ill_conditioned()

    # ---------------------------------------------------------------- factors
    def _update_factors(self, num_examples: int | None) -> None:
        super()._update_factors(num_examples)
        if self.config.factor_storage is FactorStorage.ROWS:
            self.collectives += gather_rows(self._states, self._records, self.world_size,
                                            self.group, self.device, self.config.factor_dtype)

    def curvature_backward(self, outputs: Tensor) -> None:
        """As :meth:`KFACPreconditioner.curvature_backward`; ``mc`` labels are drawn for
        the global batch (ranks' rows in rank order) and sliced, so each depends only
        on its global example index."""
        class_dim = check_class_dim(outputs, self.config.class_dim)
        rows = torch.tensor([outputs.numel() // max(outputs.shape[class_dim], 1)],
                            device=self.device)
        counts = [torch.zeros_like(rows) for _ in range(self.world_size)]
        dist.all_gather(counts, rows, group=self.group)
        sizes = [int(c) for c in counts]
        self._window = (sum(sizes[: self.rank]), sum(sizes))
        self.collectives += 1
        super().curvature_backward(outputs)

    def _fresh_factors(self, multiplier: float) -> dict[str, tuple[Tensor, Tensor]]:
        local = super()._fresh_factors(multiplier)
        dtype = self.config.factor_dtype
        tensors: list[Tensor] = []
        present = torch.zeros(len(self._records), dtype=dtype, device=self.device)
        for i, (name, record) in enumerate(self._records.items()):
            if name in local:
                present[i] = 1.0
                tensors += list(local[name])
                continue
            h = record.helper
            a_shape = (h.a_dim,) if h.diagonal_a else (h.a_dim, h.a_dim)
            tensors += [torch.zeros(a_shape, dtype=dtype, device=self.device),
                        torch.zeros(h.d_out, h.d_out, dtype=dtype, device=self.device)]
        self.collectives += all_reduce_mean([*tensors, present], self.group, self.bucket_bytes)
        out = {}
        for i, name in enumerate(self._records):
            share = float(present[i])  # fraction of ranks that saw this layer
            if share > 0:
                a, g = tensors[2 * i], tensors[2 * i + 1]
                out[name] = (a.div_(share), g.div_(share)) if share != 1.0 else (a, g)
        return out

    # ---------------------------------------------------------------- prepare
    def _due_layers(self) -> tuple[list[str], float]:
        cfg = self.config
        every = int(resolve("inv_update_steps", cfg.inv_update_steps, self.steps, INTERVAL))
        due = self.steps % every == 0
        damping = resolve("damping", cfg.damping, self.steps, NON_NEGATIVE)
        todo = [name for name, s in self._states.items()
                if s.has_factors and (due or name not in self._prepared_once)]
        self._prepared_once.update(todo)
        return todo, damping

    def _prepare_due(self) -> list[TimeBreakdown]:
        todo, damping = self._due_layers()
        if self.strategy is Strategy.MEM_OPT:
            return self._prepare_owned_layers(todo, damping)
        return self._prepare_owned_factors(todo, damping)

    def _prepare_owned_layers(self, todo: list[str], damping: float) -> list[TimeBreakdown]:
        cfg, jobs = self.config, []
        for name in todo:
            state = self._states[name]
            if self.assignment.owner(name) == self.rank:
                before = dict(state.stats)
                jobs += prepare_layer(state, self.solver, cfg.method, damping,
                                      cfg.damping_split,
                                      lambda part, name=name: self.noise(name, part))
                self._add_stats({k: v - before.get(k, 0.0) for k, v in state.stats.items()})
            else:  # memory-light: only the owner holds what was prepared
                state.a_prep = state.g_prep = state.a_inv = state.g_inv = None
        return jobs

    def _prepare_owned_factors(self, todo: list[str], damping: float) -> list[TimeBreakdown]:
        cfg, jobs = self.config, []
        mine: dict[tuple[str, str], tuple[Prepared, Tensor | None]] = {}
        meta: dict[str, Any] = {}
        for name in todo:
            state = self._states[name]
            lam = dict(zip("ag", split_damping(state.mean_diagonal("a"), state.mean_diagonal(
                "g"), damping, cfg.damping_split)))
            state.a_prep = state.g_prep = state.a_inv = state.g_inv = None
            state.failed = False
            state.spectra = {}
            diagonal = self._records[name].helper.diagonal_a
            if diagonal:
                state.a_inv = 1.0 / (state.a + lam["a"])
            for which in ("g",) if diagonal else ("a", "g"):
                if self.assignment.owner(name, which) != self.rank:
                    continue
                gen = self.noise(name, which)
                prep = prepare_factor(state, which, self.solver, lam[which], gen)
                jobs.append(job(prep.modeled_time_s, prep.stats))
                count_stats(state.stats, prep.stats)
                self._add_stats(prep.stats)
                inv, failed = None, prep.failed
                if not failed and cfg.method is Method.INVERSE:
                    try:
                        result = self.solver.inverse(prep, generator=gen)
                        inv = result.x.contiguous()
                        jobs.append(job(result.modeled_time_s, result.stats))
                    except SolverError:
                        failed = True
                        self.stats["solver_errors"] += 1
                prep.tensors = {k: t.contiguous() for k, t in prep.tensors.items()}
                mine[(name, which)] = (prep, inv)
                meta[f"{name}\x00{which}"] = {
                    "failed": failed, "damping": prep.damping, "n": prep.n,
                    "solver": prep.solver, "stats": dict(prep.stats),
                    "modeled_time_s": prep.modeled_time_s,
                    "tensors": {k: (tuple(t.shape), t.dtype) for k, t in prep.tensors.items()}
                    if cfg.method is Method.SOLVE and not failed else {},
                    "inv": None if inv is None else (tuple(inv.shape), inv.dtype)}
        self._share_prepared(todo, mine, share_objects(meta, self.group))
        for name in todo:  # resistor-array rows are only needed by a prepare
            self._states[name].a_rows = self._states[name].g_rows = None
        return jobs

    def _share_prepared(self, todo: list[str], mine: dict, meta: dict[str, Any]) -> None:
        """Broadcast what each owner prepared, in one order every rank agrees on."""
        self.collectives += 1
        pairs: list[tuple[Tensor, int]] = []
        received: dict[tuple[str, str], tuple[dict[str, Tensor], Tensor | None]] = {}
        for name in todo:
            for which in ("a", "g"):
                info = meta.get(f"{name}\x00{which}")
                if info is None:
                    continue
                owner = self.assignment.owner(name, which)
                if owner == self.rank:
                    prep, inv = mine[(name, which)]
                    tensors = prep.tensors if info["tensors"] else {}
                else:
                    tensors = {k: torch.empty(shape, dtype=dtype, device=self.device)
                               for k, (shape, dtype) in info["tensors"].items()}
                    inv = None if info["inv"] is None else torch.empty(
                        info["inv"][0], dtype=info["inv"][1], device=self.device)
                pairs += [(t, self._src(owner)) for t in tensors.values()]
                if inv is not None:
                    pairs.append((inv, self._src(owner)))
                received[(name, which)] = (tensors, inv)
        broadcast_from_owners(pairs, self.group)
        self.collectives += len(pairs)
        for name in todo:
            state, used = self._states[name], {}
            for which in ("a", "g"):
                info = meta.get(f"{name}\x00{which}")
                if info is None:
                    continue
                tensors, inv = received[(name, which)]
                used[which] = info["damping"]
                note_spectrum(state, which, Prepared(info["solver"], info["n"],
                                                     info["damping"], {}, info["stats"]))
                state.failed |= info["failed"]
                if inv is not None:
                    setattr(state, f"{which}_inv", inv)
                elif tensors:
                    setattr(state, f"{which}_prep", Prepared(
                        info["solver"], info["n"], info["damping"], tensors, info["stats"],
                        info["failed"], info["modeled_time_s"]))
            state.damping = (used.get("a", state.damping[0]), used["g"])
            if state.failed:
                state.a_prep = state.g_prep = state.g_inv = None
                state.a_inv = None

    # ----------------------------------------------------------- precondition
    def _precondition_all(self, lr: float | None) -> tuple[list[TimeBreakdown], float]:
        cfg, jobs = self.config, []
        solver = TimedSolves(self.solver, self.timing.clock)
        names = list(self._records)
        comm_opt = self.strategy is Strategy.COMM_OPT
        flags = torch.zeros(len(names) + 1, dtype=torch.float64, device=self.device)
        mine: dict[str, Tensor] = {}
        if lr is None and cfg.lr is not None:
            lr = resolve("lr", cfg.lr, self.steps, POSITIVE)
        # Each layer's ⟨U, DΘ⟩ enters weighted by its group's η² (the groups are the same
        # on every rank); no clip when a rate is unknown.
        rates = LayerRates(lr, self.optimizer, cfg.momentum)
        etas = {n: rates(*trainable_params(self._records[n].helper)) for n in names}
        clip_known = all(eta is not None for eta in etas.values())  # alike on every rank
        for i, name in enumerate(names):
            if not comm_opt and self.assignment.owner(name) != self.rank:
                continue
            outcome = precondition_layer(self._records[name].helper, self._states[name],
                                         solver, cfg.method, self.noise(name, "u"))
            if isinstance(outcome, str):
                if outcome:
                    self.stats[outcome] += 1
                continue
            u, dot, layer_jobs = outcome
            mine[name] = u if comm_opt else u.contiguous()  # a broadcast sends memory order
            jobs += layer_jobs
            eta = etas[name] or 0.0
            flags[i], flags[-1] = 1.0, flags[-1] + eta * eta * dot
        buffers = mine
        if not comm_opt:  # owners broadcast U; ⟨U, DΘ⟩ is summed over the owners
            dist.all_reduce(flags, group=self.group)
            pairs, buffers = [], {}
            for i, name in enumerate(names):
                if flags[i] > 0:
                    h = self._records[name].helper
                    buffers[name] = mine.get(name, torch.empty(
                        h.d_out, h.a_dim, dtype=h.weight_param.dtype, device=self.device))
                    pairs.append((buffers[name], self._src(self.assignment.owner(name))))
            broadcast_from_owners(pairs, self.group)
            self.collectives += 1 + len(pairs)
        nu = kl_clip_scale(cfg.kl_clip, float(flags[-1]), 1.0) if clip_known else 1.0
        self.stats["kl_clip_scale"] = nu
        for name, u in buffers.items():
            self._records[name].helper.set_grad_matrix(u.mul_(nu) if nu != 1.0 else u)
        return jobs, solver.seconds

    def _modeled_time(self, jobs: list[TimeBreakdown]) -> list[float]:
        local = super()._modeled_time(jobs)
        self.local_modeled_s = local[0]
        if getattr(self.solver, "hardware", None) is None:
            return local
        return all_reduce_scalars(local, "max", self.group, self.device)
