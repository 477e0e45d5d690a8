"""``SkillPackConfig``: the PEFT config of a SkillPack (GraftLLM, arXiv 2505.18502)."""

from dataclasses import dataclass, field
from typing import Optional

from peft.config import PeftConfig

from .peft_type import SKILLPACK

#: Module names whose deltas are stored sparse (magnitude-pruned) rather than low rank: token
#: embeddings and output heads of the supported families (Llama/Qwen2, GPT-NeoX, GPT-2).
EMBEDDING_MODULES = ("embed_tokens", "lm_head", "embed_in", "embed_out", "wte", "wpe")


@dataclass
class SkillPackConfig(PeftConfig):
    """A skill stored as the compressed weight delta between a tuned model and its base.

    A SkillPack is applied as ``W = W_base + dW`` per module, where ``dW`` is stored low rank with
    mixed-precision bit-packed factors (attention and MLP projections), magnitude-pruned and
    sparse (embeddings, output heads) or fp16 (norms, biases). Extraction fills ``module_specs``;
    the user chooses the budget.

    Args:
        target_ratio (`float`, defaults to 16.0):
            Bytes budget as a compression ratio: (bf16 bytes of the changed modules' deltas) /
            (bytes on disk). GraftLLM's comparisons are at 1/16 of the bf16 delta (Delta-CoMe
            keeps 53.2 of 53.5), so 16 is the default.
        byte_budget (`int`, *optional*):
            An absolute budget in bytes instead of ``target_ratio``.
        calibration_samples (`int`, defaults to 0):
            Texts of the calibration set used to weight the compression error by real activations
            (GPTQ-style); 0 extracts uncalibrated.
        sparse_modules (`list[str]`):
            Name suffixes whose deltas are pruned sparse rather than factored (embeddings, heads).
        module_specs (`dict`):
            Per changed module, ``{"weight": meta, "bias": meta}``: how each delta is stored (kind,
            shape, rank, bit scheme, group size, or kept count). Written by extraction.
        tied_modules (`dict`):
            ``{module: source}`` for output heads whose weight is tied to a packed embedding; their
            delta is the source's, stored once. Written by extraction.
        base_fingerprint (`str`, *optional*):
            SHA-256 over the base model's weights of the changed modules, recorded at extraction.
        check_base_fingerprint (`bool`, defaults to `True`):
            Refuse to apply the pack to a base whose weights differ from the fingerprint. Set it to
            `False` (e.g. ``PeftModel.from_pretrained(base, repo, check_base_fingerprint=False)``)
            to apply it to another base on purpose.
        measured (`dict`):
            Figures measured at extraction (ratio, bytes, relative error, retention), for the card.
    """

    target_ratio: Optional[float] = field(default=16.0, metadata={"help": "bf16 delta bytes / bytes on disk"})
    byte_budget: Optional[int] = field(default=None, metadata={"help": "absolute byte budget"})
    calibration_samples: int = field(default=0, metadata={"help": "calibration texts; 0 = uncalibrated"})
    sparse_modules: list = field(default_factory=lambda: list(EMBEDDING_MODULES))
    target_modules: Optional[list] = field(
        default=None, metadata={"help": "unused: module_specs names the changed modules exactly"}
    )
    module_specs: dict = field(default_factory=dict, metadata={"help": "per-module storage, set by extraction"})
    tied_modules: dict = field(default_factory=dict, metadata={"help": "heads tied to a packed embedding"})
    base_fingerprint: Optional[str] = field(default=None, metadata={"help": "sha256 of the base's changed weights"})
    check_base_fingerprint: bool = field(default=True, metadata={"help": "refuse another base"})
    measured: dict = field(default_factory=dict, metadata={"help": "figures measured at extraction"})

    def to_dict(self) -> dict:
        """The saved config. ``check_base_fingerprint`` is a loading option, not a property of the pack:
        it is left out so ``PeftModel.from_pretrained(..., check_base_fingerprint=False)`` takes effect."""
        data = super().to_dict()
        data.pop("check_base_fingerprint", None)
        return data

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = SKILLPACK
        if self.target_ratio is not None and self.target_ratio <= 1:
            raise ValueError(f"target_ratio must be greater than 1, got {self.target_ratio}.")
        if self.byte_budget is not None and self.byte_budget <= 0:
            raise ValueError(f"byte_budget must be positive, got {self.byte_budget}.")
