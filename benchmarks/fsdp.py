"""K-FAC on FSDP2 against DDP: bytes held per rank, bytes communicated per step, step time.

For 1, 2 and 4 gloo ranks (one thread each) and two models — an MLP (784→512×3→10,
batch 256) and a GPT (token embedding, two blocks of ``nn.MultiheadAttention`` + MLP,
width 128, a head tied to the embedding, 8 sequences of 64 tokens) — three setups train
with the same global batch split over the ranks:

* ``ddp+kfac``: ``DistributedDataParallel`` + ``DistributedKFACPreconditioner``
  (``comm-opt``: every rank holds every factor);
* ``fsdp2+kfac``: ``fully_shard`` + ``DistributedKFACPreconditioner`` (owner-rank
  blocks, :mod:`thermokfac.distributed.fully_shard`);
* ``fsdp2+adamw``: ``fully_shard`` + AdamW alone (no K-FAC).

Per rank it records K-FAC's bytes held between steps (``memory_bytes()["total"]``: factors
and their factorisations), the bytes this rank passed to ``torch.distributed`` collectives
per step in K-FAC's collectives (counted by wrapping ``torch.distributed``'s collectives
during ``pre.step()``: the bytes this rank sends), the engine's own per step (DDP's or
FSDP2's, from the ring formulas of :func:`engine_bytes`: their collectives run in C++ or
bypass the module's functions), and the median step time (SGD steps, factors every step,
inverses every 10). Ranks share the machine's cores (4 ranks on 2 cores are
oversubscribed): times compare setups within a world size.

Run by hand (≈ 3 minutes on 2 cores):  python benchmarks/fsdp.py
Writes ``benchmarks/results/fsdp.json``, ``benchmarks/results/fsdp_held.png`` and prints
a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

HERE = Path(__file__).resolve().parent
SETUPS = ("ddp+kfac", "fsdp2+kfac", "fsdp2+adamw")
MODELS = ("mlp", "gpt")
STEPS, WARMUP = 12, 2
COLLECTIVES = ("all_reduce", "reduce", "broadcast", "gather", "scatter", "all_gather",
               "all_gather_into_tensor", "reduce_scatter_tensor", "all_gather_object")


class GPT(nn.Module):
    """Embedding, two blocks of attention + MLP, a head tied to the embedding."""

    def __init__(self, vocab: int = 65, width: int = 128, depth: int = 2) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, width)
        self.blocks = nn.ModuleList(nn.ModuleDict({
            "attn": nn.MultiheadAttention(width, 4, batch_first=True),
            "up": nn.Linear(width, 4 * width), "down": nn.Linear(4 * width, width)})
            for _ in range(depth))
        self.head = nn.Linear(width, vocab, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.emb(x)
        for b in self.blocks:
            h = h + b["attn"](h, h, h, need_weights=False)[0]
            h = h + b["down"](torch.relu(b["up"](h)))
        return self.head(h)


def build(kind: str) -> tuple[nn.Module, list[nn.Module]]:
    """The model and its FSDP2 units (inner modules sharded before the root)."""
    torch.manual_seed(0)
    if kind == "mlp":
        layers: list[nn.Module] = [nn.Linear(784, 512), nn.ReLU()]
        for _ in range(2):
            layers += [nn.Linear(512, 512), nn.ReLU()]
        model = nn.Sequential(*layers, nn.Linear(512, 10))
        return model, [m for m in model if isinstance(m, nn.Linear)]
    model = GPT()
    return model, [b["attn"] for b in model.blocks]


def batch(kind: str, rank: int, world: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    if kind == "mlp":
        x, y = torch.randn(256, 784, generator=g), torch.randint(0, 10, (256,), generator=g)
    else:
        x = torch.randint(0, 65, (8, 64), generator=g)
        y = torch.randint(0, 65, (8, 64), generator=g)
    share = x.shape[0] // world
    return x[rank * share:(rank + 1) * share], y[rank * share:(rank + 1) * share]


class ByteCounter:
    """Wraps ``torch.distributed``'s collectives for the run and counts the bytes of the
    tensors handed to them while :attr:`active` (set around ``pre.step()``, where all of
    K-FAC's collectives are issued and none of the engine's)."""

    def __init__(self) -> None:
        self.bytes, self.active = 0, False

    @staticmethod
    def _size(obj) -> int:
        if isinstance(obj, torch.Tensor):
            return obj.numel() * obj.element_size()
        if isinstance(obj, (list, tuple)):
            return sum(ByteCounter._size(o) for o in obj)
        return 0

    def install(self) -> None:
        for name in COLLECTIVES:
            original = getattr(dist, name, None)
            if original is None:
                continue

            def wrapped(*args, __original=original, __name=name, **kwargs):
                if self.active:  # the tensor this rank sends (gather/scatter: its part)
                    sent = args[1] if __name.startswith("all_gather") and len(args) > 1 \
                        else (args[0] if args else kwargs.get("tensor"))
                    self.bytes += self._size(sent)
                return __original(*args, **kwargs)

            setattr(dist, name, wrapped)


def engine_bytes(model: nn.Module, setup: str, world: int) -> float:
    """Bytes each rank sends per step in the engine's own collectives (ring
    algorithms): DDP all-reduces the gradients, 2·(W−1)/W·P; FSDP2 all-gathers the
    parameters in the forward and again in the backward (``reshard_after_forward``) and
    reduce-scatters the gradients, 3·(W−1)/W·P (P: parameter bytes)."""
    p = sum(t.numel() * t.element_size() for t in model.parameters())
    return (2.0 if setup.startswith("ddp") else 3.0) * (world - 1) / world * p


def worker(out: str, kind: str, setup: str) -> None:
    """One setup on this rank; writes ``out.<rank>``."""
    from torch.distributed.fsdp import fully_shard

    from thermokfac.distributed import DistributedKFACPreconditioner

    torch.set_num_threads(1)
    rank, world = dist.get_rank(), dist.get_world_size()
    model, units = build(kind)
    if setup.startswith("fsdp2"):
        for unit in units:
            fully_shard(unit)
        fully_shard(model)
        wrapped = model
    else:
        wrapped = nn.parallel.DistributedDataParallel(model)
    counter = ByteCounter()
    counter.install()
    full_model_bytes = engine_bytes(build(kind)[0], setup, world)
    if setup == "fsdp2+adamw":
        opt: torch.optim.Optimizer = torch.optim.AdamW(model.parameters(), lr=0.0)
        pre = None
    else:
        opt = torch.optim.SGD(model.parameters(), lr=0.0, momentum=0.9)
        pre = DistributedKFACPreconditioner(wrapped, optimizer=opt, inv_update_steps=10)
    x, y = batch(kind, rank, world)
    times, per_step = [], []
    for step in range(STEPS):
        counter.bytes = 0
        start = time.perf_counter()
        opt.zero_grad()
        out_ = wrapped(x)
        nn.functional.cross_entropy(out_.flatten(0, -2) if kind == "gpt" else out_,
                                    y.flatten()).backward()
        if pre is not None:
            counter.active = True
            pre.step()
            counter.active = False
        opt.step()
        if step >= WARMUP:
            times.append(time.perf_counter() - start)
            per_step.append(counter.bytes)
    result = {"step_ms": 1e3 * statistics.median(times),
              "step_iqr_ms": 1e3 * _iqr(times),
              "kfac_bytes_per_step": statistics.median(per_step),
              "engine_bytes_per_step": full_model_bytes,
              "kfac_held_bytes": 0 if pre is None else pre.memory_bytes()["total"],
              "largest_block_bytes": 0 if pre is None else max(
                  b.memory_bytes()["factors"] + b.memory_bytes()["prepared"]
                  for b in pre.blocks.values()) if pre.blocks else 0}
    Path(f"{out}.{rank}").write_text(json.dumps(result))


def _iqr(values: list[float]) -> float:
    q = statistics.quantiles(values, n=4)
    return q[2] - q[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worlds", default="1,2,4")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "fsdp.json")
    args = parser.parse_args()
    from thermokfac.distributed import run_workers

    load_before = os.getloadavg()
    results: dict = {}
    tmp = Path(os.environ.get("TMPDIR", "/tmp")) / f"fsdp_bench_{os.getpid()}"
    tmp.mkdir(parents=True, exist_ok=True)
    for kind in MODELS:
        for world in map(int, args.worlds.split(",")):
            for setup in SETUPS:
                path = tmp / f"{kind}_{world}_{setup.replace('+', '_')}"
                run_workers("fsdp:worker", world, [str(path), kind, setup], timeout=600,
                            extra_path=str(HERE))
                ranks = [json.loads(Path(f"{path}.{r}").read_text()) for r in range(world)]
                results.setdefault(kind, {}).setdefault(str(world), {})[setup] = ranks
                print(f"{kind} W={world} {setup}: step {ranks[0]['step_ms']:.1f} ms, "
                      f"K-FAC held {max(r['kfac_held_bytes'] for r in ranks) / 2**20:.2f} MB "
                      "(busiest rank)", file=sys.stderr, flush=True)
    payload = {"steps": STEPS, "warmup": WARMUP, "threads_per_rank": 1,
               "machine": {"cpus": os.cpu_count(), "torch": torch.__version__},
               "load_average_1_5_15": {"before": load_before, "after": os.getloadavg()},
               "results": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=2))
    print(table(payload))
    plot(payload, args.out.with_name("fsdp_held.png"))
    print(f"\nwrote {args.out}")


def table(payload: dict) -> str:
    rows = ["| model | ranks | setup | K-FAC held per rank, MB (max) | K-FAC sent per rank "
            "per step, MB (max) | engine sent per rank per step, MB (formula) | step ms (rank 0) "
            "| step / fsdp2+adamw |", "|---|---:|---|---:|---:|---:|---:|---:|"]
    for kind, worlds in payload["results"].items():
        for world, setups in worlds.items():
            base = setups["fsdp2+adamw"][0]["step_ms"]
            for setup, ranks in setups.items():
                mb = {key: max(r[key] for r in ranks) / 2**20 for key in (
                    "kfac_held_bytes", "kfac_bytes_per_step", "engine_bytes_per_step")}
                rows.append(f"| {kind} | {world} | {setup} | {mb['kfac_held_bytes']:.2f} | "
                            f"{mb['kfac_bytes_per_step']:.2f} | "
                            f"{mb['engine_bytes_per_step']:.2f} "
                            f"| {ranks[0]['step_ms']:.1f} | {ranks[0]['step_ms'] / base:.2f} |")
    return "\n".join(rows)


def plot(payload: dict, path: Path) -> None:
    """Who holds what: K-FAC bytes per rank, DDP against FSDP2, per model and world."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(payload["results"]), figsize=(10, 3.6))
    for ax, (kind, worlds) in zip(axes, payload["results"].items()):
        labels = []
        for positions, (world, setups) in enumerate(worlds.items()):
            for offset, setup in enumerate(("ddp+kfac", "fsdp2+kfac")):
                held = [r["kfac_held_bytes"] / 2**20 for r in setups[setup]]
                xs = [positions + offset * 0.4 + 0.08 * i for i in range(len(held))]
                ax.bar(xs, held, width=0.07, color="C0" if offset == 0 else "C1",
                       label=setup if positions == 0 else None)
            labels.append((positions + 0.2, f"{world} rank(s)"))
        ax.set_xticks([p for p, _ in labels], [lbl for _, lbl in labels])
        ax.set_ylabel("K-FAC state held per rank (MB)")
        ax.set_title(f"{kind}: one bar per rank")
        ax.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
