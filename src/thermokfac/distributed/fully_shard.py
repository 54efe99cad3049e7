"""Exact K-FAC on FSDP2 (``torch.distributed.fsdp.fully_shard``): owner-rank blocks behind
the step's seam.

FSDP2 shards every parameter (and its gradient) by rows — dim 0 — over the ranks, and
reduce-scatters the gradients, so after the backward each rank holds its rows of the
batch-averaged gradient. A and G come from layer inputs and output gradients, which
every rank still holds whole for its own examples. :class:`FullyShard` is the
:class:`~thermokfac.kfac.parallel.Parallelism` that keeps K-FAC exact on such a model:

* every block has one **owner** rank (:class:`OwnerAssignment`; blocks that share a
  parameter — the Q, K and V blocks of one packed ``in_proj_weight`` — share an owner),
  chosen longest-first onto the least-loaded rank by the elements the block's factors
  hold, so no rank holds more than its share plus the largest block;
* each step's curvature sums are **reduced to the owner** (not all-reduced): the moving
  averages and the prepared state (Cholesky, inverse, or thermodynamic device) of a
  block live on its owner only (:class:`OwnerCommunicator`);
* the owner **gathers** the rows of each of its parameters' gradients (one ``gather``
  per owner, every parameter's rows in one flat buffer), computes
  U = (G+λI)⁻¹ DΘ (A+λI)⁻¹ (Eq. 15) on the whole DΘ, and **scatters** U's rows back into
  each rank's shard of ``.grad`` (one ``scatter`` per owner; :class:`ShardedGradients`);
  the KL clip uses Σ η²⟨U, DΘ⟩ summed over the owners.

The step is :meth:`KFACPreconditioner.step <thermokfac.KFACPreconditioner.step>`, the
same as in one process and under DDP.

**Bytes per step** (b bytes per element, W ranks, a block with DΘ ``[d_out, a_dim]``):
the owner route moves the gradient twice — rows in (gather) and U's rows out (scatter),
2·(W−1)/W·d_out·a_dim·b over the group — plus the curvature reduced to the owner,
(W−1)·(a_dim² + d_out²)·b. A reduce-scatter variant, U[rows] = Σ_s
(G+λI)⁻¹[rows, cols_s]·(∇W_s (A+λI)⁻¹), would move the gradient once
((W−1)/W·d_out·a_dim·b, half as much) but needs (A+λI)⁻¹ and G's prepared columns on
every rank: the curvature all-reduced (2·(W−1)/W·(a_dim² + d_out²)·b, more than the
reduce to one owner when W > 2, and about the same when W = 2) and every rank holding a
whole A per block — W times the owner route's state, against this issue's bound of
(total state)/W + the largest block. On the reference MLP (d_out 512, a_dim 513,
float32, W = 2) it would save 0.5 MB per block per step and cost 1 MB of A per block on
every rank, so it is not built.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .._invariants import required
from ..kfac.blocks import KroneckerBlock
from ..kfac.config import KFACConfig, setup_fingerprint
from ..kfac.curvature import CurvatureSums
from ..kfac.gradients import GradientAccess
from ..kfac.layers import LayerHelper
from ..kfac.parallel import Parallelism, Plan, Update, WorkAssignment, clip_sum
from .assignment import Assignment, WorkItem
from .comm import check_same_setup
from .data_parallel import ProcessGroupCommunicator


def is_fully_sharded(model: nn.Module) -> bool:
    """Whether some parameter of ``model`` is a DTensor (FSDP2 has sharded it)."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


class OwnerAssignment(WorkAssignment):
    """Each block's owner prepares both factors, keeps its estimates and computes U.

    Args:
        owners: Block name ↦ owner rank.
        loads: Elements of factor state per rank.
        rank: This rank.
    """

    def __init__(self, owners: dict[str, int], loads: tuple[float, ...], rank: int) -> None:
        self.owners, self.loads = owners, loads
        self.rank, self.world_size = rank, len(loads)

    def inv_worker(self, block: str, factor: str) -> int:
        return self.owners[block]

    def grad_worker(self, block: str) -> int:
        return self.owners[block]

    @property
    def broadcasts_caches(self) -> bool:
        return False

    def holds_estimates(self, block: str) -> bool:
        return self.owns(block)

    def owns(self, block: str) -> bool:
        """Whether this rank owns ``block``.

        Args:
            block: A block's name.
        """
        return self.owners[block] == self.rank


