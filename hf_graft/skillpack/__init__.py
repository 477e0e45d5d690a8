"""SkillPacks: skills stored as compressed, bit-packed weight deltas; a PEFT adapter type.

Importing this package registers the ``SKILLPACK`` method with peft, so ``get_peft_model``,
``PeftModel.from_pretrained``, ``merge_and_unload`` and multi-adapter models work as for LoRA.
"""

from peft.utils import register_peft_method

from .config import SkillPackConfig
from .extract import delta_spectrum, extract_skillpack, lora_deltas, weight_deltas
from .fusion import FusedSkillPacks, fuse
from .merging import MERGE_METHODS, merge_skillpacks
from .files import SkillPackFile, load_skillpack, pack_of, read_skillpack, record_evaluation
from .lora_export import LoraExport, export_lora
from .model import SkillPackModel, base_fingerprint
from .peft_type import SKILLPACK

register_peft_method(name="skillpack", config_cls=SkillPackConfig, model_cls=SkillPackModel)

__all__ = [
    "SKILLPACK",
    "FusedSkillPacks",
    "LoraExport",
    "MERGE_METHODS",
    "SkillPackConfig",
    "SkillPackFile",
    "SkillPackModel",
    "base_fingerprint",
    "delta_spectrum",
    "export_lora",
    "extract_skillpack",
    "fuse",
    "load_skillpack",
    "lora_deltas",
    "merge_skillpacks",
    "pack_of",
    "read_skillpack",
    "record_evaluation",
    "weight_deltas",
]
