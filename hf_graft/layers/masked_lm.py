"""An offline masked LM for MLM predictability: a small BERT trained on text at hand, cached on disk.

The layer-grafting paper scores the fluency of generated text with ``bert-base-uncased``. Where the
Hub is out of reach, :func:`corpus_masked_lm` builds the same kind of scorer from local text: an
uncased WordPiece vocabulary trained with ``tokenizers`` (written as ``vocab.txt`` and loaded with
``BertTokenizerFast.from_pretrained(folder)``) and a ``BertForMaskedLM`` pretrained with
whole-word masking, the masking the ``mlm_predictability`` metric probes (it masks every
sub-token of a word at once). The folder it writes loads back with ``AutoModelForMaskedLM`` and
``AutoTokenizer``, so it can be passed to the metric by path like a Hub id.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from types import SimpleNamespace

import torch
from tokenizers.implementations import BertWordPieceTokenizer
from transformers import BertConfig, BertForMaskedLM, BertTokenizerFast

from ..causal_lm import Schedule, train_steps
from ..errors import HfGraftError

__all__ = ["corpus_masked_lm"]

_SETTINGS = "masked_lm_settings.json"


def _word_piece_tokenizer(text: str, folder: str, vocab_size: int) -> BertTokenizerFast:
    """An uncased WordPiece tokenizer trained on ``text``'s paragraphs, saved in ``folder``."""
    trainer = BertWordPieceTokenizer(lowercase=True)
    trainer.train_from_iterator(text.split("\n\n"), vocab_size=vocab_size, min_frequency=2, show_progress=False)
    trainer.save_model(folder)
    # The constructor with vocab_file= maps every token to [UNK] in transformers 5; from_pretrained does not.
    tokenizer = BertTokenizerFast.from_pretrained(folder, model_max_length=512)
    tokenizer.save_pretrained(folder)
    return tokenizer


def _masked_batches(token_ids, starts_word, tokenizer, batch_size, seq_len, mask_fraction):
    """``next_batches`` for the training loop: windows with whole words masked (80% [MASK], 10% random, 10% kept)."""
    inner = seq_len - 2

    def batches(generator: torch.Generator) -> list[dict]:
        offsets = torch.randint(0, token_ids.numel() - inner, (batch_size,), generator=generator).tolist()
        windows = torch.stack([token_ids[o : o + inner] for o in offsets])
        word_index = starts_word[windows].long().cumsum(dim=1)  # word number of every token in its window
        chosen = torch.rand(batch_size, inner + 1, generator=generator) < mask_fraction
        masked = chosen.gather(1, word_index)
        labels = torch.where(masked, windows, torch.full_like(windows, -100))
        draw = torch.rand(windows.shape, generator=generator)
        random_ids = torch.randint(len(tokenizer.all_special_ids), len(tokenizer), windows.shape, generator=generator)
        inputs = torch.where(masked & (draw < 0.8), torch.full_like(windows, tokenizer.mask_token_id), windows)
        inputs = torch.where(masked & (draw >= 0.8) & (draw < 0.9), random_ids, inputs)
        cls = torch.full((batch_size, 1), tokenizer.cls_token_id)
        sep = torch.full((batch_size, 1), tokenizer.sep_token_id)
        ignore = torch.full((batch_size, 1), -100)
        return [
            {
                "input_ids": torch.cat([cls, inputs, sep], dim=1),
                "attention_mask": torch.ones(batch_size, seq_len, dtype=torch.long),
                "labels": torch.cat([ignore, labels, ignore], dim=1),
            }
        ]

    return batches


class _MaskedPositionsLoss(torch.nn.Module):
    """``BertForMaskedLM``'s loss computed on the masked positions only: the vocabulary head runs on
    about 15% of the tokens instead of all of them, the bulk of a small model's training cost."""

    def __init__(self, model: BertForMaskedLM):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, labels):
        hidden = self.model.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        where = labels != -100
        logits = self.model.cls(hidden[where])
        return SimpleNamespace(loss=torch.nn.functional.cross_entropy(logits, labels[where]))


def corpus_masked_lm(
    text: str,
    folder: str,
    *,
    vocab_size: int = 4000,
    hidden_size: int = 128,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 4,
    max_position_embeddings: int = 128,
    seq_len: int = 64,
    schedule: Schedule | None = None,
    mask_fraction: float = 0.15,
    progress: bool = True,
) -> tuple[BertForMaskedLM, BertTokenizerFast]:
    """A ``BertForMaskedLM`` and its tokenizer trained on ``text``, cached in ``folder``.

    When ``folder`` holds a masked LM trained with the same settings it is loaded, otherwise one
    is trained (whole-word masking of ``mask_fraction`` of the words, windows of ``seq_len``
    tokens) and written there atomically. ``schedule`` defaults to
    800 steps of 32 windows at a peak learning rate of 1e-3.
    """
    schedule = schedule or Schedule(steps=800, batch_size=32, learning_rate=1e-3, warmup_steps=50, weight_decay=0.01)
    settings = {
        "vocab_size": vocab_size,
        "hidden_size": hidden_size,
        "num_hidden_layers": num_hidden_layers,
        "num_attention_heads": num_attention_heads,
        "max_position_embeddings": max_position_embeddings,
        "seq_len": seq_len,
        "schedule": repr(schedule),
        "mask_fraction": mask_fraction,
        "text_chars": len(text),
        "text_hash": hashlib.blake2b(text.encode(), digest_size=8).hexdigest(),
    }
    marker = os.path.join(folder, _SETTINGS)
    if os.path.isfile(marker):
        with open(marker) as handle:
            if json.load(handle) == settings:
                return BertForMaskedLM.from_pretrained(folder).eval(), BertTokenizerFast.from_pretrained(folder)
    if not 3 <= seq_len <= max_position_embeddings:
        raise HfGraftError(f"seq_len must lie between 3 and max_position_embeddings={max_position_embeddings}, got {seq_len!r}.")
    if not 0 < mask_fraction < 1:
        raise HfGraftError(f"mask_fraction must lie strictly between 0 and 1, got {mask_fraction!r}.")
    parent = os.path.dirname(os.path.abspath(folder))
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".masked_lm-", dir=parent)
    try:
        tokenizer = _word_piece_tokenizer(text, staging, vocab_size)
        token_ids = torch.tensor(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"], dtype=torch.long)
        if token_ids.numel() <= seq_len:
            raise HfGraftError(f"The text holds {token_ids.numel()} tokens, fewer than one window of {seq_len}.")
        vocabulary = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
        starts_word = torch.tensor([not token.startswith("##") for token in vocabulary])
        config = BertConfig(
            vocab_size=len(tokenizer),
            hidden_size=hidden_size,
            num_hidden_layers=num_hidden_layers,
            num_attention_heads=num_attention_heads,
            intermediate_size=4 * hidden_size,
            max_position_embeddings=max_position_embeddings,
            pad_token_id=tokenizer.pad_token_id,
        )
        torch.manual_seed(schedule.seed)
        model = BertForMaskedLM(config)
        batches = _masked_batches(
            token_ids, starts_word, tokenizer, schedule.batch_size, seq_len, mask_fraction
        )
        train_steps(_MaskedPositionsLoss(model), schedule, batches, "Pretraining the masked LM", progress)
        model.save_pretrained(staging)
        with open(os.path.join(staging, _SETTINGS), "w") as handle:
            json.dump(settings, handle, indent=2)
        if os.path.isdir(folder):
            shutil.rmtree(folder)
        os.replace(staging, folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return model.eval(), BertTokenizerFast.from_pretrained(folder)
