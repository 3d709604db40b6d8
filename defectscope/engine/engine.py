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
from defectscope.engine.feature_cache import extract_features
from defectscope.engine.progress import progress_bar
from defectscope.engine.visualize import save_overlay
from defectscope.metrics import PixelMetrics, compute_metrics
from defectscope.metrics.threshold import THRESHOLD_RULES, fit_threshold, verdict_rates
from defectscope.models.base import atomic_save
from defectscope.models.model_files import ModelFileError, load_tensors

RESULT_COLUMNS = ["data", "category", "image_auroc", "pixel_auroc", "aupro", "image_f1_max", "threshold",
                  "false_reject_rate", "escape_rate", "n_good", "n_defect", "n_test"]


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
    - optionally ``set_regime(regime)`` for labelled defects, ``grad_clip``.

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
    ) -> None:
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
        self.val_fraction = float(val_fraction)
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
        dataset = AnomalyDataset(samples, image_size=model.image_size, mean=model.mean, std=model.std)
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
        # A model may step its learning-rate schedule after every optimizer step instead of every
        # epoch (scheduler_interval = "step"); it is then told how many steps an epoch has.
        per_step = getattr(model, "scheduler_interval", "epoch") == "step"
        if per_step:
            per_rank = len(features) // fabric.world_size
            steps_per_epoch = per_rank // self.batch_size + int(per_rank % self.batch_size >= min_batch)
            optimizer, scheduler = model.configure_optimizers(self.max_epochs, steps_per_epoch=steps_per_epoch)
        else:
            optimizer, scheduler = model.configure_optimizers(self.max_epochs)
        state_path = self.model_dir / "last.ckpt"
        start_epoch = 0
        if self.resume and state_path.is_file():
            start_epoch = self._load_training_state(state_path, model, optimizer, scheduler)
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
                # Order depends only on (seed, epoch), so a resumed run sees the same batches.
                order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed * 100003 + epoch))
                # Every process takes the same number of steps (DDP syncs gradients each step).
                order = order[: len(order) // world * world][rank::world]
                total, batches = 0.0, 0
                for start in range(0, len(order), self.batch_size):
                    idx = order[start : start + self.batch_size]
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
                self._save_training_state(state_path, model, optimizer, scheduler, epoch + 1)
                advance(1, epoch=epoch + 1, loss=mean_loss)
                if self.on_epoch_end is not None:
                    self.on_epoch_end(epoch, mean_loss)
        if writer is not None:
            writer.close()
        if world > 1:
            # DDP keeps weights in sync but each process updates its own batch-norm statistics
            # in the last step: take rank 0's everywhere, so every process scores the same model.
            state = fabric.broadcast({k: v.cpu() for k, v in model.trained_state_dict().items()}, src=0)
            model.load_state_dict(state, strict=False)
        model.eval()
        if hasattr(model, "calibrate"):
            self._calibrate(model, validation or samples)
        self._set_threshold(model, validation or samples, held_out=bool(validation))
        model.training_info = {"epochs": self.max_epochs, "seed": self.seed, "train_size": n, "regime": regime,
                               "batch_size": self.batch_size, "val_fraction": self.val_fraction}
        model.data_info = {**self.data_info, "train_images": [str(s.path) for s in samples],
                           "validation_images": [str(s.path) for s in validation]}
        if fabric.is_global_zero:
            model.save(self.model_dir)
        fabric.barrier()
        return model

    @torch.inference_mode()
    def _calibrate(self, model, samples: list[Sample]) -> None:
        """Hand the model's ``calibrate`` the held-out good images (normalised batches on the
        device), e.g. for EfficientAD's map normalisation; never test images."""
        good = [s for s in samples if s.label == 0]
        dataset = AnomalyDataset(good, image_size=model.image_size, mean=model.mean, std=model.std)
        loader = DataLoader(dataset, batch_size=max(self.batch_size, 8), num_workers=self.num_workers)
        model.calibrate(batch["image"].to(self.fabric.device) for batch in loader)

    @torch.inference_mode()
    def _set_threshold(self, model, samples: list[Sample], held_out: bool) -> None:
        """Score ``samples`` and set ``model.threshold`` by the engine's rule; record how."""
        dataset = AnomalyDataset(samples, image_size=model.image_size, mean=model.mean, std=model.std)
        scores, labels, _ = self._score(model, dataset, description="Setting the threshold")
        source = "held-out training images" if held_out else "training images (in-sample: none held out)"
        info = self._apply_threshold(model, labels, scores, source, seed=self.seed, val_fraction=self.val_fraction)
        self._print(describe_threshold(info))
        for note in info["notes"]:
            self._print(f"notice: {note}")

    def _apply_threshold(self, model, labels, scores, source: str, **record) -> dict:
        """Set ``model.threshold`` from ``scores`` by the engine's rule and record how (with
        ``source`` and ``record``) in ``model.threshold_info``; returns that record."""
        info = fit_threshold(labels, scores, rule=self.threshold_rule, max_false_reject=self.max_false_reject)
        info.update(source=source, **record)
        model.threshold.fill_(info["threshold"])
        model.threshold_info = info
        return info

    def _tensorboard(self):
        if not self.fabric.is_global_zero:
            return None
        from torch.utils.tensorboard import SummaryWriter

        return SummaryWriter(log_dir=str(self.run_dir / "tensorboard"))

    def _save_training_state(self, path: Path, model, optimizer, scheduler, epoch: int) -> None:
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
            },
            path,
        )

    def _load_training_state(self, path: Path, model, optimizer, scheduler) -> int:
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
            info = self._apply_threshold(model, labels, scores, source)
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
        paths: list[str | Path],
        output_dir: str | Path | None = None,
        save_images: bool = True,
        threshold: float | None = None,
    ) -> list[dict]:
        """Score image files; with ``output_dir``, write ``predictions.csv`` and overlays there.
        ``threshold`` overrides the model's own for this call. Returns
        ``[{"path", "score", "is_defect", "threshold"}]`` in input order."""
        self._launch()
        samples = [Sample(path=Path(p), label=0) for p in paths]
        if not samples:
            raise DataError("Nothing to predict: no image files were given.")
        if threshold is not None and not (isinstance(threshold, (int, float)) and math.isfinite(threshold)):
            raise ValueError(f"threshold must be a finite number, got {threshold!r}")
        dataset = AnomalyDataset(samples, image_size=model.image_size, mean=model.mean, std=model.std)
        dataset.validate()
        model.to(self.fabric.device).eval()
        scores, _, maps = self._score(model, dataset)
        threshold = float(model.threshold) if threshold is None else float(threshold)
        results = [
            {"path": str(s.path), "score": float(sc), "is_defect": bool(sc >= threshold), "threshold": threshold}
            for s, sc in zip(dataset.samples, scores)
        ]
        if output_dir is not None and self.fabric.is_global_zero:
            out = Path(output_dir)
            out.mkdir(parents=True, exist_ok=True)
            with open(out / "predictions.csv", "w", newline="") as fh:
                writer = csv.DictWriter(fh, fieldnames=["path", "score", "is_defect", "threshold"])
                writer.writeheader()
                writer.writerows(results)
            lo, hi = _overlay_range(model, maps)
            for i, s in enumerate(dataset.samples if save_images else []):
                save_overlay(out / "images" / f"{i:05d}_{s.path.stem}.png", s.path, maps[i].float().numpy(),
                             float(scores[i]), threshold, lo, hi)
        return results


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
