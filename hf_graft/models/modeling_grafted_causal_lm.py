"""``GraftedModelForCausalLM``: a host causal LM whose stack of blocks carries grafted donor blocks.

The host is an ordinary transformers causal LM built from ``config.host_config``; each graft is a
:class:`GraftedBlock` inserted in the host's block list, so the host's own forward, attention
masks, KV cache and ``generate`` run unchanged. Attention modules are renumbered so every block
has its own slot in the cache.
"""

import copy
from typing import Optional

import torch
from torch import nn
from transformers import AutoModelForCausalLM, GenerationMixin

from .configuration_grafted_causal_lm import GraftedCausalLMConfig, config_from_dict
from .modeling_grafted import GraftedModel


class Translator(nn.Linear):
    """A linear map between two residual streams, initialised as the identity (truncated if sizes differ)."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__(in_features, out_features, bias=True)
        self.reset_to_identity()

    @torch.no_grad()
    def reset_to_identity(self) -> None:
        self.weight.copy_(torch.eye(self.out_features, self.in_features))
        self.bias.zero_()


class Gate(nn.Module):
    """How far a graft's output replaces the host's stream at each token: ``sigmoid(w . norm(h) + b)``,
    read from the host's stream ``h`` before the graft (one scalar per token, causal).

    It starts open (``b`` = :data:`OPEN_LOGIT`, ``w`` = 0: the graft acts as it would ungated) and
    learns to close where the graft's task is absent, so the host runs as itself there.
    """

    #: The logit a new gate starts at: ``sigmoid(4) = 0.982``.
    OPEN_LOGIT = 4.0

    def __init__(self, hidden_size: int):
        super().__init__()
        self.norm = nn.LayerNorm(hidden_size, elementwise_affine=False)
        self.score = nn.Linear(hidden_size, 1)
        self.reset_open()

    @torch.no_grad()
    def reset_open(self) -> None:
        self.score.weight.zero_()
        self.score.bias.fill_(self.OPEN_LOGIT)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """The openness ``[..., 1]`` of each token, in ``[0, 1]``."""
        return torch.sigmoid(self.score(self.norm(hidden_states)).float()).to(hidden_states.dtype)


class GraftedBlock(nn.Module):
    """``post(block(pre(h)))``: a donor block between a pre- and a post-translator; gated, the
    stream becomes ``h + g(h) * (post(block(pre(h))) - h)``, the host's own ``h`` where ``g`` is 0.

    It takes the host block's call (hidden states plus the host's keyword arguments) and returns
    what the host's blocks return. Rotary position embeddings are recomputed with the donor's own
    settings, as its head size may differ from the host's.
    """

    def __init__(self, host_config, donor_config, block_class, rotary_class, layer_idx: int, gated: bool = False):
        super().__init__()
        self.pre = Translator(host_config.hidden_size, donor_config.hidden_size)
        self.block = block_class(donor_config, layer_idx)
        self.post = Translator(donor_config.hidden_size, host_config.hidden_size)
        self.rotary_emb = rotary_class(config=donor_config) if rotary_class is not None else None
        self.gate = Gate(host_config.hidden_size) if gated else None

    def forward(self, hidden_states, *args, position_embeddings=None, position_ids=None, **kwargs):
        inner = self.pre(hidden_states)
        if self.rotary_emb is not None and position_embeddings is not None:
            position_embeddings = self.rotary_emb(inner, position_ids)
        output = self.block(inner, *args, position_embeddings=position_embeddings, position_ids=position_ids, **kwargs)
        grafted = self.post(output[0] if isinstance(output, tuple) else output)
        if self.gate is not None:
            grafted = hidden_states + self.gate(hidden_states) * (grafted - hidden_states)
        return (grafted,) + output[1:] if isinstance(output, tuple) else grafted


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The list of transformer blocks of a transformers causal LM (``model.model.layers``, ``gpt_neox.layers``)."""
    inner = model.base_model
    layers = getattr(inner, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(f"{type(model).__name__} keeps no list of blocks at .{model.base_model_prefix}.layers.")
    return layers


def _rotary_class(model: nn.Module):
    rotary = getattr(model.base_model, "rotary_emb", None)
    return type(rotary) if rotary is not None else None


class GraftedModelForCausalLM(GraftedModel, GenerationMixin):
    """A causal LM with blocks grafted from donors (layer grafting with translators).

    Build it with :meth:`from_models` (host weights, donor block weights, identity translators);
    train its translators with ``hf_graft.layers.train_translators``; swap the grafted block for a
    specialised one with :meth:`swap_block`. ``generate`` is the host's and uses the KV cache.
    """

    config_class = GraftedCausalLMConfig
    base_model_prefix = "host"
    auto_classes = ("AutoModel", "AutoModelForCausalLM")
    _supports_cache_class = True
    supports_gradient_checkpointing = True

    def __init__(self, config: GraftedCausalLMConfig):
        super().__init__(config)
        host_config = config.host()
        self.host = AutoModelForCausalLM.from_config(host_config)
        layers = decoder_layers(self.host)
        block_class, rotary_class = type(layers[0]), _rotary_class(self.host)
        implementation = self.host.config._attn_implementation
        blocks, self._graft_slots = [], [0] * len(config.grafts)
        for position in range(len(layers) + 1):
            for index, graft in enumerate(config.grafts):
                if graft["position"] == position:
                    donor_config = config_from_dict(graft["donor_config"])
                    donor_config._attn_implementation = implementation
                    self._graft_slots[index] = len(blocks)
                    blocks.append(GraftedBlock(host_config, donor_config, block_class, rotary_class, 0, bool(graft.get("gate", False))))
            if position < len(layers):
                blocks.append(layers[position])
        self.host.base_model.layers = layers = nn.ModuleList(blocks)
        for index, block in enumerate(layers):
            for module in block.modules():
                if hasattr(module, "layer_idx"):
                    module.layer_idx = index
        self.host.config.num_hidden_layers = len(layers)
        if getattr(self.host.config, "layer_types", None) is not None:
            self.host.config.layer_types = [self.host.config.layer_types[0]] * len(layers)
        self.post_init()
        # The host's own initialisation reaches the translators and gates inside its stack: reset them.
        for module in self.modules():
            if isinstance(module, Translator):
                module.reset_to_identity()
            elif isinstance(module, Gate):
                module.reset_open()
        self.generation_config = self.host.generation_config  # one generation config: the host's

    def _init_weights(self, module):
        if isinstance(module, Translator):
            module.reset_to_identity()
        elif isinstance(module, Gate):
            module.reset_open()

    @property
    def graft_blocks(self) -> list:
        """The grafted blocks, in the order of ``config.grafts``."""
        layers = decoder_layers(self.host)
        return [layers[slot] for slot in self._graft_slots]

    def get_input_embeddings(self):
        return self.host.get_input_embeddings()

    def get_output_embeddings(self):
        return self.host.get_output_embeddings()

    def forward(self, *args, **kwargs):
        return self.host(*args, **kwargs)

    def generate(self, *args, **kwargs):
        """The host's ``generate``, through the grafted stack, with this model's generation config."""
        self.host.generation_config = self.generation_config  # e.g. the one from_pretrained read from the folder
        return self.host.generate(*args, **kwargs)

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None):
        """Checkpoint the host's blocks, grafted ones included (the host's own implementation)."""
        self.host.gradient_checkpointing_enable(gradient_checkpointing_kwargs=gradient_checkpointing_kwargs)

    def gradient_checkpointing_disable(self):
        self.host.gradient_checkpointing_disable()

    @classmethod
    def from_models(
        cls,
        host: nn.Module,
        donor: nn.Module,
        *,
        donor_layer: int,
        position: int,
        translator_init: str = "identity",
        donor_name: Optional[str] = None,
        gate: bool = False,
    ) -> "GraftedModelForCausalLM":
        """A copy of ``host`` with ``donor``'s block ``donor_layer`` inserted at ``position``.

        Translators start as the identity; with ``translator_init="least_squares"`` (needed when
        the hidden sizes differ) fit them with ``hf_graft.layers.fit_translators``. With
        ``gate=True`` the graft is gated (see :meth:`add_graft`).
        """
        if isinstance(host, GraftedModelForCausalLM):
            raise ValueError("from_models takes a plain host model; use add_graft to graft into a grafted model.")
        return cls.add_graft(
            host, donor, donor_layer=donor_layer, position=position, translator_init=translator_init, donor_name=donor_name, gate=gate,
        )

    @classmethod
    def add_graft(cls, host, donor, *, donor_layer, position, translator_init="identity", donor_name=None, gate=False):
        """Like :meth:`from_models`; ``host`` may already be a grafted model, whose grafts are kept.

        ``position`` counts the host's own blocks; a new graft at the position of an earlier one
        runs after it. With ``gate=True`` the graft's output passes through a :class:`Gate`
        (trained by ``hf_graft.layers.train_gate``); several gated grafts route between themselves, each
        opening on its own task, once ``hf_graft.layers.train_gates`` has trained their gates together.
        """
        grafted = isinstance(host, GraftedModelForCausalLM)
        source = host.host if grafted else host
        grafts = copy.deepcopy(host.config.grafts) if grafted else []
        grafts.append(
            {
                "position": position,
                "donor_config": donor.config.to_dict(),
                "donor_layer": donor_layer,
                "translator_init": translator_init,
                "donor_name": donor_name or getattr(donor, "name_or_path", None) or None,
                "block": "vanilla",
                **({"gate": True} if gate else {}),
            }
        )
        config = GraftedCausalLMConfig(
            host_config=host.config.host_config if grafted else host.config.to_dict(),
            grafts=grafts,
            donor_name=grafts[0]["donor_name"],
        )
        model = cls(config)
        prefix = f"{source.base_model_prefix}.layers."
        outside = {k: v for k, v in source.state_dict().items() if not k.startswith(prefix)}
        model.host.load_state_dict(outside, strict=False)
        new_graft = model.graft_blocks[-1]
        kept = [block for block in decoder_layers(model.host) if block is not new_graft]
        for old, new in zip(decoder_layers(source), kept):
            new.load_state_dict(old.state_dict())
        new_graft.block.load_state_dict(decoder_layers(donor)[donor_layer].state_dict())
        return model.train(host.training)

    def swap_block(self, block: nn.Module, graft: int = 0) -> None:
        """Replace grafted block ``graft``'s weights with ``block``'s (the paper's "original" strategy).

        ``block`` is a transformer block of the donor's architecture, or a whole causal LM of it,
        whose block ``donor_layer`` is taken (e.g. the model ``hf_graft.layers.specialise_block``
        returns).
        """
        target = self.graft_blocks[graft]
        if hasattr(block, "base_model") and not isinstance(block, type(target.block)):
            block = decoder_layers(block)[self.config.grafts[graft]["donor_layer"]]
        if not isinstance(block, type(target.block)):
            raise ValueError(f"swap_block needs a {type(target.block).__name__}, got {type(block).__name__}.")
        target.block.load_state_dict(block.state_dict())
        self.config.grafts[graft]["block"] = "tuned"


GraftedCausalLMConfig.register_for_auto_class()
GraftedModelForCausalLM.register_for_auto_class("AutoModelForCausalLM")
