"""Command-line start-up: ``lightning-opt --help`` and ``fit --help`` against what they must not exceed.

Each command runs in a fresh Python process (as a user types it), interleaved round by round so that the machine's
noise falls on all of them alike; the median wall time of ``--rounds`` runs is printed with its ratio.

- ``lightning-opt --help`` of this tree, and of a ``--baseline`` tree (an older checkout) when given;
- ``lightning-opt fit --help`` against importing Lightning plus the recipe's classes
  (``import lightning.pytorch, lightning_opt.module, lightning_opt.data``), its floor.

Example:
    git worktree add /tmp/before 9f0bc16 && python benchmarks/cli.py --baseline /tmp/before --rounds 7
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _run(argv: list[str], tree: Path) -> float:
    env = {**os.environ, "PYTHONPATH": str(tree), "PYTHONWARNINGS": "ignore"}
    start = time.perf_counter()
    subprocess.run([sys.executable, *argv], cwd=tree, env=env, capture_output=True, check=False)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", type=Path, default=None, help="an older checkout to compare --help with")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    cases: dict[str, tuple[list[str], Path]] = {
        "lightning-opt --help": (["-m", "lightning_opt", "--help"], REPO),
        "lightning-opt fit --help": (["-m", "lightning_opt", "fit", "--help"], REPO),
        "import lightning + recipe classes": (
            ["-c", "import lightning.pytorch, lightning_opt.module, lightning_opt.data"],
            REPO,
        ),
    }
    if args.baseline is not None:
        cases["baseline: lightning-opt --help"] = (["-m", "lightning_opt", "--help"], args.baseline.resolve())
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(args.rounds):
        for name, (argv, tree) in cases.items():
            times[name].append(_run(argv, tree))
    median = {name: statistics.median(values) for name, values in times.items()}
    for name, value in median.items():
        print(f"{name:<36} median {value:6.2f} s  (min {min(times[name]):.2f}, max {max(times[name]):.2f})")
    if args.baseline is not None:
        ratio = median["baseline: lightning-opt --help"] / median["lightning-opt --help"]
        print(f"--help: {ratio:.0f}x faster than the baseline")
    floor = median["import lightning + recipe classes"]
    print(f"fit --help / (import lightning + recipe classes): {median['lightning-opt fit --help'] / floor:.2f}")


if __name__ == "__main__":
    main()
