"""SuperSimpleNet: unifying unsupervised and supervised surface-defect detection.

Papers: Rolih et al., "SuperSimpleNet: Unifying Unsupervised and Supervised Learning for
Fast and Reliable Surface Defect Detection", ICPR 2024 (https://arxiv.org/abs/2408.03143);
"No Label Left Behind: A Unified Surface Defect Detection Model for all Supervision
Regimes", JIMS 2025. ``adapt_cls_features=True`` is the ICPR model, ``False`` (default) JIMS.

Data flow (shapes for a 256x256 input and EfficientNet-Lite0 ``blocks.2``/``blocks.4``)::

    image [B,3,256,256] -> frozen backbone -> [B,40,32,32], [B,112,16,16]
      -> upscale to 2x the largest map, concat, 3x3 average pool -> features [B,152,64,64]
      -> per-channel standardisation (fitted on training features) -> adaptor (1x1 conv)
      -> (training only) Gaussian noise inside Perlin masks on a duplicated batch
      -> segmentation head -> map logits [B,1,64,64]
      -> classification head (5x5 conv over features + map, max/avg pooling, linear) -> score logit [B]
    inference: map upscaled to the image size, Gaussian smoothing (sigma 4), sigmoid; the image
      score is the classifier, the map's maximum or their mean (``image_score``).

Noise scale. The reference adds N(0, 0.015) to features of WideResNet-50 (torchvision v1
weights). Other backbones have other activation scales (EfficientNet-Lite features have std
about 5), so a fixed absolute std means something different for each. Here the features are
standardised per channel with statistics fitted on the training set (:class:`FeatureStandardizer`)
and ``noise_std`` is in units of each channel's standard deviation, which makes one value work
for every backbone. ``standardize_features=False`` with ``noise_std=0.015`` gives the reference
behaviour for WideResNet-50.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import sigmoid_focal_loss

from defectscope.models.base import AnomalyModel
from defectscope.models.common import (
    FeatureStandardizer,
    GaussianBlur2d,
    check_setting,
    perlin_masks,
    upscale_and_concat,
)
from defectscope.models.model_files import ModelFileError
from defectscope.models.fused_head import bn_mlp_forward, bn_mlp_train_forward_copies, scatter_rows, supports_fused


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, (nn.Linear, nn.Conv2d)):
        nn.init.xavier_normal_(module.weight)
    elif isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
        nn.init.constant_(module.weight, 1)


class SegmentationDetectionHead(nn.Module):
    """Segmentation head (per-position MLP) and classification head (conv + global pooling).

    Args:
        channels: feature channels C.
        stop_grad: stop gradients flowing from the classification head into the map.
        hidden: width of the segmentation MLP (1024 in the paper).
    """

    def __init__(self, channels: int, stop_grad: bool = True, hidden: int = 1024) -> None:
        super().__init__()
        self.stop_grad = stop_grad
        # The segmentation head runs through fused_head.py where it applies (same function,
        # fewer passes over memory); False runs the plain modules (tests compare both).
        self.fused = True
        self.seg_head = nn.Sequential(
            nn.Conv2d(channels, hidden, kernel_size=1),
            nn.BatchNorm2d(hidden),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(hidden, 1, kernel_size=1, bias=False),
        )
        self.cls_conv = nn.Sequential(
            nn.Conv2d(channels + 1, 128, kernel_size=5, padding=2),
            nn.BatchNorm2d(128),
            nn.ReLU(inplace=True),
        )
        # 128 conv channels and the map, each max- and average-pooled.
        self.cls_fc = nn.Linear(128 * 2 + 2, 1)
        self.apply(_init_weights)

    def forward(self, seg_features: torch.Tensor, cls_features: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``[B,C,h,w]``, ``[B,C,h,w]`` -> map logits ``[B,1,h,w]``, score logits ``[B]``
        (None without ``cls_features``: the classification head is skipped)."""
        ano_map = self.segment(seg_features)
        if cls_features is None:
            return ano_map, None
        map_in = ano_map.detach() if self.stop_grad else ano_map
        conv = self.cls_conv(torch.cat((cls_features, map_in), dim=1))
        pooled = torch.cat(
            (
                conv.amax(dim=(2, 3)),
                conv.mean(dim=(2, 3)),
                map_in.amax(dim=(2, 3)),
                map_in.mean(dim=(2, 3)),
            ),
            dim=1,
        )
        return ano_map, self.cls_fc(pooled).reshape(-1)

    def segment(self, seg_features: torch.Tensor) -> torch.Tensor:
        """The segmentation head alone: ``[B,C,h,w]`` -> map logits ``[B,1,h,w]``; through the
        fused forward where it applies (same function, fewer passes over the [positions, 1024]
        hidden layer, which in eval mode never exists whole; fused_head.py)."""
        return bn_mlp_forward(self.seg_head, seg_features) if self.fused else self.seg_head(seg_features)


