"""Several SkillPacks on one target, mixed per input by a router: ``theta = theta + sum_i R_i(x) dtheta_i``.

GraftLLM fuses SkillPacks through a router. Here the router is a small gate (one linear layer and
a softmax) on the target's own mean-pooled last hidden states, computed with every pack switched
off, so it sees the same features whatever packs are loaded. It is trained on a few prompts per
skill (a logistic regression on frozen features), mixes the packs softly or picks one (``top1``),
and keeps the features it was trained on, so adding a pack retrains it without the earlier prompts.
Packs stay exactly as they were loaded: adding one never touches another (forget-free).

The packs are PEFT adapters on one ``PeftModel`` (all active at once); each SkillPack layer scales
each pack's term by that pack's weight for each example.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from contextlib import contextmanager
from typing import Optional

import torch
import torch.nn.functional as F
from huggingface_hub import HfApi, snapshot_download
from peft import PeftModel
from torch import nn

from ..errors import HfGraftError
from ..hub import write_fusion_card
from ..safetensors_io import atomic_write_json, load_tensors, read_json, save_tensors
from .files import CONFIG_NAME, WEIGHTS_NAME, load_skillpack, read_skillpack, resolve_files
from .integrity import DIGEST_PREFIX, tensors_digest
from .layer import SkillPackLayer
from .model import base_fingerprint

__all__ = ["FusedSkillPacks", "ROUTER_MODES", "fuse"]

ROUTER_MODES = ("learned", "top1", "uniform")
FUSION_CONFIG = "fusion_config.json"
ROUTER_WEIGHTS = "router.safetensors"


class FusedSkillPacks(nn.Module):
    """A target model carrying several SkillPacks and the router that mixes them.

    ``skills`` names the packs (their adapter names) in router order. ``mode``: ``"learned"``
    (softmax weights), ``"top1"`` (the router's best pack only, weight 1) or ``"uniform"`` (every
    pack at weight 1, no router: plain task arithmetic of the packs).
    """

    def __init__(self, model: PeftModel, skills: Sequence[str], mode: str = "learned", sources: Optional[dict] = None):
        super().__init__()
        if mode not in ROUTER_MODES:
            raise HfGraftError(f"router must be one of {ROUTER_MODES}, got {mode!r}.")
        self.model, self.skills, self.mode = model, list(skills), mode
        self.sources = dict(sources or {})
        hidden = model.get_base_model().config.hidden_size
        self.router = nn.Linear(hidden, len(self.skills))
        nn.init.zeros_(self.router.weight)
        nn.init.zeros_(self.router.bias)
        #: pooled features and skill labels the router was trained on (kept so adding a pack retrains it)
        self.register_buffer("router_features", torch.zeros(0, hidden), persistent=False)
        self.register_buffer("router_labels", torch.zeros(0, dtype=torch.long), persistent=False)
        model.base_model.set_adapter(self.skills)

    # routing ---------------------------------------------------------------------------------

    @torch.no_grad()
    def pooled_features(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Mean of the target's last hidden states over the real tokens, every pack switched off."""
        attention_mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        with self.model.disable_adapter():
            hidden = self.model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True).hidden_states[-1]
        mask = attention_mask.to(hidden.dtype)[..., None]
        return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1)

    def routing_weights(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``[batch, skills]``: each pack's weight for each input."""
        if self.mode == "uniform":
            return torch.ones(len(input_ids), len(self.skills))
        with torch.no_grad():
            scores = self.router(self.pooled_features(input_ids, attention_mask).float())
        if self.mode == "top1":
            return F.one_hot(scores.argmax(-1), len(self.skills)).float()
        return scores.softmax(-1)

    @contextmanager
    def mixing(self, weights: torch.Tensor):
        """Scale each pack's term by ``weights[:, i]`` in every SkillPack layer, for the duration."""
        layers = [m for m in self.model.modules() if isinstance(m, SkillPackLayer)]
        for layer in layers:
            layer.skillpack_mixing = {skill: weights[:, i] for i, skill in enumerate(self.skills)}
        try:
            yield
        finally:
            for layer in layers:
                layer.skillpack_mixing = {}

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None, **kwargs):
        with self.mixing(self.routing_weights(input_ids, attention_mask)):
            return self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)

    def generate(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None, **kwargs):
        """Generate with the packs weighted by the router's reading of the prompt."""
        with self.mixing(self.routing_weights(input_ids, attention_mask)):
            return self.model.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)

    # router training -------------------------------------------------------------------------

    def _encode(self, tokenizer, prompts: Sequence[str]):
        encoded = tokenizer(list(prompts), return_tensors="pt", padding=True)
        return encoded["input_ids"], encoded["attention_mask"]

    def train_router(self, prompts: Mapping[str, Sequence[str]], tokenizer, *, steps: int = 300, learning_rate: float = 0.05) -> float:
        """Train the router on ``{skill: [prompt, ...]}``; returns its accuracy on those prompts.

        Every skill of the model needs prompts, unless the router already holds features for it
        (from an earlier training): new prompts are added to the kept ones.
        """
        unknown = sorted(set(prompts) - set(self.skills))
        if unknown:
            raise HfGraftError(f"Prompts for {unknown} but the model holds no such pack (it has {self.skills}).")
        if any(not list(texts) for texts in prompts.values()):
            raise HfGraftError("Every skill given to train_router needs at least one prompt.")
        features, labels = [self.router_features], [self.router_labels]
        for skill, texts in prompts.items():
            ids, mask = self._encode(tokenizer, texts)
            features.append(self.pooled_features(ids, mask).float())
            labels.append(torch.full((len(texts),), self.skills.index(skill), dtype=torch.long))
        features, labels = torch.cat(features), torch.cat(labels)
        missing = [skill for i, skill in enumerate(self.skills) if not (labels == i).any()]
        if missing:
            raise HfGraftError(
                f"The router would be trained on fewer skills than packs: no prompts for {missing}. "
                "Give a few prompts for every pack."
            )
        self.router_features, self.router_labels = features, labels
        mean, std = features.mean(0), features.std(0).clamp_min(1e-6)
        gate = nn.Linear(features.shape[1], len(self.skills))
        optimizer = torch.optim.Adam(gate.parameters(), lr=learning_rate)
        normalised = (features - mean) / std
        for _ in range(steps):
            loss = F.cross_entropy(gate(normalised), labels) + 1e-3 * gate.weight.square().sum()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        with torch.no_grad():  # fold the normalisation into the router
            self.router.weight.copy_(gate.weight / std)
            self.router.bias.copy_(gate.bias - (gate.weight / std) @ mean)
            return float((self.router(features).argmax(-1) == labels).float().mean())

    # growing the skill set -------------------------------------------------------------------

    def add_skillpack(self, path_or_repo, *, name: Optional[str] = None, prompts: Optional[Sequence[str]] = None,
                      tokenizer=None, **load_kwargs) -> None:
        """Add one more pack; the earlier packs and their files are untouched.

        With a learned or top-1 router, ``prompts`` (and ``tokenizer``) for the new skill retrain
        the router on them plus the features kept from its earlier training, so the earlier
        skills' prompts are not needed again.
        """
        name = name or _skill_name(path_or_repo, self.skills)
        if name in self.skills:
            raise HfGraftError(f"The model already holds a pack named {name!r}.")
        if self.mode != "uniform" and (not prompts or tokenizer is None):
            raise HfGraftError(f"A {self.mode} router needs prompts= and tokenizer= for the new skill {name!r}.")
        load_skillpack(self.model, path_or_repo, adapter_name=name, **load_kwargs)
        self.skills.append(name)
        self.sources[name] = os.fspath(path_or_repo)
        old = self.router
        self.router = nn.Linear(old.in_features, len(self.skills))
        with torch.no_grad():
            self.router.weight.zero_()
            self.router.bias.fill_(-1e4)  # the new pack is never picked until the router is retrained
            self.router.weight[:-1].copy_(old.weight)
            self.router.bias[:-1].copy_(old.bias)
        self.model.base_model.set_adapter(self.skills)
        if self.mode != "uniform":
            self.train_router({name: prompts}, tokenizer)

    # saving ------------------------------------------------------------------------------------

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """One folder: each pack's files as loaded (byte for byte), the router and ``fusion_config.json``."""
        os.makedirs(directory, exist_ok=True)
        for skill in self.skills:
            target = os.path.join(directory, skill)
            os.makedirs(target, exist_ok=True)
            for source, name in zip(resolve_files(self.sources[skill]), (CONFIG_NAME, WEIGHTS_NAME)):
                if os.path.abspath(source) != os.path.abspath(os.path.join(target, name)):
                    shutil.copyfile(source, os.path.join(target, name))
        router = {"weight": self.router.weight.detach().contiguous(), "bias": self.router.bias.detach().contiguous(),
                  "features": self.router_features.contiguous(), "labels": self.router_labels.contiguous()}
        save_tensors(router, os.path.join(directory, ROUTER_WEIGHTS))
        config = {"skills": self.skills, "router": self.mode, "router_digest": tensors_digest(router)}
        atomic_write_json(os.path.join(directory, FUSION_CONFIG), config)
        self._write_card(directory)

    def _write_card(self, directory: str, repo_id: Optional[str] = None) -> str:
        rows, base_model = [], None
        for skill in self.skills:
            pack = read_skillpack(os.path.join(directory, skill))
            figures = pack.figures()
            rows.append({"skill": skill, "bytes": figures["stored_bytes"], "ratio": figures["compression_ratio"]})
            base_model = base_model or pack.config.base_model_name_or_path
        return write_fusion_card(directory, skills=self.skills, mode=self.mode, rows=rows, base_model=base_model, repo_id=repo_id)

    @classmethod
    def from_pretrained(cls, base_model: nn.Module, path_or_repo: str | os.PathLike, **load_kwargs) -> "FusedSkillPacks":
        """Load a folder (or Hub repo) written by :meth:`save_pretrained` onto ``base_model``."""
        folder = os.fspath(path_or_repo)
        if not os.path.isdir(folder):
            folder = snapshot_download(folder)
        config = read_fusion_config(os.path.join(folder, FUSION_CONFIG))
        return fuse(base_model, {skill: os.path.join(folder, skill) for skill in config["skills"]},
                    router=config["router"], _router_file=os.path.join(folder, ROUTER_WEIGHTS),
                    _router_digest=config.get("router_digest"), **load_kwargs)

    def push_to_hub(self, repo_id: str, *, private: Optional[bool] = None, token: Optional[str] = None):
        """Push the packs, router and a card listing the packs to one Hub repo."""
        api = HfApi(token=token)
        repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
        with tempfile.TemporaryDirectory() as folder:
            self.save_pretrained(folder)
            self._write_card(folder, repo_id=repo_id)
            return api.upload_folder(repo_id=repo_id, folder_path=folder, commit_message="Upload fused SkillPacks")


