"""``SkillPackConfig``: the PEFT config of a SkillPack (GraftLLM, arXiv 2505.18502)."""

import base64
import binascii
import dataclasses
import json
import os
import re
import zlib
from dataclasses import dataclass, field
from typing import Any, Optional

from peft.config import PeftConfig
from peft.utils import TaskType

from ..errors import HfGraftError, short_repr
from ..safetensors_io import atomic_write_text, parse_json
from ..validation import is_int, is_number
from .compression.formats import check_meta
from .integrity import CONFIG_NAME, DIGEST_PREFIX, WEIGHTS_NAME, check_weights_file, file_digest, locate, pack_weights_file
from .peft_type import SKILLPACK

#: Module names whose deltas are stored sparse (magnitude-pruned) rather than low rank: token
#: embeddings and output heads of the supported families (Llama/Qwen2, GPT-NeoX, GPT-2).
EMBEDDING_MODULES = ("embed_tokens", "lm_head", "embed_in", "embed_out", "wte", "wpe")

#: Scale distillation steps of a calibrated pack of loaded models when ``distill_steps`` is unset.
END_TO_END_DISTILL_STEPS = 200


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
        general_text (`bool`, defaults to `True`):
            With calibration batches given (the skill's data), add general text (the embedded pydoc
            corpus, tokenized with the base's tokenizer), as many tokens as the skill's batches take
            their loss on (their labelled tokens, or all), so that what the pack costs the model off
            the skill is measured and distilled too: the tuned model's behaviour on both is what
            the pack reproduces.
        distill_steps (`int`, *optional*):
            Steps of scale distillation (BitDelta's, applied to every format: the stored scales,
            zeros and fp16 values trained on the calibration data; bytes unchanged). Loaded models
            are distilled end to end, to the tuned model's next-token distributions: 200 steps when
            unset. Checkpoint folders, calibrated block by block, distil each block's outputs for
            this many steps: none when unset (on ``bench_scale.py``'s pair, 50 steps a block made
            extraction 2.8x slower and the KL to the tuned model 6% higher). 0 turns it
            off; data-free packs have none. Extraction records the steps it ran.
        distill_learning_rate (`float`, defaults to 1e-2):
            Adam's learning rate for scale distillation, relative to each stored tensor's mean
            magnitude (a rate of 0.01 moves a scale by about 1% of its size per step).
        objective (`str`, defaults to `"output"`):
            What candidates are measured by: ``"output"``, the loss their error costs the model on
            the calibration data (input second moments x output sensitivities, see
            ``hf_graft.skillpack.compression.objective``); ``"weight"``, the Frobenius error of the delta.
            A data-free pack measures each delta's Frobenius error relative to the delta's own norm,
            so every module counts alike.
        formats (`str`, defaults to `"all"`):
            ``"all"``: direct 1-4 bit quantization, signs with a low-rank correction, low rank,
            sparse, or the module left out; ``"lowrank"``: low rank, sparse and fp16 only
            (GraftLLM's original search space).
        candidate_search (`str`, defaults to `"predicted"`):
            How each module's candidate formats are costed: ``"predicted"``, from one factorization
            of the delta and closed forms, with only the chosen format compressed for real (and GPTQ
            run only over correlated inputs); ``"exhaustive"``, every candidate compressed and
            decoded (several times slower; the reference the predictions are checked against).
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
        tensor_digest (`str`, *optional*):
            ``"sha256:..."`` over every stored tensor and the metadata that decodes it
            (:mod:`hf_graft.skillpack.integrity`), recorded when the pack is saved.
        verify_integrity (`bool`, defaults to `True`):
            Recompute the digest from the weights file on every load and refuse a file that does not
            match it (a damaged download or disk). A loading option like ``check_base_fingerprint``:
            ``PeftModel.from_pretrained(base, repo, verify_integrity=False)`` skips the check.
        measured (`dict`):
            Figures measured at extraction (ratio, bytes, relative error, retention), for the card.
    """

    target_ratio: Optional[float] = field(default=16.0, metadata={"help": "bf16 delta bytes / bytes on disk"})
    inference_mode: bool = field(default=True, metadata={"help": "always True: SkillPacks are frozen"})
    byte_budget: Optional[int] = field(default=None, metadata={"help": "absolute byte budget"})
    calibration_samples: int = field(default=128, metadata={"help": "calibration sequences used at most; 0 = all given"})
    general_text: bool = field(default=True, metadata={"help": "mix general text into given calibration batches"})
    distill_steps: Optional[int] = field(default=None, metadata={"help": "scale distillation steps; 0 = none, unset = 200 end to end, none block by block"})
    distill_learning_rate: float = field(default=1e-2, metadata={"help": "Adam rate, relative to each tensor's size"})
    objective: str = field(default="output", metadata={"help": "'output': what errors cost the model; 'weight': Frobenius"})
    formats: str = field(default="all", metadata={"help": "'all' formats, or 'lowrank' (SVD, sparse, fp16) only"})
    candidate_search: str = field(default="predicted", metadata={"help": "'predicted' (closed forms) or 'exhaustive'"})
    compensation: bool = field(default=True, metadata={"help": "compress blocks in order on the partly compressed model"})
    sparse_modules: list = field(default_factory=lambda: list(EMBEDDING_MODULES))
    target_modules: Optional[list] = field(
        default=None, metadata={"help": "unused: module_specs names the changed modules exactly"}
    )
    module_specs: dict = field(default_factory=dict, metadata={"help": "per-module storage, set by extraction"})
    tied_modules: dict = field(default_factory=dict, metadata={"help": "heads tied to a packed embedding"})
    base_fingerprint: Optional[str] = field(default=None, metadata={"help": "sha256 of the base's changed weights"})
    check_base_fingerprint: bool = field(default=True, metadata={"help": "refuse another base"})
    tensor_digest: Optional[str] = field(default=None, metadata={"help": "sha256 of the stored tensors, set on save"})
    verify_integrity: bool = field(default=True, metadata={"help": "check the weights file against tensor_digest"})
    measured: dict = field(default_factory=dict, metadata={"help": "figures measured at extraction"})

    def to_dict(self) -> dict:
        """The saved config. ``check_base_fingerprint`` and ``verify_integrity`` are loading options, not
        properties of the pack: they are left out so ``PeftModel.from_pretrained(..., verify_integrity=False)``
        takes effect."""
        data = super().to_dict()
        for option in LOADING_OPTIONS:
            data.pop(option, None)
        return data

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str, subfolder: Optional[str] = None, **kwargs):
        """peft's config loading, then the weights file beside the config checked before peft opens it:
        a truncated or damaged file, or one whose tensors do not match the recorded ``tensor_digest``
        (unless ``verify_integrity=False``), raises :class:`~hf_graft.errors.HfGraftError` naming it."""
        config = super().from_pretrained(pretrained_model_name_or_path, subfolder=subfolder, **kwargs)
        hub_kwargs, _, _ = cls._split_kwargs(kwargs)
        weights = locate(pretrained_model_name_or_path, WEIGHTS_NAME, subfolder, **hub_kwargs)
        check_weights_file(
            weights, config.module_specs, config.tied_modules, config.tensor_digest, verify=config.verify_integrity
        )
        return config

    def to_json_text(self, auto_mapping: Optional[dict] = None) -> str:
        """``adapter_config.json`` as written: compact, every byte counted against the pack's budget.

        One top-level field per line in compact JSON; fields left at their defaults are not
        written (peft fills them in on load); ``module_specs`` and ``tied_modules`` go in one
        ``layout`` field, their JSON deflated and base64-encoded (:func:`encode_layout`), and the
        per-module errors of ``measured`` go to the model card only. ``auto_mapping`` is what peft
        records for custom base models.
        """
        data = {key: sorted(value) if isinstance(value, set) else value for key, value in self.to_dict().items()}
        for item in dataclasses.fields(self):
            if item.name in data and item.name not in ALWAYS_SAVED and data[item.name] == _default(item):
                del data[item.name]
        data["layout"] = encode_layout(data.pop("module_specs", {}), data.pop("tied_modules", {}))
        if "measured" in data:
            data["measured"] = {key: value for key, value in data["measured"].items() if key not in CARD_ONLY_FIGURES}
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
        weights = os.path.join(save_directory, WEIGHTS_NAME)
        if os.path.isfile(weights):  # peft writes the weights first, a tensor per delta: one payload instead, and its digest
            pack_weights_file(weights, self.module_specs)
            self.tensor_digest = file_digest(weights, self.module_specs, self.tied_modules)
        text = self.to_json_text(kwargs.get("auto_mapping_dict"))
        atomic_write_text(os.path.join(save_directory, CONFIG_NAME), text)

    def __post_init__(self):
        self.peft_type = SKILLPACK
        check_fields({name: getattr(self, name) for name in FIELD_RULES if hasattr(self, name)})
        super().__post_init__()


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


#: Fields that are options of one load, never saved with a pack.
LOADING_OPTIONS = ("check_base_fingerprint", "verify_integrity")

#: Fields written even at their defaults: what says which adapter type and base a file is for.
ALWAYS_SAVED = ("peft_type", "base_model_name_or_path")

#: Figures of ``measured`` shown on the model card but not saved in ``adapter_config.json``.
CARD_ONLY_FIGURES = ("module_errors", "omitted", "compression_ratio")

#: Largest ``layout`` a config may inflate to.
MAX_LAYOUT_BYTES = 64 << 20


def _default(item: dataclasses.Field) -> Any:
    if item.default_factory is not dataclasses.MISSING:
        return item.default_factory()
    return item.default if item.default is not dataclasses.MISSING else dataclasses.MISSING


def encode_layout(module_specs: dict, tied_modules: dict) -> str:
    """``module_specs`` and ``tied_modules`` as saved: compact JSON, deflated, base64 (a few bytes a module)."""
    text = json.dumps({"module_specs": module_specs, "tied_modules": tied_modules}, separators=(",", ":"), sort_keys=True)
    return base64.b64encode(zlib.compress(text.encode(), 9)).decode("ascii")


def decode_layout(value: Any, source: Optional[str] = None) -> tuple[dict, dict]:
    """``(module_specs, tied_modules)`` of a saved ``layout`` (:func:`encode_layout`), read strictly:
    at most :data:`MAX_LAYOUT_BYTES` inflated, strict JSON, exactly those two objects."""
    where, fix = (f"{source}: ", " " + _FILE_FIX) if source else ("SkillPackConfig: ", "")
    problem = None
    try:
        if not isinstance(value, str):
            raise ValueError("it is not a string")
        inflater = zlib.decompressobj()
        text = inflater.decompress(base64.b64decode(value, validate=True), MAX_LAYOUT_BYTES)
        if not inflater.eof or inflater.unconsumed_tail:
            raise ValueError(f"it does not inflate to a whole layout within {MAX_LAYOUT_BYTES >> 20} MiB")
        data = parse_json(text.decode("utf-8"))
    except (ValueError, binascii.Error, zlib.error, UnicodeDecodeError, RecursionError) as error:
        problem = str(error)
    else:
        if not (isinstance(data, dict) and set(data) == {"module_specs", "tied_modules"}):
            problem = "it does not hold exactly module_specs and tied_modules"
    if problem is not None:
        raise HfGraftError(f"{where}field 'layout' is not a SkillPack layout ({problem}).{fix}")
    return data["module_specs"], data["tied_modules"]

_HEX64 = re.compile(r"[0-9a-f]{64}")
_TASK_TYPES = tuple(task.value for task in TaskType)
_FILE_FIX = "The file is damaged or was edited by hand: download the pack again or re-save it from its source."




def _optional(check):
    return lambda value: value is None or check(value)


def _is_str_list(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and all(isinstance(item, str) for item in value)


def _is_str_map(value: Any) -> bool:
    return isinstance(value, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in value.items())


def _is_choice(*choices):
    return lambda value: isinstance(value, str) and value in choices


#: Figures of ``measured`` that the model card and the CLI read, with what each must be.
_MEASURED_RULES = {
    "delta_bf16_bytes": (lambda v: is_int(v) and v >= 0, "an integer >= 0"),
    "stored_bytes": (lambda v: is_int(v) and v >= 0, "an integer >= 0"),
    "compression_ratio": (lambda v: is_number(v) and v > 0, "a positive number"),
    "relative_error": (_optional(is_number), "a number or null"),
    "distill_loss": (_optional(lambda v: isinstance(v, list) and all(map(is_number, v))), "a list of numbers or null"),
    "omitted": (_is_str_list, "a list of module names"),
    "module_errors": (
        lambda v: isinstance(v, dict) and all(isinstance(k, str) and (x is None or is_number(x)) for k, x in v.items()),
        "an object of module names to numbers",
    ),
    "evaluation": (
        lambda v: isinstance(v, dict) and isinstance(v.get("metric"), str)
        and all(is_number(v.get(key)) for key in ("base", "tuned", "pack", "retention"))
        and (v.get("dataset") is None or isinstance(v.get("dataset"), str)),
        "an object with a metric name and numbers base, tuned, pack and retention",
    ),
}


#: Every field of a SkillPack config, with the check its value must pass and what it must be.
FIELD_RULES = {
    "peft_type": (lambda v: v == "SKILLPACK", "'SKILLPACK'"),
    "target_ratio": (_optional(lambda v: is_number(v) and v > 1), "a number greater than 1, or null"),
    "byte_budget": (_optional(lambda v: is_int(v) and v > 0), "a positive integer, or null"),
    "calibration_samples": (lambda v: is_int(v) and v >= 0, "an integer >= 0"),
    "distill_steps": (_optional(lambda v: is_int(v) and v >= 0), "an integer >= 0, or null"),
    "distill_learning_rate": (lambda v: is_number(v) and v > 0, "a positive number"),
    "objective": (_is_choice("output", "weight"), "'output' or 'weight'"),
    "formats": (_is_choice("all", "lowrank"), "'all' or 'lowrank'"),
    "candidate_search": (_is_choice("predicted", "exhaustive"), "'predicted' or 'exhaustive'"),
    "compensation": (lambda v: isinstance(v, bool), "true or false"),
    "general_text": (lambda v: isinstance(v, bool), "true or false"),
    "inference_mode": (lambda v: isinstance(v, bool), "true or false"),
    "check_base_fingerprint": (lambda v: isinstance(v, bool), "true or false"),
    "verify_integrity": (lambda v: isinstance(v, bool), "true or false"),
    "sparse_modules": (_is_str_list, "a list of module name suffixes"),
    "target_modules": (_optional(lambda v: isinstance(v, str) or _is_str_list(v)), "null (module_specs names the modules)"),
    "base_fingerprint": (_optional(lambda v: isinstance(v, str) and _HEX64.fullmatch(v) is not None), "64 hex digits, or null"),
    "tensor_digest": (
        _optional(lambda v: isinstance(v, str) and v.startswith(DIGEST_PREFIX) and _HEX64.fullmatch(v[len(DIGEST_PREFIX):]) is not None),
        f"'{DIGEST_PREFIX}' and 64 hex digits, or null",
    ),
    "base_model_name_or_path": (_optional(lambda v: isinstance(v, str)), "a string or null"),
    "revision": (_optional(lambda v: isinstance(v, str)), "a string or null"),
    "peft_version": (_optional(lambda v: isinstance(v, str)), "a string or null"),
    "task_type": (_optional(_is_choice(*_TASK_TYPES)), f"one of {', '.join(_TASK_TYPES)}, or null"),
    "auto_mapping": (_optional(_is_str_map), "an object of strings, or null"),
    "measured": (lambda v: isinstance(v, dict), "an object of extraction figures"),
    "layout": (lambda v: isinstance(v, str), "the deflated, base64-encoded module layout"),
    "module_specs": (lambda v: isinstance(v, dict), "an object of module names to stored-delta metadata"),
    "tied_modules": (_is_str_map, "an object of module names to the packed modules they are tied to"),
}


def check_fields(data: dict, source: Optional[str] = None) -> None:
    """Check every SkillPack config field in ``data`` (as read from ``source``, a file, when given).

    The one place a SkillPack config's values are checked: types, ranges, choices, and the
    ``module_specs`` / ``tied_modules`` structure. Raises :class:`~hf_graft.errors.HfGraftError`
    naming the first bad field and what it must be.
    """
    where, fix = (f"{source}: ", " " + _FILE_FIX) if source else ("SkillPackConfig: ", "")
    for name, (check, want) in FIELD_RULES.items():
        if name in data and not check(data[name]):
            raise HfGraftError(f"{where}field {name!r} must be {want}, got {short_repr(data[name])}.{fix}")
    for key, (check, want) in _MEASURED_RULES.items():
        value = data.get("measured", {}).get(key)
        if key in data.get("measured", {}) and not check(value):
            raise HfGraftError(f"{where}field 'measured', figure {key!r} must be {want}, got {short_repr(value)}.{fix}")
    specs = data.get("module_specs", {})
    for module, parts in specs.items():
        if not (isinstance(parts, dict) and parts and set(parts) <= {"weight", "bias"}):
            raise HfGraftError(f"{where}module_specs[{short_repr(module)}] must map 'weight' and/or 'bias' to metadata.{fix}")
        for part, meta in parts.items():
            try:
                check_meta(meta, f"{module}.{part}")
            except HfGraftError as error:
                raise HfGraftError(f"{where}{error}{fix}") from None
    for head, source_module in data.get("tied_modules", {}).items():
        if source_module not in specs:
            raise HfGraftError(
                f"{where}tied_modules[{short_repr(head)}] names {short_repr(source_module)}, which module_specs does not hold.{fix}"
            )