class LabelProbe(nn.Module):
    """Logistic regression on each image's pooled standardised features: ``[B,C,h,w]`` -> logit ``[B]``.

    Pooling (``pooling``): each channel's mean and the mean of its top 1 % positions
    (``"mean+top1%"``, 10 of a 32x32 grid; the default), or its mean and maximum (``"mean+max"``,
    how files saved before 2026-11-30 were fitted, kept so that they score as they did). The top
    1 % is a maximum that one odd position cannot set alone. On the 24 saved ELPV runs with
    5-50 labelled cells it raised the fused test AUROC in 24 of 24 runs (+0.001 to +0.004 per
    cell count; 50 cells: mono 0.9629 -> 0.9653, poly 0.9149 -> 0.9164), and the training-side
    check (cross-fitted fused AUROC on the labelled cells against held-out good ones, no test
    cell) preferred it in 20 of 24 (benchmarks/results/probe_pooling.md).

    Fitted once after training by L-BFGS on the training images' image labels (:meth:`fit`), not
    by the optimizer: a few dozen labelled defects among hundreds of good images give SGD a few
    hundred noisy steps in a short schedule, while the convex fit converges exactly. Its loss is
    scikit-learn's ``LogisticRegression(C=0.1)`` (L2, intercept not penalised); tests compare the two.
    """

    POOLINGS = ("mean+top1%", "mean+max")
    DEFAULT_POOLING = "mean+top1%"  # what a new fit uses
    OLD_FILE_POOLING = "mean+max"  # a fitted probe whose file records no pooling

    def __init__(self, channels: int, pooling: str = DEFAULT_POOLING) -> None:
        super().__init__()
        if pooling not in self.POOLINGS:
            raise ValueError(f"pooling must be one of {', '.join(self.POOLINGS)}, got {pooling!r}")
        self.pooling = pooling
        self.linear = nn.Linear(2 * channels, 1)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)
        self.linear.requires_grad_(False)  # fitted in closed form, never by the optimizer

    @staticmethod
    def pool(features: torch.Tensor, pooling: str = DEFAULT_POOLING) -> torch.Tensor:
        """``[B,C,h,w]`` -> ``[B,2C]``: channel means, then the channel's top-1 % mean (at least one
        position) or maximum (``pooling``)."""
        mean = features.mean(dim=(2, 3))
        if pooling == "mean+max":
            return torch.cat((mean, features.amax(dim=(2, 3))), dim=1)
        flat = features.flatten(2)
        top = flat.topk(max(1, flat.shape[2] // 100), dim=2).values.mean(dim=2)
        return torch.cat((mean, top), dim=1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear(self.pool(features, self.pooling)).reshape(-1)

    @staticmethod
    def solve(pooled: torch.Tensor, labels: torch.Tensor, c: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
        """L2-regularised logistic regression (``0.5 |w|^2 + c * sum of log-losses``) on
        ``[N,D]`` inputs and ``[N]`` 0/1 labels -> (weight ``[D]``, bias), in float64.

        ``c`` 0.1 (scikit-learn's default is 1): with 5-50 labelled defects in 304 dimensions the
        stronger penalty ranked unseen ELPV defects better at every count on mono (probe alone,
        image AUROC 0.908 / 0.924 / 0.942 / 0.942 at 5 / 10 / 25 / 50 cells against 0.864 / 0.896 /
        0.935 / 0.933) and on poly (0.826 / 0.833 / 0.882 / 0.868 against 0.801 / 0.759 / 0.855 /
        0.852); benchmarks/results/labels_recipe.md."""
        x = pooled.detach().double()
        y = labels.detach().double().reshape(-1)
        w = torch.zeros(x.shape[1] + 1, dtype=torch.float64, requires_grad=True)
        optimizer = torch.optim.LBFGS([w], lr=1, max_iter=1000, tolerance_grad=1e-9, tolerance_change=1e-12,
                                      history_size=20, line_search_fn="strong_wolfe")

        def closure():
            optimizer.zero_grad()
            logits = x @ w[:-1] + w[-1]
            loss = c * F.binary_cross_entropy_with_logits(logits, y, reduction="sum") + 0.5 * (w[:-1] ** 2).sum()
            loss.backward()
            return loss

        with torch.enable_grad():
            optimizer.step(closure)
        w = w.detach()
        return w[:-1], w[-1]

    def fit(self, pooled: torch.Tensor, labels: torch.Tensor) -> None:
        weight, bias = self.solve(pooled, labels)
        with torch.no_grad():
            self.linear.weight.copy_(weight.reshape(1, -1))
            self.linear.bias.copy_(bias.reshape(1))


def cross_fitted_probe_logits(pooled: torch.Tensor, labels: torch.Tensor, defects: torch.Tensor,
                              folds: int = 5) -> torch.Tensor:
    """Each labelled defect's probe logit from a probe fitted without it: ``pooled`` ``[N,D]``,
    ``labels`` ``[N]`` (0/1), ``defects`` the indices of the labelled defects, split into ``folds``
    interleaved folds -> ``[len(defects)]`` float64 logits (in ``defects`` order)."""
    unseen = torch.empty(len(defects), dtype=torch.float64)
    for k in range(folds):
        held = torch.zeros(len(labels), dtype=torch.bool)
        held[defects[k::folds]] = True
        weight, bias = LabelProbe.solve(pooled[~held], labels[~held])
        unseen[k::folds] = pooled[defects[k::folds]].double() @ weight + bias
    return unseen


class SuperSimpleNet(AnomalyModel):
    """SuperSimpleNet model.

    Args (the first eight are anomalib's, with its defaults):
        perlin_threshold: threshold binarising Perlin noise into anomaly masks.
        backbone: backbone name (see :data:`defectscope.backbones.BACKBONES`).
        layers: backbone layers whose features are used; None takes the backbone's default
            (``["layer2", "layer3"]`` for wide_resnet50_2, as in the reference).
        supervised: training uses real labelled defects; turns off the stop-gradient
            between the heads (and clips gradients when ``supervised_grad_clip`` is set). The
            engine sets it from the data (see :meth:`set_regime`).
        adapt_cls_features: ICPR variant (True: the classification head sees adapted
            features) or JIMS variant (False: it sees the standardised backbone features).
        pre_processor: resize and normalise inputs in :meth:`predict` (False: inputs are
            already pre-processed tensors).
        post_processor: map outputs through a sigmoid and normalise scores with the
            threshold fitted at training time (False: raw logits).
        evaluator: compute metrics when the engine tests the model.
        visualizer: write heat-map overlays when the engine tests the model.
        noise_std: std of the synthetic feature noise, in units of each channel's std
            when ``standardize_features`` (default 0.015 in absolute units otherwise).
        standardize_features: standardise features per channel (see module docstring).
        image_size: input size (square int or (h, w)); 256 as in the reference.
        patch_size: neighbourhood of the average pooling over features.
        upscale_factor: features are resized to this multiple of the largest map (2 in the
            reference; 1 keeps the backbone's resolution and is 4x cheaper).
        sigma: Gaussian smoothing of the output map.
        lr_scale: multiplies the reference learning rates (1e-4 adaptor, 2e-4 heads).
        image_score: which output is the image's anomaly score. ``"classifier"``: the
            classification head (the reference's score). ``"map_max"``: the maximum of the
            smoothed anomaly map (the reference's evaluation reports it too, as "seg_score"); the
            classification head is then skipped at inference. ``"mean"``: the average of the two
            as probabilities. ``"fused"``: the map maximum and the label probe (:class:`LabelProbe`,
            a logistic regression on pooled features fitted on the labelled training images after
            training), each as a z-score against the held-out good images, weighed by how far each
            puts the labelled defects from them (the probe's by probes fitted without each defect;
            :func:`fusion_weights`). ``"auto"`` (default): ``map_max`` after unsupervised training,
            ``fused`` after training with labelled defects. Why: trained on synthetic noise only,
            the classification head learns to spot that noise rather than real defects (ELPV
            image AUROC 0.85 mono / 0.73 poly against 0.93 / 0.86 for the map maximum of the same
            models, benchmarks/results/elpv_labelled_xavier_adaptor.md); with a few labelled
            defects it still trails a linear probe fitted on the same features, and the mean of
            probabilities added little (benchmarks/results/labels_recipe.md has the comparison).
        supervised_grad_clip: gradient-norm clipping in the supervised regimes (None: off). The
            reference clips at 1 in its supervised runs (300 epochs); in short schedules it slows
            learning: ELPV mono with 10 weakly labelled cells, 3 epochs, image AUROC 0.879 with
            clipping at 1 vs 0.909 without (benchmarks/results/elpv_labelled_xavier_adaptor.md). Default off.
        adaptor_init: starting weights of the adaptor: ``"orthogonal"`` (default) or
            ``"xavier"`` (Xavier-normal, the reference's). The synthetic noise is isotropic
            after the adaptor, and a random Xavier square matrix has singular values down to
            ~1e-3 (0.002 for Lite0's 152 channels), which hides feature directions under the
            noise; the adaptor barely moves in a short schedule, so its start stays.
            Orthogonal keeps every direction: ELPV, 3 epochs, seeds 0-2, map maximum, mono
            0.936 vs 0.928 and poly 0.880 vs 0.861 (benchmarks/results/noise_scale.md).
        train_unused_classifier: train the classification head even when the image score does
            not use it. By default it trains only for ``image_score="classifier"`` or ``"mean"``:
            the default scores (``map_max`` unsupervised, ``fused`` with labels) do not use it,
            and it is the largest cost of a step (its 5x5 convolution). Unsupervised, skipping it
            changes no other weight (the stop-gradient keeps it out of the map). With labels its
            gradient also reaches the map; measured on ELPV mono with 50 labelled cells (seeds
            0, 1), the fused score was 0.961 / 0.961 trained 10 epochs without it against 0.961 /
            0.955 trained 3 epochs with it in about the same time (benchmarks/results/labels_recipe.md).
            A model trained without it refuses ``image_score="classifier"`` / ``"mean"``; set this
            to True, or ask for that score before training, to have one.
        weights: path to backbone weights (else the packaged / cached ones are used).
        pretrained: False builds a random backbone (tests only).
    """

    name = "supersimplenet"
    # Epochs of `defectscope train` when --epochs is not given. 10, not 3: the map of a 3-epoch run
    # depends a lot on the seed (ELPV mono, unsupervised, seeds 0-2: 0.945 / 0.913 / 0.928, mean
    # 0.929, under the nearest-neighbour floor of 0.940); 10 epochs gave 0.949 / 0.931 / 0.941,
    # mean 0.940 (benchmarks/results/labels_recipe.md). An epoch costs ~10 s on one CPU thread
    # for ELPV mono's 352 training cells with the feature cache.
    default_epochs = 10
    # ... and at least this many optimizer steps (more epochs on small training sets): on a
    # generated grass set with 32 training images (4 steps an epoch) 10 epochs gave image AUROC
    # 0.689 against 0.813 for 60 (the nearest-neighbour floor: 0.829). ELPV's 10 epochs are ~440 steps.
    min_default_steps = 400

    def __init__(
        self,
        perlin_threshold: float = 0.2,
        backbone: str = "wide_resnet50_2.tv_in1k",
        layers: list[str] | tuple[str, ...] | None = None,
        supervised: bool = False,
        adapt_cls_features: bool = False,
        pre_processor: bool = True,
        post_processor: bool = True,
        evaluator: bool = True,
        visualizer: bool = True,
        noise_std: float | None = None,
        standardize_features: bool = True,
        image_size: int | tuple[int, int] = 256,
        patch_size: int = 3,
        upscale_factor: int = 2,
        sigma: float = 4.0,
        lr_scale: float = 1.0,
        supervised_grad_clip: float | None = None,
        image_score: str = "auto",
        adaptor_init: str = "orthogonal",
        train_unused_classifier: bool = False,
        weights: str | None = None,
        pretrained: bool = True,
    ) -> None:
        # Checked before the backbone is built: a wrong setting fails at once.
        check_setting("perlin_threshold", perlin_threshold, 0, 1, high_open=True)
        if noise_std is not None:
            check_setting("noise_std", noise_std, 0, low_open=True)
        check_setting("lr_scale", lr_scale, 0, low_open=True)
        check_setting("sigma", sigma, 0, low_open=True)
        check_setting("upscale_factor", upscale_factor, 1, integer=True)
        check_setting("patch_size", patch_size, 1, integer=True)
        if supervised_grad_clip is not None:
            check_setting("supervised_grad_clip", supervised_grad_clip, 0, low_open=True)
        super().__init__(
            backbone=backbone,
            layers=layers,
            image_size=image_size,
            weights=weights,
            pretrained=pretrained,
            pre_processor=pre_processor,
            post_processor=post_processor,
            evaluator=evaluator,
            visualizer=visualizer,
        )
        if noise_std is None:
            noise_std = DEFAULT_RELATIVE_NOISE_STD if standardize_features else 0.015
        if noise_std <= 0:
            raise ValueError(f"noise_std must be > 0, got {noise_std}")
        if image_score not in IMAGE_SCORES:
            raise ValueError(f"image_score must be one of {', '.join(IMAGE_SCORES)}, got {image_score!r}")
        if adaptor_init not in ADAPTOR_INITS:
            raise ValueError(f"adaptor_init must be one of {', '.join(ADAPTOR_INITS)}, got {adaptor_init!r}")
        self.hparams.update(
            perlin_threshold=perlin_threshold,
            supervised=supervised,
            adapt_cls_features=adapt_cls_features,
            noise_std=noise_std,
            standardize_features=standardize_features,
            patch_size=patch_size,
            upscale_factor=upscale_factor,
            sigma=sigma,
            lr_scale=lr_scale,
            supervised_grad_clip=supervised_grad_clip,
            image_score=image_score,
            adaptor_init=adaptor_init,
            train_unused_classifier=train_unused_classifier,
        )
        self.lr_scale = lr_scale
        self.perlin_threshold = perlin_threshold
        self.supervised = supervised
        self.adapt_cls_features = adapt_cls_features
        self.noise_std = noise_std
        self.patch_size = patch_size
        self.upscale_factor = upscale_factor
        # The reference stops gradients between the heads only when unsupervised.
        self.supervised_grad_clip = supervised_grad_clip
        self.image_score = image_score
        self.train_unused_classifier = train_unused_classifier
        # Set by training: True when the classification head was left out (saved in params.json).
        self.classifier_skipped = False
        self.stop_grad = not supervised
        self.grad_clip = supervised_grad_clip if supervised else None

        channels = sum(self.feature_extractor.channels)
        self.standardizer = FeatureStandardizer(channels) if standardize_features else None
        self.adaptor = nn.Conv2d(channels, channels, kernel_size=1)
        if adaptor_init == "orthogonal":
            # The noise is isotropic after the adaptor. A Xavier-normal square matrix has
            # singular values down to ~1e-3, so it squeezes some feature directions far below
            # the noise and defects that differ from normal features along them cannot be told
            # from the noise; an orthogonal start keeps every direction at scale 1.
            nn.init.orthogonal_(self.adaptor.weight)
        else:
            _init_weights(self.adaptor)
        self.segdec = SegmentationDetectionHead(channels, stop_grad=self.stop_grad)
        # Image labels pay through a probe fitted after training (fit_on_training_features) and
        # fused with the map maximum (image_score "fused"): rows centre, scale and weight of each
        # part (map-maximum logit, probe logit), set by calibrate(). Until then: the map alone.
        self.label_probe = LabelProbe(channels)
        self.register_buffer("fusion", torch.tensor([[0.0, 0.0], [1.0, 1.0], [1.0, 0.0]]))
        self.probe_info: dict = {}
        self._defect_parts: torch.Tensor | None = None
        self._sync_classifier_trainable()
        self.smoothing = GaussianBlur2d(sigma=sigma)
        # Channels-last (NHWC) convolutions: 1.1-1.7x faster heads in training and ~1.5x faster
        # inference on CPU, same results within float tolerance (benchmarks/results/ssn_profile.md).
        self.to(memory_format=torch.channels_last)

    # Saved before the label probe existed: such files lack these tensors (the map alone scores).
    optional_state_prefixes = ("label_probe.", "fusion")

    def params(self) -> dict:
        return {**super().params(), "classifier_skipped": self.classifier_skipped, "label_probe": dict(self.probe_info)}

    def load_params(self, params: dict) -> None:
        supervised = params.get("hparams", {}).get("supervised")
        if supervised is not None and bool(supervised) != self.supervised:
            # Loading into an instance: the regime is set by training, so the saved one applies.
            self.set_regime("weakly" if supervised else "unsupervised")
        self.classifier_skipped = bool(params.get("classifier_skipped", False))
        self.probe_info = dict(params.get("label_probe") or {})
        if self.probe_info:  # a fitted probe: the pooling it was fitted with (none recorded: the first one)
            pooling = self.probe_info.get("pooling", LabelProbe.OLD_FILE_POOLING)
            if pooling not in LabelProbe.POOLINGS:
                raise ModelFileError(
                    f"params.json: label_probe pooling {pooling!r} is not one this version knows "
                    f"({', '.join(LabelProbe.POOLINGS)}). Fix: restore the model folder from the copy training "
                    "wrote, or retrain the model.")
            self.label_probe.pooling = pooling

    # ---- features ---------------------------------------------------------------------
    @torch.no_grad()
    def extract_features(self, images: torch.Tensor) -> torch.Tensor:
        """Frozen part: ``[B,3,H,W]`` normalised images -> ``[B,C,h,w]`` aggregated features.

        Deterministic for a given image, so the engine may cache its output.
        """
        images = self.roi_images(images)
        maps = list(self.feature_extractor(images.contiguous(memory_format=torch.channels_last)).values())
        h, w = maps[0].shape[-2:]
        size = (h * self.upscale_factor, w * self.upscale_factor)
        return upscale_and_concat(maps, size=size, patch_size=self.patch_size)

    def feature_params(self) -> dict:
        """Settings that change :meth:`extract_features` output (part of the feature-cache key)."""
        return {"upscale_factor": self.upscale_factor, "patch_size": self.patch_size}

    def fit_feature_statistics(self, features: torch.Tensor) -> None:
        """Fit the per-channel standardisation on training features ``[N,C,h,w]``."""
        if self.standardizer is not None:
            self.standardizer.fit(features)

    def _standardize(self, features: torch.Tensor) -> torch.Tensor:
        features = features.to(self.adaptor.weight.dtype).contiguous(memory_format=torch.channels_last)
        return self.standardizer(features) if self.standardizer is not None else features

    # ---- training ---------------------------------------------------------------------
    def training_forward(
        self,
        features: torch.Tensor,
        masks: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        mask_known: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """One training forward on pre-extracted features.

        Args:
            features: ``[B,C,h,w]`` from :meth:`extract_features`.
            masks: ground-truth masks ``[B,1,H,W]`` or ``[B,H,W]`` at image size (None: all normal).
            labels: image labels ``[B]`` (None: all normal).
            mask_known: ``[B]`` bool, False for defective images with an image label only
                (weak supervision: their map positions are left out of the segmentation loss,
                except where synthetic anomalies were added). None: every mask is known.

        Returns:
            map logits ``[2B,1,h,w]``, score logits ``[2B]`` (None when the classification
            head is not trained, see :attr:`trains_classifier`), target masks ``[2B,1,h,w]``,
            target labels ``[2B]`` and the map positions that count in the segmentation loss
            ``[2B,1,h,w]`` (bool): the batch and a copy, each with its own Perlin noise.
        """
        feats = self._standardize(features)
        b, c, h, w = feats.shape
        if masks is None:
            masks = feats.new_zeros(b, 1, h, w)
        else:
            masks = self.downsample_mask(masks.to(feats.dtype), h, w)
        labels = feats.new_zeros(b) if labels is None else labels.to(feats.dtype).reshape(b)
        known = torch.ones(b, dtype=torch.bool, device=feats.device) if mask_known is None else mask_known.to(feats.device).bool().reshape(b)
        adapted = self.adaptor(feats)

        # Duplicate the batch: each copy gets its own Perlin mask, so every image is seen
        # both clean and (about half the time) with synthetic anomalies.
        masks, labels, known = masks.repeat(2, 1, 1, 1), labels.repeat(2), known.repeat(2)
        # Synthetic anomalies never overlap real ones.
        noise_mask = (1 - masks) * perlin_masks(2 * b, h, w, self.perlin_threshold, device=adapted.device)
        roi = self.roi_grid(h, w)
        if roi is not None:  # no synthetic anomalies outside the region of interest
            noise_mask = noise_mask * roi.to(noise_mask)
        # The noise exists only inside the masks: channel vectors noise_rows [K,C] at the
        # positions noise_index of the duplicated batch (batch, row, column order).
        noise_index = noise_mask.reshape(-1).nonzero().squeeze(1)
        noise_rows = torch.randn(len(noise_index), c, device=adapted.device, dtype=adapted.dtype) * self.noise_std
        masks = (masks + noise_mask).clamp_(max=1)
        labels = torch.maximum(labels, noise_mask.flatten(1).amax(dim=1))
        # Where a weakly labelled defect lies is unknown; only its synthetic anomalies are.
        seg_valid = known[:, None, None, None] | (noise_mask > 0)

        trains_classifier = self._sync_classifier_trainable()
        self.classifier_skipped = not trains_classifier
        if not trains_classifier and self.segdec.fused and supports_fused(self.segdec.seg_head, adapted):
            # The map head alone on the two copies without building them: same result,
            # ~2.4x faster at a 64x64 map on CPU (fused_head.py, benchmarks/results/ssn_profile.md).
            map_logits = bn_mlp_train_forward_copies(self.segdec.seg_head, adapted, noise_rows, noise_index, copies=2)
            return map_logits, None, masks, labels, seg_valid
        noise = scatter_rows(noise_rows, noise_index, (2 * b, c, h, w))
        seg_feats = torch.cat((adapted, adapted)) + noise
        if not trains_classifier:
            return *self.segdec(seg_feats, None), masks, labels, seg_valid
        # ICPR: both heads on adapted features. JIMS: classification on raw (standardised)
        # features with the same noise.
        cls_feats = seg_feats if self.adapt_cls_features else torch.cat((feats, feats)) + noise
        map_logits, score_logits = self.segdec(seg_feats, cls_feats)
        return map_logits, score_logits, masks, labels, seg_valid

    @property
    def trains_classifier(self) -> bool:
        """Whether training updates the classification head: when the image score uses it
        (``classifier``, ``mean``) or ``train_unused_classifier`` asks for it."""
        return self.train_unused_classifier or self.resolved_image_score in ("classifier", "mean")

    @property
    def learns_from_image_labels(self) -> bool:
        """Whether an image label alone (a defect without a mask) reaches the training loss: only
        through the classification head. The engine gives labelled defects a share of every batch
        only when their labels reach the loss."""
        return self.trains_classifier

    @staticmethod
    def downsample_mask(masks: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """Image-size masks -> feature-grid masks ``[B,1,h,w]``: bilinear, then >= 0.5."""
        if masks.dim() == 3:
            masks = masks[:, None]
        if masks.shape[-2:] != (height, width):
            masks = F.interpolate(masks, size=(height, width), mode="bilinear", align_corners=False)
        return (masks >= 0.5).to(masks.dtype)

    def loss(
        self,
        map_logits: torch.Tensor,
        score_logits: torch.Tensor,
        masks: torch.Tensor,
        labels: torch.Tensor,
        seg_valid: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Focal + truncated L1 on the map (over ``seg_valid`` positions; None: all), focal on
        the score (gamma 4, no alpha; left out when ``score_logits`` is None)."""
        if seg_valid is None or bool(seg_valid.all()):
            map_focal = sigmoid_focal_loss(map_logits, masks, alpha=-1, gamma=4.0, reduction="mean")
            map_l1 = truncated_l1(map_logits, masks)
        else:
            per_position = sigmoid_focal_loss(map_logits, masks, alpha=-1, gamma=4.0, reduction="none")
            map_focal = (per_position * seg_valid).sum() / seg_valid.sum().clamp_min(1)
            map_l1 = truncated_l1(map_logits[seg_valid], masks[seg_valid])
        if score_logits is None:
            return map_focal + map_l1
        score_focal = sigmoid_focal_loss(score_logits, labels, alpha=-1, gamma=4.0, reduction="mean")
        return map_focal + map_l1 + score_focal

    def training_step(self, features: torch.Tensor, masks=None, labels=None, mask_known=None) -> torch.Tensor:
        return self.loss(*self.training_forward(features, masks, labels, mask_known))

    def set_regime(self, regime: str) -> None:
        """Train for a supervision regime (``unsupervised``, ``weakly``, ``mixed``, ``supervised``):
        any labelled defects turn on the supervised settings: no stop-gradient between the
        heads, as in the reference, and ``supervised_grad_clip`` clipping when set."""
        supervised = regime != "unsupervised"
        self.supervised = supervised
        self.stop_grad = self.segdec.stop_grad = not supervised
        self.grad_clip = self.supervised_grad_clip if supervised else None
        self.hparams["supervised"] = supervised
        self._sync_classifier_trainable()

    def _sync_classifier_trainable(self) -> bool:
        """Freeze the classification head while it is left out of training (DDP must know
        before it wraps the model which parameters get no gradient); returns whether it trains."""
        trains = self.trains_classifier
        for module in (self.segdec.cls_conv, self.segdec.cls_fc):
            for param in module.parameters():
                param.requires_grad_(trains)
        return trains

    def configure_optimizers(self, max_epochs: int):
        """AdamW (adaptor lr 1e-4; heads lr 2e-4, weight decay 1e-5) and MultiStepLR
        (x0.4 at 80 % and 90 % of the epochs), stepped once per epoch."""
        optimizer = torch.optim.AdamW(
            [
                {"params": self.adaptor.parameters(), "lr": 1e-4 * self.lr_scale},
                {"params": self.segdec.parameters(), "lr": 2e-4 * self.lr_scale, "weight_decay": 1e-5},
            ]
        )
        milestones = sorted({max(1, int(max_epochs * 0.8)), max(1, int(max_epochs * 0.9))})
        scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=milestones, gamma=0.4)
        return optimizer, scheduler

    # ---- after training: the label probe and the fused score --------------------------
    @torch.no_grad()
    def fit_on_training_features(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        """After the optimizer loop (eval mode), with every training image's cached features
        ``[N,C,h,w]`` and image labels ``[N]``: fit the label probe on all of them, and score each
        labelled defect by a probe fitted without it (5 folds) and by the map, for calibrate() to
        weigh the two parts by how far each puts defects from good images. Without at least two
        labelled defects nothing is fitted (the map alone scores)."""
        labels = torch.as_tensor(labels).reshape(-1).float().cpu()
        self._defect_parts = None
        if not self.supervised or int(labels.sum()) < 2:
            self.probe_info = {}
            return
        device = self.fusion.device
        self.label_probe.pooling = LabelProbe.DEFAULT_POOLING  # a new fit takes the current pooling
        pooled = torch.cat([LabelProbe.pool(self._standardize(features[start:start + 64].to(device, torch.float32)),
                                            self.label_probe.pooling).float().cpu()
                            for start in range(0, len(features), 64)])
        self.label_probe.fit(pooled, labels)
        defects = labels.nonzero().squeeze(1)
        # The map's part for the labelled defects only (their map-maximum logits).
        map_max = torch.cat([self._map_and_parts(features[defects[start:start + 64]].to(device, torch.float32),
                                                 tuple(self.image_size))[1][:, 0].cpu()
                             for start in range(0, len(defects), 64)])
        folds = min(5, len(defects))
        unseen = cross_fitted_probe_logits(pooled, labels, defects, folds)
        self._defect_parts = torch.stack((map_max.double(), unseen), dim=1)
        self.probe_info = {"fitted_on": {"good": int((labels == 0).sum()), "defective": len(defects)},
                           "folds": folds, "pooling": self.label_probe.pooling}

    @torch.no_grad()
    def calibrate(self, batches) -> tuple[torch.Tensor, torch.Tensor] | None:
        """With the fused score: centre and scale each part on the held-out good images (normalised
        batches), weigh each by how far it puts the labelled defects from them (the probe part by
        its cross-fitted scores, see :meth:`fit_on_training_features`), and return those images'
        scores and map maxima as :meth:`forward` now gives them. Other image scores: None (the
        engine scores the images itself)."""
        if self.resolved_image_score != "fused":
            return None
        parts, map_max = [], []
        for images in batches:
            map_logits, p = self._map_and_parts(self.extract_features(images), images.shape[-2:])
            maps = map_logits.sigmoid() if self.post_processor else map_logits
            map_max.append(self.apply_roi(maps, maps.amax(dim=(1, 2, 3)), score_from_map=False)[0].amax(dim=(1, 2, 3)))
            parts.append(p)
        if not parts:
            return None
        parts, map_max = torch.cat(parts), torch.cat(map_max)
        center = parts.double().mean(dim=0)
        scale = parts.double().std(dim=0).nan_to_num(0.0).clamp_min(1e-6) if len(parts) > 1 else torch.ones(2, dtype=torch.float64)
        weight = fusion_weights(self._defect_parts, parts)
        self.fusion.copy_(torch.stack((center, scale, weight)).to(self.fusion))
        self.probe_info.update(weights={"map_max": float(weight[0]), "probe": float(weight[1])},
                               calibrated_on=len(parts))
        scores = self._fuse(parts)
        return (scores.sigmoid() if self.post_processor else scores), map_max

    # ---- inference --------------------------------------------------------------------
    @property
    def resolved_image_score(self) -> str:
        """``classifier``, ``map_max``, ``mean`` or ``fused``: what ``image_score`` means for this model."""
        if self.image_score == "auto":
            return "fused" if self.supervised else "map_max"
        return self.image_score

    @property
    def scores_by_map(self) -> bool:
        """True when the image score is the map maximum alone (no classification head needed)."""
        return self.resolved_image_score == "map_max"

    def _map_and_parts(self, features: torch.Tensor, output_size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Pre-extracted features -> (smoothed map logits ``[B,1,H,W]``, the fused score's parts
        ``[B,2]``: map-maximum logit and label-probe logit)."""
        feats = self._standardize(features)
        map_logits = self.segdec.segment(self.adaptor(feats))
        map_logits = self.smoothing(F.interpolate(map_logits, size=output_size, mode="bilinear", align_corners=False))
        return map_logits, torch.stack((map_logits.amax(dim=(1, 2, 3)), self.label_probe(feats)), dim=1)

    def _fuse(self, parts: torch.Tensor) -> torch.Tensor:
        """``[B,2]`` parts -> fused score ``[B]``: the weighted sum of each part's z-score against
        the held-out good images (calibrate)."""
        center, scale, weight = self.fusion
        return (((parts - center) / scale) * weight).sum(dim=1)

    def forward_features(self, features: torch.Tensor, output_size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Inference on pre-extracted features -> (map logits ``[B,1,H,W]`` smoothed, score logits ``[B]``)."""
        kind = self.resolved_image_score
        if kind == "fused":
            map_logits, parts = self._map_and_parts(features, output_size)
            return map_logits, self._fuse(parts)
        feats = self._standardize(features)
        adapted = self.adaptor(feats)
        if kind != "map_max" and self.classifier_skipped:
            raise ValueError(
                f"image_score={kind!r} needs the classification head, but this model was trained without it "
                "(unsupervised, scored by the map maximum). Use image_score='map_max', or train again with "
                "train_unused_classifier=True (CLI: --image-score classifier or mean when training)."
            )
        if kind == "map_max":
            # The classification head's output would be thrown away: skip its 5x5 conv.
            map_logits = self.segdec.segment(adapted)
        else:
            cls_feats = adapted if self.adapt_cls_features else feats
            map_logits, score_logits = self.segdec(adapted, cls_feats)
        map_logits = self.smoothing(F.interpolate(map_logits, size=output_size, mode="bilinear", align_corners=False))
        if kind == "map_max":
            score_logits = map_logits.amax(dim=(1, 2, 3))
        elif kind == "mean":
            # Average as probabilities, returned as a logit like the other scores (the
            # post-processor's sigmoid turns it back into the average).
            mean = 0.5 * (score_logits.sigmoid() + map_logits.amax(dim=(1, 2, 3)).sigmoid())
            score_logits = torch.logit(mean, eps=1e-7)
        return map_logits, score_logits

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``[B,3,H,W]`` normalised images -> anomaly maps ``[B,1,H,W]`` and scores ``[B]``,
        both in [0, 1] (sigmoid of the logits) when ``post_processor`` is on."""
        map_logits, score_logits = self.forward_features(self.extract_features(images), images.shape[-2:])
        if self.post_processor:
            return self.apply_roi(map_logits.sigmoid(), score_logits.sigmoid(), score_from_map=self.scores_by_map)
        return self.apply_roi(map_logits, score_logits, score_from_map=self.scores_by_map)


def truncated_l1(pred: torch.Tensor, target: torch.Tensor, margin: float = 0.5) -> torch.Tensor:
    """Hinge on logits: normal positions pushed below ``-margin``, anomalous above ``margin``;
    each part averaged over its own positions (a part with no positions adds 0)."""
    normal = target == 0
    normal_loss = (pred[normal] + margin).clamp_min(0)
    anomalous_loss = (margin - pred[~normal]).clamp_min(0)
    zero = pred.new_zeros(())
    return (normal_loss.mean() if normal_loss.numel() else zero) + (
        anomalous_loss.mean() if anomalous_loss.numel() else zero
    )


def fusion_weights(defect_parts: torch.Tensor | None, good_parts: torch.Tensor) -> torch.Tensor:
    """Weights of the fused score's parts (map maximum, label probe): how much better than chance
    each part ranks the labelled training defects above the held-out good images (its AUROC minus
    0.5, floored at 0; the probe's part from probes fitted without each defect), normalised to sum
    1. Ranks, not means: a few very strong defects cannot buy a part its weight. Without labelled
    defects, or when neither part separates them: the map alone ([1, 0])."""
    alone = torch.tensor([1.0, 0.0], dtype=torch.float64)
    if defect_parts is None or len(defect_parts) == 0 or len(good_parts) == 0:
        return alone
    d = defect_parts.double().cpu()[:, None, :]
    g = good_parts.double().cpu()[None, :, :]
    auroc = ((d > g).double() + 0.5 * (d == g).double()).mean(dim=(0, 1))
    weight = (auroc - 0.5).nan_to_num(0.0).clamp_min(0.0)
    if float(weight.sum()) <= 0:
        return alone
    return weight / weight.sum()


IMAGE_SCORES = ("auto", "classifier", "map_max", "mean", "fused")
ADAPTOR_INITS = ("orthogonal", "xavier")

# Chosen by the ELPV / synthetic experiments recorded in benchmarks/results/noise_scale.md.
DEFAULT_RELATIVE_NOISE_STD = 1.0
