"""SkillPack files on disk or on the Hub, read with every field, header, shape and dtype checked.

A SkillPack folder is a PEFT adapter folder: ``adapter_config.json`` (a :class:`SkillPackConfig`)
and ``adapter_model.safetensors`` (the stored tensors of every module and part, end to end in one
payload; :mod:`.integrity`).
:func:`read_skillpack` validates both before anything is decoded: a truncated or corrupt file, a
header with wrong dtypes or shapes, a missing or unexpected tensor, malformed metadata, tensors
whose bytes differ from the digest recorded when the pack was saved, each raises one
:class:`~hf_graft.errors.HfGraftError`. Only JSON and safetensors are read; a
pickled ``adapter_model.bin`` is refused, never opened. :func:`load_skillpack` applies a pack read
this way to a base model (or adds it to a ``PeftModel`` that already holds other packs).
"""

from __future__ import annotations

import copy
import functools
import math
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any, Optional

import torch
from huggingface_hub import HfApi, ModelCard
from peft import MODEL_TYPE_TO_PEFT_MODEL_MAPPING, PeftModel
from torch import nn

from ..errors import HfGraftError
from ..hub import SKILLPACK_TAGS, write_skillpack_card
from .compression.formats import CompressedDelta, stored_layout
from .config import LOADING_OPTIONS, SkillPackConfig
from .config_file import read_config_data
from .integrity import CONFIG_NAME, WEIGHTS_NAME, check_weights_file, locate, pack_digest, payload_header, stored_tensors, tensor_key, write_payload
from .peft_type import SKILLPACK

__all__ = [
    "CONFIG_NAME",
    "WEIGHTS_NAME",
    "SkillPackCardMixin",
    "SkillPackFile",
    "StoredTensors",
    "attach",
    "load_skillpack",
    "pack_of",
    "read_skillpack",
    "record_evaluation",
    "resolve_files",
    "saved_config_text",
    "tensor_key",
]

#: The metadata peft writes into ``adapter_model.safetensors``.
WEIGHTS_METADATA = {"format": "pt"}


def saved_config_text(config: SkillPackConfig, model_class: Optional[type] = None) -> str:
    """``adapter_config.json`` exactly as ``PeftModel.save_pretrained`` writes it for a base of ``model_class``."""
    probe = copy.deepcopy(config)
    probe.inference_mode = True
    auto_mapping = None
    if probe.task_type is None and model_class is not None:  # peft records the base class of custom models
        auto_mapping = {"base_model_class": model_class.__name__, "parent_library": model_class.__module__}
    return probe.to_json_text(auto_mapping)


class StoredTensors(Mapping):
    """The tensors a pack's weights file stores, by key: each payload is made when it is read, so
    hashing or writing a pack holds one payload at a time beside the pack itself."""

    def __init__(self, deltas: Mapping[str, Mapping[str, CompressedDelta]]):
        self._sources = {
            tensor_key(module, name): (delta, part, name, value)
            for module, parts in deltas.items()
            for part, delta in parts.items()
            for name, value in stored_layout(part, delta.meta).items()
        }

    def __getitem__(self, key: str) -> torch.Tensor:
        delta, part, name, _ = self._sources[key]
        return delta.to_tensors(part)[name]

    def __iter__(self):
        return iter(self._sources)

    def __len__(self) -> int:
        return len(self._sources)

    def layout(self) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
        """``(key, dtype, shape)`` of every stored tensor, in the payload's order (by key)."""
        return sorted((key, dtype, tuple(shape)) for key, (*_, (shape, dtype)) in self._sources.items())

    def sizes(self) -> dict[str, int]:
        """Bytes of every stored tensor, by key."""
        return {key: math.prod(shape) * dtype.itemsize for key, dtype, shape in self.layout()}

    def file_bytes(self, metadata: Mapping[str, str]) -> int:
        """Bytes of the weights file of these tensors and ``metadata``: one payload (:data:`~.integrity.PAYLOAD_KEY`)."""
        size = sum(self.sizes().values())
        return len(payload_header(size, metadata)) + size

    def save(self, path: str | os.PathLike, metadata: Mapping[str, str]) -> None:
        """Write them to ``path`` (atomically) as one payload, end to end in key order, made one at a time."""
        write_payload(path, self.sizes(), self.__getitem__, metadata)


