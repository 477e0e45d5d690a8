"""hf-graft: knowledge grafting on the Hugging Face Hub.

Importing the package registers the graft models with transformers' Auto classes, so
``AutoModel.from_pretrained("org/grafted-...")`` works without ``trust_remote_code``, and the
SkillPack adapter type with peft, so ``PeftModel.from_pretrained(base, "org/skillpack-...")`` works.
Everything else (``hf_graft.vision``, ``hf_graft.layers``, ``hf_graft.metrics``, ...) is imported
on first use.
"""

from transformers import AutoConfig, AutoImageProcessor, AutoModel, AutoModelForCausalLM, AutoModelForImageClassification

from . import skillpack
from .errors import HfGraftError
from .lazy import lazy_exports
from .models.configuration_grafted import GraftedConfig
from .models.configuration_grafted_causal_lm import GraftedCausalLMConfig
from .models.configuration_grafted_vision import GraftedVisionConfig
from .models.image_processing_grafted import GraftedImageProcessor
from .models.modeling_grafted import GraftedModel
from .models.modeling_grafted_causal_lm import GraftedModelForCausalLM
from .models.modeling_grafted_vision import GraftedModelForImageClassification
from .skillpack import SkillPackConfig

__version__ = "0.1.0"


def _write_model_card(model, save_directory, **kwargs):
    from .hub import write_model_card

    return write_model_card(model, save_directory, **kwargs)


GraftedModel.model_card_writer = staticmethod(_write_model_card)

AutoConfig.register(GraftedVisionConfig.model_type, GraftedVisionConfig, exist_ok=True)
AutoModel.register(GraftedVisionConfig, GraftedModelForImageClassification, exist_ok=True)
AutoModelForImageClassification.register(GraftedVisionConfig, GraftedModelForImageClassification, exist_ok=True)
AutoImageProcessor.register(GraftedVisionConfig, slow_image_processor_class=GraftedImageProcessor, exist_ok=True)
AutoConfig.register(GraftedCausalLMConfig.model_type, GraftedCausalLMConfig, exist_ok=True)
AutoModel.register(GraftedCausalLMConfig, GraftedModelForCausalLM, exist_ok=True)
AutoModelForCausalLM.register(GraftedCausalLMConfig, GraftedModelForCausalLM, exist_ok=True)

_LAZY = {
    **{name: name for name in ("data", "demo", "hub", "layers", "metrics", "recipes", "reporting", "vision")},
    "extract_skillpack": "skillpack.extraction.loaded",
    "fuse": "skillpack.fusion",
}
__getattr__, __dir__ = lazy_exports(__name__, _LAZY)

__all__ = [
    "GraftedCausalLMConfig",
    "GraftedConfig",
    "GraftedImageProcessor",
    "GraftedModel",
    "GraftedModelForCausalLM",
    "GraftedModelForImageClassification",
    "GraftedVisionConfig",
    "HfGraftError",
    "SkillPackConfig",
    "extract_skillpack",
    "fuse",
]
