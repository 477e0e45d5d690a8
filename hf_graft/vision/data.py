"""Image classification data: scikit-learn's digits (embedded) or any ``datasets`` image dataset.

Every source becomes the same three splits of ``(pixel_values, label)`` items, resized to the
config's ``image_size`` and normalised with its ``image_mean`` / ``image_std``.
"""

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from torch.utils.data import Dataset

from ..errors import HfGraftError
from ..models.image_processing_grafted import prepare_image

DIGITS = "digits"


@dataclass
class ImageSplits:
    """Train, validation and test datasets with their label names."""

    train: Dataset
    val: Dataset
    test: Dataset
    label_names: list
    name: str


class _NormalisedImages(Dataset):
    """Base of the image datasets: resizes to ``image_size`` and normalises per channel."""

    def __init__(self, image_size: int, mean, std):
        self.image_size = image_size
        self.mean = torch.tensor(mean).view(-1, 1, 1)
        self.std = torch.tensor(std).view(-1, 1, 1)

    def _prepare(self, image: torch.Tensor) -> torch.Tensor:
        return prepare_image(image, self.image_size, self.mean, self.std)


class TensorImageDataset(_NormalisedImages):
    """Images kept small in memory and resized on access (digits are 8x8 before resizing)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, image_size: int, mean, std):
        super().__init__(image_size, mean, std)
        self.images, self.labels = images, labels

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, index):
        return self._prepare(self.images[index]), int(self.labels[index])


class HFImageDataset(_NormalisedImages):
    """A ``datasets.Dataset`` split with one image column and one integer label column."""

    def __init__(self, split, image_column: str, label_column: str, image_size: int, mean, std):
        super().__init__(image_size, mean, std)
        self.split, self.image_column, self.label_column = split, image_column, label_column

    def __len__(self):
        return len(self.split)

    def __getitem__(self, index):
        row = self.split[int(index)]
        mode = "L" if len(self.mean) == 1 else "RGB"
        pixels = np.asarray(row[self.image_column].convert(mode), dtype=np.float32) / 255.0
        image = torch.from_numpy(pixels).reshape(pixels.shape[0], pixels.shape[1], -1).permute(2, 0, 1)
        return self._prepare(image), int(row[self.label_column])


def _split(labels: np.ndarray, fraction: float, seed: int):
    """Indices of a stratified ``(1 - fraction, fraction)`` split."""
    from sklearn.model_selection import train_test_split

    return train_test_split(np.arange(len(labels)), test_size=fraction, stratify=labels, random_state=seed)


def _three_way_split(labels: np.ndarray, seed: int, val_fraction: float, test_fraction: float):
    rest, test = _split(labels, test_fraction, seed)
    train, val = _split(labels[rest], val_fraction / (1 - test_fraction), seed)
    return rest[train], rest[val], test


def load_digits_splits(config, seed: int = 0, val_fraction: float = 0.15, test_fraction: float = 0.15) -> ImageSplits:
    """scikit-learn's 1,797 handwritten digits (8x8, 10 classes, shipped in its wheel), stratified."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 16.0
    labels = np.asarray(digits.target)
    parts = _three_way_split(labels, seed, val_fraction, test_fraction)
    make = lambda idx: TensorImageDataset(  # noqa: E731
        images[idx], torch.as_tensor(labels[idx]), config.image_size, config.image_mean, config.image_std
    )
    train, val, test = (make(idx) for idx in parts)
    return ImageSplits(train, val, test, [str(i) for i in range(10)], DIGITS)


def _find_columns(features, image_column: Optional[str], label_column: Optional[str], source: str):
    import datasets

    columns = list(features)
    if image_column is None:
        image_column = next((c for c in columns if isinstance(features[c], datasets.Image)), None)
    if label_column is None:
        label_column = next((c for c in columns if isinstance(features[c], datasets.ClassLabel)), None)
        if label_column is None:
            label_column = next((c for c in ("label", "labels") if c in columns), None)
    if image_column is None or image_column not in columns:
        raise HfGraftError(f"The dataset {source!r} has no image column (columns: {columns}); pass image_column=.")
    if label_column is None or label_column not in columns:
        raise HfGraftError(
            f"The dataset {source!r} has no label column (columns: {columns}); pass label_column= "
            "naming the column of integer class ids."
        )
    return image_column, label_column


def load_image_splits(
    source: str,
    config,
    *,
    image_column: Optional[str] = None,
    label_column: Optional[str] = None,
    seed: int = 0,
    val_fraction: float = 0.15,
    test_fraction: float = 0.15,
) -> ImageSplits:
    """Load ``"digits"``, a local image folder (``class_name/image.png``) or a Hub dataset id.

    Existing ``validation`` / ``test`` splits are used as they are; missing ones are carved out
    of ``train``, stratified by label.
    """
    if source == DIGITS:
        return load_digits_splits(config, seed, val_fraction, test_fraction)
    import os

    import datasets

    if os.path.isdir(source):
        loaded = datasets.load_dataset("imagefolder", data_dir=source)
    else:
        loaded = datasets.load_dataset(source)
    if "train" not in loaded:
        raise HfGraftError(f"The dataset {source!r} has no 'train' split (splits: {list(loaded)}).")
    train = loaded["train"]
    image_column, label_column = _find_columns(train.features, image_column, label_column, source)
    labels = np.asarray(train[label_column])
    label_feature = train.features[label_column]
    names = getattr(label_feature, "names", None) or [str(i) for i in range(int(labels.max()) + 1)]
    val = loaded.get("validation") or loaded.get("val")
    test = loaded.get("test")
    if val is None or test is None:
        missing = (val_fraction if val is None else 0.0) + (test_fraction if test is None else 0.0)
        rest, carved = _split(labels, missing, seed)
        if val is None and test is None:
            val_part, test_part = _split(labels[carved], test_fraction / missing, seed)
            val, test = train.select(carved[val_part]), train.select(carved[test_part])
        elif val is None:
            val = train.select(carved)
        else:
            test = train.select(carved)
        train = train.select(rest)
    wrap = lambda split: HFImageDataset(  # noqa: E731
        split, image_column, label_column, config.image_size, config.image_mean, config.image_std
    )
    return ImageSplits(wrap(train), wrap(val), wrap(test), list(names), os.path.basename(source.rstrip("/")))


def stack_images(dataset: Dataset, limit: Optional[int] = None):
    """The first ``limit`` items of a dataset as one ``(pixel_values, labels)`` batch."""
    count = len(dataset) if limit is None else min(limit, len(dataset))
    items = [dataset[i] for i in range(count)]
    return torch.stack([x for x, _ in items]), torch.tensor([y for _, y in items])
