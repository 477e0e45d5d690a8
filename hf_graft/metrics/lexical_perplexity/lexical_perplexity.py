"""Lexical perplexity of texts, from their own word frequencies, as an ``evaluate`` measurement.

The layer-grafting paper checks that a graft keeps the host's language intact with this
model-free measure: 2 to the entropy of a text's empirical word distribution. It rises with lexical
diversity (a text that repeats one word scores 1, a text of N distinct words scores N), so a
collapse into repetition shows as a drop. It looks at one text at a time and compares it with
nothing, so it is an ``evaluate.Measurement``, like the Hub's ``word_count``. The module imports
only evaluate, datasets and numpy, so it runs anywhere ``evaluate`` does.
"""

import math
import re
from collections import Counter

import datasets
import evaluate
import numpy as np


# Words: maximal runs of Unicode word characters (letters, digits, underscore) of the lowercased text.
_WORD = re.compile(r"\w+")

_DESCRIPTION = """
For a text of N words, each distinct word w has the empirical probability p(w) = count(w) / N; the
text's entropy is H = -sum_w p(w) log2 p(w) and its lexical perplexity 2^H. Words are the maximal
runs of word characters (regex \\w+: letters, digits, underscore) of the lowercased text, so case
and punctuation are ignored and "don't" is the two words "don" and "t". The score is the mean over
texts; texts without a word get NaN and are left out of the mean.
"""

_KWARGS_DESCRIPTION = """
Args:
    data (`list` of `str`): Texts, e.g. a model's generated continuations.

Returns:
    lexical_perplexity (`float`): The mean of the per-text perplexities (NaN when no text has a word).
    perplexities (`list` of `float`): 2^H of each text, from 1.0 (one word repeated) up to its
        number of words (all distinct); NaN for a text without a word.

Examples:
    >>> lexical_perplexity = hf_graft.metrics.load("lexical_perplexity")
    >>> lexical_perplexity.compute(data=["a a b b", "A b, c. D!"])
    {'lexical_perplexity': 3.0, 'perplexities': [2.0, 4.0]}
"""

_CITATION = """
@misc{zimmermann_boussard_layer_grafting,
  title={Transplanting Knowledge: A Study on Layer-Specific Grafting in {LLMs}},
  author={Zimmermann, Bastien and Boussard, Matthieu},
  howpublished={craft ai}
}
"""


def _lexical_perplexity(text: str) -> float:
    counts = np.fromiter(Counter(_WORD.findall(text.lower())).values(), dtype=np.float64)
    if counts.size == 0:
        return math.nan
    p = counts / counts.sum()
    return float(2.0 ** -np.sum(p * np.log2(p)))


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class LexicalPerplexity(evaluate.Measurement):
    """2 to the entropy of each text's word-frequency distribution, and their mean."""

    def _info(self):
        return evaluate.MeasurementInfo(
            module_type="measurement",
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"data": datasets.Value("string")}),
            reference_urls=["https://en.wikipedia.org/wiki/Perplexity"],
        )

    def _compute(self, data):
        if not data:
            raise ValueError("Lexical perplexity is undefined without texts: pass at least one.")
        perplexities = [_lexical_perplexity(text) for text in data]
        scored = [value for value in perplexities if not math.isnan(value)]
        mean = float(np.mean(scored)) if scored else math.nan
        return {"lexical_perplexity": mean, "perplexities": perplexities}
