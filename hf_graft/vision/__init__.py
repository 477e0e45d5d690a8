"""Feature-scion grafting for image classification (Knowledge Grafting, arXiv 2507.19261)."""

from ..models.configuration_grafted_vision import PRESETS, GraftedVisionConfig
from ..models.modeling_grafted_vision import GraftedModelForImageClassification
from .data import ImageSplits, load_digits_splits, load_image_splits, stack_images
from .donor import DonorClassifier, donor_model
from .pipeline import VisionGraftResult, graft_vision, model_report
from .training import TrainingArguments, distillation_loss, evaluate_classifier, train_classifier

__all__ = [
    "PRESETS",
    "DonorClassifier",
    "GraftedModelForImageClassification",
    "GraftedVisionConfig",
    "ImageSplits",
    "TrainingArguments",
    "VisionGraftResult",
    "distillation_loss",
    "donor_model",
    "evaluate_classifier",
    "graft_vision",
    "load_digits_splits",
    "load_image_splits",
    "model_report",
    "stack_images",
    "train_classifier",
]
