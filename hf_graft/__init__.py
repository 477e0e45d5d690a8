"""hf-graft: knowledge grafting on the Hugging Face Hub.

Importing the package registers the graft models with transformers' Auto classes, so
``AutoModel.from_pretrained("org/grafted-...")`` works without ``trust_remote_code``, and the
SkillPack adapter type with peft, so ``PeftModel.from_pretrained(base, "org/skillpack-...")`` works.
"""

from transformers import AutoConfig, AutoModel, AutoModelForImageClassification

from . import hub, skillpack, vision
from .errors import HfGraftError
from .models.configuration_grafted import GraftedConfig
from .models.configuration_grafted_vision import GraftedVisionConfig
from .models.modeling_grafted import GraftedModel
from .models.modeling_grafted_vision import GraftedModelForImageClassification
from .skillpack import SkillPackConfig, extract_skillpack

__version__ = "0.1.0"

GraftedModel.model_card_writer = staticmethod(hub.write_model_card)

AutoConfig.register(GraftedVisionConfig.model_type, GraftedVisionConfig, exist_ok=True)
AutoModel.register(GraftedVisionConfig, GraftedModelForImageClassification, exist_ok=True)
AutoModelForImageClassification.register(GraftedVisionConfig, GraftedModelForImageClassification, exist_ok=True)

__all__ = [
    "GraftedConfig",
    "GraftedModel",
    "GraftedModelForImageClassification",
    "GraftedVisionConfig",
    "HfGraftError",
    "SkillPackConfig",
    "extract_skillpack",
]