def share_groups(blocks: Sequence[KroneckerBlock]) -> list[list[KroneckerBlock]]:
    """Blocks grouped so that blocks sharing a parameter are in one group (model order
    within and across groups)."""
    group_of: dict[int, int] = {}
    groups: list[list[KroneckerBlock]] = []
    for block in blocks:
        ids = [id(p) for p in block.helper.parameters]
        found = sorted({group_of[i] for i in ids if i in group_of})
        if not found:
            groups.append([block])
            index = len(groups) - 1
        else:
            index = found[0]
            for other in found[1:]:  # a block joining two groups merges them
                groups[index] += groups[other]
                groups[other] = []
                group_of.update({k: index for k, v in group_of.items() if v == other})
            groups[index].append(block)
        group_of.update(dict.fromkeys(ids, index))
    return [g for g in groups if g]


def factor_elements(helper: LayerHelper) -> float:
    """Elements a block's factors hold: a_dim² (a_dim for a diagonal A) + d_out²."""
    a = helper.a_dim if helper.diagonal_a else helper.a_dim ** 2
    return float(a + helper.d_out ** 2)


class _Rows:
    """Where rank r's rows of a dim-0-sharded tensor of ``n`` rows lie: FSDP2's chunks
    of ⌈n/W⌉ rows (the last ones shorter or empty)."""

    def __init__(self, n: int, world: int) -> None:
        self.n, self.world = n, world
        self.chunk = max(1, math.ceil(n / world))

    def span(self, rank: int) -> tuple[int, int]:
        start = min(rank * self.chunk, self.n)
        return start, min(start + self.chunk, self.n)


class ShardedGradients(GradientAccess):
    """DΘ and U of a block through FSDP2's row shards of ``.grad``.

    The owner of a block reads DΘ from the whole gradients gathered for this step
    (:meth:`OwnerCommunicator.gather_gradients`) and writes U into them; the
    communicator then scatters their rows back to every rank's shard. Scaling (the KL
    clip's ν) acts on this rank's shard, on the elements of the block's own part of a
    shared parameter only.
    """

    def __init__(self, rank: int, world_size: int) -> None:
        self.rank, self.world_size = rank, world_size
        #: Parameter ↦ its whole gradient, for the parameters this rank owns this step.
        self.whole: dict[nn.Parameter, Tensor] = {}
        self._masks: dict[tuple[int, int], Tensor | None] = {}

    def _source(self, param: nn.Parameter) -> Tensor | None:
        if param.grad is None:
            return None
        try:
            return self.whole[param]
        except KeyError:
            raise RuntimeError("a block's whole gradient was read on a rank that does not "
                               "own it (an internal error of the FSDP2 plan)") from None

    def has_grad(self, helper: LayerHelper) -> bool:
        # the parameters themselves: a block's view of a DTensor (Q, K or V rows of a
        # packed projection) would be a collective, and only the owner asks
        weight = helper.weight_param.grad if helper.weight_trainable else None
        bias = required(helper.bias_param, "the bias").grad if helper.has_bias else None
        return weight is not None or bias is not None

    def read(self, helper: LayerHelper) -> Tensor | None:
        return helper.grad_matrix(self._source)

    def inner(self, helper: LayerHelper, u: Tensor) -> float:
        return helper.inner_with_grad(u, self._source)

    def write(self, helper: LayerHelper, u: Tensor) -> None:
        helper.set_grad_matrix(u, self._source)

    def scale(self, helper: LayerHelper, factor: float) -> None:
        for param in helper.parameters:
            if param.grad is None:
                continue
            local = local_tensor(param.grad)
            mask = self._mask(helper, param)
            if mask is None:
                local.mul_(factor)
            else:
                local.copy_(torch.where(mask, local * factor, local))  # in local's dtype

    def _mask(self, helper: LayerHelper, param: nn.Parameter) -> Tensor | None:
        """This rank's elements of ``param`` that belong to the block (None: all)."""
        key = (id(helper), id(param))
        if key not in self._masks:
            marks = torch.zeros(param.shape, dtype=torch.bool, device=param.device)
            view = helper.weight_view if param is helper.weight_param else helper.bias_view
            view(marks).fill_(True)
            start, end = _Rows(param.shape[0], self.world_size).span(self.rank)
            local = marks[start:end]
            self._masks[key] = None if bool(local.all()) else local
        return self._masks[key]

    def parameters(self, helper: LayerHelper) -> list[nn.Parameter]:
        return helper.parameters