def read_fusion_config(path: str) -> dict:
    """``fusion_config.json`` at ``path``, checked: unique skill names that are plain folder names, a
    router mode, and the router's digest. Raises :class:`~hf_graft.errors.HfGraftError` naming the file."""
    fix = "Load a folder FusedSkillPacks.save_pretrained wrote; if it was, download it again or re-save it."
    config = read_json(path, fix)
    if not isinstance(config, dict):
        raise HfGraftError(f"{path} must hold a JSON object. {fix}")
    skills, mode, digest = config.get("skills"), config.get("router"), config.get("router_digest")
    plain = lambda name: isinstance(name, str) and name not in ("", ".", "..") and not set(name) & set("/\\:")
    if not (isinstance(skills, list) and skills and all(map(plain, skills)) and len(set(skills)) == len(skills)):
        raise HfGraftError(f"{path}: field 'skills' must list the packs' folder names, each once, got {skills!r:.80}. {fix}")
    if not (isinstance(mode, str) and mode in ROUTER_MODES):
        raise HfGraftError(f"{path}: field 'router' must be one of {', '.join(ROUTER_MODES)}, got {mode!r:.60}. {fix}")
    if digest is not None and not (isinstance(digest, str) and digest.startswith(DIGEST_PREFIX)):
        raise HfGraftError(f"{path}: field 'router_digest' must be '{DIGEST_PREFIX}...', got {digest!r:.80}. {fix}")
    return config


