"""``SkillPackConfig``: the PEFT config of a SkillPack (GraftLLM, arXiv 2505.18502)."""

import json
import os
from dataclasses import dataclass, field
from typing import Optional

from peft.config import PeftConfig

from ..errors import HfGraftError
from ..safetensors_io import atomic_write_text
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
        inference_mode (`bool`, defaults to `True`):
            SkillPacks are frozen (their codes are integers); loading one with ``is_trainable=True``
            is refused with a message saying how to train further.
        byte_budget (`int`, *optional*):
            An absolute budget in bytes instead of ``target_ratio``.
        calibration_samples (`int`, defaults to 128):
            At most this many calibration sequences are used (0: all that are given); extraction
            records how many it used, 0 for a data-free pack.
        distill_steps (`int`, defaults to 200):
            Steps of scale distillation (BitDelta's, applied to every format: the stored scales,
            zeros and fp16 values trained to match the tuned model's next-token distributions on
            the calibration data; bytes unchanged). 0 turns it off; data-free packs have none.
        distill_learning_rate (`float`, defaults to 1e-2):
            Adam's learning rate for scale distillation, relative to each stored tensor's mean
            magnitude (a rate of 0.01 moves a scale by about 1% of its size per step).
        objective (`str`, defaults to `"output"`):
            What candidates are measured by: ``"output"``, the loss their error costs the model on
            the calibration data (input second moments x output sensitivities, see
            ``hf_graft.skillpack.objective``); ``"weight"``, the Frobenius error of the delta.
        formats (`str`, defaults to `"all"`):
            ``"all"``: direct 1-4 bit quantization, signs with a low-rank correction, low rank,
            sparse, or the module left out; ``"lowrank"``: low rank, sparse and fp16 only
            (GraftLLM's original search space).
        compensation (`bool`, defaults to `True`):
            Compress decoder blocks in order, each measured on the model with the earlier blocks'
            compressed deltas applied, so errors are compensated rather than compounded.
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
    inference_mode: bool = field(default=True, metadata={"help": "always True: SkillPacks are frozen"})
    byte_budget: Optional[int] = field(default=None, metadata={"help": "absolute byte budget"})
    calibration_samples: int = field(default=128, metadata={"help": "calibration sequences used at most; 0 = all given"})
    distill_steps: int = field(default=200, metadata={"help": "scale distillation steps; 0 = none"})
    distill_learning_rate: float = field(default=1e-2, metadata={"help": "Adam rate, relative to each tensor's size"})
    objective: str = field(default="output", metadata={"help": "'output': what errors cost the model; 'weight': Frobenius"})
    formats: str = field(default="all", metadata={"help": "'all' formats, or 'lowrank' (SVD, sparse, fp16) only"})
    compensation: bool = field(default=True, metadata={"help": "compress blocks in order on the partly compressed model"})
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

    def to_json_text(self, auto_mapping: Optional[dict] = None) -> str:
        """``adapter_config.json`` as written: one top-level field per line, values in compact JSON.

        peft's indented layout would spend more bytes on whitespace than a small pack spends on
        its deltas; every byte here counts against the pack's budget. ``auto_mapping`` is what
        peft records for custom base models.
        """
        data = {key: sorted(value) if isinstance(value, set) else value for key, value in self.to_dict().items()}
        if auto_mapping is not None:
            data["auto_mapping"] = auto_mapping
        lines = [f"{json.dumps(key)}: {json.dumps(data[key], separators=(',', ':'), sort_keys=True)}" for key in sorted(data)]
        return "{\n" + ",\n".join(lines) + "\n}\n"

    def save_pretrained(self, save_directory: str, **kwargs) -> None:
        """Write ``adapter_config.json`` (:meth:`to_json_text`) to ``save_directory``."""
        if os.path.isfile(save_directory):
            raise HfGraftError(f"{save_directory} is a file; give a folder to save the SkillPack config in.")
        os.makedirs(save_directory, exist_ok=True)
        _refuse_pickled_weights(save_directory)
        text = self.to_json_text(kwargs.get("auto_mapping_dict"))
        atomic_write_text(os.path.join(save_directory, "adapter_config.json"), text)

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = SKILLPACK
        if self.target_ratio is not None and self.target_ratio <= 1:
            raise ValueError(f"target_ratio must be greater than 1, got {self.target_ratio}.")
        if self.objective not in ("output", "weight"):
            raise ValueError(f"objective must be 'output' or 'weight', got {self.objective!r}.")
        if self.formats not in ("all", "lowrank"):
            raise ValueError(f"formats must be 'all' or 'lowrank', got {self.formats!r}.")
        if isinstance(self.distill_steps, bool) or not isinstance(self.distill_steps, int) or self.distill_steps < 0:
            raise ValueError(f"distill_steps must be an int >= 0, got {self.distill_steps!r}.")
        rate = self.distill_learning_rate
        if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not rate > 0:
            raise ValueError(f"distill_learning_rate must be a positive number, got {rate!r}.")
        if not isinstance(self.compensation, bool):
            raise ValueError(f"compensation must be True or False, got {self.compensation!r}.")
        if self.byte_budget is not None and self.byte_budget <= 0:
            raise ValueError(f"byte_budget must be positive, got {self.byte_budget}.")


def _refuse_pickled_weights(folder: str) -> None:
    """Remove a pickled ``adapter_model.bin`` that ``save_pretrained(safe_serialization=False)`` just wrote, and say why.

    peft writes the weights before the config; a pickle can run code when it is loaded, so a
    SkillPack is never stored that way.
    """
    pickle, safe = os.path.join(folder, "adapter_model.bin"), os.path.join(folder, "adapter_model.safetensors")
    if os.path.isfile(pickle) and (not os.path.isfile(safe) or os.path.getmtime(pickle) >= os.path.getmtime(safe)):
        os.remove(pickle)
        raise HfGraftError(
            "SkillPacks are saved as safetensors only (a pickle can run code when it is loaded): "
            "save_pretrained(safe_serialization=False) is refused and the adapter_model.bin it began was removed. "
            "Call save_pretrained without safe_serialization=False."
        )
