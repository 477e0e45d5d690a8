"""``GraftedModelForImageClassification``: a donor CNN's scion grown on a small rootstock head.

Also holds the layer plumbing the donor baseline shares (``feature_layers``), so that a donor's
body and a graft's scion have the same parameter names and weights move between them by name.
"""

import copy
from collections import OrderedDict
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_outputs import ImageClassifierOutput

from .configuration_grafted_vision import GraftedVisionConfig
from .image_processing_grafted import GraftedImageProcessor
from .modeling_grafted import GraftedModel

_INITIALISED_TYPES = (nn.Conv2d, nn.Linear, nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm)


def _owns_tensors(module: nn.Module) -> bool:
    return any(True for _ in module.parameters(recurse=False)) or any(
        b is not None for b in module.buffers(recurse=False)
    )


def create_timm(name: str, **kwargs) -> nn.Module:
    """A timm model with random weights, built on the meta device when that is safe.

    Every tensor is re-initialised by ``GraftedModelForImageClassification._init_weights`` or
    loaded from a checkpoint, so timm's own initialisation would be thrown away; building on
    ``meta`` skips it (VGG16 alone spends seconds initialising its 119M-parameter classifier).
    Models with module types that initialisation does not know are built normally.
    """
    import timm  # imported when a vision graft is built, not when hf_graft is

    with torch.device("meta"):
        model = timm.create_model(name, pretrained=False, **kwargs)
    if any(_owns_tensors(m) and not isinstance(m, _INITIALISED_TYPES) for m in model.modules()):
        return timm.create_model(name, pretrained=False, **kwargs)
    return model


def materialise(module: nn.Module) -> nn.Module:
    """Give meta tensors real (uninitialised) storage on the current default device.

    Inside transformers' ``from_pretrained`` the default device is ``meta`` and this is a no-op:
    the weights arrive from the checkpoint.
    """
    if any(t.is_meta for t in module.parameters()):
        module.to_empty(device=torch.empty(0).device)
    return module


def feature_layers(donor_name: str, num_channels: int, body: Optional[nn.Module] = None) -> list:
    """The donor's feature extractor as an ordered list of ``(name, layer)``.

    The list is timm's ``features_only`` model with sequential containers opened one level, so
    running the layers in order is the donor's forward. Names are timm's with ``.`` -> ``_``
    (``features.13`` -> ``features_13``).
    """
    if body is None:
        body = create_timm(donor_name, features_only=True, in_chans=num_channels)
    layers = []
    for name, child in body.named_children():
        if isinstance(child, nn.Sequential):
            layers += [(f"{name}_{sub}", layer) for sub, layer in child.named_children()]
        else:
            layers.append((name, child))
    return layers


def cut_layers(layers: list, cut: str, donor_name: str) -> list:
    """The layers up to and including ``cut`` (a layer name or a group such as ``layer2``)."""
    key = cut.replace(".", "_")
    hits = [i for i, (name, _) in enumerate(layers) if name == key or name.startswith(key + "_")]
    if not hits:
        names = [name.replace("_", ".", 1) if name.split("_")[-1].isdigit() else name for name, _ in layers]
        raise ValueError(
            f"scion_cut={cut!r} is not a layer of {donor_name}, whose {len(layers)} cut points run "
            f"{names[0]} ... {names[-1]}: {', '.join(names)}."
        )
    return layers[: hits[-1] + 1]


def output_shape(module: nn.Module, input_shape: tuple) -> torch.Size:
    """Output shape of one sample, computed on the meta device (no real compute).

    The probe batch holds two samples: batch norm in training mode refuses a single value
    per channel.
    """
    probe = module if all(t.is_meta for t in module.parameters()) else copy.deepcopy(module).to("meta")
    with torch.no_grad():
        return probe(torch.empty((2, *input_shape[1:]), device="meta")).shape[1:]


def dense_head(in_width: int, widths: list, num_labels: int, dropout: float) -> nn.Sequential:
    """Dense -> ReLU blocks of the given widths, then a linear classifier."""
    layers, width = OrderedDict(), in_width
    for i, out_width in enumerate(widths, start=1):
        if dropout:
            layers[f"drop{i}"] = nn.Dropout(dropout)
        layers[f"fc{i}"] = nn.Linear(width, out_width)
        layers[f"act{i}"] = nn.ReLU()
        width = out_width
    if dropout:
        layers["drop_out"] = nn.Dropout(dropout)
    layers["classifier"] = nn.Linear(width, num_labels)
    return nn.Sequential(layers)


