"""Which of EfficientAD's two maps finds the defects: image AUROC of each map alone and of their mean.

Run by hand (not in CI):
    python benchmarks/efficientad_branches.py --run RUN_FOLDER --data-path ROOT --category NAME [--run ...]

A trained EfficientAD run folder (``defectscope train --model efficientad``, mvtec layout) is loaded
from its ``models/0/ckpt.pth``. Each test image's two raw maps (student vs teacher, student vs
autoencoder; :meth:`EfficientAd.raw_maps`) are normalised with the model's own quantiles of
held-out good images (as :meth:`forward` does) and scored three ways: the map's maximum (the
model's image score), the mean of its top 1 % of positions, and its mean. Also reported: each
image's student-teacher maximum on the training images, the held-out calibration images and the
good and defective test images (quartiles), to tell a student that memorised its training images
(low on seen, high on every unseen image) from good test images that carry something the training
set never showed (high on a few). Appends a section to benchmarks/results/efficientad_branches.md.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

RESULTS = Path(__file__).parent / "results"
SCORES = ("max", "top 1 %", "mean")


def image_scores(maps: torch.Tensor) -> dict[str, np.ndarray]:
    """``[N,1,h,w]`` maps -> the three image scores, each ``[N]``."""
    flat = maps.flatten(1)
    top = max(1, flat.shape[1] // 100)
    return {"max": flat.amax(1).numpy(), "top 1 %": flat.topk(top, dim=1).values.mean(1).numpy(),
            "mean": flat.mean(1).numpy()}


@torch.inference_mode()
def raw_maps(model, samples, batch: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Samples -> the two unnormalised maps ``[N,1,h,w]`` each."""
    st, ae = [], []
    for i in range(0, len(samples), batch):
        x = torch.cat([model.preprocess(s.path)[0] for s in samples[i:i + batch]])
        a, b = model.raw_maps(x)
        st.append(a.float())
        ae.append(b.float())
    return torch.cat(st), torch.cat(ae)


def quartiles(values: torch.Tensor) -> str:
    q = np.quantile(values.numpy(), [0.25, 0.5, 0.75, 1.0])
    return " / ".join(f"{v:.2f}" for v in q)


def analyse(run: Path, data_path: Path, category: str, seed: int) -> str:
    from defectscope.data import hold_out_validation, mvtec_split
    from defectscope.models import load_model
    from defectscope.models.efficientad import normalize_map

    model = load_model(run / "models" / "0" / "ckpt.pth").eval()
    split = mvtec_split(data_path, category)
    labels = np.array([s.label for s in split.test])
    st, ae = raw_maps(model, split.test)
    q = model.map_quantiles.float()
    maps = {"student-teacher": normalize_map(st, q[0], q[1]), "autoencoder": normalize_map(ae, q[2], q[3])}
    maps["mean of both (the model)"] = 0.5 * maps["student-teacher"] + 0.5 * maps["autoencoder"]
    lines = [f"### {category} (`{run}`)", "", "| map | " + " | ".join(f"image AUROC, {s}" for s in SCORES) + " |",
             "|---|" + "---|" * len(SCORES)]
    for name, m in maps.items():
        scores = image_scores(m)
        lines.append(f"| {name} | " + " | ".join(f"{roc_auc_score(labels, scores[s]):.3f}" for s in SCORES) + " |")
    # The same seeded split the engine made: the images the model trained on and those it
    # calibrated on (hold_out_validation depends only on the file names and the seed).
    trained, held_out, _ = hold_out_validation([s for s in split.train if s.label == 0], seed=seed)
    test_maxima = st.flatten(1).amax(1)  # the test images' maps are already computed above
    groups = {"training images the model saw": raw_maps(model, trained)[0].flatten(1).amax(1),
              "held-out good images (calibration)": raw_maps(model, held_out)[0].flatten(1).amax(1),
              "good test images": test_maxima[torch.from_numpy(labels == 0)],
              "defective test images": test_maxima[torch.from_numpy(labels == 1)]}
    lines += ["", "| images | n | student-teacher map maximum, raw: quartiles and largest |", "|---|---|---|"]
    for name, maxima in groups.items():
        lines.append(f"| {name} | {len(maxima)} | {quartiles(maxima)} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, action="append", required=True, help="run folder (repeatable)")
    parser.add_argument("--data-path", type=Path, action="append", required=True, help="mvtec root, one per --run")
    parser.add_argument("--category", action="append", required=True, help="category, one per --run")
    parser.add_argument("--seed", type=int, default=0, help="the run's --seed (it chose the held-out images)")
    parser.add_argument("--output", type=Path, default=RESULTS / "efficientad_branches.md")
    args = parser.parse_args()
    if not len(args.run) == len(args.data_path) == len(args.category):
        parser.error("give one --data-path and one --category per --run")
    torch.set_num_threads(1)
    start = time.time()
    sections = [analyse(r, d, c, args.seed) for r, d, c in zip(args.run, args.data_path, args.category)]
    text = "\n\n".join(sections) + f"\n\n({time.time() - start:.0f} s, {time.strftime('%Y-%m-%d')})\n"
    if not args.output.exists():
        args.output.write_text("# EfficientAD: which map finds the defects\n\nCommand: `python "
                               "benchmarks/efficientad_branches.py --run RUN --data-path ROOT --category NAME`.\n\n")
    with args.output.open("a") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
