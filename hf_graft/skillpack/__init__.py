"""SkillPacks: skills stored as compressed, bit-packed weight deltas; a PEFT adapter type.

Importing this package registers the ``SKILLPACK`` method with peft, so ``get_peft_model``,
``PeftModel.from_pretrained``, ``merge_and_unload`` and multi-adapter models work as for LoRA.
"""

from peft.utils import register_peft_method

from .config import SkillPackConfig
from .extract import extract_skillpack, lora_deltas, weight_deltas
from .files import SkillPackFile, load_skillpack, read_skillpack
from .model import SkillPackModel, base_fingerprint
from .peft_type import SKILLPACK

register_peft_method(name="skillpack", config_cls=SkillPackConfig, model_cls=SkillPackModel)

__all__ = [
    "SKILLPACK",
    "SkillPackConfig",
    "SkillPackFile",
    "SkillPackModel",
    "base_fingerprint",
    "extract_skillpack",
    "load_skillpack",
    "lora_deltas",
    "read_skillpack",
    "weight_deltas",
]
