"""SkillPacks: skills stored as compressed, bit-packed weight deltas; a PEFT adapter type.

Importing this package registers the ``SKILLPACK`` method with peft, so ``get_peft_model``,
``PeftModel.from_pretrained``, ``merge_and_unload`` and multi-adapter models work as for LoRA.
"""

from peft.utils import register_peft_method

from ..lazy import lazy_exports
from . import config_file
from .config import SkillPackConfig
from .model import SkillPackModel, base_fingerprint
from .peft_type import SKILLPACK

register_peft_method(name="skillpack", config_cls=SkillPackConfig, model_cls=SkillPackModel)
config_file.install()

_LAZY = {
    "FusedSkillPacks": "fusion",
    "LoraExport": "lora_export",
    "MERGE_METHODS": "merging",
    "SkillPackFile": "files",
    "delta_spectrum": "extraction.loaded",
    "export_lora": "lora_export",
    "extract_from_checkpoints": "extraction.checkpoints",
    "extract_skillpack": "extraction.loaded",
    "fuse": "fusion",
    "load_skillpack": "files",
    "lora_deltas": "extraction.loaded",
    "merge_into_checkpoint": "checkpoint_merge",
    "merge_skillpacks": "merging",
    "pack_of": "files",
    "read_skillpack": "files",
    "record_evaluation": "files",
    "weight_deltas": "extraction.loaded",
}
__getattr__, __dir__ = lazy_exports(__name__, _LAZY)

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
    "extract_from_checkpoints",
    "extract_skillpack",
    "fuse",
    "load_skillpack",
    "lora_deltas",
    "merge_into_checkpoint",
    "merge_skillpacks",
    "pack_of",
    "read_skillpack",
    "record_evaluation",
    "weight_deltas",
]
