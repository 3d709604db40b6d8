"""SimpleNet: a simple network for image anomaly detection and localisation.

Paper: Liu, Zhou, Xu, Wang, "SimpleNet: A Simple Network for Image Anomaly Detection and
Localization", CVPR 2023. Reference code: https://github.com/DonaldRR/SimpleNet (MIT).
Every parameter of its command line is a constructor argument here, with its default.

Data flow (shapes for ``imagesize`` 224, EfficientNet-Lite0 ``blocks.2``/``blocks.4``, defaults)::

    image [B,3,resize,resize] -> centre crop [B,3,224,224] -> frozen backbone
      -> [B,40,28,28], [B,112,14,14]
      -> each layer: patchsize x patchsize neighbourhood of every position, flattened
         (C*p*p values), the coarser grids resized to the finest -> [B,28*28,C_i*p*p]
      -> each layer: adaptive average pooling to pretrain_embed_dimension, layers stacked,
         adaptive average pooling to target_embed_dimension -> features [B,384,28,28]
      -> per-channel standardisation (fitted on training features)
      -> projection (pre_proj linear layers, proj_layer_type) -> [B*28*28, embedding_size]
      -> (training only) copies with Gaussian noise -> discriminator (dsc_layers) -> logits
    inference: patch score -D(x), map resized to the image, Gaussian smoothing (sigma 4),
    image score = highest patch score; sigmoid when ``post_processor``.

Noise scale. The reference adds N(0, noise_std^2) to features of WideResNet-50 in absolute
units. Other backbones have other activation scales, so here the aggregated features are
standardised per channel (:class:`FeatureStandardizer`, fitted on the training set) and
``noise_std`` is in units of each channel's standard deviation: one value means the same for
every backbone. Its default there is 1.0: the reference's 0.05 read in these units is far too
little noise (the discriminator then flags normal texture variation too; see
``DEFAULT_RELATIVE_NOISE_STD``). ``standardize_features=False`` gives the reference's absolute
units, with its default 0.05.

Where this file differs from the reference, on purpose:

- ``noise_std`` defaults to 1.0 feature stds (the reference's 0.05 with
  ``standardize_features=False``), and the projection starts orthogonal (``proj_init``; the
  reference's Xavier-normal with ``"xavier"``).
- ``pretrain_embed_dimension`` and ``target_embed_dimension`` default to 384, not the
  reference's 1024. Its MVTec runs pass 1536 for WideResNet-50's layer2 + layer3, whose patch
  descriptors (512 x 9 and 1024 x 9 values) that pools 3x and 6x; 1024 on Lite0's 40 x 9 and
  112 x 9 values *repeats* the first layer's values ~3 times and leaves a 1024 -> 682
  discriminator that made SimpleNet's epoch 4.7x SuperSimpleNet's. 384 pools Lite0's layers ~1x
  and ~2.6x, and an epoch is ~5x shorter. Generated natural textures, 25 epochs, image AUROC
  384 vs 1024: grass 0.756 vs 0.726 (100 epochs: 0.828 vs 0.795), gravel 0.686 vs 0.698, fabric
  0.900 vs 0.914 (one seed, 60 test images: +-0.05); 152 (Lite0's channel count) lost pixel
  AUROC (grass 0.661, gravel 0.635 vs 0.772, 0.810). With WideResNet-50 pass 1536, as the
  reference's commands do.
- ``defectscope train`` trains at least ``min_default_steps`` optimizer steps when ``--epochs``
  is not given (small training sets get more epochs; see :attr:`min_default_steps`).
- ``meta_epochs x gan_epochs`` passes over the training set train the discriminator; the
  reference also scores the *test* set after every meta-epoch and keeps the best weights,
  which is model selection on test data, so the final weights are kept instead.
- ``aed_meta_epochs`` only shortens the cosine period (as in the reference):
  ``(meta_epochs - aed_meta_epochs) * gan_epochs`` discriminator epochs.
- ``auto_noise`` is stored but unused in the reference. Here ``auto_noise > 0`` sets the
  noise std of every step to ``auto_noise`` times the per-channel std of that batch's
  projected features, so the noise follows the projection as it trains.
- ``embedding_size`` is stored but unused in the reference. Here it is the projection's
  output width (with ``pre_proj > 0``); the reference's projection keeps the width.
- ``proj_layer_type`` between projection layers: 0 nothing, 1 BatchNorm (commented out in
  the reference), 2 or more LeakyReLU(0.2) (as in the reference).
- ``augment`` switches the augmentation on; the strengths (``rotate_degrees`` ... ``vflip``)
  say how much. The reference applies the strengths whatever ``augment`` says.
- ``train_backbone``: the backbone's weights train (AdamW, lr 1e-3) but its BatchNorm
  statistics stay frozen.
- ``resize`` / ``imagesize``: square resize, then a centre crop; the map is returned at the
  ``resize`` size with the uncropped border filled from the crop's edge, so it lines up with
  the whole image.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from defectscope.models.base import AnomalyModel
from defectscope.models.common import FeatureStandardizer, GaussianBlur2d

# Reference learning rate; the projection trains at a tenth of it, a trained backbone at it.
BASE_LR = 1e-3
# Adam weight decay of the discriminator in the reference (an L2 term on the gradient).
DSC_WEIGHT_DECAY = 1e-5
# Cosine schedule floor, as a fraction of dsc_lr.
COS_LR_FLOOR = 0.4
# Default noise std: in units of each channel's feature std (standardised features), and the
# reference's in absolute units (``standardize_features=False``). The reference's 0.05 read as
# relative units is too little noise: synthetic set, 20 epochs, pixel AUROC 0.64 against 0.996
# with 1.0; ELPV, 3 epochs, image AUROC 0.860 / 0.768 (mono / poly) against 0.906 / 0.866
# (benchmarks/results/simplenet.md).
DEFAULT_RELATIVE_NOISE_STD = 1.0
REFERENCE_NOISE_STD = 0.05


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, (nn.Linear, nn.Conv2d)):
        nn.init.xavier_normal_(module.weight)


PROJ_INITS = ("orthogonal", "xavier")


class Projection(nn.Sequential):
    """``n_layers`` linear layers ``in_dim -> out_dim -> ... -> out_dim``.

    ``layer_type`` (between layers): 0 nothing, 1 BatchNorm1d, 2+ LeakyReLU(0.2).
    ``init``: starting weights, ``"orthogonal"`` or ``"xavier"`` (Xavier-normal, the reference's).
    A random Xavier square matrix has singular values down to ~1e-3, which squeezes some feature
    directions far below the isotropic noise added after the projection; an orthogonal start
    keeps every direction at scale 1 (as SuperSimpleNet's adaptor, see ``adaptor_init`` there).
    """

    def __init__(self, in_dim: int, out_dim: int, n_layers: int = 1, layer_type: int = 0,
                 init: str = "orthogonal") -> None:
        layers: list[nn.Module] = []
        for i in range(n_layers):
            layers.append(nn.Linear(in_dim if i == 0 else out_dim, out_dim))
            if i < n_layers - 1:
                if layer_type == 1:
                    layers.append(nn.BatchNorm1d(out_dim))
                elif layer_type > 1:
                    layers.append(nn.LeakyReLU(0.2))
        super().__init__(*layers)
        if init == "orthogonal":
            for layer in self:
                if isinstance(layer, nn.Linear):
                    nn.init.orthogonal_(layer.weight)
        else:
            self.apply(_init_weights)


class Discriminator(nn.Module):
    """Per-patch MLP: ``n_layers - 1`` blocks (Linear, BatchNorm1d, LeakyReLU) and a linear
    tail to one logit. ``hidden`` None: each block is 1.5x narrower than its input.

    Its first layer's two ``[rows, width] x [width, width / 1.5]`` products (forward and weight
    gradient) are most of a training step; a fused forward like SuperSimpleNet's head was measured
    1.07x slower here and is not used (benchmarks/results/simplenet_speed.md).
    """

    def __init__(self, in_dim: int, n_layers: int = 2, hidden: int | None = None) -> None:
        super().__init__()
        blocks: list[nn.Module] = []
        width = in_dim
        for _ in range(n_layers - 1):
            out = int(width // 1.5) if hidden is None else hidden
            blocks += [nn.Linear(width, out), nn.BatchNorm1d(out), nn.LeakyReLU(0.2)]
            width = out
        self.body = nn.Sequential(*blocks)
        self.tail = nn.Linear(width, 1, bias=False)
        self.apply(_init_weights)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[N, in_dim]`` -> ``[N]`` logits (high: normal)."""
        return self.tail(self.body(x))[:, 0]


def aggregate_patches(
    maps: list[torch.Tensor], patchsize: int, pretrain_embed_dimension: int, target_embed_dimension: int
) -> torch.Tensor:
    """Backbone maps -> one patch descriptor per position of the finest map.

    Each layer's ``patchsize`` x ``patchsize`` neighbourhood (zero-padded) is flattened to
    ``C_i * p * p`` values; coarser grids are resized (bilinear) to the finest; each layer is
    average-pooled to ``pretrain_embed_dimension`` values, and the concatenated layers to
    ``target_embed_dimension``.

    ``[B, C_i, H_i, W_i]`` list -> ``[B, target_embed_dimension, H_0, W_0]``.
    """
    b, _, h, w = maps[0].shape
    pad = (patchsize - 1) // 2
    per_layer = []
    for fmap in maps:
        fh, fw = fmap.shape[-2:]
        patches = F.unfold(fmap, kernel_size=patchsize, padding=pad)  # [B, C*p*p, fh*fw]
        if (fh, fw) != (h, w):
            patches = patches.reshape(b, -1, fh, fw)
            patches = F.interpolate(patches, size=(h, w), mode="bilinear", align_corners=False).flatten(2)
        patches = patches.transpose(1, 2).reshape(b * h * w, 1, -1)  # one row per position
        per_layer.append(F.adaptive_avg_pool1d(patches, pretrain_embed_dimension))
    stacked = torch.cat(per_layer, dim=2)  # [B*h*w, 1, L*pretrain]
    pooled = F.adaptive_avg_pool1d(stacked, target_embed_dimension)[:, 0]
    return pooled.reshape(b, h, w, target_embed_dimension).permute(0, 3, 1, 2).contiguous()


def build_augmentation(
    rotate_degrees: float = 0, translate: float = 0, scale: float = 0, brightness: float = 0,
    contrast: float = 0, saturation: float = 0, gray: float = 0, hflip: float = 0, vflip: float = 0,
):
    """The reference's training augmentation (colour jitter, flips, grey, affine), on [0, 1] images."""
    from torchvision.transforms import v2

    return v2.Compose([
        v2.ColorJitter(brightness, contrast, saturation),
        v2.RandomHorizontalFlip(hflip),
        v2.RandomVerticalFlip(vflip),
        v2.RandomGrayscale(gray),
        v2.RandomAffine(rotate_degrees, translate=(translate, translate), scale=(1 - scale, 1 + scale),
                        interpolation=v2.InterpolationMode.BILINEAR),
    ])


class SimpleNet(AnomalyModel):
    """SimpleNet model. Arguments named as in the reference's command line, same defaults
    except ``noise_std`` (1.0 feature stds; the reference's 0.05 with ``standardize_features=False``),
    the projection's start (``proj_init``, orthogonal) and the embedding widths (384, not 1024; see
    the module doc).

    Args:
        backbone, layers_to_extract_from, weights, pretrained: frozen backbone (see
            :class:`~defectscope.backbones.FeatureExtractor`); no layers: the backbone's own.
        pretrain_embed_dimension: values per layer after pooling each patch descriptor.
        target_embed_dimension: values per patch after pooling all layers together.
        patchsize: neighbourhood aggregated around every position.
        embedding_size: projection output width (``pre_proj > 0``); None: target_embed_dimension.
        meta_epochs, aed_meta_epochs, gan_epochs: training length (see :meth:`epochs`) and
            cosine period; the engine is run for :attr:`epochs` passes.
        noise_std: std of the synthetic feature noise. None (default): 1.0 in units of each
            channel's feature std when ``standardize_features`` (see module doc), the
            reference's 0.05 in absolute units otherwise.
        auto_noise: > 0: noise std = auto_noise x the batch's projected-feature std.
        mix_noise: number of noise levels, ``noise_std * 1.1**k``; each patch draws one.
        train_backbone: the backbone trains too (features computed every step, no cache).
        cos_lr: cosine schedule of the discriminator's learning rate.
        dsc_layers, dsc_hidden, dsc_margin, dsc_lr: discriminator depth, width, loss margin
            and learning rate.
        pre_proj, proj_layer_type: projection depth and what sits between its layers.
        resize, imagesize: square resize, then centre crop fed to the backbone.
        rotate_degrees ... vflip, augment: training augmentation (applied when ``augment``).
        standardize_features: noise in per-channel-std units (False: absolute, as the reference).
        proj_init: starting weights of the projection (``pre_proj > 0``): ``"orthogonal"``
            (default) or ``"xavier"`` (Xavier-normal, the reference's). Synthetic set, ``pre_proj``
            1, noise 1.0, 4 seeds: 128 px, 8 epochs, pixel AUROC 0.977 vs 0.971, AUPRO 0.915 vs
            0.901, image AUROC 0.995 vs 1.000; 64 px, 4 epochs, image AUROC 0.924 vs 0.836, pixel
            AUROC 0.733 vs 0.708, AUPRO 0.413 vs 0.442 (benchmarks/results/simplenet.md,
            benchmarks/simplenet_proj_init.py).
        sigma: smoothing of the anomaly map.
        pre_processor, post_processor, evaluator, visualizer: as for every defectscope model;
            ``post_processor`` maps scores through a sigmoid.
    """

    name = "simplenet"
    # `defectscope train` without --epochs: 3 passes, raised to at least this many optimizer steps
    # on small training sets (defectscope/cli.py, default_epochs). Generated grass, 32 training
    # images (4 steps an epoch): 3 epochs scored image AUROC 0.594 against the nearest-neighbour
    # floor's 0.686; 25 epochs 0.726 and 100 epochs 0.795 (1024-wide features; 384: 0.756 and
    # 0.828; 60 test images, benchmarks/results/floor_synthetic.md). floor_synthetic_test100+120.md
    # has every model against its floor on 220 test images.
    default_epochs = 3
    min_default_steps = 400

    def __init__(
        self,
        backbone: str = "efficientnet_lite0",
        layers_to_extract_from: list[str] | tuple[str, ...] | None = None,
        pretrain_embed_dimension: int = 384,
        target_embed_dimension: int = 384,
        patchsize: int = 3,
        embedding_size: int | None = None,
        meta_epochs: int = 1,
        aed_meta_epochs: int = 1,
        gan_epochs: int = 1,
        noise_std: float | None = None,
        auto_noise: float = 0,
        mix_noise: int = 1,
        train_backbone: bool = False,
        cos_lr: bool = False,
        dsc_layers: int = 2,
        dsc_hidden: int | None = None,
        dsc_margin: float = 0.8,
        dsc_lr: float = 0.0002,
        pre_proj: int = 0,
        proj_layer_type: int = 0,
        resize: int = 256,
        imagesize: int = 224,
        rotate_degrees: float = 0,
        translate: float = 0,
        scale: float = 0,
        brightness: float = 0,
        contrast: float = 0,
        saturation: float = 0,
        gray: float = 0,
        hflip: float = 0,
        vflip: float = 0,
        augment: bool = False,
        standardize_features: bool = True,
        proj_init: str = "orthogonal",
        sigma: float = 4.0,
        weights: str | None = None,
        pretrained: bool = True,
        pre_processor: bool = True,
        post_processor: bool = True,
        evaluator: bool = True,
        visualizer: bool = True,
    ) -> None:
        super().__init__(
            backbone=backbone, layers=layers_to_extract_from, image_size=resize, weights=weights,
            pretrained=pretrained, pre_processor=pre_processor, post_processor=post_processor,
            evaluator=evaluator, visualizer=visualizer,
        )
        checks = {
            "patchsize must be an odd number >= 1": patchsize >= 1 and patchsize % 2 == 1,
            "pretrain_embed_dimension and target_embed_dimension must be >= 1":
                min(pretrain_embed_dimension, target_embed_dimension) >= 1,
            "meta_epochs and gan_epochs must be >= 1": min(meta_epochs, gan_epochs) >= 1,
            "aed_meta_epochs must be >= 0": aed_meta_epochs >= 0,
            "noise_std must be > 0": noise_std is None or noise_std > 0,
            "auto_noise must be >= 0": auto_noise >= 0,
            "mix_noise must be >= 1": mix_noise >= 1,
            "dsc_layers must be >= 1": dsc_layers >= 1,
            "dsc_lr must be > 0": dsc_lr > 0,
            "pre_proj must be >= 0": pre_proj >= 0,
            f"proj_init must be one of {', '.join(PROJ_INITS)}": proj_init in PROJ_INITS,
            "imagesize must be between 32 and resize": 32 <= imagesize <= resize,
            "gray, hflip and vflip are probabilities in [0, 1]": all(0 <= p <= 1 for p in (gray, hflip, vflip)),
            "translate must be in [0, 1] and scale in [0, 1)": 0 <= translate <= 1 and 0 <= scale < 1,
        }
        failed = [message for message, ok in checks.items() if not ok]
        if failed:
            raise ValueError("Invalid SimpleNet settings: " + "; ".join(failed) + ".")
        if embedding_size is None:
            embedding_size = target_embed_dimension
        if noise_std is None:
            noise_std = DEFAULT_RELATIVE_NOISE_STD if standardize_features else REFERENCE_NOISE_STD
        self.hparams.pop("layers")
        self.hparams.pop("image_size")
        self.hparams.update(
            layers_to_extract_from=list(self.feature_extractor.layers),
            pretrain_embed_dimension=pretrain_embed_dimension, target_embed_dimension=target_embed_dimension,
            patchsize=patchsize, embedding_size=embedding_size, meta_epochs=meta_epochs,
            aed_meta_epochs=aed_meta_epochs, gan_epochs=gan_epochs, noise_std=noise_std, auto_noise=auto_noise,
            mix_noise=mix_noise, train_backbone=train_backbone, cos_lr=cos_lr, dsc_layers=dsc_layers,
            dsc_hidden=dsc_hidden, dsc_margin=dsc_margin, dsc_lr=dsc_lr, pre_proj=pre_proj,
            proj_layer_type=proj_layer_type, resize=resize, imagesize=imagesize, rotate_degrees=rotate_degrees,
            translate=translate, scale=scale, brightness=brightness, contrast=contrast, saturation=saturation,
            gray=gray, hflip=hflip, vflip=vflip, augment=augment, standardize_features=standardize_features,
            proj_init=proj_init, sigma=sigma,
        )
        self.pretrain_embed_dimension = pretrain_embed_dimension
        self.target_embed_dimension = target_embed_dimension
        self.patchsize = patchsize
        self.meta_epochs, self.aed_meta_epochs, self.gan_epochs = meta_epochs, aed_meta_epochs, gan_epochs
        self.noise_std, self.auto_noise, self.mix_noise = noise_std, auto_noise, mix_noise
        self.cos_lr, self.dsc_lr, self.dsc_margin = cos_lr, dsc_lr, dsc_margin
        self.crop_size = imagesize
        self.train_backbone = train_backbone
        if train_backbone:
            self.feature_extractor.requires_grad_(True)
        self.augment = augment
        self.train_transform = (
            build_augmentation(rotate_degrees, translate, scale, brightness, contrast, saturation, gray, hflip, vflip)
            if augment else None
        )

        self.standardizer = FeatureStandardizer(target_embed_dimension) if standardize_features else None
        if pre_proj > 0:
            self.pre_projection = Projection(target_embed_dimension, embedding_size, pre_proj, proj_layer_type, proj_init)
            width = embedding_size
        else:
            self.pre_projection = None
            width = target_embed_dimension
        self.discriminator = Discriminator(width, n_layers=dsc_layers, hidden=dsc_hidden)
        self.smoothing = GaussianBlur2d(sigma=sigma)

    @property
    def epochs(self) -> int:
        """Passes over the training set: ``meta_epochs * gan_epochs``."""
        return self.meta_epochs * self.gan_epochs

    # ---- features ---------------------------------------------------------------------
    def _crop(self, images: torch.Tensor) -> torch.Tensor:
        h, w = images.shape[-2:]
        c = self.crop_size
        top, left = (h - c) // 2, (w - c) // 2
        return images[..., top : top + c, left : left + c]

    def _aggregate(self, images: torch.Tensor) -> torch.Tensor:
        maps = list(self.feature_extractor(self._crop(self.roi_images(images))).values())
        return aggregate_patches(maps, self.patchsize, self.pretrain_embed_dimension, self.target_embed_dimension)

    @torch.no_grad()
    def extract_features(self, images: torch.Tensor) -> torch.Tensor:
        """Frozen part: ``[B,3,resize,resize]`` normalised images -> ``[B,target,h,w]``.

        Deterministic for a given image, so the engine may cache it (unless the images are
        augmented or the backbone trains, see :attr:`train_transform`, :attr:`train_backbone`).
        """
        return self._aggregate(images)

    def feature_params(self) -> dict:
        """Settings that change :meth:`extract_features` output (part of the feature-cache key)."""
        return {
            "patchsize": self.patchsize, "pretrain_embed_dimension": self.pretrain_embed_dimension,
            "target_embed_dimension": self.target_embed_dimension, "imagesize": self.crop_size,
        }

    def fit_feature_statistics(self, features: torch.Tensor) -> None:
        """Fit the per-channel standardisation on training features ``[N,C,h,w]``."""
        if self.standardizer is not None:
            self.standardizer.fit(features)

    def embed(self, features: torch.Tensor) -> torch.Tensor:
        """``[B,C,h,w]`` aggregated features -> ``[B*h*w, width]`` (standardised, projected)."""
        x = features.to(self.discriminator.tail.weight.dtype)
        if self.standardizer is not None:
            x = self.standardizer(x)
        x = x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])
        return self.pre_projection(x) if self.pre_projection is not None else x

    # ---- training ---------------------------------------------------------------------
    def make_noise(self, true_feats: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """Gaussian noise for ``[N, D]`` features: each row draws one of ``mix_noise`` levels
        ``std * 1.1**k``; ``std`` is ``noise_std`` or (``auto_noise``) measured on the batch.
        ``out``: a contiguous ``[N, D]`` tensor to write it into (the same numbers)."""
        if self.auto_noise > 0:
            std = self.auto_noise * true_feats.detach().std(dim=0, keepdim=True)
        else:
            std = true_feats.new_tensor(self.noise_std)
        levels = torch.randint(0, self.mix_noise, (true_feats.shape[0], 1), device=true_feats.device)
        noise = torch.randn_like(true_feats) if out is None else out.normal_()
        noise.mul_(std)
        if self.mix_noise > 1:  # 1.1**0 is exactly 1: one level leaves the noise as it is
            noise.mul_(1.1 ** levels.to(true_feats.dtype))
        return noise

    def loss(self, true_scores: torch.Tensor, fake_scores: torch.Tensor) -> torch.Tensor:
        """Truncated L1: normal patches pushed above ``dsc_margin``, noisy ones below
        ``-dsc_margin``; plus the reference's Adam weight decay on the discriminator as an
        L2 term (so all parameter groups fit in one AdamW)."""
        th = self.dsc_margin
        hinge = (th - true_scores).clamp_min(0).mean() + (fake_scores + th).clamp_min(0).mean()
        l2 = sum((p * p).sum() for p in self.discriminator.parameters())
        return hinge + 0.5 * DSC_WEIGHT_DECAY * l2

    def training_step(self, features: torch.Tensor, masks=None, labels=None) -> torch.Tensor:
        """One step on pre-extracted features ``[B,C,h,w]`` (all normal; masks and labels unused)."""
        true_feats = self.embed(features)
        n = true_feats.shape[0]
        roi = self.roi_grid(*features.shape[-2:], roi=self._crop(self.roi))
        if roi is None and not true_feats.requires_grad:
            # No projection: the noisy copies are written straight into the discriminator's
            # input after the clean rows; the same numbers as below, fewer passes over memory.
            both = true_feats.new_empty(2 * n, true_feats.shape[1])
            both[:n] = true_feats
            self.make_noise(true_feats, out=both[n:]).add_(true_feats)
        else:
            fake_feats = true_feats + self.make_noise(true_feats)
            if roi is not None:  # no synthetic anomalies outside the region of interest
                inside = roi.expand(features.shape[0], 1, *features.shape[-2:]).reshape(-1) > 0
                fake_feats = fake_feats[inside.to(fake_feats.device)]
            both = torch.cat((true_feats, fake_feats))
        scores = self.discriminator(both)
        return self.loss(scores[:n], scores[n:])

    def training_step_images(self, images: torch.Tensor) -> torch.Tensor:
        """One step on normalised images: augmentation (when on), then features (with
        gradients into the backbone when ``train_backbone``), then :meth:`training_step`."""
        if self.train_transform is not None:
            images = self.augment_images(images)
        if self.train_backbone:
            return self.training_step(self._aggregate(images))
        return self.training_step(self.extract_features(images))

    @torch.no_grad()
    def augment_images(self, images: torch.Tensor) -> torch.Tensor:
        """Normalised ``[B,3,H,W]`` -> the same with each image augmented on its own."""
        mean = images.new_tensor(self.mean).view(1, 3, 1, 1)
        std = images.new_tensor(self.std).view(1, 3, 1, 1)
        pixels = (images * std + mean).clamp(0, 1)
        pixels = torch.stack([self.train_transform(image) for image in pixels])
        return (pixels - mean) / std

    def configure_optimizers(self, max_epochs: int):
        """One AdamW: projection (lr 1e-4, weight decay 0.01), trained backbone (lr 1e-3),
        discriminator (``dsc_lr``; its decay is in :meth:`loss`). LambdaLR, stepped once per
        epoch, keeps the others constant and gives the discriminator, with ``cos_lr``, the
        reference's cosine from ``dsc_lr`` to ``0.4 * dsc_lr`` over
        ``(meta_epochs - aed_meta_epochs) * gan_epochs`` epochs."""
        groups, lambdas = [], []
        if self.pre_projection is not None:
            groups.append({"params": self.pre_projection.parameters(), "lr": BASE_LR * 0.1})
            lambdas.append(_constant)
        if self.train_backbone:
            groups.append({"params": self.feature_extractor.parameters(), "lr": BASE_LR})
            lambdas.append(_constant)
        # The discriminator last: the engine logs the last group's learning rate.
        groups.append({"params": self.discriminator.parameters(), "lr": self.dsc_lr, "weight_decay": 0.0})
        lambdas.append(CosineFactor(self.cosine_period) if self.cos_lr else _constant)
        optimizer = torch.optim.AdamW(groups)
        return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambdas)

    @property
    def cosine_period(self) -> int:
        return max(1, (self.meta_epochs - self.aed_meta_epochs) * self.gan_epochs)

    # ---- inference --------------------------------------------------------------------
    def forward_features(self, features: torch.Tensor, output_size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Pre-extracted features -> (maps ``[B,1,H,W]`` smoothed, scores ``[B]``), raw -D(x)."""
        b, _, h, w = features.shape
        patch_scores = -self.discriminator(self.embed(features)).reshape(b, 1, h, w)
        scores = patch_scores.flatten(1).amax(dim=1)
        crop = (self.crop_size, self.crop_size)
        maps = self.smoothing(F.interpolate(patch_scores, size=crop, mode="bilinear", align_corners=False))
        if tuple(output_size) != crop:
            # Place the crop's map back where the crop came from; the border repeats its edge.
            top, left = (output_size[0] - crop[0]) // 2, (output_size[1] - crop[1]) // 2
            pad = (left, output_size[1] - crop[1] - left, top, output_size[0] - crop[0] - top)
            maps = F.pad(maps, pad, mode="replicate")
        return maps, scores

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``[B,3,resize,resize]`` normalised images -> anomaly maps ``[B,1,H,W]`` and scores
        ``[B]``; in [0, 1] (sigmoid) when ``post_processor`` is on."""
        maps, scores = self.forward_features(self.extract_features(images), images.shape[-2:])
        if self.post_processor:
            return self.apply_roi(maps.sigmoid(), scores.sigmoid())
        return self.apply_roi(maps, scores)

    def trained_state_dict(self) -> dict[str, torch.Tensor]:
        """Projection, discriminator and statistics; the backbone too when it trained."""
        return dict(self.state_dict()) if self.train_backbone else super().trained_state_dict()


def _constant(epoch: int) -> float:
    return 1.0


class CosineFactor:
    """Learning-rate factor ``floor + (1 - floor) * (1 + cos(pi * epoch / period)) / 2``."""

    def __init__(self, period: int, floor: float = COS_LR_FLOOR) -> None:
        self.period, self.floor = period, floor

    def __call__(self, epoch: int) -> float:
        return self.floor + (1 - self.floor) * (1 + math.cos(math.pi * epoch / self.period)) / 2