def local_tensor(t: Tensor) -> Tensor:
    """This rank's rows of a DTensor (the tensor itself when it is not one)."""
    return t.to_local() if hasattr(t, "to_local") else t


class OwnerCommunicator(ProcessGroupCommunicator):
    """The collectives of owner-rank blocks: curvature reduced to each owner, gradient
    rows gathered to it and U's rows scattered back, the KL clip's sum all-reduced."""

    def __init__(self, group: Any, device: torch.device, bucket_bytes: int,
                 factor_dtype: Callable[[], torch.dtype], owners: dict[str, int],
                 owner_of_param: dict[int, int]) -> None:
        super().__init__(group, device, bucket_bytes, factor_dtype)
        self.owners, self.owner_of_param = owners, owner_of_param

    # ---------------------------------------------------------------- curvature
    def reduce_curvature(self, sums: dict[str, CurvatureSums],
                         blocks: Sequence[KroneckerBlock]) -> dict[str, CurvatureSums]:
        """Every block's sums reduced (summed) to its owner, one buffer per owner: A's
        numerators and row counts summed, G averaged over ranks. Returns the sums of the
        blocks this rank owns and some rank captured."""
        dtype, device = self._dtype(sums), self._device(sums)
        out: dict[str, CurvatureSums] = {}
        for owner in range(self.world_size):
            mine = [b for b in blocks if self.owners[b.name] == owner]
            if not mine:
                continue
            parts: list[Tensor] = []
            for block in mine:
                got = sums.get(block.name)
                h = block.helper
                a_shape = (h.a_dim,) if h.diagonal_a else (h.a_dim, h.a_dim)
                if got is None:
                    parts += [torch.zeros(a_shape, dtype=dtype, device=device).flatten(),
                              torch.zeros(h.d_out * h.d_out, dtype=dtype, device=device),
                              torch.zeros(1, dtype=dtype, device=device)]
                else:
                    parts += [required(got.a, f"A of {block.name}").to(dtype).flatten(),
                              required(got.g, f"G of {block.name}").to(dtype).flatten(),
                              torch.tensor([float(got.a_rows)], dtype=dtype, device=device)]
            buffer = torch.cat(parts)
            dist.reduce(buffer, dst=self._src(owner), op=dist.ReduceOp.SUM, group=self.group)
            self.collectives += 1
            if owner != self.rank:
                continue
            offset = 0
            for block in mine:
                h = block.helper
                a_shape = (h.a_dim,) if h.diagonal_a else (h.a_dim, h.a_dim)
                a_n = math.prod(a_shape)
                a = buffer[offset:offset + a_n].view(a_shape)
                g = buffer[offset + a_n:offset + a_n + h.d_out ** 2].view(h.d_out, h.d_out)
                rows = float(buffer[offset + a_n + h.d_out ** 2])
                offset += a_n + h.d_out ** 2 + 1
                if rows > 0:  # Σ āāᵀ / #rows of the global batch; G: the mean over ranks
                    out[block.name] = CurvatureSums(a=a, a_rows=rows,
                                                    g=g / self.world_size, g_rows=1.0)
        return out

    # ---------------------------------------------------------------- gradients
    def gather_gradients(self, blocks: Sequence[KroneckerBlock],
                         assignment: WorkAssignment, gradients: GradientAccess) -> None:
        """Each parameter's gradient rows gathered whole to the owner of its blocks
        (``gradients.whole``; other ranks hold none): one ``gather`` per owner (and
        dtype), every parameter's chunk padded to FSDP2's chunk size and flattened into
        one buffer."""
        assert isinstance(gradients, ShardedGradients)
        gradients.whole.clear()
        for owner, params in self._buckets(self._with_grad_everywhere(blocks)):
            send = torch.cat([self._padded_local(p).flatten() for p in params])
            chunks = ([torch.empty_like(send) for _ in range(self.world_size)]
                      if owner == self.rank else None)
            dist.gather(send, chunks, dst=self._src(owner), group=self.group)
            self.collectives += 1
            if chunks is None:
                continue
            offset = 0
            for p in params:
                rows = _Rows(p.shape[0], self.world_size)
                size = rows.chunk * math.prod(p.shape[1:])
                parts = [c[offset:offset + size].view(rows.chunk, *p.shape[1:]) for c in chunks]
                gradients.whole[p] = torch.cat(parts)[: p.shape[0]]
                offset += size

    def _buckets(self, params: list[nn.Parameter]
                 ) -> list[tuple[int, list[nn.Parameter]]]:
        """``params`` grouped by (owner, gradient dtype), in a fixed order."""
        groups: dict[tuple[int, torch.dtype], list[nn.Parameter]] = {}
        for p in params:
            dtype = required(p.grad, "a gradient").dtype
            groups.setdefault((self.owner_of_param[id(p)], dtype), []).append(p)
        return [(owner, ps) for (owner, _), ps in groups.items()]

    def _padded_local(self, param: nn.Parameter) -> Tensor:
        """This rank's rows of ``param``'s gradient, zero-padded to FSDP2's chunk.

        Raises:
            RuntimeError: The rows are not FSDP2's chunk of this rank.
        """
        grad = required(param.grad, "a gradient")
        local = local_tensor(grad)
        rows = _Rows(grad.shape[0], self.world_size)
        start, end = rows.span(self.rank)
        if local.shape[0] != end - start:
            raise RuntimeError(
                f"a gradient of {tuple(grad.shape)} holds rows of {local.shape[0]} on "
                f"rank {self.rank}, not FSDP2's chunk [{start}, {end}) of "
                f"{self.world_size}: a sharding this plan does not know")
        if local.shape[0] == rows.chunk:
            return local
        padded = local.new_zeros((rows.chunk, *grad.shape[1:]))
        padded[: local.shape[0]] = local
        return padded

    def _with_grad_everywhere(self, blocks: Sequence[KroneckerBlock]) -> list[nn.Parameter]:
        """The blocks' distinct parameters that hold a gradient, checked to hold one on
        every rank or on none (one all-reduce).

        Raises:
            RuntimeError: A parameter has a gradient on some ranks only: FSDP2 leaves the
                gradient of a module that a rank did not call unset there, so that
                rank's rows would miss their step (a data-dependent route; every rank must
                call every preconditioned module, or use DDP).
        """
        params = _parameters(blocks)
        names = {id(p): b.name for b in blocks for p in b.helper.parameters}
        counts = torch.tensor([float(p.grad is not None) for p in params],
                              dtype=torch.float64, device=self.device)
        dist.all_reduce(counts, group=self.group)
        self.collectives += 1
        partial = [names[id(p)] for p, c in zip(params, counts.tolist())
                   if 0 < c < self.world_size]
        if partial:
            raise RuntimeError(
                f"the gradients of layer(s) {sorted(set(partial))} are set on some ranks "
                "only: FSDP2 leaves a parameter's gradient unset on a rank that did not "
                "call its module, so K-FAC cannot precondition it exactly — call every "
                "preconditioned module on every rank (skip_layers= the routed ones, or use "
                "DistributedDataParallel)")
        return [p for p, c in zip(params, counts.tolist()) if c > 0]

    def share_updates(self, updates: dict[str, Update], blocks: Sequence[KroneckerBlock],
                      assignment: WorkAssignment, gradients: GradientAccess
                      ) -> tuple[dict[str, Update], float | None]:
        """U's rows scattered from each owner into every rank's shard (parameters of a
        block that was preconditioned), Σ η²⟨U, DΘ⟩ summed over the owners."""
        assert isinstance(gradients, ShardedGradients)
        n = len(blocks)
        partial = clip_sum(updates)
        flags = torch.tensor([float(b.name in updates) for b in blocks]
                             + [0.0 if partial is None else partial,
                                1.0 if partial is None else 0.0],
                             dtype=torch.float64, device=self.device)
        dist.all_reduce(flags, group=self.group)
        self.collectives += 1
        present = flags.tolist()
        done = [b for i, b in enumerate(blocks) if present[i] > 0]
        helpers = {b.name: b.helper for b in blocks}
        for name, update in updates.items():  # U into the owner's whole gradients
            gradients.write(helpers[name], required(update.u, f"U of {name}"))
        # every preconditioned block: U arrives in the shards below (u=None: written)
        out = {b.name: Update(updates[b.name].inner if b.name in updates else 0.0,
                              updates[b.name].rate if b.name in updates else None)
               for b in done}
        for owner, params in self._buckets(_parameters(done, with_grad=True)):
            sizes = [_Rows(p.shape[0], self.world_size).chunk * math.prod(p.shape[1:])
                     for p in params]
            recv = local_tensor(required(params[0].grad, "a gradient")).new_empty(sum(sizes))
            chunks = None
            if owner == self.rank:  # rank r's chunk of every parameter, flattened
                per_rank: list[list[Tensor]] = [[] for _ in range(self.world_size)]
                for p in params:
                    rows = _Rows(p.shape[0], self.world_size)
                    whole = gradients.whole[p]
                    padded = whole.new_zeros((rows.chunk * self.world_size, *p.shape[1:]))
                    padded[: p.shape[0]] = whole
                    for r, chunk in enumerate(padded.chunk(self.world_size)):
                        per_rank[r].append(chunk.flatten())
                chunks = [torch.cat(parts) for parts in per_rank]
            dist.scatter(recv, chunks, src=self._src(owner), group=self.group)
            self.collectives += 1
            offset = 0
            for p, size in zip(params, sizes):
                local = local_tensor(required(p.grad, "a gradient"))
                rows_here = _Rows(p.shape[0], self.world_size).chunk
                mine = recv[offset:offset + size].view(rows_here, *p.shape[1:])
                local.copy_(mine[: local.shape[0]])
                offset += size
        gradients.whole.clear()
        return out, (None if present[n + 1] > 0 else present[n])


