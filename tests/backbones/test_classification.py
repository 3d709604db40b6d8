"""The re-keyed packaged EfficientNet-Lite0 must still recognise ImageNet images: a wrong mapping
(or a wrong padding variant) cannot pass silently."""

import pytest
import torch
import torch.nn.functional as F
from skimage import data
from timm.layers import Conv2dSame

from defectscope.backbones import create_classifier, get_backbone_config

CATS = range(281, 286)  # tabby, tiger cat, Persian, Siamese, Egyptian cat
ESPRESSO = 967


def _prepare(image, config):
    """HWC uint8 RGB → [1, 3, H, W] at the weights' input size, normalised with their mean/std."""
    size = config.input_size[1:]
    x = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255.0
    x = F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)
    mean = torch.tensor(config.mean).view(1, 3, 1, 1)
    std = torch.tensor(config.std).view(1, 3, 1, 1)
    return (x - mean) / std


@pytest.mark.parametrize("name", ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"])
def test_packaged_lite_classifies_cat_and_espresso(name):
    config = get_backbone_config(name)
    model = create_classifier(name)
    # offline.md: the packaged TF weights were checked in timm's tf_ variant ("same" padding)
    assert config.timm_name.startswith("tf_")
    assert isinstance(model.conv_stem, Conv2dSame)
    assert "packaged" in model.weights_source
    batch = torch.cat([_prepare(data.chelsea(), config), _prepare(data.coffee(), config)])
    with torch.no_grad():
        probs = model(batch).softmax(dim=-1)
    cat_top1, coffee_top1 = probs.argmax(dim=-1).tolist()
    assert cat_top1 in CATS, probs[0].topk(3)
    assert coffee_top1 == ESPRESSO, probs[1].topk(3)
    assert probs[0, 281:286].sum() > 0.6 and probs[1, ESPRESSO] > 0.5