@dataclass(frozen=True)
class SkillPackFile:
    """A validated SkillPack: its config and, per module and part, the stored delta."""

    config: SkillPackConfig
    deltas: dict[str, dict[str, CompressedDelta]]

    @property
    def nbytes(self) -> int:
        """Bytes of the stored tensors."""
        return sum(delta.nbytes for parts in self.deltas.values() for delta in parts.values())

    def tensors(self) -> StoredTensors:
        """The stored tensors under their keys in ``adapter_model.safetensors``, each made when read."""
        return StoredTensors(self.deltas)

    @property
    def digest(self) -> str:
        """The pack's ``tensor_digest``: SHA-256 over its stored tensors and the metadata that decodes them."""
        return pack_digest(self.config.module_specs, self.config.tied_modules, self.tensors())

    def save_pretrained(self, save_directory: str | os.PathLike, *, model_class: Optional[type] = None) -> None:
        """Write the pack's two files and its model card to ``save_directory``, each atomically.

        The files are those ``PeftModel.save_pretrained`` writes for the pack on a base of
        ``model_class`` (the loaded model's class), byte for byte, so ``PeftModel.from_pretrained``
        reads them; no base model is needed.
        """
        from ..safetensors_io import atomic_write_text

        save_directory = os.fspath(save_directory)
        if os.path.isfile(save_directory):
            raise HfGraftError(f"{save_directory} is a file; give a folder to save the SkillPack in.")
        os.makedirs(save_directory, exist_ok=True)
        tensors = self.tensors()
        self.config.tensor_digest = pack_digest(self.config.module_specs, self.config.tied_modules, tensors)
        tensors.save(os.path.join(save_directory, WEIGHTS_NAME), metadata=WEIGHTS_METADATA)
        atomic_write_text(os.path.join(save_directory, CONFIG_NAME), saved_config_text(self.config, model_class))
        write_skillpack_card(self.card_data(), save_directory)

    def figures(self) -> dict[str, Any]:
        """Bytes and ratio of the pack: as extraction measured them (the saved files, headers included)
        when recorded, else from its stored tensors; its error, distillation losses and digest."""
        measured = self.config.measured
        bf16_bytes = measured.get("delta_bf16_bytes") or sum(
            2 * math.prod(delta.shape) for parts in self.deltas.values() for delta in parts.values()
        )
        stored = measured.get("stored_bytes") or self.nbytes
        return {
            "stored_bytes": stored,
            "delta_bf16_bytes": bf16_bytes,
            "compression_ratio": measured.get("compression_ratio") or bf16_bytes / max(1, stored),
            "relative_error": measured.get("relative_error"),
            "distill_loss": measured.get("distill_loss"),
            "digest": self.digest,
        }

    def card_data(self) -> dict[str, Any]:
        """What the pack's model card shows (:func:`hf_graft.hub.write_skillpack_card`)."""
        config = self.config
        return {
            "base_model": config.base_model_name_or_path,
            "figures": self.figures(),
            "rows": self.summary(),
            "evaluation": config.measured.get("evaluation"),
            "calibration_samples": config.calibration_samples,
            "distill_steps": config.distill_steps,
            "tied_modules": config.tied_modules,
            "omitted": config.measured.get("omitted"),
            "general_perplexity": config.measured.get("general_perplexity"),
        }

    def summary(self) -> list[dict[str, Any]]:
        """One row per stored delta: module, part, kind, shape, rank, bit scheme, kept entries, bytes, error."""
        errors = self.config.measured.get("module_errors", {})
        rows = []
        for module, parts in self.deltas.items():
            for part, delta in parts.items():
                meta = delta.meta
                rows.append(
                    {
                        "module": module,
                        "part": part,
                        "kind": delta.kind,
                        "shape": "x".join(map(str, delta.shape)),
                        "rank": meta.get("rank"),
                        "bits": _bits(meta),
                        "kept": meta.get("count"),
                        "bytes": delta.nbytes,
                        "relative_error": errors.get(f"{module}.{part}"),
                    }
                )
        return rows


