"""Fit, test and predict on Lightning Fabric: one code path for CPU, one GPU or many (DDP).

Run folder (as in SimpleNet's reference)::

    <results_path>/<project>/<group>/<run_name>/
        models/0/ckpt.pth      trained weights (no frozen backbone)
        models/0/params.json   everything needed to rebuild the model (plain JSON)
        models/0/last.ckpt     resumable training state, rewritten atomically every epoch
        tensorboard/           loss and learning-rate curves
        results.csv            one row per category (+ mean), image/pixel metrics
        images/<category>/     heat-map overlays of the test images
"""

from __future__ import annotations

import csv
import math
import random
import time
from collections.abc import Callable
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader

from defectscope.data import AnomalyDataset, DataError, Sample, describe_regime, hold_out_validation, resolve_regime
from defectscope.data.tiling import Tiler
from defectscope.engine.feature_cache import extract_features
from defectscope.engine.progress import progress_bar
from defectscope.engine.visualize import save_overlay
from defectscope.metrics import PixelMetrics, compute_metrics
from defectscope.metrics.threshold import THRESHOLD_RULES, fit_threshold, verdict_rates
from defectscope.models.base import atomic_save
from defectscope.models.model_files import ModelFileError, load_tensors

RESULT_COLUMNS = ["data", "category", "image_auroc", "pixel_auroc", "aupro", "image_f1_max", "threshold",
                  "false_reject_rate", "escape_rate", "n_good", "n_defect", "n_test"]

# Which epoch's weights a model with a validation loss keeps (Engine.select_epoch).
SELECT_EPOCH = ("validation", "last")
# How often, about, the validation loss is measured in a training (and at its last epoch). Why
# not every epoch: a small training set has hundreds of short epochs (STFPM: 300 on 40 images).
VALIDATION_CHECKS = 20


