"""``GraftedCausalLMConfig``: a host causal LM carrying transformer blocks grafted from donors.

Layer grafting with translators (Zimmermann & Boussard): a donor's block ``i`` is inserted in the
host's stack of blocks between a pre-translator (host stream -> what the block saw in its donor)
and a post-translator (block output -> what the host's next block expects), each one linear layer.
"""

import copy

from transformers import AutoConfig

from .configuration_grafted import GraftedConfig

#: Host families whose blocks can be grafted (donor blocks must come from the same family).
SUPPORTED_FAMILIES = ("llama", "gpt_neox", "qwen2")
TRANSLATOR_INITS = ("identity", "least_squares")


class GraftedCausalLMConfig(GraftedConfig):
    """A host causal LM with donor blocks inserted between translators.

    Args:
        host_config (`dict`):
            The host's own configuration (``host.config.to_dict()``), as it is before grafting.
        grafts (`list[dict]`):
            One entry per grafted block, applied in order:

            - ``position`` (`int`): where the block goes in the host's stack: after host blocks
              ``0 .. position - 1`` and before host block ``position`` (``0`` to the host's
              number of blocks);
            - ``donor_config`` (`dict`): the donor's configuration (same family as the host; its
              hidden size may differ);
            - ``donor_layer`` (`int`): which of the donor's blocks it is;
            - ``translator_init`` (`str`): ``"identity"`` (hidden sizes must match) or
              ``"least_squares"`` (fitted from paired activations; any sizes);
            - ``gate`` (`bool`, optional, default false): the block's output passes through a learned
              per-token gate read from the host's stream, so the host runs as itself where it is closed;
            - ``donor_name`` (`str`, optional) and ``block`` (`str`, optional: ``"vanilla"`` or
              ``"tuned"``): where the weights came from, for the model card.
    """

    model_type = "grafted_causal_lm"

    def __init__(self, host_config=None, grafts=None, **kwargs):
        self.host_config = copy.deepcopy(host_config) if host_config is not None else None
        self.grafts = [dict(graft) for graft in (grafts or [])]
        if self.host_config is not None:
            kwargs.setdefault("tie_word_embeddings", bool(self.host_config.get("tie_word_embeddings", False)))
            kwargs.setdefault("vocab_size", self.host_config.get("vocab_size"))
            kwargs.setdefault("hidden_size", self.host_config.get("hidden_size"))
        super().__init__(**kwargs)
        if self.host_config is not None:
            self.validate_grafts()

    def host(self):
        """The host's configuration as a transformers config object."""
        return config_from_dict(self.host_config)

    @property
    def host_layers(self) -> int:
        return int(self.host_config["num_hidden_layers"])

    def validate_grafts(self) -> None:
        """Check the host family, every position, donor layer, family and translator init; raise ValueError."""
        family = self.host_config.get("model_type")
        if family not in SUPPORTED_FAMILIES:
            raise ValueError(
                f"Layer grafting supports hosts of the {', '.join(SUPPORTED_FAMILIES)} families, got {family!r}."
            )
        if not self.grafts:
            raise ValueError("A grafted causal LM needs at least one graft.")
        for index, graft in enumerate(self.grafts):
            what = f"Graft {index}"
            missing = {"position", "donor_config", "donor_layer"} - set(graft)
            if missing:
                raise ValueError(f"{what} lacks {sorted(missing)}.")
            position, donor, layer = graft["position"], graft["donor_config"], graft["donor_layer"]
            if not (isinstance(position, int) and 0 <= position <= self.host_layers):
                raise ValueError(
                    f"{what}: position {position!r} is outside the host, which has {self.host_layers} blocks "
                    f"(positions 0 to {self.host_layers})."
                )
            if donor.get("model_type") != family:
                raise ValueError(
                    f"{what}: a {donor.get('model_type')!r} block cannot be grafted into a {family!r} host; "
                    "donor and host must be of the same family."
                )
            donor_layers = int(donor["num_hidden_layers"])
            if not (isinstance(layer, int) and 0 <= layer < donor_layers):
                raise ValueError(
                    f"{what}: donor layer {layer!r} is outside the donor, which has {donor_layers} blocks "
                    f"(layers 0 to {donor_layers - 1})."
                )
            if not isinstance(graft.get("gate", False), bool):
                raise ValueError(f"{what}: gate must be true or false, got {graft['gate']!r}.")
            init = graft.setdefault("translator_init", "identity")
            if init not in TRANSLATOR_INITS:
                raise ValueError(f"{what}: translator_init must be one of {TRANSLATOR_INITS}, got {init!r}.")
            if init == "identity" and donor["hidden_size"] != self.host_config["hidden_size"]:
                raise ValueError(
                    f"{what}: identity translators need equal hidden sizes, but the host has "
                    f"{self.host_config['hidden_size']} and the donor {donor['hidden_size']}; "
                    "use translator_init='least_squares' and fit them from paired activations."
                )


def config_from_dict(data: dict):
    """The transformers config a ``to_dict()`` of one gives back (its ``model_type`` picks the class)."""
    data = dict(data)
    return AutoConfig.for_model(data.pop("model_type"), **data)