def _bits(meta: dict) -> Optional[str]:
    """The bit widths of a stored delta: ``2`` for a 2-bit quantized one, ``8x2/3x30`` for factors,
    ``1 + 8x2/4x4`` for signs with a low-rank correction."""
    scheme = "/".join(f"{bits}x{cols}" for bits, cols in meta["scheme"]) if "scheme" in meta else None
    if meta["kind"] == "quant":
        return f"{meta['bits']}" + (f" + {scheme}" if scheme else "")
    return scheme


def resolve_files(path_or_repo: str | os.PathLike, revision: Optional[str] = None, token=None) -> tuple[str, str]:
    """Local paths of the config and weights of a SkillPack folder or Hub repo (downloaded to the cache)."""
    return tuple(locate(path_or_repo, name, revision=revision, token=token) for name in (CONFIG_NAME, WEIGHTS_NAME))


def read_config(path: str | os.PathLike) -> SkillPackConfig:
    """Parse and check ``adapter_config.json``: a SkillPack config whose every field is valid."""
    data = read_config_data(path)
    known = {field.name for field in fields(SkillPackConfig)} - set(LOADING_OPTIONS)
    return SkillPackConfig(**{name: value for name, value in data.items() if name in known})


def read_skillpack(
    path_or_repo: str | os.PathLike,
    *,
    revision: Optional[str] = None,
    token: Optional[str] = None,
    verify_integrity: bool = True,
    check_codes: bool = True,
) -> SkillPackFile:
    """Read and validate a SkillPack from a folder or a Hub repo; nothing is applied to any model.

    Raises :class:`~hf_graft.errors.HfGraftError` for a missing or corrupt file, a config that is
    not a SkillPack's or is malformed, tensors that are missing, unexpected, or of the wrong
    shape or dtype for the metadata, and (unless ``verify_integrity=False``) tensors whose bytes
    do not match the pack's recorded ``tensor_digest``. ``check_codes`` decodes every delta once,
    so codes, indices or bitmaps that contradict the metadata are refused here rather than on
    first use (a caller that decodes every delta next anyway may skip it).
    """
    config_path, weights_path = resolve_files(path_or_repo, revision, token)
    config = read_config(config_path)
    if not config.module_specs:
        raise HfGraftError(f"{config_path} describes no stored deltas (module_specs is empty).")
    check_weights_file(weights_path, config.module_specs, config.tied_modules, config.tensor_digest, verify=verify_integrity)
    tensors = stored_tensors(weights_path, config.module_specs)
    deltas: dict[str, dict[str, CompressedDelta]] = {}
    for module, parts in config.module_specs.items():
        for part, meta in parts.items():
            stored = {name: tensors[tensor_key(module, name)] for name in stored_layout(part, meta)}
            delta = CompressedDelta.from_tensors(part, stored, meta)
            if check_codes:
                delta.delta()  # decode once: codes, indices and bitmaps are checked against the metadata
            deltas.setdefault(module, {})[part] = delta
    return SkillPackFile(config, deltas)


def pack_of(model: PeftModel, adapter_name: str = "default") -> SkillPackFile:
    """The SkillPack ``adapter_name`` of a ``PeftModel``, as stored (what ``save_pretrained`` writes)."""
    config = model.peft_config.get(adapter_name)
    if config is None or config.peft_type != SKILLPACK:
        raise HfGraftError(f"The model holds no SkillPack named {adapter_name!r}.")
    modules = dict(model.base_model.model.named_modules())
    deltas = {
        name: {part: modules[name].compressed(adapter_name, part) for part in parts}
        for name, parts in config.module_specs.items()
    }
    return SkillPackFile(config, deltas)