class Engine:
    """Training / evaluation loop around a model.

    The engine knows no model by name. A model brings its own step and needs:

    - ``extract_features(images)``: the frozen part, cached once per image (``feature_params()``
      keys the cache, ``fit_feature_statistics(features)`` sees all of it before training);
    - ``training_step(features, masks, labels[, mask_known])``, or with
      ``train_on_images_and_features = True`` ``training_step_images(images, features)`` (a
      student that sees the images beside a cached frozen teacher), or, when its images are
      augmented or its backbone trains, ``training_step_images(images)``;
    - ``configure_optimizers(max_epochs)`` -> (optimizer, scheduler), stepped once an epoch, or
      with ``scheduler_interval = "step"`` ``configure_optimizers(max_epochs, steps_per_epoch=S)``
      stepped after every optimizer step;
    - ``min_batch_size`` (default 2, batch norm) and ``max_batch_size`` (default none): other batch
      sizes are refused with ``batch_size_reason``, never changed silently;
    - optionally ``calibrate(batches)``: after training, the held-out good images (normalised
      batches on the device), e.g. to normalise maps; then the verdict threshold is set;
    - optionally ``set_regime(regime)`` for labelled defects, ``grad_clip``;
    - optionally ``validation_loss(images)``: normalised held-out good images ``[B,3,H,W]`` ->
      each one's loss ``[B]`` as training measures it, without augmentation; then the engine
      keeps the weights of the epoch where it was lowest (``select_epoch``).

    Args:
        results_path, project, group, run_name: the run folder (``run_name`` None: a timestamp).
        max_epochs: training epochs.
        batch_size: images per optimisation step (per device).
        seed: seeds Python, NumPy and torch; the same seed gives the same model on CPU.
        accelerator, devices, strategy, precision, num_nodes: passed to ``lightning.Fabric``.
        num_workers: data-loading processes.
        progress: show progress bars.
        cache_memory_gb: frozen features are kept in memory up to this size, else memory-mapped
            under the run folder.
        cache_features: False recomputes the frozen backbone's features from the images every
            step instead of reading the cache (slower, same model: it is how the cache is checked).
        cache_float16_above_gb: caches larger than this (as float32) are stored as float16,
            halving their memory (features rounded to float16).
        resume: continue from ``models/0/last.ckpt`` when the run folder has one.
        compile_heads: ``torch.compile`` the trainable modules (not the frozen backbone) before
            training. Same results within float round-off. On CPU it gains nothing for
            SuperSimpleNet since its fused map head (models/fused_head.py), which runs eagerly
            either way: 0.99-1.02x per step on 2 idle cores (benchmarks/results/compile_idle.md;
            1.12-1.13x before the fused head). Needs a C++ compiler on CPU.
        on_epoch_end: optional ``callback(epoch, loss)`` after each epoch's checkpoint.
        val_fraction: share of the good training images held out (seeded by ``seed``) to set
            the verdict threshold on; they are not trained on. 0: no hold-out (the threshold is
            then set on the training images, which is optimistic, with a notice).
        threshold_rule: ``false_reject`` (default: at most ``max_false_reject`` of good images
            rejected, see defectscope.metrics.threshold) or ``f1`` (best F1 on held-out labelled
            defects; a share of the labelled defects is then held out too).
        max_false_reject: the false-reject rate the threshold is set for (``false_reject`` rule).
        data_info: what the training data was (data-set settings, category); recorded with
            the model so that ``test`` can rebuild the same split.
        defects_per_batch: when the training set has labelled defective images, every batch
            holds this many of them (drawn in turn from a seeded shuffle, so each is seen equally
            often) beside ``batch_size`` minus that many good images; an epoch is one pass over
            the good images. A few labelled defects among hundreds of good images are otherwise
            ~5 % of an epoch: ELPV mono, 25 labelled cells, 3 epochs, SuperSimpleNet's classifier
            0.907 and its mean score 0.942 by plain shuffling against 0.921 and 0.950 with 2 per
            batch of 8 (benchmarks/results/labels_recipe.md). Only defects whose labels reach the
            loss get the share: those with masks, and image-labelled ones when the model says
            ``learns_from_image_labels`` (default True); the others are shuffled in with the good
            images. None: a quarter of the batch (at least 1); 0: plain shuffling of all images.
        select_epoch: ``"validation"`` (default): for a model with ``validation_loss``, that loss
            on the held-out good images is measured about :data:`VALIDATION_CHECKS` times in
            training and the weights of the check where it was lowest are kept (recorded in
            ``model.training_info``); ``"last"``: the last epoch's weights. Models without
            ``validation_loss`` (their loss is not a measure of good images, e.g. trained on
            synthetic defects) always keep the last epoch.
    """

    def __init__(
        self,
        results_path: str | Path = "results",
        project: str = "project",
        group: str = "group",
        run_name: str | None = None,
        max_epochs: int = 300,
        batch_size: int = 32,
        seed: int = 0,
        accelerator: str = "auto",
        devices: int | str = 1,
        strategy: str = "auto",
        precision: str = "32-true",
        num_nodes: int = 1,
        num_workers: int = 0,
        progress: bool = True,
        cache_memory_gb: float = 4.0,
        cache_features: bool = True,
        cache_float16_above_gb: float = 1.0,
        resume: bool = True,
        on_epoch_end: Callable[[int, float], None] | None = None,
        compile_heads: bool = False,
        val_fraction: float = 0.2,
        threshold_rule: str = "false_reject",
        max_false_reject: float = 0.01,
        data_info: dict | None = None,
        tiler: Tiler | None = None,
        image_rois=None,
        defects_per_batch: int | None = None,
        select_epoch: str = "validation",
    ) -> None:
        """``tiler`` (:class:`defectscope.data.tiling.Tiler`): train on the tiles of large images
        and score them tiled (a model trained so keeps its tiling and is scored tiled anyway).
        ``image_rois`` (:class:`defectscope.data.roi.RoiSet`): per-image regions of interest
        applied to maps and scores after the forward in ``test``; the data set's ROI lives in
        the model (``model.set_roi``)."""
        if max_epochs < 1:
            raise ValueError(f"max_epochs must be >= 1, got {max_epochs}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        if threshold_rule not in THRESHOLD_RULES:
            raise ValueError(f"threshold_rule must be one of {', '.join(THRESHOLD_RULES)}, got {threshold_rule!r}")
        if not (isinstance(max_false_reject, (int, float)) and 0.0 < max_false_reject < 1.0):
            raise ValueError(f"max_false_reject must be a rate in (0, 1), e.g. 0.01, got {max_false_reject!r}")
        if not (isinstance(val_fraction, (int, float)) and 0.0 <= val_fraction < 1.0):
            raise ValueError(f"val_fraction must be in [0, 1), e.g. 0.2, got {val_fraction!r}")
        if select_epoch not in SELECT_EPOCH:
            raise ValueError(f"select_epoch must be one of {', '.join(SELECT_EPOCH)}, got {select_epoch!r}")
        if defects_per_batch is not None and (isinstance(defects_per_batch, bool) or not isinstance(defects_per_batch, int)
                                              or not 0 <= defects_per_batch < batch_size):
            raise ValueError(f"defects_per_batch must be an integer from 0 to batch_size - 1 ({batch_size - 1}), "
                             f"got {defects_per_batch!r}")
        self.defects_per_batch = (max(1, batch_size // 4) if batch_size > 1 else 0) if defects_per_batch is None \
            else defects_per_batch
        self.val_fraction = float(val_fraction)
        self.select_epoch = select_epoch
        self.threshold_rule = threshold_rule
        self.max_false_reject = float(max_false_reject)
        self.data_info = dict(data_info or {})
        self.run_dir = Path(results_path) / project / group / (run_name or time.strftime("%Y%m%d-%H%M%S"))
        self.max_epochs = max_epochs
        self.batch_size = batch_size
        self.seed = seed
        self.num_workers = num_workers
        self.progress = progress
        self.cache_memory_gb = cache_memory_gb
        self.cache_features = cache_features
        self.cache_float16_above_gb = cache_float16_above_gb
        self.resume = resume
        self.on_epoch_end = on_epoch_end
        self.compile_heads = compile_heads
        self.tiler = tiler
        self.image_rois = image_rois
        self.fabric = L.Fabric(
            accelerator=accelerator, devices=devices, strategy=strategy, precision=precision, num_nodes=num_nodes
        )
        self._launched = False
        # models/<model_index>: one model per category in a multi-category run.
        self.model_index = 0
        # The supervision regime of the last fit (see fit()).
        self.regime: str | None = None

    @property
    def model_dir(self) -> Path:
        return self.run_dir / "models" / str(self.model_index)

    def _launch(self) -> None:
        if not self._launched:
            self.fabric.launch()
            self._launched = True

    def _print(self, message: str) -> None:
        if self.fabric.is_global_zero:
            print(message, flush=True)

    # ---- fit --------------------------------------------------------------------------
    def fit(self, model, samples: list[Sample], regime: str = "auto"):
        """Train ``model`` on ``samples``: good images, plus labelled defects for the supervised
        regimes. ``regime`` (``auto``, ``unsupervised``, ``weakly``, ``mixed``, ``supervised``):
        ``auto`` follows the data (defects with masks: supervised; with image labels only:
        weakly; both: mixed; none: unsupervised); a request the data cannot meet is adjusted
        with a notice (see :func:`defectscope.data.resolve_regime`). The regime that ran is
        printed and stored in ``self.regime``. A seeded share of the good images (``val_fraction``)
        is held out of training and scored after it to set the verdict threshold
        (``threshold_rule``); the model records the threshold, its rule and data. Writes the run
        folder's model files; returns the model in eval mode."""
        self._launch()
        fabric = self.fabric
        fabric.seed_everything(self.seed, verbose=False)
        samples, regime, notices = resolve_regime(list(samples), regime)
        if regime != "unsupervised" and not hasattr(model, "set_regime"):
            raise DataError(
                f"The training set has labelled defective images but {model.name} trains on good images only. "
                "Fix: train on good images only (regime 'unsupervised'), or use supersimplenet."
            )
        if hasattr(model, "set_regime"):
            model.set_regime(regime)
        self.regime = regime
        for notice in notices:
            self._print(f"notice: {notice}")
        min_batch = int(getattr(model, "min_batch_size", 2))
        max_batch = getattr(model, "max_batch_size", None)
        if self.batch_size < min_batch or (max_batch is not None and self.batch_size > max_batch):
            allowed = f"exactly {min_batch}" if max_batch == min_batch else (
                f"{min_batch} to {max_batch}" if max_batch else f"at least {min_batch}")
            why = getattr(model, "batch_size_reason", "")
            raise DataError(
                f"{model.name} trains at batch size {allowed}{f' ({why})' if why else ''}; got {self.batch_size}. "
                f"Fix: --batch-size {min_batch if max_batch == min_batch else max(min_batch, 2)}."
            )
        AnomalyDataset(samples, image_size=model.image_size, mean=model.mean, std=model.std).validate()
        samples, validation, val_notes = hold_out_validation(
            samples, self.val_fraction, seed=self.seed, hold_out_defects=self.threshold_rule == "f1"
        )
        for notice in val_notes:
            self._print(f"notice: {notice}")
        if self.threshold_rule == "f1" and not any(s.label == 1 for s in validation):
            raise DataError(
                "--threshold-rule f1 needs held-out labelled defects, and there are none to hold out (it needs at "
                "least 2 labelled defective training images). Fix: add labelled defects, or use the false-reject "
                "rule (--threshold-rule false_reject --max-false-reject 0.01)."
            )
        if len(samples) < 2:
            raise DataError(f"Only {len(samples)} training image(s) left; training needs at least 2. Fix: add good images.")
        self._print(describe_regime(samples, regime)
                    + (f"; {len(validation)} held out to set the threshold" if validation else ""))
        tiler = self.tiler  # --tile: train on the tiles of large images (data/tiling.py)
        if tiler is not None:
            model.tiling_info = tiler.info()
        dataset = AnomalyDataset(samples if tiler is None else tiler.training_tiles(samples, model.image_size),
                                 image_size=model.image_size, mean=model.mean, std=model.std)
        labels = torch.tensor([s.label for s in dataset.samples], dtype=torch.float32)
        # Good images have a known (empty) mask; defects only when a mask file exists.
        mask_known = torch.tensor([s.label == 0 or s.mask_path is not None for s in dataset.samples])
        model.to(fabric.device)
        # Under DDP each process runs the backbone on its share of the images; all get every feature.
        features = extract_features(
            model,
            dataset,
            fabric,
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            max_memory_gb=self.cache_memory_gb,
            cache_dir=self.run_dir / "cache",
            float16_above_gb=self.cache_float16_above_gb,
            progress=self.progress and fabric.is_global_zero,
        )
        # Ground-truth masks (image size; zeros for good images and weak labels) for supervised training.
        masks = None
        if labels.any():
            masks = torch.zeros(len(dataset), 1, *dataset.image_size, dtype=torch.bool)
            for i, sample in enumerate(dataset.samples):
                if sample.label == 1 and sample.mask_path is not None:
                    masks[i] = dataset[i]["mask"].bool()
        weak = not bool(mask_known.all())
        # Labelled defects get a share of every batch when their labels reach the loss: with masks
        # always, with image labels only when the model learns from those (learns_from_image_labels).
        balanced = mask_known | bool(getattr(model, "learns_from_image_labels", True))
        # A model may step its learning-rate schedule after every optimizer step instead of every
        # epoch (scheduler_interval = "step"); it is then told how many steps an epoch has.
        per_step = getattr(model, "scheduler_interval", "epoch") == "step"
        if per_step:
            steps_per_epoch = sum(len(idx) >= min_batch for idx in self._epoch_batches(
                labels, 0, fabric.global_rank, fabric.world_size, balanced))
            optimizer, scheduler = model.configure_optimizers(self.max_epochs, steps_per_epoch=steps_per_epoch)
        else:
            optimizer, scheduler = model.configure_optimizers(self.max_epochs)
        state_path = self.model_dir / "last.ckpt"
        start_epoch = 0
        # Keeping the epoch with the lowest held-out loss (select_epoch): the held-out good images.
        selection = _EpochSelection(self, model, validation)
        if self.resume and state_path.is_file():
            start_epoch = self._load_training_state(state_path, model, optimizer, scheduler, selection)
            self._print(f"Resuming {self.run_dir} from epoch {start_epoch}/{self.max_epochs}")
        else:
            model.fit_feature_statistics(features)
        model.train()
        if self.compile_heads:
            compiled = _compile_trainable_modules(model)
            self._print(f"torch.compile: {', '.join(compiled)} (compiled at the first step)")
        fmodel, optimizer = fabric.setup(model, optimizer)
        if hasattr(model, "training_step"):
            fmodel.mark_forward_method("training_step")
        # Models whose trainable part sees the images while their frozen part's output comes from
        # the cache (a student beside a frozen teacher): training_step_images(images, features).
        with_features = bool(getattr(model, "train_on_images_and_features", False))
        on_images = "" if with_features else _trains_on_images(model)
        if with_features:
            fmodel.mark_forward_method("training_step_images")
        if on_images:
            fmodel.mark_forward_method("training_step_images")
            self._print(f"{model.name}: {on_images}, so backbone features are computed from the images "
                        "every step (the feature cache only fitted the statistics)")
        writer = self._tensorboard()
        n = len(features)
        rank, world = fabric.global_rank, fabric.world_size
        steps = 0
        with progress_bar(
            f"Training {model.name}", total=self.max_epochs - start_epoch, enabled=self.progress and fabric.is_global_zero
        ) as advance:
            for epoch in range(start_epoch, self.max_epochs):
                total, batches = 0.0, 0
                for idx in self._epoch_batches(labels, epoch, rank, world, balanced):
                    if len(idx) < min_batch:  # e.g. batch norm cannot train on one sample
                        continue
                    images = None
                    if on_images or with_features or not self.cache_features:
                        images = torch.stack([dataset[int(i)]["image"] for i in idx]).to(fabric.device)
                    if with_features:
                        feats = (features[idx].to(fabric.device, torch.float32, non_blocking=True)
                                 if self.cache_features else model.extract_features(images))
                        loss = fmodel.training_step_images(images, feats)
                    elif on_images:
                        loss = fmodel.training_step_images(images)
                    else:
                        if images is None:
                            feats = features[idx].to(fabric.device, torch.float32, non_blocking=True)
                        else:
                            feats = model.extract_features(images)
                        batch_masks = None if masks is None else masks[idx].to(fabric.device, torch.float32)
                        batch_labels = labels[idx].to(fabric.device) if labels.any() else None
                        if weak:
                            loss = fmodel.training_step(feats, batch_masks, batch_labels, mask_known[idx])
                        else:
                            loss = fmodel.training_step(feats, batch_masks, batch_labels)
                    optimizer.zero_grad(set_to_none=True)
                    fabric.backward(loss)
                    if getattr(model, "grad_clip", None):
                        fabric.clip_gradients(fmodel, optimizer, max_norm=model.grad_clip)
                    optimizer.step()
                    if per_step:
                        scheduler.step()
                    total += loss.item()
                    batches += 1
                    steps += 1
                if not per_step:
                    scheduler.step()
                mean_loss = total / max(batches, 1)
                if writer is not None:
                    writer.add_scalar("train/loss", mean_loss, epoch)
                    writer.add_scalar("train/lr", optimizer.param_groups[-1]["lr"], epoch)
                if selection.due(epoch):
                    val_loss = selection.check(epoch)
                    if writer is not None:
                        writer.add_scalar("val/loss", val_loss, epoch)
                self._save_training_state(state_path, model, optimizer, scheduler, epoch + 1, selection)
                advance(1, epoch=epoch + 1, loss=mean_loss)
                if self.on_epoch_end is not None:
                    self.on_epoch_end(epoch, mean_loss)
        if writer is not None:
            writer.close()
        kept = selection.restore_best()
        if kept:
            self._print(kept)
        if world > 1:
            # DDP keeps weights in sync but each process updates its own batch-norm statistics
            # in the last step: take rank 0's everywhere, so every process scores the same model.
            state = fabric.broadcast({k: v.cpu() for k, v in model.trained_state_dict().items()}, src=0)
            model.load_state_dict(state, strict=False)
        model.eval()
        if hasattr(model, "fit_on_training_features"):
            # Closed-form parts fitted on the training features once the optimizer is done (e.g.
            # SuperSimpleNet's label probe); every process has all features, so all fit the same.
            model.fit_on_training_features(features, labels)
        self._set_threshold(model, validation or samples, held_out=bool(validation))
        model.training_info = {"epochs": self.max_epochs, "seed": self.seed, "train_size": n, "regime": regime,
                               "batch_size": self.batch_size, "val_fraction": self.val_fraction,
                               **selection.record()}
        model.data_info = {**self.data_info, "train_images": [str(s.path) for s in samples],
                           "validation_images": [str(s.path) for s in validation]}
        if fabric.is_global_zero:
            model.save(self.model_dir)
        fabric.barrier()
        return model

    def _epoch_batches(self, labels: torch.Tensor, epoch: int, rank: int = 0, world: int = 1,
                       balanced: torch.Tensor | None = None) -> list[torch.Tensor]:
        """This process's batches (dataset indices) for ``epoch``. The order depends only on
        (seed, epoch), so a resumed run sees the same batches, and every process takes the same
        number of steps (DDP syncs gradients each step). With labelled defects and
        ``defects_per_batch`` > 0, each batch is that many defects (drawn in turn from a
        seeded shuffle of them) and good images for the rest; an epoch is one pass over the good
        images. ``balanced`` ([N] bool, default: every labelled defect) marks the defects that get
        the share; the others are shuffled in with the good images."""
        generator = torch.Generator().manual_seed(self.seed * 100003 + epoch)
        chosen = labels > 0 if balanced is None else (labels > 0) & balanced
        defects = chosen.nonzero().squeeze(1)
        share = self.defects_per_batch if len(defects) else 0
        if not share or len(defects) == len(labels):
            order = torch.randperm(len(labels), generator=generator)
            order = order[: len(order) // world * world][rank::world]
            return [order[start : start + self.batch_size] for start in range(0, len(order), self.batch_size)]
        good = (~chosen).nonzero().squeeze(1)
        good = good[torch.randperm(len(good), generator=generator)]
        good = good[: len(good) // world * world][rank::world]
        per_good = self.batch_size - share
        steps = -(-len(good) // per_good)
        # Each process draws its own defects from one shuffled cycle (offset by rank), so the
        # processes see different defects in the same step.
        cycle = torch.cat([defects[torch.randperm(len(defects), generator=generator)]
                           for _ in range(-(-steps * share * world // len(defects)))])
        batches = []
        for step in range(steps):
            start = (step * world + rank) * share
            batches.append(torch.cat([good[step * per_good : (step + 1) * per_good], cycle[start : start + share]]))
        return batches

    @torch.inference_mode()
    def _calibrate(self, model, samples: list[Sample]) -> tuple[np.ndarray, np.ndarray] | None:
        """Hand the model's ``calibrate`` the held-out good images of ``samples`` (normalised
        batches on the device), e.g. for EfficientAD's map normalisation; never test images.

        A model whose ``calibrate`` returns the calibrated scores and map maxima of the images
        it was given saves the engine a second scoring pass over them; returns those, or None."""
        good = [s for s in samples if s.label == 0]
        dataset = AnomalyDataset(good, image_size=model.image_size, mean=model.mean, std=model.std)
        loader = DataLoader(dataset, batch_size=max(self.batch_size, 8), num_workers=self.num_workers)
        result = model.calibrate(batch["image"].to(self.fabric.device) for batch in loader)
        if result is None:
            return None
        scores, map_max = (torch.as_tensor(r).float().cpu().numpy() for r in result)
        if len(scores) != len(good) or len(map_max) != len(good):
            raise RuntimeError(f"{type(model).__name__}.calibrate returned {len(scores)} scores and "
                               f"{len(map_max)} map maxima for {len(good)} images")
        return scores, map_max

    @torch.inference_mode()
    def _set_threshold(self, model, samples: list[Sample], held_out: bool) -> None:
        """Calibrate the model (when it has ``calibrate``), score ``samples`` and set
        ``model.threshold`` and ``model.pixel_threshold`` by the engine's rule; record how.

        The held-out images are scored once: by the model's ``calibrate`` when it returns
        its scores, else here (a model that calibrates but returns nothing is scored again)."""
        calibrated = self._calibrate(model, samples) if hasattr(model, "calibrate") else None
        rest = [s for s in samples if s.label != 0] if calibrated is not None else samples
        labels, scores, map_max = np.zeros(0, np.int64), np.zeros(0, np.float32), np.zeros(0, np.float32)
        if calibrated is not None:
            labels = np.zeros(len(calibrated[0]), np.int64)
            scores, map_max = calibrated
        if rest:
            dataset = AnomalyDataset(rest, image_size=model.image_size, mean=model.mean, std=model.std)
            more_scores, more_labels, maps = self._score(model, dataset, description="Setting the threshold")
            labels = np.concatenate([labels, more_labels])
            scores = np.concatenate([scores, more_scores])
            map_max = np.concatenate([map_max, maps.float().amax(dim=(1, 2)).numpy()])
        source = "held-out training images" if held_out else "training images (in-sample: none held out)"
        info = self._apply_threshold(model, labels, scores, source, map_max=map_max,
                                     seed=self.seed, val_fraction=self.val_fraction)
        self._print(describe_threshold(info))
        for note in info["notes"]:
            self._print(f"notice: {note}")

    def _apply_threshold(self, model, labels, scores, source: str, map_max=None, **record) -> dict:
        """Set ``model.threshold`` from ``scores`` by the engine's rule and record how (with
        ``source`` and ``record``) in ``model.threshold_info``; returns that record.

        With ``map_max`` (each image's largest map value) the same rule on those sets
        ``model.pixel_threshold``: the map level that marks defect regions (good images' maps
        stay under it at the rate asked)."""
        info = fit_threshold(labels, scores, rule=self.threshold_rule, max_false_reject=self.max_false_reject)
        info.update(source=source, **record)
        model.threshold.fill_(info["threshold"])
        model.threshold_info = info
        if map_max is not None:
            pixel = fit_threshold(labels, map_max, rule=self.threshold_rule, max_false_reject=self.max_false_reject)
            model.pixel_threshold = float(pixel["threshold"])
            model.pixel_threshold_info = {"rule": pixel["rule"], "source": f"largest map value of {source}",
                                          **{k: pixel[k] for k in ("n_good", "n_defect") if k in pixel}}
        return info

    def _tensorboard(self):
        if not self.fabric.is_global_zero:
            return None
        from torch.utils.tensorboard import SummaryWriter

        return SummaryWriter(log_dir=str(self.run_dir / "tensorboard"))

    def _save_training_state(self, path: Path, model, optimizer, scheduler, epoch: int,
                             selection: _EpochSelection | None = None) -> None:
        if not self.fabric.is_global_zero:
            return
        atomic_save(
            {
                "epoch": epoch,
                "max_epochs": self.max_epochs,
                "params": model.params(),
                "model": model.trained_state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                # Plain data and tensors only, so the file loads weights-only (no code runs).
                "rng": {
                    "torch": torch.get_rng_state(),
                    "numpy": _numpy_state_to_plain(np.random.get_state()),
                    "python": _python_state_to_plain(random.getstate()),
                },
                # The best epoch so far by the validation loss, its weights and the losses measured.
                "selection": selection.state() if selection is not None else {},
            },
            path,
        )

    def _load_training_state(self, path: Path, model, optimizer, scheduler,
                             selection: _EpochSelection | None = None) -> int:
        """Restore a killed run from ``last.ckpt`` (read weights-only: opening it runs no code)."""
        fix = (f"Fix: train with --no-resume (Python: Engine(resume=False)) to start again, use another --run-name, "
               f"or delete {path}.")
        try:
            state = load_tensors(path, "training state")
        except ModelFileError as err:
            raise ModelFileError(f"Cannot resume: {err} {fix}") from err
        try:
            saved = state["params"]["hparams"]
            mine = model.params()["hparams"]
            if saved != mine or state["max_epochs"] != self.max_epochs:
                differ = sorted(k for k in set(saved) | set(mine) if saved.get(k) != mine.get(k))
                if state["max_epochs"] != self.max_epochs:
                    differ.append(f"epochs ({state['max_epochs']} then, {self.max_epochs} now)")
                raise ModelFileError(
                    f"Cannot resume from {path}: it was written by a run with other settings "
                    f"({', '.join(map(str, differ[:8]))}). {fix}"
                )
            model.load_state_dict(state["model"], strict=False)
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            torch.set_rng_state(state["rng"]["torch"])
            np.random.set_state(_numpy_state_from_plain(state["rng"]["numpy"]))
            random.setstate(_python_state_from_plain(state["rng"]["python"]))
            if selection is not None:
                # Files written before epoch selection existed have none: it starts from here.
                selection.load_state(state.get("selection") or {})
            return int(state["epoch"])
        except ModelFileError:
            raise
        except (KeyError, TypeError, ValueError, RuntimeError, IndexError) as err:
            raise ModelFileError(f"Cannot resume from {path}: it is incomplete or from another version "
                                 f"({type(err).__name__}: {err}). {fix}") from err

    # ---- test -------------------------------------------------------------------------
    @torch.inference_mode()
    def test(
        self,
        model,
        samples: list[Sample],
        category: str = "default",
        save_images: bool | None = None,
        max_images: int | None = None,
        update_threshold: bool = False,
        data_name: str | None = None,
    ) -> dict:
        """Measure ``model`` on ``samples`` (good and defective): image / pixel metrics, and the
        false-reject and escape rates of the model's own verdict threshold. The model is not
        changed, unless ``update_threshold``: then its threshold is set again by the engine's
        rule on these images' scores (recorded as coming from this test set).

        Images the model was trained on (or held out to set its threshold) are left out with a
        notice. Appends a row to ``results.csv`` and (``save_images`` or the model's
        ``visualizer``) writes heat-map overlays: all of them, or with ``max_images`` the most
        telling ones (highest-scoring good images, lowest- and highest-scoring defects).
        Returns the metrics dict (``notes`` says which metrics could not be computed and why)."""
        self._launch()
        if save_images is None:
            save_images = bool(getattr(model, "visualizer", True))
        samples, notes = _without_training_images(model, list(samples))
        dataset = AnomalyDataset(samples, image_size=model.image_size, mean=model.mean, std=model.std)
        dataset.validate()
        model.to(self.fabric.device).eval()
        has_masks = any(s.mask_path is not None for s in dataset.samples)
        pixel = PixelMetrics() if has_masks else None
        scores, labels, maps_for_images = self._score(model, dataset, pixel)
        metrics = compute_metrics(labels, scores)
        metrics["notes"] = notes + [n for n in metrics["notes"] if not n.startswith("pixel AUROC and AUPRO need")]
        if pixel is not None:
            try:
                metrics.update(pixel.compute())
            except ValueError as err:
                metrics["notes"].append(str(err))
        else:
            metrics["notes"].append("pixel AUROC and AUPRO need ground-truth masks; this test set has none")
        if update_threshold:
            source = f"test images of {data_name or 'a test set'} ({category}), set by --update-threshold"
            info = self._apply_threshold(model, labels, scores, source,
                                         map_max=maps_for_images.float().amax(dim=(1, 2)).numpy())
            metrics["notes"].append(f"threshold updated on these test images: {describe_threshold(info)}; "
                                    "the rates below are now in-sample")
            if self.model_dir.joinpath("ckpt.pth").is_file() and self.fabric.is_global_zero:
                model.save(self.model_dir)
        threshold = float(model.threshold)
        if not model.threshold_info:
            metrics["notes"].append(
                f"this model's threshold ({threshold:g}) was never fitted (an untrained model, or one saved by an "
                "older version): its false-reject and escape rates are not meaningful. Fix: retrain, or "
                "--update-threshold"
            )
        rates = verdict_rates(labels, scores, threshold)
        metrics.update(threshold=threshold, false_reject_rate=rates["false_reject_rate"],
                       escape_rate=rates["escape_rate"], n_good=rates["n_good"], n_defect=rates["n_defect"])
        metrics["image_threshold_f1"] = metrics.pop("image_threshold")  # the test set's own F1-max threshold
        metrics["n_test"] = len(dataset)
        metrics["category"] = category
        metrics["data"] = data_name or model.data_info.get("data") or ""
        if self.fabric.is_global_zero:
            self._write_results(metrics)
            if save_images:
                lo, hi = _overlay_range(model, maps_for_images)
                folder = self.run_dir / "images" / category
                chosen = _telling_images(scores, labels, max_images)
                with progress_bar("Writing overlays", total=len(chosen), enabled=self.progress) as advance:
                    for i in chosen:
                        sample = dataset.samples[i]
                        mask = dataset[i]["mask"][0].numpy() if sample.mask_path is not None else None
                        name = f"{sample.defect_type}_{Path(sample.path).stem}.png"
                        save_overlay(folder / name, sample.path, maps_for_images[i].numpy(), float(scores[i]),
                                     threshold, lo, hi, mask)
                        advance(1)
        return metrics

    def _score(self, model, dataset, pixel: PixelMetrics | None = None,
               description: str = "Scoring") -> tuple[np.ndarray, np.ndarray, torch.Tensor]:
        """Scores ``[N]``, labels ``[N]`` and float16 maps ``[N,H,W]`` in dataset order; streams
        pixel metrics over the images whose masks are pixel-level truth.

        Under DDP each process scores its share of the images (Lightning's distributed
        sampler); the results are gathered to every process and put back in dataset order.
        """
        fabric = self.fabric
        tiler = self.tiler or Tiler.from_model(model)
        if tiler is not None:  # large images: tiles in, stitched full-resolution maps out (data/tiling.py)
            with progress_bar(description, total=len(dataset), enabled=self.progress and fabric.is_global_zero) as advance:
                return tiler.score(model, dataset, pixel, progress=advance)
        distributed = fabric.world_size > 1
        loader = DataLoader(dataset, batch_size=self.batch_size, num_workers=self.num_workers)
        if distributed:
            loader = fabric.setup_dataloaders(loader, move_to_device=False)
        parts: dict[str, list[torch.Tensor]] = {
            k: [] for k in ("score", "label", "map", "index", "mask", "has_mask", "map32")
        }
        total = len(loader.sampler) if distributed else len(dataset)
        with progress_bar(description, total=total, enabled=self.progress and fabric.is_global_zero) as advance:
            for batch in loader:
                batch_maps, batch_scores = model(batch["image"].to(fabric.device))
                rois = self.image_rois  # per-image ROIs (data/roi.py RoiSet), after the forward
                if rois is not None:
                    roi = rois.batch(batch["path"], tuple(batch_maps.shape[-2:])).to(batch_maps.device)
                    batch_maps, batch_scores = model.apply_roi(batch_maps, batch_scores, roi=roi)
                batch_maps = batch_maps[:, 0].float().cpu()
                parts["score"].append(batch_scores.float().cpu())
                parts["map"].append(batch_maps.half())
                parts["label"].append(batch["label"])
                parts["index"].append(batch["index"])
                keep = batch["has_mask"].bool()
                if pixel is not None and distributed:
                    # uint8, not bool: collectives (gloo) do not all handle bool tensors.
                    parts["mask"].append(batch["mask"][:, 0].to(torch.uint8))
                    parts["has_mask"].append(keep.to(torch.uint8))
                    parts["map32"].append(batch_maps)  # pixel metrics at full precision
                elif pixel is not None and keep.any():
                    pixel.update(batch_maps[keep], batch["mask"][keep, 0].bool())
                advance(len(batch["label"]))
        local = {k: torch.cat(v) for k, v in parts.items() if v}
        if not distributed:
            return local["score"].numpy(), local["label"].numpy(), local["map"]
        # Every process holds the same number of images (the sampler pads by repeating some).
        gathered = fabric.all_gather({k: v.to(fabric.device) for k, v in local.items()})
        merged = {k: v.cpu().flatten(0, 1) for k, v in gathered.items()}
        order = torch.argsort(merged["index"], stable=True)
        first = torch.ones(len(order), dtype=torch.bool)
        first[1:] = merged["index"][order][1:] != merged["index"][order][:-1]
        pick = order[first]  # one row per image, in dataset order
        if pixel is not None:
            for start in range(0, len(pick), self.batch_size):
                rows = pick[start : start + self.batch_size]
                keep = merged["has_mask"][rows].bool()
                if keep.any():
                    pixel.update(merged["map32"][rows][keep], merged["mask"][rows][keep].bool())
        return merged["score"][pick].numpy(), merged["label"][pick].numpy(), merged["map"][pick]

    def _write_results(self, metrics: dict) -> None:
        """Replace this (data, category) row of ``results.csv``; a mean row per data set with
        more than one category (never a mean across data sets)."""
        path = self.run_dir / "results.csv"
        rows = []
        if path.is_file():
            with open(path, newline="") as fh:
                rows = [r for r in csv.DictReader(fh)
                        if r.get("category") != "mean" and "data" in r
                        and (r["data"], r["category"]) != (str(metrics["data"]), metrics["category"])]
        rows.append({k: metrics.get(k) for k in RESULT_COLUMNS})
        out = []
        for data in dict.fromkeys(str(r["data"]) for r in rows):
            group = [r for r in rows if str(r["data"]) == data]
            out.extend(group)
            if len(group) > 1:
                mean = {"data": data, "category": "mean"}
                for key in RESULT_COLUMNS[2:]:
                    values = [float(r[key]) for r in group if r[key] not in (None, "", "nan")]
                    mean[key] = float(np.mean(values)) if values else math.nan
                for key in ("n_good", "n_defect", "n_test"):
                    mean[key] = int(sum(int(float(r[key] or 0)) for r in group))
                # Each category has its own threshold: no mean threshold; the rates are pooled
                # over all images (the share of all good parts rejected, of all defects passed).
                mean["threshold"] = math.nan
                for key, count in (("false_reject_rate", "n_good"), ("escape_rate", "n_defect")):
                    pairs = [(float(r[key]), int(float(r[count] or 0))) for r in group
                             if r[key] not in (None, "", "nan")]
                    total = sum(n for _, n in pairs)
                    mean[key] = sum(v * n for v, n in pairs) / total if total else math.nan
                out.append(mean)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".csv.tmp")
        with open(tmp, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=RESULT_COLUMNS)
            writer.writeheader()
            for row in out:
                writer.writerow({k: (f"{v:.4f}" if isinstance(v, float) else v) for k, v in row.items()})
        tmp.replace(path)

    # ---- predict ----------------------------------------------------------------------
    @torch.inference_mode()
    def predict(
        self,
        model,
        paths,
        output_dir: str | Path | None = None,
        save_images: bool = True,
        threshold: float | None = None,
        *,
        pixel_threshold: float | None = None,
        writer=None,
        return_results: bool = True,
        **writer_options,
    ) -> list[dict]:
        """Score image files in batches and stream the results out.

        ``paths`` is any iterable of image files (a generator or
        :class:`defectscope.deploy.outputs.image_files` keeps huge folders lazy); each batch is
        read, scored and handed to the writer before the next is read, so neither the maps nor
        the file list are held in memory. An unreadable file is skipped with its reason (listed
        in the outputs and said as a notice) and the run goes on; when no file at all could be
        read, :class:`DataError` lists why.

        With ``output_dir`` (or a ``writer``, a :class:`~defectscope.deploy.outputs.PredictionWriter`
        or anything with its ``add`` / ``skip`` / ``flush``), writes ``predictions.csv``,
        ``regions.json``, overlays (``save_images``) and ``report.html`` there; further
        ``writer_options`` go to the writer (``save_masks``, ``save_maps``, ``label_for``, ...).
        ``threshold`` / ``pixel_threshold`` override the model's own for this call.

        Returns ``[{"path", "score", "is_defect", "threshold", "verdict", "skipped"}]`` in input
        order (``skipped``: the reason, or None; a skipped file has a NaN score), or ``[]`` with
        ``return_results=False`` (bounded memory) and on the processes other than the first
        under DDP (each process scores a share of the batches; the first writes them in order).
        """
        from defectscope.deploy.outputs import PredictionWriter

        self._launch()
        fabric = self.fabric
        for name, value in (("threshold", threshold), ("pixel_threshold", pixel_threshold)):
            if value is not None and not (isinstance(value, (int, float)) and math.isfinite(value)):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
        if isinstance(paths, (str, Path)):
            paths = [paths]
        if hasattr(paths, "__len__") and len(paths) == 0:
            raise DataError("Nothing to predict: no image files were given.")
        threshold = float(model.threshold) if threshold is None else float(threshold)
        if pixel_threshold is None:
            pixel_threshold = getattr(model, "pixel_threshold", None)
        own_writer = writer is None and output_dir is not None and fabric.is_global_zero
        if own_writer:
            writer_options.setdefault("map_range", (0.0, 1.0) if getattr(model, "post_processor", False) else None)
            writer_options.setdefault("model_name", getattr(model, "name", type(model).__name__))
            writer = PredictionWriter(output_dir, threshold, pixel_threshold, save_images=save_images, **writer_options)
        if not fabric.is_global_zero:
            writer = None
        model.to(fabric.device).eval()
        tiler = self.tiler or Tiler.from_model(model)
        reader = _PredictReader(model, need_tensor=tiler is None)
        distributed = fabric.world_size > 1
        if tiler is not None and distributed:
            raise DataError("Tiled prediction (a model trained with --tile) runs in one process. Fix: --devices 1.")
        if distributed:
            paths = [Path(p) for p in paths]  # every process needs the same batches
            if not paths:
                raise DataError("Nothing to predict: no image files were given.")
        batches = _PredictBatches(paths, self.batch_size, reader, rank=fabric.global_rank,
                                  world_size=fabric.world_size)
        workers = self.num_workers if not distributed else 0
        if workers and iter(paths) is paths:
            batches.paths = list(paths)  # each loading process walks the list; a generator cannot be shared
        loader = DataLoader(batches, batch_size=None, num_workers=workers, collate_fn=_as_is)
        results: list[dict] = []
        counts = {"seen": 0, "scored": 0}
        reasons: list[str] = []
        total = len(paths) if hasattr(paths, "__len__") else None
        try:
            with progress_bar("Predicting", total=total, enabled=self.progress and fabric.is_global_zero) as advance:
                for items in loader:
                    started = time.perf_counter()
                    ok = [item for item in items if item["image"] is not None]
                    scores = maps = batch = batch_maps = None
                    if ok and tiler is not None:  # each image in tiles, its map stitched at its own size
                        tiled = [tiler.predict(model, item["image"]) for item in ok]
                        scores = np.asarray([t[0] for t in tiled], dtype=np.float32)
                        maps = [t[1] for t in tiled]
                    elif ok:
                        batch = torch.stack([item["image"] for item in ok]).to(fabric.device)
                        batch_maps, batch_scores = model(batch)
                        maps = batch_maps[:, 0].float().cpu().numpy()
                        scores = batch_scores.float().cpu().numpy()
                    share = (time.perf_counter() - started) / max(len(ok), 1)
                    if distributed:
                        items, scores, maps = self._gather_predictions(items, scores, maps, reader)
                    if fabric.is_global_zero:
                        self._hand_out(items, scores, maps, share, threshold, writer, results if return_results
                                       else None, counts, reasons)
                        if writer is not None:
                            writer.flush()
                    advance(len(items))
                    items = batch = batch_maps = maps = None  # dropped before the next batch is read
        finally:
            if own_writer:
                writer.close()  # also after an error: what was scored is reported
        if fabric.is_global_zero and counts["seen"] == 0:
            raise DataError("Nothing to predict: no image files were given (or the folders hold none).")
        if fabric.is_global_zero and counts["scored"] == 0:
            listed = "\n".join(f"  - {r}" for r in reasons[:20])
            more = f"\n  ... and {len(reasons) - 20} more." if len(reasons) > 20 else ""
            raise DataError(f"None of the {counts['seen']} files could be read:\n{listed}{more}\n"
                            "Fix: repair or remove these files, then run again.")
        return results

    def _hand_out(self, items, scores, maps, share, threshold, writer, results, counts, reasons) -> None:
        """One batch's results (input order) to the writer and the returned list."""
        k = 0
        for item in items:
            counts["seen"] += 1
            if item["image"] is None:
                reason = item["reason"] or "could not be read"
                if len(reasons) < 21:
                    reasons.append(f"{item['path']}: {reason}")
                if writer is not None:
                    writer.skip(item["path"], reason)
                if results is not None:
                    results.append({"path": str(item["path"]), "score": math.nan, "is_defect": None,
                                    "threshold": threshold, "verdict": "skipped", "skipped": reason})
                continue
            score = float(scores[k])
            if writer is not None:
                writer.add(item["path"], item["rgb"], score, maps[k], item["seconds"] + share)
            if results is not None:
                results.append({"path": str(item["path"]), "score": score, "is_defect": bool(score >= threshold),
                                "threshold": threshold, "verdict": "defect" if score >= threshold else "good",
                                "skipped": None})
            counts["scored"] += 1
            k += 1

    def _gather_predictions(self, items, scores, maps, reader):
        """DDP: every process's batch of this step to the first process, in input order.
        Shapes are padded to the batch size (collectives need equal shapes); the first process
        reads the other processes' images again for its outputs."""
        fabric = self.fabric
        size = self.batch_size
        h, w = reader.image_size
        padded_scores = torch.zeros(size)
        padded_maps = torch.zeros(size, h, w)
        valid = torch.zeros(size, dtype=torch.uint8)
        number = torch.tensor([items[0]["batch"] if items else -1])
        ok = [i for i, item in enumerate(items) if item["image"] is not None]
        if ok:
            padded_scores[ok] = torch.from_numpy(scores)
            padded_maps[ok] = torch.from_numpy(maps)
            valid[ok] = 1
        gathered = fabric.all_gather({"scores": padded_scores.to(fabric.device), "maps": padded_maps.to(fabric.device),
                                      "valid": valid.to(fabric.device), "batch": number.to(fabric.device)})
        if not fabric.is_global_zero:
            return [], None, None
        merged, out_scores, out_maps = [], [], []
        for rank in range(fabric.world_size):
            batch_number = int(gathered["batch"][rank][0])
            if batch_number < 0:
                continue
            own = rank == fabric.global_rank
            files = [it["path"] for it in items] if own else reader.batch_paths(batch_number)
            for j, path in enumerate(files):
                item = items[j] if own else reader.read(path, need_tensor=False)
                if bool(gathered["valid"][rank][j]):
                    if item["rgb"] is None:  # read there, not here: keep its score, say why no picture
                        item = dict(item, rgb=np.zeros((h, w, 3), np.uint8))
                    item = dict(item, image=True)
                    out_scores.append(float(gathered["scores"][rank][j]))
                    out_maps.append(gathered["maps"][rank][j].float().cpu().numpy())
                merged.append(item)
        return merged, np.asarray(out_scores, np.float32), out_maps


def _as_is(batch):
    """DataLoader collate for :class:`_PredictBatches`: the batch as built."""
    return batch


class _PredictReader:
    """Reads one image for prediction: the RGB picture as stored (for the outputs) and the
    model's normalised input, or the reason it cannot be read. Same pre-processing as
    training and ``test`` (AnomalyDataset)."""

    def __init__(self, model, need_tensor: bool = True) -> None:
        self.need_tensor = need_tensor  # False: the RGB picture only (tiled prediction cuts its own inputs)
        self.image_size = tuple(model.image_size)
        self.dataset = AnomalyDataset([Sample(path=Path("."), label=0)], image_size=model.image_size,
                                      mean=model.mean, std=model.std)
        self.paths: list | None = None  # DDP: the full list, to find another process's batch
        self.batch_size = 1

    def read(self, path, need_tensor: bool = True) -> dict:
        from defectscope.data import load_image

        started = time.perf_counter()
        item = {"path": Path(path), "rgb": None, "image": None, "reason": None, "seconds": 0.0}
        try:
            picture = load_image(path)
            item["rgb"] = np.asarray(picture)
            if need_tensor:
                # The model's input; for tiled prediction the picture itself (the tiler cuts the inputs).
                item["image"] = self.dataset._image_tensor(picture) if self.need_tensor else item["rgb"]
        except DataError as err:
            item["reason"] = str(err)
        except Exception as err:  # noqa: BLE001 (a file the decoder chokes on is skipped, not fatal)
            item["reason"] = f"cannot be read ({type(err).__name__}: {err})"
        item["seconds"] = time.perf_counter() - started
        return item

    def batch_paths(self, number: int) -> list:
        return self.paths[number * self.batch_size:(number + 1) * self.batch_size]


class _PredictBatches(torch.utils.data.IterableDataset):
    """Batches of read images, built lazily from an iterable of paths. Batch ``b`` is read by
    loading process ``b % workers`` and, under DDP, scored by process ``b % world_size``; a
    DDP process pads its share with empty batches so that every process takes as many steps."""

    def __init__(self, paths, batch_size: int, reader: _PredictReader, rank: int = 0, world_size: int = 1) -> None:
        self.paths = paths
        self.batch_size = batch_size
        self.reader = reader
        self.rank, self.world_size = rank, world_size
        if world_size > 1:
            reader.paths, reader.batch_size = list(paths), batch_size

    def _chunks(self):
        chunk = []
        for path in self.paths:
            chunk.append(path)
            if len(chunk) == self.batch_size:
                yield chunk
                chunk = []
        if chunk:
            yield chunk

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        if self.world_size > 1:
            n_batches = math.ceil(len(self.paths) / self.batch_size)
            steps = math.ceil(n_batches / self.world_size)
            for step in range(steps):
                number = step * self.world_size + self.rank
                chunk = self.paths[number * self.batch_size:(number + 1) * self.batch_size]
                yield [dict(self.reader.read(p), batch=number) for p in chunk]
            return
        for number, chunk in enumerate(self._chunks()):
            if number % workers == worker:
                yield [self.reader.read(p) for p in chunk]


def _without_training_images(model, samples: list[Sample]) -> tuple[list[Sample], list[str]]:
    """``samples`` less the images ``model`` was trained on or set its threshold on (their
    scores would flatter it), and a note saying how many were left out."""
    seen = set(model.data_info.get("train_images", [])) | set(model.data_info.get("validation_images", []))
    if not seen:
        return samples, []
    seen = {str(Path(p).resolve()) for p in seen} | seen
    kept = [s for s in samples if str(s.path) not in seen and str(Path(s.path).resolve()) not in seen]
    if len(kept) == len(samples):
        return samples, []
    left = len(samples) - len(kept)
    if not kept:
        raise DataError(
            f"All {len(samples)} test images were used to train this model (or to set its threshold): there is "
            "nothing to test on. Fix: test on images the model has not seen."
        )
    return kept, [f"{left} test image(s) were used in training or to set the threshold and are left out"]


class _EpochSelection:
    """Keeps the weights of the epoch with the lowest validation loss (``Engine.select_epoch``).

    Active when the engine selects on validation, the model has ``validation_loss`` and good
    images were held out. The loss is each held-out good image's loss, averaged, measured every
    ``ceil(max_epochs / VALIDATION_CHECKS)`` epochs and at the last one, in eval mode. Why: a
    student that sees a few images hundreds of times memorises them, and its distance on good
    images it has not seen, what the verdict rests on, rises again after a point (STFPM on 32
    generated grass images: lowest at epoch 100 of 300, benchmarks/results/stfpm_epochs_curves.md).
    Under DDP every process measures all held-out images and rank 0's loss decides, so all keep
    the same epoch."""

    def __init__(self, engine: Engine, model, validation: list[Sample]) -> None:
        good = [s for s in validation if s.label == 0]
        self.active = engine.select_epoch == "validation" and hasattr(model, "validation_loss") and bool(good)
        self.model, self.fabric, self.max_epochs = model, engine.fabric, engine.max_epochs
        self.every = max(1, math.ceil(engine.max_epochs / VALIDATION_CHECKS))
        self.best_loss, self.best_epoch, self.best_state = math.inf, None, None
        self.losses: dict[int, float] = {}
        if self.active:
            if engine.tiler is not None:
                good = engine.tiler.training_tiles(good, model.image_size)
            dataset = AnomalyDataset(good, image_size=model.image_size, mean=model.mean, std=model.std)
            # A generator of its own: iterating a DataLoader draws a seed from the generator it has,
            # and drawing from torch's global one would change the training's random stream (crops,
            # noise), so that measuring would change the model.
            self.loader = DataLoader(dataset, batch_size=max(engine.batch_size, 8), num_workers=engine.num_workers,
                                     generator=torch.Generator())

    def due(self, epoch: int) -> bool:
        """Whether the loss is measured after ``epoch`` (0-based)."""
        return self.active and ((epoch + 1) % self.every == 0 or epoch + 1 == self.max_epochs)

    @torch.no_grad()
    def check(self, epoch: int) -> float:
        """Measure the validation loss after ``epoch`` (0-based); keep a copy of the weights when
        it is the lowest so far. Returns the loss."""
        model = self.model
        model.eval()
        total, count = 0.0, 0
        for batch in self.loader:
            losses = model.validation_loss(batch["image"].to(self.fabric.device))
            total += float(losses.sum())
            count += len(losses)
        model.train()
        loss = float(self.fabric.broadcast(total / max(count, 1), src=0))
        self.losses[epoch + 1] = loss
        if loss < self.best_loss:
            self.best_loss, self.best_epoch = loss, epoch + 1
            self.best_state = {k: v.detach().clone().cpu() for k, v in model.trained_state_dict().items()}
        return loss

    def restore_best(self) -> str | None:
        """Load the kept weights into the model when they are not the last epoch's; returns what
        was kept, in words, or None when nothing was measured."""
        if not self.active or self.best_epoch is None:
            return None
        last = max(self.losses)
        if self.best_epoch != last:
            self.model.load_state_dict(self.best_state, strict=False)
        return (f"Kept the weights of epoch {self.best_epoch} of {self.max_epochs}: the lowest loss on the held-out "
                f"good images ({self.best_loss:.4g}; epoch {last}: {self.losses[last]:.4g}). "
                "Train with --select-epoch last to keep the last epoch's.")

    def record(self) -> dict:
        """What ``model.training_info`` records: the epoch kept and the losses measured."""
        if not self.active or self.best_epoch is None:
            return {}
        return {"selected_epoch": self.best_epoch,
                "validation_loss": {str(epoch): round(loss, 6) for epoch, loss in self.losses.items()}}

    def state(self) -> dict:
        """Plain data and tensors for ``last.ckpt`` (loads weights-only)."""
        if not self.active or self.best_epoch is None:
            return {}
        return {"best_loss": self.best_loss, "best_epoch": self.best_epoch, "best_state": self.best_state,
                "losses": [[epoch, loss] for epoch, loss in self.losses.items()]}

    def load_state(self, state: dict) -> None:
        if not self.active or not state:
            return
        self.best_loss, self.best_epoch = float(state["best_loss"]), int(state["best_epoch"])
        self.best_state = dict(state["best_state"])
        self.losses = {int(epoch): float(loss) for epoch, loss in state["losses"]}


def describe_threshold(info: dict) -> str:
    """One line on a threshold: value, rule, data, and the false-reject rate it promises."""
    text = f"Threshold {info['threshold']:.4g}"
    if info.get("rule") == "f1":
        text += f" (best F1 on {info['n_defect']} held-out defects and {info['n_good']} good images"
    else:
        text += f" (false-reject rule, {info['max_false_reject']:.2%} asked, on {info['n_good']} good images"
    text += f" from the {info.get('source', 'training side')})"
    if info.get("expected_false_reject") is not None:
        lo, hi = info["false_reject_interval"]
        text += (f": expected false-reject rate {info['expected_false_reject']:.2%} "
                 f"({info.get('confidence', 0.95):.0%} interval {lo:.2%}-{hi:.2%})")
    return text


def _numpy_state_to_plain(state) -> dict:
    name, keys, pos, has_gauss, cached = state
    return {"name": name, "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
            "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}


def _numpy_state_from_plain(state: dict):
    keys = np.asarray(state["keys"].numpy(), dtype=np.uint32)
    return (state["name"], keys, state["pos"], state["has_gauss"], state["cached_gaussian"])


def _python_state_to_plain(state) -> list:
    version, internal, gauss = state
    return [int(version), [int(v) for v in internal], gauss]


def _python_state_from_plain(state) -> tuple:
    version, internal, gauss = state
    return (int(version), tuple(int(v) for v in internal), gauss)


def _compile_trainable_modules(model) -> list[str]:
    """Compile, in place, each direct child module that has trainable parameters (the frozen
    backbone stays eager). In place, so parameter names and checkpoints do not change."""
    names = []
    for name, child in model.named_children():
        if any(p.requires_grad for p in child.parameters()):
            child.compile()
            names.append(name)
    return names


def _trains_on_images(model) -> str:
    """Why ``model`` needs fresh features every step (augmented images, a backbone that
    trains), or "" when the cached frozen features serve every epoch."""
    reasons = []
    if getattr(model, "train_transform", None) is not None:
        reasons.append("its training images are augmented")
    if getattr(model, "train_backbone", False):
        reasons.append("its backbone trains")
    return " and ".join(reasons)


def _overlay_range(model, maps: torch.Tensor) -> tuple[float, float]:
    """Colour range of heat-maps: [0, 1] for sigmoid outputs, else the maps' own range, so
    every overlay of a run uses the same scale."""
    if model.post_processor:
        return 0.0, 1.0
    return float(maps.min()), float(maps.max())


def _telling_images(scores: np.ndarray, labels: np.ndarray, max_images: int | None) -> list[int]:
    """Indices of the images worth looking at: all when ``max_images`` is None; else up to a
    third each of the highest-scoring good images (false alarms), the lowest-scoring defects
    (misses) and the highest-scoring defects."""
    if max_images is None or max_images >= len(scores):
        return list(range(len(scores)))
    third = max(1, max_images // 3)
    good = [int(i) for i in np.argsort(-scores) if labels[i] == 0][:third]
    defects = [int(i) for i in np.argsort(scores) if labels[i] == 1]
    chosen = good + defects[:third] + defects[::-1][:third]
    return sorted(dict.fromkeys(chosen))[:max_images]