def _skill_name(path_or_repo, taken: Sequence[str]) -> str:
    name = os.path.basename(os.fspath(path_or_repo).rstrip("/")) or "skill"
    name = name.replace(".", "_").replace("-", "_")
    return name if name not in taken else f"{name}_{len(taken)}"


def fuse(
    base_model: nn.Module,
    packs: Sequence | Mapping,
    *,
    router: str = "learned",
    prompts: Optional[Mapping[str, Sequence[str]]] = None,
    tokenizer=None,
    _router_file: Optional[str] = None,
    _router_digest: Optional[str] = None,
    **load_kwargs,
) -> FusedSkillPacks:
    """Load ``packs`` (folders or Hub ids; a mapping names them) onto ``base_model`` with a router.

    All packs must be for this base (their fingerprints are checked). With ``prompts``
    (``{skill: [prompt, ...]}``) and ``tokenizer`` the router is trained right away.
    """
    named = dict(packs) if isinstance(packs, Mapping) else {}
    if not named:
        for pack in packs:
            named[_skill_name(pack, list(named))] = pack
    if not named:
        raise HfGraftError("fuse needs at least one SkillPack.")
    if load_kwargs.get("check_base_fingerprint", True):
        strangers = []
        for name, path in named.items():
            config = read_skillpack(path, verify_integrity=load_kwargs.get("verify_integrity", True)).config
            if config.base_fingerprint and base_fingerprint(base_model, config.module_specs) != config.base_fingerprint:
                strangers.append(name)
        if strangers:
            raise HfGraftError(
                f"SkillPacks {strangers} were extracted from different base models than this one; "
                "fuse packs of one base (or pass check_base_fingerprint=False)."
            )
    model = base_model
    for name, path in named.items():
        model = load_skillpack(model, path, adapter_name=name, **load_kwargs)
    fused = FusedSkillPacks(model, list(named), router, sources={k: os.fspath(v) for k, v in named.items()})
    if _router_file is not None:
        tensors, _ = load_tensors(_router_file)
        if _router_digest is not None and load_kwargs.get("verify_integrity", True) and tensors_digest(tensors) != _router_digest:
            raise HfGraftError(
                f"{_router_file} is not the router these packs were saved with (its digest differs from "
                f"{FUSION_CONFIG}'s): the file was damaged; download it again, or pass verify_integrity=False."
            )
        hidden, count = fused.router.in_features, len(named)
        expected = {"weight": (count, hidden), "bias": (count,)}
        for key, shape in expected.items():
            if key not in tensors or tuple(tensors[key].shape) != shape:
                raise HfGraftError(f"{ROUTER_WEIGHTS} must hold {key} of shape {shape} for {count} packs.")
        with torch.no_grad():
            fused.router.weight.copy_(tensors["weight"])
            fused.router.bias.copy_(tensors["bias"])
        features, labels = tensors.get("features"), tensors.get("labels")
        if features is not None and labels is not None:
            if not (features.dim() == 2 and features.shape[1] == hidden and labels.shape == (len(features),)
                    and bool(((labels >= 0) & (labels < count)).all())):
                raise HfGraftError(f"{ROUTER_WEIGHTS} holds router training features that do not fit {count} packs.")
            fused.router_features, fused.router_labels = features.float(), labels.long()
    if prompts is not None:
        if tokenizer is None:
            raise HfGraftError("Training the router on prompts needs the target's tokenizer=.")
        fused.train_router(prompts, tokenizer)
    return fused