class SkillPackCardMixin:
    """``PeftModel`` behaviour for SkillPacks: ``save_pretrained`` and ``push_to_hub`` write hf-graft's card.

    peft then adds its own fields (library, tags, framework versions) to the card, as for any adapter.
    """

    def create_or_update_model_card(self, output_dir: str) -> None:
        packs = [name for name, config in self.peft_config.items() if config.peft_type == SKILLPACK]
        if not packs:
            return super().create_or_update_model_card(output_dir)
        pack = pack_of(self, packs[0])
        path = write_skillpack_card(pack.card_data(), output_dir, repo_id=getattr(self, "_card_repo_id", None))
        super().create_or_update_model_card(output_dir)
        card = ModelCard.load(path)  # peft replaced the tags and base model with its own guesses
        card.data.tags = sorted(set(card.data.tags or []) | set(SKILLPACK_TAGS))
        if pack.config.base_model_name_or_path:
            card.data.base_model = pack.config.base_model_name_or_path
        card.save(path)

    def push_to_hub(
        self,
        repo_id: str,
        *,
        commit_message: Optional[str] = None,
        private: Optional[bool] = None,
        token: Optional[str] = None,
        revision: Optional[str] = None,
        create_pr: bool = False,
    ):
        """Create ``repo_id`` if needed and upload what ``save_pretrained`` writes (card included), in one commit."""
        api = HfApi(token=token)
        repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
        with tempfile.TemporaryDirectory() as folder:
            self._card_repo_id = repo_id
            try:
                self.save_pretrained(folder)
            finally:
                del self._card_repo_id
            return api.upload_folder(
                repo_id=repo_id,
                folder_path=folder,
                commit_message=commit_message or "Upload SkillPack",
                revision=revision,
                create_pr=create_pr,
            )


@functools.cache
def _with_card(cls: type) -> type:
    return type(cls.__name__, (SkillPackCardMixin, cls), {"__module__": cls.__module__, "__doc__": cls.__doc__})


def attach(model: nn.Module, pack: SkillPackFile, adapter_name: str = "default") -> PeftModel:
    """Put ``pack`` on ``model`` under ``adapter_name``: a new ``PeftModel``, or one more adapter on one."""
    if isinstance(model, PeftModel):
        if adapter_name in model.peft_config:
            raise HfGraftError(f"The model already holds an adapter named {adapter_name!r}; choose another name.")
        model.add_adapter(adapter_name, pack.config)
    else:
        cls = MODEL_TYPE_TO_PEFT_MODEL_MAPPING.get(pack.config.task_type, PeftModel)
        model = _with_card(cls)(model, pack.config, adapter_name=adapter_name)
    for name, module in model.base_model.model.named_modules():
        if name in pack.deltas:
            module.update_layer(adapter_name, pack.config.module_specs[name], pack.deltas[name])
    return model


def load_skillpack(
    model: nn.Module,
    path_or_repo: str | os.PathLike,
    *,
    adapter_name: str = "default",
    check_base_fingerprint: bool = True,
    verify_integrity: bool = True,
    revision: Optional[str] = None,
    token: Optional[str] = None,
) -> PeftModel:
    """Read a SkillPack with every check of :func:`read_skillpack` and apply it to ``model``, unmerged.

    ``model`` is a base model (a ``PeftModel`` is returned) or a ``PeftModel`` already holding
    SkillPacks (the pack is added as ``adapter_name``). The pack's base fingerprint must match
    unless ``check_base_fingerprint=False``; its weights must match its digest unless
    ``verify_integrity=False``.
    """
    pack = read_skillpack(path_or_repo, revision=revision, token=token, verify_integrity=verify_integrity)
    pack.config.check_base_fingerprint = check_base_fingerprint
    return attach(model, pack, adapter_name)



def record_evaluation(model: PeftModel, metric: str, base: float, tuned: float, pack: float, *,
                      dataset: Optional[str] = None, adapter_name: str = "default") -> float:
    """Store a skill score of the base, the tuned model and the pack in the pack's config; return the retention.

    Retention is ``(pack - base) / (tuned - base)``; the model card shows it.
    """
    if tuned == base:
        raise HfGraftError(f"The tuned model scores the same {metric} as the base ({tuned}): there is no skill to retain.")
    retention = (pack - base) / (tuned - base)
    evaluation = {"metric": metric, "base": base, "tuned": tuned, "pack": pack, "retention": retention, "dataset": dataset}
    model.peft_config[adapter_name].measured["evaluation"] = evaluation
    return retention
