"""A/B of the K-FAC step between two source trees: × Adam, held bytes, extra peak RSS.

Runs ``benchmarks/step_time.py`` (this tree's harness) alternately on tree A and tree B
— A, B, A, B, ... each a fresh process with that tree's ``src`` first on
``PYTHONPATH`` — for the default configuration (Method 1) and Method 2, and compares
the medians over pairs of each run's own × Adam (the ratio is measured inside one
process, against Adam in the same rounds), the bytes the preconditioner holds between
steps, and the extra peak RSS over SGD.

Run by hand (≈ 2 minutes per run on 2 cores; ``--pairs 4`` ≈ 16 minutes):

    git worktree add /tmp/before <commit>
    python benchmarks/ab_step.py --a /tmp/before/src --b src --pairs 4

Writes ``benchmarks/results/ab_step.json`` and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).parent
CONFIGS = ("thermokfac ema1/inv10 M1", "thermokfac ema1/inv10 M2")
FIELDS = ("ratio_to_adam", "held_mb", "peak_rss_over_sgd_mb")


def run(src: Path, rounds: int, out: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(src.resolve()), "OMP_NUM_THREADS": "2"}
    subprocess.run([sys.executable, str(HERE / "step_time.py"), "--skip-asdl",
                    "--skip-curvlinops", "--rounds", str(rounds), "--configs",
                    ",".join(CONFIGS), "--out", str(out)], check=True, env=env,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return json.loads(out.read_text())


def describe(src: Path) -> str:
    """The commit a source tree is at (``+`` when it has uncommitted changes)."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(src), *args], capture_output=True,
                              text=True).stdout.strip()
    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    return commit + ("+" if git("status", "--porcelain", "--", ".") else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--a", type=Path, required=True, help="src folder of tree A")
    parser.add_argument("--b", type=Path, required=True, help="src folder of tree B")
    parser.add_argument("--pairs", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "ab_step.json")
    args = parser.parse_args()
    load_before = os.getloadavg()
    runs: dict[str, list[dict]] = {"a": [], "b": []}
    with tempfile.TemporaryDirectory() as tmp:
        for pair in range(args.pairs):
            for tree in ("a", "b"):
                payload = run(getattr(args, tree), args.rounds, Path(tmp) / f"{tree}.json")
                machine = payload["machine"]
                runs[tree].append({c: {f: payload["results"][c].get(f) for f in FIELDS}
                                   | {"load_before": payload["load_average_1_5_15"]["before"][0]}
                                   for c in CONFIGS})
                print(f"pair {pair + 1}/{args.pairs} tree {tree}: " + ", ".join(
                    f"{c.split()[-1]} {runs[tree][-1][c]['ratio_to_adam']:.3f}×"
                    for c in CONFIGS), file=sys.stderr)
    load_after = os.getloadavg()
    summary = {}
    for config in CONFIGS:
        entry = {}
        for field in FIELDS:
            a = [r[config][field] for r in runs["a"]]
            b = [r[config][field] for r in runs["b"]]
            entry[field] = {"a_median": statistics.median(a), "b_median": statistics.median(b),
                            "a": a, "b": b,
                            "b_over_a": (statistics.median(b) / statistics.median(a)
                                         if statistics.median(a) else None)}
        summary[config] = entry
    payload = {"a": describe(args.a), "b": describe(args.b), "pairs": args.pairs,
               "rounds": args.rounds, "machine": machine,
               "load_average_1_5_15": {"before": load_before, "after": load_after},
               "quiet": load_before[0] < 0.5, "summary": summary, "runs": runs}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=2))
    print(f"A = {payload['a']}, B = {payload['b']}; medians over {args.pairs} runs each "
          "[min–max]\n")
    print("| configuration | × Adam A | × Adam B | B/A | held MB A / B | extra peak RSS "
          "MB A / B |\n|---|---:|---:|---:|---:|---:|")
    for config, e in summary.items():
        r, h, p = e["ratio_to_adam"], e["held_mb"], e["peak_rss_over_sgd_mb"]
        print(f"| {config} | {_span(r, 'a')} | {_span(r, 'b')} | {r['b_over_a']:.3f} | "
              f"{h['a_median']:.1f} / {h['b_median']:.1f} | "
              f"{_span(p, 'a', '.0f')} / {_span(p, 'b', '.0f')} |")
    print(f"\nwrote {args.out}")


def _span(entry: dict, tree: str, fmt: str = ".3f") -> str:
    values = entry[tree]
    return (f"{entry[f'{tree}_median']:{fmt}} [{min(values):{fmt}}–{max(values):{fmt}}]")


if __name__ == "__main__":
    main()
