"""Seconds per epoch from the wall times of the train/loss scalars in a run's tensorboard folder."""
import sys, glob
import numpy as np
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
for run in sys.argv[1:]:
    for f in sorted(glob.glob(f"{run}/tensorboard/events.*")):
        acc = EventAccumulator(f); acc.Reload()
        if "train/loss" not in acc.Tags()["scalars"]:
            continue
        ev = acc.Scalars("train/loss")
        t = np.array([e.wall_time for e in ev])
        d = np.diff(t)
        print(run.split("/")[-1], f.split(".")[-1], "epochs", len(ev), "s/epoch (median of diffs)", round(float(np.median(d)), 2) if len(d) else None)
