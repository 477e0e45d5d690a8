"""The donor baseline: a timm CNN's convolutional base, flattened, then a dense head.

This is the paper's donor (VGG16 conv base + Flatten + Dense 256 + Dense 256 + Dense labels:
16,880,201 parameters for 9 labels at 128x128). Its ``body`` uses the same layer names as a
graft's ``scion``, so ``GraftedModelForImageClassification.from_donor`` moves weights by name.
"""

import math
import os
from collections import OrderedDict
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_outputs import ImageClassifierOutput

from ..errors import HfGraftError
from ..models.configuration_grafted_vision import GraftedVisionConfig
from ..models.modeling_grafted_vision import (
    dense_head,
    feature_layers,
    init_cnn_weights,
    materialise,
    output_shape,
)
from ..safetensors_io import atomic_write_json, load_tensors, save_tensors

DONOR_WEIGHTS = "donor.safetensors"
DONOR_CONFIG = "donor_config.json"


class DonorClassifier(nn.Module):
    """A timm CNN body (``features_only``) + Flatten + the config's ``donor_head_widths`` head."""

    def __init__(self, config: GraftedVisionConfig, body: Optional[nn.Module] = None):
        super().__init__()
        self.config = config
        layers = feature_layers(config.donor_name, config.num_channels, body=body)
        self.body = nn.Sequential(OrderedDict(layers))
        size = (1, config.num_channels, config.image_size, config.image_size)
        flat = math.prod(output_shape(self.body, size))
        self.head = dense_head(flat, config.donor_head_widths, config.num_labels, config.head_dropout)
        if body is None:
            materialise(self)
            self.apply(init_cnn_weights)
        else:
            self.head.apply(init_cnn_weights)

    def forward(self, pixel_values: torch.Tensor, labels: Optional[torch.Tensor] = None, **kwargs):
        logits = self.head(torch.flatten(self.body(pixel_values), 1))
        loss = F.cross_entropy(logits, labels) if labels is not None else None
        return ImageClassifierOutput(loss=loss, logits=logits)

    def save_pretrained(self, directory: str) -> None:
        """Write ``donor.safetensors`` and ``donor_config.json`` (each atomically)."""
        os.makedirs(directory, exist_ok=True)
        save_tensors(self.state_dict(), os.path.join(directory, DONOR_WEIGHTS), metadata={"format": "pt"})
        atomic_write_json(os.path.join(directory, DONOR_CONFIG), self.config.to_dict())


def donor_model(
    config: GraftedVisionConfig, checkpoint: Optional[str] = None, pretrained: bool = False
) -> DonorClassifier:
    """The donor baseline of a graft config.

    Args:
        config: the graft's config; its ``donor_name``, ``num_labels``, ``image_size`` and
            ``donor_head_widths`` define the donor.
        checkpoint: a directory written by ``DonorClassifier.save_pretrained`` (a donor trained
            by hf-graft); its label count, donor and input size must match ``config``.
        pretrained: start the body from timm's pretrained weights (downloaded from the Hub);
            the head stays random and needs training.
    """
    if checkpoint is None:
        body = None
        if pretrained:
            import timm

            body = timm.create_model(
                config.donor_name, pretrained=True, features_only=True, in_chans=config.num_channels
            )
        return DonorClassifier(config, body=body)

    config_path = os.path.join(checkpoint, DONOR_CONFIG)
    if not os.path.isfile(config_path):
        raise HfGraftError(
            f"{checkpoint!r} is not a donor checkpoint ({DONOR_CONFIG} missing); "
            "train one with `hf-graft vision train` or pass pretrained=True."
        )
    saved = GraftedVisionConfig.from_json_file(config_path)
    for field in ("donor_name", "num_labels", "image_size", "num_channels", "donor_head_widths"):
        if getattr(saved, field) != getattr(config, field):
            raise HfGraftError(
                f"The donor checkpoint {checkpoint!r} has {field}={getattr(saved, field)!r} but the graft "
                f"config asks for {getattr(config, field)!r}; train a donor for this config or set "
                f"{field}={getattr(saved, field)!r}."
            )
    donor = DonorClassifier(config)
    expected = {k: (tuple(v.shape), v.dtype) for k, v in donor.state_dict().items()}
    tensors, _ = load_tensors(os.path.join(checkpoint, DONOR_WEIGHTS), expected)
    donor.load_state_dict(tensors)
    return donor
