"""``GraftedImageProcessor``: the exact image transform a vision graft was trained with.

Images are scaled to ``[0, 1]``, converted to the model's channel count, resized bilinearly to
``image_size`` (``torch.nn.functional.interpolate``, ``align_corners=False``) and normalised per
channel. hf-graft's datasets use :func:`prepare_image` itself, so a saved graft's
``preprocessor_config.json`` gives ``pipeline("image-classification", model=...)`` the inputs the
model saw in training.
"""

from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from transformers.image_processing_utils import BaseImageProcessor, BatchFeature


def prepare_image(image: torch.Tensor, image_size: int, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """One image ``[C, H, W]`` in ``[0, 1]`` -> resized to ``image_size``, ``len(mean)`` channels, normalised.

    ``mean`` and ``std`` are ``[channels, 1, 1]`` tensors.
    """
    if image.shape[-1] != image_size or image.shape[-2] != image_size:
        image = F.interpolate(image[None], size=(image_size, image_size), mode="bilinear", align_corners=False)[0]
    channels = mean.shape[0]
    if image.shape[0] != channels:
        image = image.mean(dim=0, keepdim=True) if channels == 1 else image.expand(channels, -1, -1)
    return (image.contiguous() - mean) / std


class GraftedImageProcessor(BaseImageProcessor):
    """Turns PIL images, arrays (``[H, W]``, ``[H, W, C]`` uint8 or float) or tensors into ``pixel_values``.

    Args:
        image_size (`int`): side of the square the model takes.
        image_mean, image_std (`list[float]`): per-channel normalisation, one value per channel.
    """

    model_input_names = ["pixel_values"]

    def __init__(self, image_size: int = 224, image_mean=(0.485, 0.456, 0.406), image_std=(0.229, 0.224, 0.225), **kwargs):
        super().__init__(**kwargs)
        self.image_size = int(image_size)
        self.image_mean = [float(v) for v in image_mean]
        self.image_std = [float(v) for v in image_std]
        if len(self.image_mean) != len(self.image_std) or not self.image_mean:
            raise ValueError("image_mean and image_std need one value per channel, as many of each.")

    @classmethod
    def from_model_config(cls, config) -> "GraftedImageProcessor":
        """The processor of a ``GraftedVisionConfig``."""
        return cls(image_size=config.image_size, image_mean=config.image_mean, image_std=config.image_std)

    def _to_tensor(self, image) -> torch.Tensor:
        channels = len(self.image_mean)
        if hasattr(image, "convert") and hasattr(image, "mode"):  # a PIL image
            image = np.asarray(image.convert("L" if channels == 1 else "RGB"))
        if isinstance(image, np.ndarray):
            scale = 255.0 if image.dtype == np.uint8 else 1.0
            array = image.astype(np.float32) / scale
            if array.ndim == 2:
                array = array[:, :, None]
            if array.ndim != 3:
                raise ValueError(f"An image array must be [H, W] or [H, W, C], got shape {image.shape}.")
            return torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1)
        if isinstance(image, torch.Tensor):
            tensor = image.float() / 255.0 if image.dtype == torch.uint8 else image.float()
            if tensor.dim() == 2:
                tensor = tensor[None]
            if tensor.dim() != 3:
                raise ValueError(f"An image tensor must be [H, W] or [C, H, W], got shape {tuple(image.shape)}.")
            return tensor
        raise TypeError(f"Cannot read an image from a {type(image).__name__}; pass PIL images, arrays or tensors.")

    def preprocess(self, images, return_tensors: Optional[str] = "pt", **kwargs) -> BatchFeature:
        """``{"pixel_values": [N, C, image_size, image_size]}`` for one image or a list of them."""
        if not isinstance(images, (list, tuple)):
            images = [images]
        mean = torch.tensor(self.image_mean).view(-1, 1, 1)
        std = torch.tensor(self.image_std).view(-1, 1, 1)
        pixels = torch.stack([prepare_image(self._to_tensor(image), self.image_size, mean, std) for image in images])
        if return_tensors in (None, "pt"):
            return BatchFeature({"pixel_values": pixels}, tensor_type="pt")
        return BatchFeature({"pixel_values": pixels.numpy()}, tensor_type=return_tensors)


GraftedImageProcessor.register_for_auto_class("AutoImageProcessor")
