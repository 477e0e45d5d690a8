"""Layer grafting with translators (Zimmermann & Boussard): specialise a block, graft it, translate.

- :func:`specialise_block`: LoRA on one block of a donor, trained on a task, merged back;
- ``hf_graft.GraftedModelForCausalLM.from_models``: the donor's block inserted in a host between
  identity-initialised translators;
- :func:`fit_translators` (least squares) and :func:`train_translators` (the paper's two stages,
  residual or logits losses) on :func:`translator_batches` (task, corpus or mixed data);
- ``grafted.swap_block(tuned)``: the paper's "original" strategy (translators trained around the
  vanilla block, then the specialised block swapped in); grafting the specialised block from the
  start is the "direct" strategy;
- gated grafts (``gate=True``): :func:`train_gate` teaches the gate to open on the task and close
  on general text, :func:`train_gates` routes between several gated grafts (each opens on its own
  task), :func:`gate_openness` reports how far a gate opens and :func:`record_openness` keeps that
  in the config, for the model card.
"""

from ..models.modeling_grafted_causal_lm import GraftedBlock, Translator, decoder_layers
from . import evaluation
from .evaluation import language_scores, task_scores
from .gating import gate_openness, record_openness, train_gate, train_gates
from .specialise import block_linear_names, specialise_block
from .translators import LOSSES, fit_translators, train_translators, translator_batches

__all__ = [
    "GraftedBlock",
    "LOSSES",
    "Translator",
    "block_linear_names",
    "decoder_layers",
    "evaluation",
    "fit_translators",
    "gate_openness",
    "record_openness",
    "language_scores",
    "specialise_block",
    "task_scores",
    "train_gate",
    "train_gates",
    "train_translators",
    "translator_batches",
]
