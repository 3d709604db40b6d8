"""Seconds per training epoch of finished runs, read from their tensorboard folders.

    python benchmarks/tensorboard_epoch_times.py results/defectscope/elpv/<run_name> [...]

One line per category model (one event file each): the median difference between the wall times
of consecutive ``train/loss`` points, i.e. one epoch without the one-off feature extraction.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator


def epoch_seconds(event_file: Path) -> tuple[int, float | None]:
    """(epochs logged, median seconds per epoch) of one event file; (0, None) without a loss curve."""
    acc = EventAccumulator(str(event_file))
    acc.Reload()
    if "train/loss" not in acc.Tags()["scalars"]:
        return 0, None
    times = np.array([event.wall_time for event in acc.Scalars("train/loss")])
    return len(times), (float(np.median(np.diff(times))) if len(times) > 1 else None)


def main(runs: list[str]) -> None:
    for run in map(Path, runs):
        for index, event_file in enumerate(sorted((run / "tensorboard").glob("events.*"))):
            epochs, seconds = epoch_seconds(event_file)
            if epochs:
                per_epoch = "n/a" if seconds is None else f"{seconds:.1f}"
                print(f"{run.name} model {index}: {epochs} epochs, {per_epoch} s/epoch")


if __name__ == "__main__":
    main(sys.argv[1:])
