"""``GraftedVisionConfig``: a feature-scion graft for image classification.

A *scion* (the first layers of a donor CNN, cut after ``scion_cut``) is pooled by global average
pooling (GAP); optionally a light timm *rootstock* backbone runs on the same image and its GAP
features are concatenated; a dense head classifies the result. Knowledge Grafting
(arXiv 2507.19261) grafts VGG16's first six convolutions this way.
"""

import copy
import difflib

from .configuration_grafted import GraftedConfig

#: Named architectures. ``paper`` reproduces the paper's model exactly: 1,934,665 parameters
#: (7.38 MB fp32) against the donor's 16,880,201 (64.39 MB) for 9 labels at 128x128.
PRESETS = {
    "paper": {
        "donor_name": "vgg16",
        "scion_cut": "features.13",  # ReLU after conv3_2: blocks 1-2, conv3_1, conv3_2
        "rootstock": None,
        "head_widths": [512, 1024, 128],
        "donor_head_widths": [256, 256],
        "image_size": 128,
    },
    "paper-mobilenetv2": {
        "donor_name": "vgg16",
        "scion_cut": "features.13",
        "rootstock": "mobilenetv2_050",
        "head_widths": [512, 1024, 128],
        "donor_head_widths": [256, 256],
        "image_size": 128,
    },
    "rootstock-only": {
        "donor_name": "vgg16",
        "scion_cut": None,
        "rootstock": "mobilenetv2_050",
        "head_widths": [512, 128],
        "donor_head_widths": [256, 256],
        "image_size": 128,
    },
}


def _positive_ints(name, values):
    values = [int(v) for v in values]
    if any(v <= 0 for v in values):
        raise ValueError(f"{name} must be positive layer widths, got {values}.")
    return values


def _check_timm_name(field, name):
    import timm  # imported when a vision config is made, not when hf_graft is

    if not timm.is_model(name):
        close = difflib.get_close_matches(str(name), timm.list_models(), n=6, cutoff=0.6)
        hint = f" Close names: {', '.join(close)}." if close else ""
        raise ValueError(f"{field}={name!r} is not a timm model name.{hint} See timm.list_models().")


class GraftedVisionConfig(GraftedConfig):
    """Configuration of [`GraftedModelForImageClassification`] and of its donor baseline.

    Args:
        donor_name (`str`, defaults to ``"vgg16"``):
            timm name of the donor CNN; any timm model with ``features_only`` support.
        scion_cut (`str` or `None`, defaults to ``"features.13"``):
            The donor layer after which the scion is cut, as timm names it (``"features.13"``,
            ``"layer2"``, ``"blocks.3"``); ``None`` grafts no scion (a rootstock that learns the
            scion's knowledge by distillation, for edge models without the donor prefix).
        scion_trainable (`bool`, defaults to `True`):
            Whether the scion's donor weights keep training with the head (at a lower rate, see
            ``TrainingArguments.scion_lr_scale``): the fine-tuning of the grafted model that
            Knowledge Grafting describes. ``False`` keeps the donor's weights fixed (cheaper to
            train: no gradients through the scion).
        rootstock (`str`, *optional*):
            timm name of a light backbone whose GAP features are concatenated to the scion's.
        head_widths (`list[int]`, defaults to ``[512, 1024, 128]``):
            Hidden widths of the dense head (ReLU between layers), the paper's rootstock head.
        head_dropout (`float`, defaults to 0.0):
            Dropout before each dense layer of the head.
        donor_head_widths (`list[int]`, defaults to ``[256, 256]``):
            Hidden widths of the donor baseline's head (Flatten -> Dense -> ... -> labels).
        image_size (`int`, defaults to 128):
            Side of the square input images.
        num_channels (`int`, defaults to 3):
            Input channels.
        image_mean, image_std (`list[float]`):
            Per-channel normalisation applied to images before the model (ImageNet's by default,
            as timm's pretrained donors expect).
    """

    model_type = "grafted_vision"

    def __init__(
        self,
        donor_name="vgg16",
        scion_cut="features.13",
        scion_trainable=True,
        rootstock=None,
        head_widths=(512, 1024, 128),
        head_dropout=0.0,
        donor_head_widths=(256, 256),
        image_size=128,
        num_channels=3,
        image_mean=(0.485, 0.456, 0.406),
        image_std=(0.229, 0.224, 0.225),
        **kwargs,
    ):
        if scion_cut is None and rootstock is None:
            raise ValueError("A vision graft needs a scion (scion_cut), a rootstock, or both.")
        _check_timm_name("donor_name", donor_name)
        if rootstock is not None:
            _check_timm_name("rootstock", rootstock)
        if not 0.0 <= float(head_dropout) < 1.0:
            raise ValueError(f"head_dropout must be in [0, 1), got {head_dropout}.")
        if int(image_size) < 8:
            raise ValueError(f"image_size must be at least 8 pixels, got {image_size}.")
        self.scion_cut = scion_cut
        self.scion_trainable = bool(scion_trainable)
        self.rootstock = rootstock
        self.head_widths = _positive_ints("head_widths", head_widths)
        self.head_dropout = float(head_dropout)
        self.donor_head_widths = _positive_ints("donor_head_widths", donor_head_widths)
        self.image_size = int(image_size)
        self.num_channels = int(num_channels)
        self.image_mean = [float(v) for v in image_mean]
        self.image_std = [float(v) for v in image_std]
        if len(self.image_mean) != self.num_channels or len(self.image_std) != self.num_channels:
            raise ValueError("image_mean and image_std need one value per input channel.")
        super().__init__(donor_name=donor_name, **kwargs)

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "GraftedVisionConfig":
        """Build a config from a named preset (see ``PRESETS``), with any field overridden."""
        if name not in PRESETS:
            raise ValueError(f"Unknown preset {name!r}; choose one of {sorted(PRESETS)}.")
        return cls(**{**copy.deepcopy(PRESETS[name]), **overrides})
