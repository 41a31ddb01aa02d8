"""Grouping speed: 100,000 scan positions, median of repeated runs (not a timed test).

Run: .venv/bin/python benchmarks/grouping.py [--positions 100000] [--repeats 5]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import _checkout  # noqa: F401  (this checkout's code, not the venv's copy)
import numpy as np

from ptychodus_torch_plugin.engine.grouping import group_positions


def main(n_positions: int = 100_000, repeats: int = 5) -> None:
    rng = np.random.default_rng(0)
    side = np.sqrt(n_positions) * 4.0  # about 4 px between neighbours
    x = rng.uniform(0, side, n_positions)
    y = rng.uniform(0, side, n_positions)
    print(f"machine: {platform.processor() or platform.machine()}, {platform.python_version()}")
    for gridsize, k, n_groups in [
        (1, 4, 0),
        (2, 4, 0),
        (2, 7, 0),
        (2, 7, 3 * n_positions),
        (3, 9, 0),
    ]:
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            groups = group_positions(x, y, gridsize, k, n_groups=n_groups, seed=1)
            times.append(time.perf_counter() - start)
        print(
            f"gridsize={gridsize} K={k} n_groups={groups.n_groups:>7}: median "
            f"{statistics.median(times):.3f} s over {repeats} runs "
            f"({n_positions / statistics.median(times):,.0f} positions/s)"
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--positions", type=int, default=100_000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    main(args.positions, args.repeats)
