"""Why labelled defects hardly help SuperSimpleNet on ELPV, measured on cached features.

Run by hand (not in CI):
    python benchmarks/labels_recipe.py --cells mono --counts 25 --seeds 0 --recipes base balanced ...

Features of the demo's extractor (EfficientNet-Lite0 blocks.2 + blocks.4, 256 px, 32x32 grid) are
computed once per cell type and kept in ``--cache`` (a temporary folder). Each recipe then trains the
heads the way the engine does (same hold-out of 20 % of the good cells, same batches, same loss),
with one change per recipe, and scores the test cells with every image score. Beside them: the
label-free nearest-neighbour floor, a logistic probe on pooled features trained on the labelled
cells, and the two fused by mean rank (the baselines named in issue 16). Appends JSON lines to
``benchmarks/results/labels_recipe_runs.jsonl``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from scipy.stats import rankdata
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

RESULTS = Path(__file__).parent / "results"
RUNS = RESULTS / "labels_recipe_runs.jsonl"


@torch.inference_mode()
def features(model, samples, batch: int = 32) -> torch.Tensor:
    out = []
    for i in range(0, len(samples), batch):
        x = torch.cat([model.preprocess(s.path)[0] for s in samples[i:i + batch]])
        out.append(model.extract_features(x).float())
    return torch.cat(out)


def cached(cell: str, cache: Path):
    """(train good [N,C,h,w] after the engine's hold-out, held-out good, labelled pool (50), test, test labels)."""
    path = cache / f"{cell}.pt"
    if path.exists():
        return torch.load(path, weights_only=True)
    from defectscope.data import elpv_split
    from defectscope.data.samples import hold_out_validation
    from defectscope.models import SuperSimpleNet

    model = SuperSimpleNet(backbone="efficientnet_lite0", upscale_factor=1).eval()
    split = elpv_split(cell, seed=0, train_defects=50)
    good = [s for s in split.train if s.label == 0]
    pool = [s for s in split.train if s.label == 1]
    train, held, _ = hold_out_validation(good, 0.2, seed=0)
    data = dict(train=features(model, train), held=features(model, held), pool=features(model, pool),
                test=features(model, split.test), labels=torch.tensor([s.label for s in split.test]))
    cache.mkdir(parents=True, exist_ok=True)
    torch.save(data, path)
    return data


def augment(feats: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random flips and 90-degree turns of each feature map (a solar cell looks the same turned)."""
    out = []
    for f in feats:
        k = int(torch.randint(4, (1,), generator=gen))
        f = torch.rot90(f, k, dims=(1, 2))
        if torch.rand(1, generator=gen) < 0.5:
            f = f.flip(2)
        out.append(f)
    return torch.stack(out)


def train(data, count: int, seed: int, recipe: dict):
    from defectscope.models import SuperSimpleNet

    torch.manual_seed(seed)
    model = SuperSimpleNet(backbone="efficientnet_lite0", upscale_factor=1, pretrained=False,
                           **recipe.get("model", {}))
    model.set_regime("weakly" if count else "unsupervised")
    if recipe.get("skip_classifier"):
        class WithoutClassifier(type(model)):
            trains_classifier = property(lambda self: False)

        model.__class__ = WithoutClassifier
        model._sync_classifier_trainable()
    good, pool = data["train"], data["pool"][:count]
    epochs, batch = recipe.get("epochs", 3), 8
    per_batch = recipe.get("defects_per_batch", 0) if count else 0
    aug = recipe.get("augment", False)
    model.fit_feature_statistics(good if recipe.get("stats_on_good", True) else torch.cat([good, pool]))
    optimizer, scheduler = model.configure_optimizers(epochs)
    model.train()
    gen = torch.Generator().manual_seed(seed)
    if per_batch:
        n_good = len(good)
    else:
        everything = torch.cat([good, pool])
        labels_all = torch.cat([torch.zeros(len(good)), torch.ones(len(pool))])
    steps = 0
    for epoch in range(epochs):
        if per_batch:
            order = torch.randperm(n_good, generator=torch.Generator().manual_seed(seed * 100003 + epoch))
            good_per = batch - per_batch
            for start in range(0, n_good, good_per):
                idx = order[start:start + good_per]
                if len(idx) < 2:
                    continue
                d = torch.randint(len(pool), (per_batch,), generator=gen)
                dfe = pool[d]
                if aug:
                    dfe = augment(dfe, gen)
                feats = torch.cat([good[idx], dfe])
                labels = torch.cat([torch.zeros(len(idx)), torch.ones(per_batch)])
                known = labels == 0
                loss = model.training_step(feats, None, labels, known)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                steps += 1
        else:
            n = len(everything)
            order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100003 + epoch))
            for start in range(0, n, batch):
                idx = order[start:start + batch]
                if len(idx) < 2:
                    continue
                feats = everything[idx]
                labels = labels_all[idx]
                if aug and labels.any():
                    feats = feats.clone()
                    feats[labels == 1] = augment(feats[labels == 1], gen)
                known = labels == 0
                if labels.any():
                    loss = model.training_step(feats, None, labels, known)
                else:
                    loss = model.training_step(feats, None, labels if count else None, known if count else None)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                steps += 1
        scheduler.step()
    model.eval()
    return model, steps


@torch.inference_mode()
def raw_scores(model, feats: torch.Tensor) -> dict:
    """Classifier logit and map-maximum logit per image (both heads run)."""
    out = {"classifier": [], "map_max": [], "map_top1": []}
    kind = model.image_score
    for i in range(0, len(feats), 64):
        f = feats[i:i + 64]
        model.image_score = "map_max"
        maps, s_map = model.forward_features(f, (256, 256))
        out["map_max"].append(s_map)
        flat = maps.flatten(1)
        out["map_top1"].append(flat.topk(max(1, flat.shape[1] // 100), dim=1).values.mean(dim=1))
        if not model.classifier_skipped:
            model.image_score = "classifier"
            _, s_cls = model.forward_features(f, (256, 256))
            out["classifier"].append(s_cls)
    model.image_score = kind
    return {k: torch.cat(v).numpy() for k, v in out.items() if v}


def _pooled(model, features: torch.Tensor) -> np.ndarray:
    """Mean- and max-pooled features standardised by the model's own standardiser, [N, 2C]."""
    f = model._standardize(features).float()
    return torch.cat([f.mean(dim=(2, 3)), f.amax(dim=(2, 3))], 1).detach().numpy()


def probe_scores(model, data, count: int) -> tuple[np.ndarray, np.ndarray] | None:
    """A logistic probe on mean- and max-pooled standardised features (the model's own
    standardiser), fitted on the training good cells and the labelled ones; (test, held-out) scores."""
    if not count:
        return None

    x = np.concatenate([_pooled(model, data["train"]), _pooled(model, data["pool"][:count])])
    y = np.r_[np.zeros(len(data["train"])), np.ones(count)]
    probe = LogisticRegression(C=0.1, max_iter=5000).fit(x, y)
    return probe.decision_function(_pooled(model, data["test"])), probe.decision_function(_pooled(model, data["held"]))


@torch.inference_mode()
def head_pooled(model, feats: torch.Tensor) -> np.ndarray:
    """The classification head's pooled vector (conv max/mean, map max/mean) before its last layer."""
    out = []
    for i in range(0, len(feats), 64):
        f = model._standardize(feats[i:i + 64])
        adapted = model.adaptor(f)
        seg = model.segdec
        ano = seg.segment(adapted)
        conv = seg.cls_conv(torch.cat((adapted if model.adapt_cls_features else f, ano), dim=1))
        out.append(torch.cat((conv.amax(dim=(2, 3)), conv.mean(dim=(2, 3)), ano.amax(dim=(2, 3)), ano.mean(dim=(2, 3))), 1))
    return torch.cat(out).float().numpy()


def head_probe_scores(model, data, count: int):
    """Refit the classification head's last layer by logistic regression on the real labels."""
    if not count or model.classifier_skipped:
        return None
    from sklearn.preprocessing import StandardScaler

    x = np.concatenate([head_pooled(model, data["train"]), head_pooled(model, data["pool"][:count])])
    y = np.r_[np.zeros(len(data["train"])), np.ones(count)]
    scaler = StandardScaler().fit(x[y == 0])
    probe = LogisticRegression(max_iter=5000).fit(scaler.transform(x), y)
    return (probe.decision_function(scaler.transform(head_pooled(model, data["test"]))),
            probe.decision_function(scaler.transform(head_pooled(model, data["held"]))))


def probe_cv(model, data, count: int, folds: int = 5) -> np.ndarray:
    """Each labelled defect scored by a probe fitted without it (k folds over the defects; all
    good cells in every fit): an honest estimate of how far the probe puts unseen defects."""
    good, defects = _pooled(model, data["train"]), _pooled(model, data["pool"][:count])
    out = np.zeros(count)
    for k in range(min(folds, count)):
        test = np.arange(count) % min(folds, count) == k
        x = np.concatenate([good, defects[~test]])
        y = np.r_[np.zeros(len(good)), np.ones((~test).sum())]
        out[test] = LogisticRegression(C=0.1, max_iter=5000).fit(x, y).decision_function(defects[test])
    return out


def fused(test: dict, held: dict) -> dict:
    """Image scores from the two heads: each alone, the mean of probabilities (today's 'mean'), and
    the mean of z-scores against the held-out good cells (no test data used)."""
    out = {k: v for k, v in test.items()}
    if "classifier" in test:
        sig = lambda x: 1 / (1 + np.exp(-x))  # noqa: E731
        out["mean"] = 0.5 * (sig(test["classifier"]) + sig(test["map_max"]))
        z = lambda k: (test[k] - held[k].mean()) / (held[k].std() + 1e-6)  # noqa: E731
        out["zmean"] = 0.5 * (z("classifier") + z("map_max"))
        if "probe" in test:
            out["z_map_probe"] = 0.5 * (z("probe") + z("map_max"))
            out["z_all"] = (z("probe") + z("map_max") + z("classifier")) / 3
        if "head_probe" in test:
            out["z_map_headprobe"] = 0.5 * (z("head_probe") + z("map_max"))
    return out


def baselines(data, count: int, keep_scores: bool = False, nn: np.ndarray | None = None) -> dict:
    """NN floor, logistic probe on pooled standardised features, and their mean-rank fusion
    (``nn``: the floor's test scores when already computed; they do not depend on ``count``)."""
    good = data["train"]
    c = good.shape[1]
    test = data["test"]
    if nn is None:
        bank = good.permute(0, 2, 3, 1).reshape(-1, c)
        bank = bank[torch.randperm(len(bank), generator=torch.Generator().manual_seed(0))[:20000]]
        nn = np.array([torch.cdist(t.permute(1, 2, 0).reshape(-1, c), bank).amin(1).amax().item() for t in test])
    nn = np.asarray(nn)
    labels = data["labels"].numpy()
    out = {"nn": roc_auc_score(labels, nn)}
    if count:
        mean, std = good.mean(dim=(0, 2, 3)), good.std(dim=(0, 2, 3)) + 1e-6

        def pooled(f):
            f = (f - mean[None, :, None, None]) / std[None, :, None, None]
            return torch.cat([f.mean(dim=(2, 3)), f.amax(dim=(2, 3))], 1).numpy()

        x = np.concatenate([pooled(good), pooled(data["pool"][:count])])
        y = np.r_[np.zeros(len(good)), np.ones(count)]
        probe = LogisticRegression(max_iter=2000).fit(x, y).decision_function(pooled(test))
        out["probe"] = roc_auc_score(labels, probe)
        out["fused"] = roc_auc_score(labels, (rankdata(nn) + rankdata(probe)) / 2)
        if keep_scores:
            out["scores_fused"] = ((rankdata(nn) + rankdata(probe)) / 2).tolist()
    if keep_scores:
        out["scores_nn"] = nn.tolist()
        out["labels"] = labels.tolist()
    return out


RECIPES = {
    "base": {},
    "balanced2": {"defects_per_batch": 2},
    "balanced2_aug": {"defects_per_batch": 2, "augment": True},
    "aug": {"augment": True},
    "e10": {"epochs": 10},
    "noclf": {"skip_classifier": True},
    "noclf_e10": {"skip_classifier": True, "epochs": 10},
    "balanced2_aug_e10": {"defects_per_batch": 2, "augment": True, "epochs": 10},
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cells", nargs="+", default=["mono"])
    ap.add_argument("--counts", type=int, nargs="+", default=[25])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--recipes", nargs="*", default=["base"])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--cache", default="/tmp/labels_recipe")
    ap.add_argument("--baselines", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    for cell in args.cells:
        data = cached(cell, Path(args.cache))
        labels = data["labels"].numpy()
        for count in args.counts:
            if args.baselines:
                row = dict(cell=cell, count=count, kind="baselines", **baselines(data, count))
                print(json.dumps(row), flush=True)
                with open(RUNS, "a") as fh:
                    fh.write(json.dumps(row) + "\n")
            for name in args.recipes:
                for seed in args.seeds:
                    started = time.time()
                    model, steps = train(data, count, seed, RECIPES[name])
                    took = time.time() - started
                    test_raw, held_raw = raw_scores(model, data["test"]), raw_scores(model, data["held"])
                    probe = probe_scores(model, data, count)
                    if probe is not None:
                        test_raw["probe"], held_raw["probe"] = probe
                    head = head_probe_scores(model, data, count)
                    if head is not None:
                        test_raw["head_probe"], held_raw["head_probe"] = head
                    scores = fused(test_raw, held_raw)
                    if count:  # every component, for trying fusions after the fact
                        dump = Path(args.cache) / "scores"
                        dump.mkdir(parents=True, exist_ok=True)
                        train_raw = raw_scores(model, data["pool"][:count])
                        np.savez(dump / f"{cell}_{count}_{seed}_{name}.npz", labels=labels,
                                 **{f"test_{k}": v for k, v in test_raw.items()},
                                 **{f"held_{k}": v for k, v in held_raw.items()},
                                 **{f"defects_{k}": v for k, v in train_raw.items()},
                                 defects_probe_cv=probe_cv(model, data, count))
                    row = dict(cell=cell, count=count, seed=seed, recipe=name, steps=steps, seconds=round(took, 1),
                               **{k: round(float(roc_auc_score(labels, v)), 4) for k, v in scores.items()})
                    print(json.dumps(row), flush=True)
                    with open(RUNS, "a") as fh:
                        fh.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
