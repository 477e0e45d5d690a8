"""An offline tokenizer: byte-level BPE trained on the embedded corpus, as a ``PreTrainedTokenizerFast``.

Every byte has a token (nothing is ever unknown) and digits are always split one per token, so
numbers are spelled digit by digit as arithmetic skills need. The tokenizer adds its
``<|endoftext|>`` token in front of every text it encodes (as Llama's adds ``<s>``); encode
continuations with ``add_special_tokens=False``. ``save_pretrained`` / ``from_pretrained`` and
``AutoTokenizer`` work as for any Hugging Face tokenizer.
"""

from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from ..errors import HfGraftError
from .corpus import pydoc_corpus

__all__ = ["BOUNDARY_TOKEN", "PAD_TOKEN", "corpus_tokenizer", "train_tokenizer"]

BOUNDARY_TOKEN = "<|endoftext|>"
"""Begins and ends every text (bos and eos)."""
PAD_TOKEN = "<|pad|>"


def train_tokenizer(texts: Iterable[str], vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE of ``vocab_size`` tokens (256 bytes, 2 special tokens, merges) on ``texts``."""
    byte_alphabet = pre_tokenizers.ByteLevel.alphabet()
    if not (isinstance(vocab_size, int) and vocab_size >= len(byte_alphabet) + 2):
        raise HfGraftError(f"vocab_size must be an integer >= {len(byte_alphabet) + 2} (bytes + 2 special tokens), got {vocab_size!r}.")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[BOUNDARY_TOKEN, PAD_TOKEN],
        initial_alphabet=byte_alphabet,
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    boundary = tokenizer.token_to_id(BOUNDARY_TOKEN)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOUNDARY_TOKEN} $A", pair=f"{BOUNDARY_TOKEN} $A $B", special_tokens=[(BOUNDARY_TOKEN, boundary)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=BOUNDARY_TOKEN,
        eos_token=BOUNDARY_TOKEN,
        pad_token=PAD_TOKEN,
        model_input_names=["input_ids", "attention_mask"],  # a causal LM's inputs: no token_type_ids
    )


def corpus_tokenizer(vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """:func:`train_tokenizer` on the training part of :func:`~hf_graft.data.pydoc_corpus` (about a second)."""
    return train_tokenizer(pydoc_corpus().train.split("\n\n"), vocab_size)