def _parameters(blocks: Sequence[KroneckerBlock], with_grad: bool = False
                ) -> list[nn.Parameter]:
    """The distinct parameters of ``blocks`` (those holding a gradient when
    ``with_grad``), in block order."""
    seen: set[int] = set()
    params = []
    for block in blocks:
        for p in block.helper.parameters:
            if id(p) not in seen and (p.grad is not None or not with_grad):
                seen.add(id(p))
                params.append(p)
    return params


class FullyShard(Parallelism):
    """K-FAC over an FSDP2 model (see the module doc).

    Args:
        group: Process group (default: the world; FSDP2's mesh must be the world).

    Raises:
        ValueError: On ``factor_storage="rows"`` (the resistor-array mode keeps every
            row on every rank: not built for sharded models), a parameter sharded
            over a mesh of another size than the process group, or a layer left
            unsharded beside sharded ones.
    """

    averages_factors = True
    shards_parameters = True

    def __init__(self, group: Any = None) -> None:
        self.group = group

    def plan(self, blocks: Sequence[KroneckerBlock], config: KFACConfig,
             device: torch.device, factor_dtype: Callable[[], torch.dtype]) -> Plan:
        """Check that every rank built the same setup, then give each group of blocks
        that share parameters one owner, longest-first by factor elements."""
        if config.factors.rows:
            raise ValueError("factor_storage='rows' is not supported on an FSDP2 model: use "
                             "factor_storage='matrix'")
        solver = config.solver
        check_same_setup(";".join(
            [f"solver {solver.name}, method {config.method.value}, FSDP2 owner blocks"]
            + [setup_fingerprint(config)]
            + [f"{b.name}: A {b.helper.a_dim}, G {b.helper.d_out}" for b in blocks]),
            self.group)
        world = dist.get_world_size(self.group)
        for block in blocks:
            for param in block.helper.parameters:
                mesh = getattr(param, "device_mesh", None)
                if mesh is None:
                    raise ValueError(
                        f"layer {block.name!r} is not sharded (its parameters are plain "
                        "tensors) while other layers are: apply fully_shard to the root "
                        "module too (it shards every parameter not in an inner unit), or "
                        "leave the layer out with skip_layers=")
                if mesh.size() != world:
                    raise ValueError(
                        f"layer {block.name!r} is sharded over {mesh.size()} ranks but the "
                        f"process group has {world}: pass group= the FSDP2 mesh's group")
        groups = share_groups(blocks)
        items = [WorkItem(g[0].name, "layer", sum(factor_elements(b.helper) for b in g))
                 for g in groups]
        greedy = Assignment.greedy(items, world)
        owners: dict[str, int] = {}
        owner_of_param: dict[int, int] = {}
        for g in groups:
            rank = greedy.owner(g[0].name)
            for block in g:
                owners[block.name] = rank
                owner_of_param.update(dict.fromkeys(map(id, block.helper.parameters), rank))
        comm = OwnerCommunicator(self.group, device, 0, factor_dtype, owners, owner_of_param)
        return Plan(OwnerAssignment(owners, greedy.loads, comm.rank), comm,
                    ShardedGradients(comm.rank, comm.world_size))
