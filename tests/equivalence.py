"""The equivalence suite's cases, models and training loop, shared by the one-process
reference (in the test process) and the gloo workers (``worker``, one group per world
size, every case in turn).

A case varies one factor from the base case (matrix storage, Method 2, Cholesky,
``comm-opt``, empirical Fisher, float64). Every run trains ``STEPS`` steps on the same
global batches — a rank takes its contiguous share — with
:meth:`KFACPreconditioner.step` itself: the one-process run uses
:class:`~thermokfac.KFACPreconditioner`, the ranks
:class:`~thermokfac.distributed.DistributedKFACPreconditioner` (on a
``DistributedDataParallel`` model), whose ``step`` is the same function object.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from thermokfac import KFACPreconditioner
from thermokfac.solvers import CholeskySolver, SolverError, ThermodynamicSolver

STEPS, BATCH = 6, 16
BASE = {"damping": 0.05, "factor_decay": 0.5, "inv_update_steps": 2, "kl_clip": 1e-2,
        "lr": 0.2, "method": "solve", "solver": "cholesky"}

#: name ↦ the one factor it changes: keyword overrides, the model, an event, a strategy.
CASES: dict[str, dict] = {
    "base": {},
    "method_inverse": {"kw": {"method": "inverse"}},
    "storage_rows": {"kw": {"factor_storage": "rows", "factor_decay": 0.0}},
    "storage_diagonal": {"model": "tokens"},
    "solver_eigh": {"kw": {"solver": "eigh"}},
    "solver_cg": {"kw": {"solver": "cg"}},
    "solver_thermodynamic": {"kw": {"solver": "thermodynamic"}},
    "separate_weight_and_bias": {"kw": {"separate_weight_and_bias": True}},
    "strategy_mem_opt": {"strategy": "mem-opt"},
    "fisher_mc": {"kw": {"fisher_type": "mc"}},
    "trainable_layout_change": {"event": "freeze"},
    "solver_error": {"kw": {"solver": "flaky"}},
    "skipped_step": {"event": "skip"},
    "call_order_misuse": {"event": "misuse"},
    "layer_on_one_rank": {"model": "routed"},
}

#: Combinations refused at construction: (keywords, the ValueError's message part).
INVALID = [
    ({"factor_storage": "rows", "factor_decay": 0.0, "method": "inverse"},
     "needs method='solve'"),
    ({"factor_storage": "rows", "factor_decay": 0.9}, "needs factor_decay=0"),
    ({"factor_storage": "rows", "factor_decay": lambda step: 0.0}, "needs factor_decay=0"),
    ({"fisher_type": "type3"}, "fisher_type='type3' is not valid"),
    ({"method": "invert"}, "method='invert' is not valid"),
]
#: Refused by the distributed preconditioner only (checked on the ranks).
INVALID_DISTRIBUTED = [
    ({"strategy": "fastest"}, "strategy='fastest' is not valid"),
    ({"bucket_mb": 0}, "bucket_mb=0 must be positive"),
    ({"parallel": None}, "builds its own plan"),
]

FLAKY_STEP, FLAKY_N = 3, 4


class FlakySolver(CholeskySolver):
    """Cholesky whose solves with a 4×4 factor (the head's G) fail at one step: a
    solver error the same on every rank, whoever solves."""

    name = "cholesky"
    failing = False

    def _solve(self, prepared, b, generator, overwrite_b=False):
        if FlakySolver.failing and prepared.n == FLAKY_N:
            raise SolverError("injected solve failure")
        return super()._solve(prepared, b, generator, overwrite_b)


class Net(nn.Module):
    """Linear → tanh → Linear head; ``tokens``: an embedding (diagonal A) first;
    ``routed``: two heads, the first half of the global batch through ``head`` and the
    second through ``other`` (on two ranks each head is used on one rank only)."""

    def __init__(self, kind: str = "base") -> None:
        super().__init__()
        self.kind = kind
        self.embed = nn.Embedding(12, 3) if kind == "tokens" else None
        self.fc = nn.Linear(6, 8)
        self.head = nn.Linear(8, 4)
        self.other = nn.Linear(8, 4) if kind == "routed" else None

    def forward(self, x: torch.Tensor, route: torch.Tensor) -> torch.Tensor:
        if self.embed is not None:
            x = self.embed(x).flatten(1)
        h = torch.tanh(self.fc(x))
        if self.other is None:
            return self.head(h)
        out = h.new_zeros(h.shape[0], 4)
        for value, head in ((0, self.head), (1, self.other)):
            rows = route == value
            if bool(rows.any()):  # a head with no rows here is not called at all
                out = out.index_put((rows,), head(h[rows]))
        return out


def data(kind: str, step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    x = torch.randint(0, 12, (BATCH, 2), generator=g) if kind == "tokens" else \
        torch.randn(BATCH, 6, generator=g, dtype=torch.float64)
    y = torch.randint(0, 4, (BATCH,), generator=g)
    route = (torch.arange(BATCH) >= BATCH // 2).long()
    return x, y, route


def options(case: dict) -> dict:
    kw = {**BASE, **case.get("kw", {})}
    if kw["solver"] == "thermodynamic":
        kw["solver"], kw["seed"] = ThermodynamicSolver(target_error=1e-3), 3
    elif kw["solver"] == "flaky":
        kw["solver"] = FlakySolver()
    return kw


def build(name: str) -> nn.Module:
    torch.manual_seed(0)
    return Net(CASES[name].get("model", "base")).double()


def train(name: str, model: nn.Module, pre: KFACPreconditioner, rank: int, world: int,
          bare: nn.Module) -> dict:
    """``STEPS`` steps of case ``name`` on this rank's share; what happened."""
    case = CASES[name]
    event, kind = case.get("event"), case.get("model", "base")
    mc = case.get("kw", {}).get("fisher_type") == "mc"
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    share = BATCH // world
    mine = slice(rank * share, (rank + 1) * share)
    events = {"refused": 0, "discarded": 0}
    for step in range(STEPS):
        x, y, route = (t[mine] for t in data(kind, step))
        if event == "freeze" and step == 3:
            bare.fc.bias.requires_grad_(False)
        FlakySolver.failing = step == FLAKY_STEP
        opt.zero_grad()
        out = model(x, route)
        nn.functional.cross_entropy(out, y).backward(retain_graph=mc)
        if event == "skip" and step == 2:  # gradients dropped without a step
            events["discarded"] += int(pre.discard_unstepped())
            continue
        pre.step(outputs=out if mc else None)
        if event == "misuse" and step == 1:
            try:
                pre.step()  # a second step() after one backward
            except RuntimeError:
                events["refused"] += 1
        opt.step()
    FlakySolver.failing = False
    return {"params": {k: v.detach().clone() for k, v in bare.named_parameters()},
            "stats": pre.stats, "events": events, "held": pre.memory_bytes()["total"],
            "largest": max((b.memory_bytes()["factors"] + b.memory_bytes()["prepared"]
                            for b in pre.blocks.values()), default=0),
            "same_step": type(pre).step is KFACPreconditioner.step}


def one_process(name: str) -> dict:
    """The reference: one process, the whole batch."""
    model = build(name)
    pre = KFACPreconditioner(model, **options(CASES[name]))
    return train(name, model, pre, 0, 1, model)


def worker(out: str) -> None:
    """Every case on this rank (DDP model, distributed preconditioner), then the
    distributed-only invalid combinations; saved to ``out.<rank>``."""
    from thermokfac.distributed import DistributedKFACPreconditioner

    rank, world = dist.get_rank(), dist.get_world_size()
    results = {}
    for name, case in CASES.items():
        bare = build(name)
        model = nn.parallel.DistributedDataParallel(bare, find_unused_parameters=True)
        pre = DistributedKFACPreconditioner(model, strategy=case.get("strategy", "comm-opt"),
                                            **options(case))
        results[name] = train(name, model, pre, rank, world, bare)
    refused = []
    for kw, _ in INVALID_DISTRIBUTED:
        try:
            DistributedKFACPreconditioner(build("base"), **{**BASE, **kw})
        except ValueError as err:
            refused.append(str(err))
        else:
            refused.append("accepted")
    torch.save({"results": results, "refused": refused}, f"{out}.{rank}")


#: The cases an FSDP2 model runs (the rows storage is refused there; strategies are DDP's;
#: a layer called on one rank only is refused: FSDP2 leaves its gradient unset on the
#: other ranks, so their rows would miss their step whatever K-FAC did).
FSDP_CASES = [name for name in CASES
              if name not in ("storage_rows", "strategy_mem_opt", "layer_on_one_rank")]


def fsdp_worker(out: str) -> None:
    """Every FSDP2 case on this rank (``fully_shard`` on the root, the distributed
    preconditioner built after it: owner-rank blocks), with what the ranks held: K-FAC's
    bytes, the largest block's, and whether a rank ever gathered a gradient of a block
    it does not own. Saved to ``out.<rank>``."""
    from torch.distributed.fsdp import fully_shard

    from thermokfac.distributed import DistributedKFACPreconditioner
    from thermokfac.distributed.fully_shard import OwnerCommunicator

    gathered_foreign = []
    gather = OwnerCommunicator.gather_gradients

    def watched(self, blocks, assignment, gradients):
        gather(self, blocks, assignment, gradients)
        owned = {id(p) for b in blocks if assignment.owns(b.name) for p in b.helper.parameters}
        gathered_foreign.extend(id(p) for p in gradients.whole if id(p) not in owned)

    OwnerCommunicator.gather_gradients = watched
    rank, world = dist.get_rank(), dist.get_world_size()
    results = {}
    for name in FSDP_CASES:
        bare = build(name)
        fully_shard(bare)
        pre = DistributedKFACPreconditioner(bare, **options(CASES[name]))
        run = train(name, bare, pre, rank, world, bare)
        run["params"] = {k: v.full_tensor() for k, v in run["params"].items()}
        run["owners"] = dict(pre.assignment.owners)
        results[name] = run
    bare = build("base")
    fully_shard(bare)
    adamw = train_kfac_adamw(bare, rank, world)
    options_runs = fsdp_options(rank, world)
    late = build("base")  # Accelerate's order: the preconditioner first, then fully_shard
    pre = DistributedKFACPreconditioner(late, **options(CASES["base"]))
    fully_shard(late)
    run = train("base", late, pre, rank, world, late)
    options_runs["built_before_sharding"] = {k: v.full_tensor()
                                             for k, v in run["params"].items()}
    options_runs["built_before_sharding_plan"] = type(pre.parallelism).__name__
    gpt = TinyGPT()
    fully_shard(gpt.attn)  # the attention its own FSDP2 unit, inside the root's
    fully_shard(gpt)
    gpt_params = train_gpt(gpt, DistributedKFACPreconditioner, rank, world)
    cnn = TinyCNN()
    for conv in (cnn.conv1, cnn.conv2):
        fully_shard(conv)
    fully_shard(cnn)
    cnn_params = train_cnn(cnn, DistributedKFACPreconditioner, rank, world)
    misuse = fsdp_misuse(rank)
    bare = build("layer_on_one_rank")
    fully_shard(bare)
    pre = DistributedKFACPreconditioner(bare, **options(CASES["layer_on_one_rank"]))
    try:
        train("layer_on_one_rank", bare, pre, rank, world, bare)
        routed = "accepted"
    except RuntimeError as err:
        routed = str(err)
    torch.save({"results": results, "gathered_foreign": len(gathered_foreign),
                "routed": routed,
                "adamw": {k: v.full_tensor() for k, v in adamw.items()},
                "gpt": {k: v.full_tensor() for k, v in gpt_params.items()},
                "cnn": {k: v.full_tensor() for k, v in cnn_params.items()},
                "options": options_runs, "misuse": misuse}, f"{out}.{rank}")


def fsdp_misuse(rank: int) -> dict[str, str]:
    """What FSDP2 + K-FAC says to three mistakes (the error's text, or "accepted"): no
    ``zero_grad()`` between steps, a setting that differs across ranks, a layer left
    unsharded beside sharded ones."""
    from torch.distributed.fsdp import fully_shard

    from thermokfac.distributed import DistributedKFACPreconditioner

    out = {}
    model = build("base")
    fully_shard(model)
    pre = DistributedKFACPreconditioner(model, **options(CASES["base"]))
    x, y, route = data("base", 0)
    try:
        for _ in range(2):  # no zero_grad(): the second backward adds onto U
            nn.functional.cross_entropy(model(x, route), y).backward()
            pre.step()
        out["no_zero_grad"] = "accepted"
    except RuntimeError as err:
        out["no_zero_grad"] = str(err)
    model = build("base")
    fully_shard(model)
    try:
        DistributedKFACPreconditioner(model, **{**options(CASES["base"]),
                                                "damping": 0.05 if rank == 0 else 0.1})
        out["mixed_settings"] = "accepted"
    except ValueError as err:
        out["mixed_settings"] = str(err)
    model = build("base")
    fully_shard(model.fc)  # the head stays a plain module
    try:
        DistributedKFACPreconditioner(model, **options(CASES["base"]))
        out["unsharded_layer"] = "accepted"
    except ValueError as err:
        out["unsharded_layer"] = str(err)
    return out


def fsdp_options(rank: int, world: int) -> dict:
    """The base case under FSDP2's options — ``reshard_after_forward=False``,
    ``CPUOffloadPolicy``, ``MixedPrecisionPolicy`` (float32 compute of the float64
    model), and two micro-batches a step with ``set_requires_gradient_sync(False)`` on
    the first (with ``num_examples=``, and without: refused) — each run's parameters
    gathered whole, or the error it raised."""
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

    from thermokfac.distributed import DistributedKFACPreconditioner

    out: dict = {}
    policies = {"no_reshard": {"reshard_after_forward": False},
                "cpu_offload": {"offload_policy": CPUOffloadPolicy(pin_memory=False)},
                "mixed_precision": {"mp_policy": MixedPrecisionPolicy(
                    param_dtype=torch.float32, reduce_dtype=torch.float64)}}
    for name, kw in policies.items():
        model = build("base")
        fully_shard(model, **kw)
        pre = DistributedKFACPreconditioner(model, **options(CASES["base"]))
        run = train("base", model, pre, rank, world, model)
        out[name] = {k: v.full_tensor() for k, v in run["params"].items()}
    for counted in (True, False):
        model = build("base")
        fully_shard(model)
        pre = DistributedKFACPreconditioner(model, **options(CASES["base"]))
        opt = torch.optim.SGD(model.parameters(), lr=0.2)
        share = BATCH // world
        mine = slice(rank * share, (rank + 1) * share)
        name = "accumulation" + ("" if counted else "_uncounted")
        try:
            for step in range(STEPS):
                x, y, route = (t[mine] for t in data("base", step))
                opt.zero_grad()
                for part, sync in ((slice(0, share // 2), False), (slice(share // 2, share), True)):
                    model.set_requires_gradient_sync(sync)
                    loss = nn.functional.cross_entropy(model(x[part], route[part]), y[part])
                    (loss / 2).backward()
                pre.step(num_examples=share if counted else None)
                opt.step()
            out[name] = {k: v.detach().full_tensor() for k, v in model.named_parameters()}
        except ValueError as err:
            out[name] = str(err)
    return out


class TinyCNN(nn.Module):
    """Two convolutions (the second strided, 5 output channels: uneven row shards) and
    a Linear head (float64, seeded)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv1 = nn.Conv2d(2, 4, 3, padding=1, dtype=torch.float64)
        self.conv2 = nn.Conv2d(4, 5, 3, stride=2, dtype=torch.float64)
        self.head = nn.Linear(5 * 3 * 3, 3, dtype=torch.float64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.conv2(torch.tanh(self.conv1(x))))
        return self.head(h.flatten(1))


def train_cnn(model: nn.Module, cls: type, rank: int, world: int) -> dict:
    """``STEPS`` steps of the tiny CNN (8 images 2×8×8 a step) under preconditioner class
    ``cls`` with SGD, on this rank's share; the parameters."""
    def batch(g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        return (torch.randn(8, 2, 8, 8, generator=g, dtype=torch.float64),
                torch.randint(0, 3, (8,), generator=g))
    return _train_sgd(model, cls, rank, world, 300, batch)


def _train_sgd(model: nn.Module, cls: type, rank: int, world: int, seed: int,
               batch) -> dict:
    """``STEPS`` SGD steps under preconditioner class ``cls`` on this rank's share of
    ``batch(generator)`` (8 examples; the generator seeded by ``seed`` + step), the loss
    cross-entropy over the last dimension; the parameters."""
    pre = cls(model, damping=1e-2, kl_clip=1e-2, lr=0.1, inv_update_steps=2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    share = 8 // world
    mine = slice(rank * share, (rank + 1) * share)
    for step in range(STEPS):
        x, y = batch(torch.Generator().manual_seed(seed + step))
        opt.zero_grad()
        out = model(x[mine])
        nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]), y[mine].reshape(-1)).backward()
        pre.step()
        opt.step()
    return {k: v.detach().clone() for k, v in model.named_parameters()}


class TinyGPT(nn.Module):
    """Token embedding, one ``nn.MultiheadAttention`` block (its packed in_proj rows
    straddle the Q, K and V blocks), a Linear, and an output head tied to the
    embedding (float64, seeded)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(11, 8, dtype=torch.float64)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True, dtype=torch.float64)
        self.mlp = nn.Linear(8, 8, dtype=torch.float64)
        self.head = nn.Linear(8, 11, bias=False, dtype=torch.float64)
        self.head.weight = self.emb.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.emb(x)
        h = h + self.attn(h, h, h, need_weights=False)[0]
        h = h + torch.tanh(self.mlp(h))
        return self.head(h)


def train_gpt(model: nn.Module, cls: type, rank: int, world: int) -> dict:
    """``STEPS`` steps of the tiny GPT (8 sequences of 5 tokens a step) under
    preconditioner class ``cls`` with SGD, on this rank's share; the parameters."""
    def batch(g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.randint(0, 11, (8, 5), generator=g), torch.randint(0, 11, (8, 5), generator=g)
    return _train_sgd(model, cls, rank, world, 200, batch)


def train_kfac_adamw(model: nn.Module, rank: int, world: int) -> dict:
    """``STEPS`` steps of :class:`~thermokfac.optim.KFACOptimizer` over AdamW (its
    default recipe: relative damping, grafting) on this rank's share; the parameters."""
    from thermokfac.optim import KFACOptimizer

    opt = KFACOptimizer(model, torch.optim.AdamW(model.parameters(), lr=1e-2),
                        inv_update_steps=2)
    share = BATCH // world
    mine = slice(rank * share, (rank + 1) * share)
    for step in range(STEPS):
        x, y, route = (t[mine] for t in data("base", step))
        opt.zero_grad()
        nn.functional.cross_entropy(model(x, route), y).backward()
        opt.step()
    return {k: v.detach().clone() for k, v in model.named_parameters()}
