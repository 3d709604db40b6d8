"""Distil an EfficientAD teacher (PDN-S or PDN-M) from a packaged backbone, offline.

The paper distils its PDN teachers from WideResNet-101 on ImageNet (nelson1425/EfficientAD's
``pretraining.py``): the backbone sees the image at 512 px, its ``layer2`` (stride 8, 64x64) and
``layer3`` (stride 16, upscaled to 64x64) feature maps are turned into 384-d patch descriptors,
standardised per channel, and a PDN with padding regresses them from the same image at 256 px
(its output, at stride 4, is on the same 64x64 grid), with a mean squared error, Adam (lr 1e-4,
weight decay 1e-5), 60,000 steps of 16 images.

Here the backbone is the packaged EfficientNet-Lite0 (no download): ``blocks.2`` (stride 8, 40
channels) and ``blocks.4`` (stride 16, 112 channels) at twice the PDN's input size, the strides
the reference takes from WideResNet. The descriptors are made exactly as the reference makes
them: each position's 3x3 neighbourhood of a layer (C x 3 x 3 values) is average-pooled to 1024
values, the layers' vectors are stacked and pooled to 384. Average pooling is linear, so that
is one fixed 3x3 convolution per layer (:func:`reference_projection`), run at the layer's own
resolution and then upscaled to the grid (bilinear, as the reference upscales its patches).

Images: ``images`` (any folder, searched with its sub-folders: ImageNet's ``train``,
Imagenette, ...) or, offline, random crops of scikit-image's 19 packaged sample pictures. Either
way each image is a random crop (10-100 % of its area), flipped half the time, grey 10 % of the
time (the reference's ``RandomGrayscale(0.1)``). Batches depend only on (seed, step), so a
resumed run sees the same images as an uninterrupted one.

Cost and quality: PDN-S costs about 110 GFLOP per 256-px image and step (forward and
backward), a quarter of that at 128 px; the backbone adds little. The defaults (2,000 steps of
one 128-px image) take about a quarter of an hour on 2 CPU cores (0.45-0.5 s a step, measured on
a shared 2-core machine with one torch thread) and a few minutes on a GPU. The paper's teacher
saw 60,000 x 16 images at 256 px, about 2,000 times the pixels of the defaults: a short
distillation gives a usable but weaker teacher. Measured (2026-11-30, seed 0, scikit-image crops, 1,300 steps, 632 s):
the loss fell from 1.16 to 0.65, where 1.0 is what predicting each channel's mean scores (the
targets are standardised), i.e. the PDN reproduces about a third of the descriptors' variance.
Prefer the official PDN files where you can download them.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import functional as TF

from defectscope.backbones import IMAGENET_MEAN, IMAGENET_STD, FeatureExtractor
from defectscope.engine.progress import progress_bar
from defectscope.models.efficientad import PDN, TEACHER_FORMAT, image_files, random_resized_crop, skimage_pictures
from defectscope.models.model_files import ModelFileError, load_tensors, save_tensors

BACKBONE = "efficientnet_lite0"
LAYERS = ("blocks.2", "blocks.4")  # strides 8 and 16, as WideResNet's layer2 / layer3 in the reference
STAT_IMAGES = 64  # images whose descriptors set the per-channel standardisation


def reference_projection(channels: list[int], out_channels: int = 384, patch: int = 3,
                         layer_dim: int = 1024) -> list[torch.Tensor]:
    """Convolution weights ``[out_channels, C_l, patch, patch]`` per layer that compute the
    reference's patch descriptor: each layer's ``C_l * patch * patch`` neighbourhood vector
    average-pooled to ``layer_dim`` values, the layers stacked and pooled to ``out_channels``."""

    def pooling(n_in: int, n_out: int) -> torch.Tensor:  # x @ P == adaptive_avg_pool1d(x, n_out)
        return F.adaptive_avg_pool1d(torch.eye(n_in, dtype=torch.float64)[:, None], n_out)[:, 0]

    stacked = pooling(len(channels) * layer_dim, out_channels)
    weights = []
    for i, c in enumerate(channels):
        matrix = pooling(c * patch * patch, layer_dim) @ stacked[i * layer_dim:(i + 1) * layer_dim]
        weights.append(matrix.t().reshape(out_channels, c, patch, patch).float())
    return weights


class PatchTargets(nn.Module):
    """Frozen backbone -> the 384-d patch descriptors a PDN learns: ``[B,3,2H,2W]`` images in
    [0, 1] -> ``[B,out_channels,H/4,W/4]`` (the first layer's grid)."""

    def __init__(self, backbone: str = BACKBONE, layers=LAYERS, out_channels: int = 384) -> None:
        super().__init__()
        self.extractor = FeatureExtractor(backbone, list(layers))
        for i, weight in enumerate(reference_projection(self.extractor.channels, out_channels)):
            self.register_buffer(f"projection{i}", weight)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        mean = torch.tensor(self.extractor.config.mean, device=images.device).view(1, 3, 1, 1)
        std = torch.tensor(self.extractor.config.std, device=images.device).view(1, 3, 1, 1)
        maps = list(self.extractor((images - mean) / std).values())
        out = None
        for i, feature in enumerate(maps):
            weight = getattr(self, f"projection{i}")
            part = F.conv2d(feature, weight, padding=weight.shape[-1] // 2)
            if part.shape[-2:] != maps[0].shape[-2:]:
                part = F.interpolate(part, size=maps[0].shape[-2:], mode="bilinear", align_corners=False)
            out = part if out is None else out + part
        return out


class StepBatches(Dataset):
    """Item ``k``: the images of step ``k`` (``k < 0``: of the statistics batches), float
    ``[B,3,2S,2S]`` in [0, 1]; drawn from a generator seeded by (seed, k) alone."""

    def __init__(self, files: list[Path] | None, batch_size: int, image_size: int, seed: int) -> None:
        self.files, self.batch_size, self.size, self.seed = files, batch_size, 2 * image_size, seed

    def __getitem__(self, step: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed((self.seed * 1_000_003 + step * 7919) % 2**62)
        images = []
        for _ in range(self.batch_size):
            if self.files is None:
                pictures = skimage_pictures()
                picture = pictures[int(torch.randint(len(pictures), (), generator=generator))]
            else:
                from defectscope.data import load_image

                picture = TF.pil_to_tensor(load_image(self.files[int(torch.randint(len(self.files), (),
                                                                                    generator=generator))]))
            image = random_resized_crop(picture, (self.size, self.size), generator)
            if float(torch.rand((), generator=generator)) < 0.1:
                image = TF.rgb_to_grayscale(image, num_output_channels=3)
            images.append(image)
        return torch.stack(images)


def describe_images(images: str | Path | None) -> tuple[list[Path] | None, str]:
    if images is None:
        try:
            count = len(skimage_pictures())
        except ImportError as err:
            raise ValueError("distill-teacher without --images crops scikit-image's sample pictures, and scikit-image "
                              "is not installed. Fix: pip install scikit-image, or pass --images DIR (any folder "
                              "of natural images, e.g. ImageNet or Imagenette).") from err
        return None, f"random crops of {count} scikit-image sample pictures (skimage.data)"
    files = image_files(images)
    return files, f"random crops of {len(files)} images of {Path(images).resolve()}"


def checkpoint_path(output: str | Path) -> Path:
    """Where an unfinished distillation keeps its state, beside ``output``."""
    output = Path(output)
    return output.with_name(output.name + ".partial.ckpt")


def distill_teacher(
    output: str | Path,
    model_size: str = "s",
    images: str | Path | None = None,
    steps: int = 2000,
    batch_size: int = 1,
    image_size: int = 128,
    seed: int = 0,
    resume: bool = True,
    checkpoint_every: int = 200,
    out_channels: int = 384,
    accelerator: str = "auto",
    num_workers: int = 0,
    progress: bool = True,
    on_step: Callable[[int, float], None] | None = None,
) -> dict:
    """Distil a PDN teacher and write it to ``output``; returns the file's metadata.

    The state (PDN, Adam, standardisation) is written atomically to
    :func:`checkpoint_path` every ``checkpoint_every`` steps; with ``resume`` a run with the same
    settings continues from there (same result as an uninterrupted run), and the file is removed
    when the teacher is written. ``on_step(step, loss)`` is called after every step.
    """
    model_size = str(model_size).lower()
    if model_size not in ("s", "m"):
        raise ValueError(f"model_size must be 's' or 'm', got {model_size!r}")
    for name, value, low in (("steps", steps, 1), ("batch_size", batch_size, 1), ("image_size", image_size, 32),
                             ("checkpoint_every", checkpoint_every, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    output = Path(output)
    if output.is_dir():
        raise IsADirectoryError(f"--output {output} is a folder. Fix: give a file name, "
                                f"e.g. {output / 'teacher_s.pth'}.")
    files, source = describe_images(images)
    settings = {"model_size": model_size, "out_channels": out_channels, "backbone": BACKBONE, "layers": list(LAYERS),
                "images": source, "batch_size": batch_size, "image_size": image_size, "seed": seed}

    fabric = L.Fabric(accelerator=accelerator, devices=1, precision="32-true")
    fabric.seed_everything(seed, verbose=False)
    targets = PatchTargets(BACKBONE, LAYERS, out_channels).to(fabric.device)
    # On the device before Adam's state is loaded: a resumed state then lands where the weights are.
    pdn = PDN(model_size, out_channels, padding=True).to(fabric.device)
    optimizer = torch.optim.Adam(pdn.parameters(), lr=1e-4, weight_decay=1e-5)
    batches = StepBatches(files, batch_size, image_size, seed)
    ckpt, start, losses = checkpoint_path(output), 0, []
    if resume and ckpt.is_file():
        state = load_tensors(ckpt, "distillation state")
        if state.get("settings") != settings:
            differ = sorted(k for k in settings if state.get("settings", {}).get(k) != settings[k])
            raise ModelFileError(f"Cannot resume from {ckpt}: it was written with other settings "
                                 f"({', '.join(differ)}). Fix: run with the same settings, or --no-resume to start "
                                 "again (it is overwritten).")
        pdn.load_state_dict(state["pdn"])
        optimizer.load_state_dict(state["optimizer"])
        mean, std, start, losses = state["mean"], state["std"], int(state["step"]), list(state["losses"].tolist())
    else:
        mean, std = target_statistics(targets, batches, max(1, STAT_IMAGES // batch_size), fabric.device)
    mean, std = mean.to(fabric.device).view(1, -1, 1, 1), std.to(fabric.device).view(1, -1, 1, 1)
    pdn, optimizer = fabric.setup(pdn, optimizer)
    pdn_mean = torch.tensor(IMAGENET_MEAN, device=fabric.device).view(1, 3, 1, 1)
    pdn_std = torch.tensor(IMAGENET_STD, device=fabric.device).view(1, 3, 1, 1)

    def save_state(step: int) -> None:
        save_tensors({"settings": settings, "step": step, "pdn": pdn.module.state_dict(), "mean": mean.flatten().cpu(),
                      "std": std.flatten().cpu(), "optimizer": optimizer.state_dict(),
                      "losses": torch.tensor(losses, dtype=torch.float64)}, ckpt)

    loader = DataLoader(batches, batch_size=None, sampler=range(start, steps), num_workers=num_workers)
    started = time.perf_counter()
    pdn.train()
    with progress_bar(f"Distilling PDN-{model_size.upper()} from {BACKBONE}", total=max(0, steps - start),
                      enabled=progress) as advance:
        for step, big in enumerate(loader, start=start):
            big = big.to(fabric.device)
            target = (targets(big) - mean) / std
            small = F.interpolate(big, scale_factor=0.5, mode="bilinear", antialias=True, align_corners=False)
            prediction = pdn((small - pdn_mean) / pdn_std)
            if prediction.shape[-2:] != target.shape[-2:]:
                target = F.interpolate(target, size=prediction.shape[-2:], mode="bilinear", align_corners=False)
            loss = (prediction - target).square().mean()
            optimizer.zero_grad(set_to_none=True)
            fabric.backward(loss)
            optimizer.step()
            losses.append(loss.item())
            advance(1, loss=sum(losses[-20:]) / len(losses[-20:]))
            if (step + 1) % checkpoint_every == 0 and step + 1 < steps:
                save_state(step + 1)
            if on_step is not None:
                on_step(step, losses[-1])
    tail = losses[-max(1, min(100, len(losses) // 10)):]
    meta = {"format": TEACHER_FORMAT, **settings, "steps": steps, "resumed_from": start or None,
            "final_loss": sum(tail) / len(tail), "first_loss": losses[0] if losses else None,
            "projection": "reference: 3x3 patches, adaptive average pooling to 1024 per layer, stacked, to "
                          f"{out_channels}; standardised per channel over {STAT_IMAGES} images",
            "backbone_weights": targets.extractor.weights_source, "seconds_this_run": time.perf_counter() - started,
            "created_by": "defectscope distill-teacher", "created": time.strftime("%Y-%m-%d %H:%M:%S")}
    state = {k: v.detach().cpu().clone() for k, v in pdn.module.state_dict().items()}
    save_tensors({"state_dict": state, "meta": meta}, output)
    ckpt.unlink(missing_ok=True)
    return meta


@torch.no_grad()
def target_statistics(targets: PatchTargets, batches: StepBatches, count: int, device) -> tuple[torch.Tensor, ...]:
    """Per-channel mean and standard deviation of the descriptors of ``count`` batches."""
    total = total_sq = None
    n = 0
    for k in range(count):
        t = targets(batches[-1 - k].to(device)).double()
        total = t.sum(dim=(0, 2, 3)) + (0 if total is None else total)
        total_sq = t.square().sum(dim=(0, 2, 3)) + (0 if total_sq is None else total_sq)
        n += t.shape[0] * t.shape[2] * t.shape[3]
    mean = total / n
    return mean.float().cpu(), (total_sq / n - mean.square()).clamp_min(1e-12).sqrt().float().cpu()


def describe(meta: dict) -> str:
    """One paragraph on a distilled teacher."""
    return (f"PDN-{meta['model_size'].upper()} teacher distilled from {meta['backbone']} on {meta['images']}: "
            f"{meta['steps']} steps of {meta['batch_size']} images at {meta['image_size']} px, seed {meta['seed']}; "
            + (f"loss {meta['first_loss']:.3f} at the first step, " if meta.get("first_loss") is not None else "")
            + f"final loss {meta['final_loss']:.3f} (mean of the last steps)"
            + (f" (resumed at step {meta['resumed_from']})" if meta.get("resumed_from") else "")
            + f"; {meta['seconds_this_run']:.0f} s" + (" this run" if meta.get("resumed_from") else ""))


__all__ = ["PatchTargets", "StepBatches", "checkpoint_path", "distill_teacher", "reference_projection",
           "target_statistics", "describe"]