def init_cnn_weights(module: nn.Module) -> None:
    """He-normal (fan-in) convolutions and linears with zero biases, unit norms.

    Fan-in scaling (He et al., 2015; Keras' ``he_normal``) keeps the activation scale through a
    plain ReLU stack. A donor without normalisation layers, such as VGG16, needs that: with
    timm's fan-out convolutions and PyTorch's default linears its logits start near zero and
    training sits on the chance-level plateau for its first epoch or more.
    """
    if isinstance(module, (nn.Conv2d, nn.Linear)):
        nn.init.kaiming_normal_(module.weight, mode="fan_in", nonlinearity="relu")
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm)):
        if getattr(module, "weight", None) is not None:
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        if getattr(module, "running_mean", None) is not None:
            nn.init.zeros_(module.running_mean)
            nn.init.ones_(module.running_var)
            nn.init.zeros_(module.num_batches_tracked)


class GraftedModelForImageClassification(GraftedModel):
    """A scion of donor layers (and/or a timm rootstock), pooled by GAP, classified by a dense head.

    The head standardises the pooled features (``head.norm``, a batch norm without parameters,
    so the parameter count is the paper's) before its dense layers.

    Build it from a config (random weights), from a donor with [`from_donor`] (the scion takes the
    donor's weights) or with ``from_pretrained``.
    """

    config_class = GraftedVisionConfig
    main_input_name = "pixel_values"
    auto_classes = ("AutoModel", "AutoModelForImageClassification")

    def __init__(self, config: GraftedVisionConfig):
        super().__init__(config)
        size = (1, config.num_channels, config.image_size, config.image_size)
        width = 0
        self.scion = None
        if config.scion_cut is not None:
            layers = cut_layers(
                feature_layers(config.donor_name, config.num_channels), config.scion_cut, config.donor_name
            )
            self.scion = nn.Sequential(OrderedDict(layers))
            width += output_shape(self.scion, size)[0]
        self.rootstock = None
        if config.rootstock is not None:
            self.rootstock = create_timm(config.rootstock, num_classes=0, in_chans=config.num_channels)
            width += self.rootstock.num_features
        dense = dense_head(width, config.head_widths, config.num_labels, config.head_dropout)
        # GAP features of a donor prefix sit on large per-channel offsets with a small
        # image-dependent part; a parameter-free batch norm standardises them for the head.
        norm = nn.BatchNorm1d(width, affine=False)
        self.head = nn.Sequential(OrderedDict([("norm", norm), *dense.named_children()]))
        materialise(self)
        self.post_init()
        if self.scion is not None and not config.scion_trainable:
            self.scion.requires_grad_(False)

    def _init_weights(self, module):
        init_cnn_weights(module)

    @classmethod
    def from_donor(cls, donor: nn.Module, config: Optional[GraftedVisionConfig] = None):
        """A graft whose scion carries the donor's weights.

        ``donor`` is a donor classifier from ``hf_graft.vision.donor_model`` (its ``body`` holds
        the feature layers under the names ``feature_layers`` gives); ``config`` defaults to the
        donor's.
        """
        config = config or donor.config
        if config.donor_name != donor.config.donor_name:
            raise ValueError(
                f"The config grafts from {config.donor_name!r} but the donor is {donor.config.donor_name!r}."
            )
        model = cls(config)
        if model.scion is not None:
            donor_state = donor.body.state_dict()
            wanted = model.scion.state_dict().keys()
            model.scion.load_state_dict({key: donor_state[key] for key in wanted})
        return model

    def save_pretrained(self, save_directory, *args, **kwargs):
        """Save the graft and its image processor (``preprocessor_config.json``), so
        ``pipeline("image-classification", model=save_directory)`` works from the folder alone."""
        super().save_pretrained(save_directory, *args, **kwargs)
        if kwargs.get("is_main_process", True):
            GraftedImageProcessor.from_model_config(self.config).save_pretrained(save_directory)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.scion is not None and not self.config.scion_trainable:
            self.scion.eval()  # a frozen scion keeps its donor statistics
        return self

    def pooled_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The GAP features the head classifies: scion and rootstock, concatenated."""
        features = []
        if self.scion is not None:
            features.append(self.scion(pixel_values).mean(dim=(2, 3)))
        if self.rootstock is not None:
            features.append(self.rootstock(pixel_values))
        return torch.cat(features, dim=1) if len(features) > 1 else features[0]

    def forward(
        self,
        pixel_values: torch.Tensor,
        labels: Optional[torch.Tensor] = None,
        output_hidden_states: Optional[bool] = None,
        return_dict: Optional[bool] = None,
        **kwargs,
    ):
        features = self.pooled_features(pixel_values)
        logits = self.head(features)
        loss = F.cross_entropy(logits, labels) if labels is not None else None
        hidden_states = (features,) if output_hidden_states else None
        if return_dict is False:
            return tuple(v for v in (loss, logits, hidden_states) if v is not None)
        return ImageClassifierOutput(loss=loss, logits=logits, hidden_states=hidden_states)


GraftedVisionConfig.register_for_auto_class()
GraftedModelForImageClassification.register_for_auto_class("AutoModelForImageClassification")
