"""Data that ships with hf-graft, so models can be trained and evaluated with no download.

- :func:`pydoc_corpus`: general English and code text (CPython's pydoc topics), split into train
  and held-out parts;
- :func:`addition`, :func:`modular_addition`: arithmetic skills as ``(prompt, answer)`` pairs with
  a fixed answer format and disjoint train / test splits;
- :func:`corpus_tokenizer`: a byte-level BPE tokenizer trained on the corpus.
"""

from .corpus import TextSplit, pydoc_corpus, pydoc_text
from .tasks import Example, Task, addition, copying, modular_addition, reversal
from .tokenizer import BOUNDARY_TOKEN, PAD_TOKEN, corpus_tokenizer, train_tokenizer

__all__ = [
    "BOUNDARY_TOKEN",
    "Example",
    "PAD_TOKEN",
    "Task",
    "TextSplit",
    "addition",
    "copying",
    "corpus_tokenizer",
    "modular_addition",
    "pydoc_corpus",
    "pydoc_text",
    "reversal",
    "train_tokenizer",
]
