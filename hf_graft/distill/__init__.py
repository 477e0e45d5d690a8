"""Distil a capability from a teacher (source) model into a student (target) model.

GraftLLM's first stage (arXiv 2505.18502): the teacher answers a prompt set; the student is
fine-tuned on those answers (SFT with trl), then trained with DPO against its own remaining
mistakes (the teacher's answer chosen, the student's rejected). Answers pass as text, so the two
models may have different tokenizers. When they share one, :func:`distill_logits` matches the
teacher's whole next-token distributions instead, in an ``accelerate`` loop that checkpoints and
resumes. The tuned student minus its base becomes a SkillPack (:mod:`hf_graft.skillpack`);
:mod:`hf_graft.recipes` runs the whole job from one YAML file.
"""

from .logits import LogitResult, LogitSettings, check_shared_vocabulary, distill_logits, token_kl
from .preference import DpoSettings, SftSettings, StageResult, dpo, sft
from .teacher import check_prompts, model_answers, preference_pairs

__all__ = [
    "DpoSettings",
    "LogitResult",
    "LogitSettings",
    "SftSettings",
    "StageResult",
    "check_prompts",
    "check_shared_vocabulary",
    "distill_logits",
    "dpo",
    "model_answers",
    "preference_pairs",
    "sft",
    "token_kl",
]
