"""The embedded general-text corpus: CPython's ``pydoc_data.topics`` (~465 KB of English and code).

It ships with every CPython, so a language model can be pretrained and evaluated with no download.
The text is the same on every run of one Python version (topics are sorted by name); other Python
versions ship slightly different documentation.
"""

from dataclasses import dataclass

from ..errors import HfGraftError

__all__ = ["TextSplit", "pydoc_corpus", "pydoc_text"]


@dataclass(frozen=True)
class TextSplit:
    """A corpus cut into a training text and a held-out text that share no paragraph."""

    train: str
    held_out: str


def pydoc_text() -> str:
    """Every pydoc topic, sorted by topic name, separated by blank lines."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[name].strip() for name in sorted(topics))


def pydoc_corpus(held_out_every: int = 10, chunk_chars: int = 4000) -> TextSplit:
    """The pydoc text split deterministically into train and held-out parts.

    Paragraphs (separated by blank lines) are grouped in order into chunks of at least
    ``chunk_chars`` characters; every ``held_out_every``-th chunk is held out, so the held-out
    text (about ``1 / held_out_every`` of the whole) samples every region of the documentation.
    Paragraphs the documentation repeats (boilerplate shared by several topics) are dropped from
    the held-out text when the training text has them, so the two share no paragraph.
    """
    if not (isinstance(held_out_every, int) and held_out_every >= 2):
        raise HfGraftError(f"held_out_every must be an integer >= 2, got {held_out_every!r}.")
    if not (isinstance(chunk_chars, int) and chunk_chars >= 1):
        raise HfGraftError(f"chunk_chars must be a positive integer, got {chunk_chars!r}.")
    chunks, current = [], []
    for paragraph in pydoc_text().split("\n\n"):
        current.append(paragraph)
        if sum(len(p) for p in current) >= chunk_chars:
            chunks.append("\n\n".join(current))
            current = []
    if current:
        chunks.append("\n\n".join(current))
    train = [chunk for index, chunk in enumerate(chunks) if index % held_out_every != held_out_every - 1]
    seen = {paragraph for chunk in train for paragraph in chunk.split("\n\n")}
    held_out = [
        "\n\n".join(paragraph for paragraph in chunk.split("\n\n") if paragraph not in seen)
        for index, chunk in enumerate(chunks)
        if index % held_out_every == held_out_every - 1
    ]
    return TextSplit(train="\n\n".join(train), held_out="\n\n".join(held_out))
