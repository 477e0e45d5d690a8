"""Format-hard: strict adherence to a task's answer format, as an ``evaluate`` metric module.

The layer-grafting paper scores modular addition with three metrics of rising demand:
format-soft (the output holds one number), format-hard (the output is exactly "The result is x")
and factual (the number is right). Format-hard checks the wording, never the value, so it tells
a model that learned the answer's shape from one that learned the arithmetic. The format is read
off each reference, so the same module serves any task with a fixed answer wording. The module
imports only evaluate, datasets and numpy, so it runs anywhere ``evaluate`` does.
"""

import re

import datasets
import evaluate
import numpy as np


# A number: an optional minus sign, ASCII digits, an optional fractional part ("3." is 3 then a dot).
_NUMBER = re.compile(r"-?[0-9]+(?:\.[0-9]+)?")
_ANY_INTEGER = r"-?[0-9]+"
_ANY_DECIMAL = r"-?[0-9]+\.[0-9]+"

_DESCRIPTION = """
Format-hard is the fraction of predictions written exactly in their reference's format, whatever
their value. The format of a reference is its text with every number in it standing for any number
of the same kind: "The result is 2" accepts "The result is 3" and "The result is -17", nothing else.
Leading and trailing whitespace is ignored on both sides; everything else must match character for
character (case, inner spaces, punctuation), so a trailing "." or a second sentence fails.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `str`): Generated answers, cut at the end-of-sequence token.
    references (`list` of `str`): Expected answers, one per prediction (e.g. "The result is 2"),
        whose wording defines the format. A number is an optional "-", ASCII digits and an optional
        fractional part; an integer in the reference accepts any integer, a decimal any decimal.

Returns:
    format_hard (`float`): The fraction of predictions in their reference's format, between 0.0 and 1.0.

Examples:
    >>> format_hard = hf_graft.metrics.load("format_hard")
    >>> format_hard.compute(
    ...     predictions=["The result is 3", "The result is  3", "result: 3", "The result is -2."],
    ...     references=["The result is 1"] * 4,
    ... )
    {'format_hard': 0.25}
    >>> format_hard.compute(predictions=[" The result is -12\\n"], references=["The result is 0"])
    {'format_hard': 1.0}
"""

_CITATION = """
@misc{zimmermann_boussard_layer_grafting,
  title={Transplanting Knowledge: A Study on Layer-Specific Grafting in {LLMs}},
  author={Zimmermann, Bastien and Boussard, Matthieu},
  howpublished={craft ai}
}
"""


def _format_pattern(reference: str) -> re.Pattern:
    """The reference, stripped, with each number replaced by "any number of its kind"."""
    reference = reference.strip()
    parts, last = [], 0
    for number in _NUMBER.finditer(reference):
        parts.append(re.escape(reference[last : number.start()]))
        parts.append(_ANY_DECIMAL if "." in number.group() else _ANY_INTEGER)
        last = number.end()
    parts.append(re.escape(reference[last:]))
    return re.compile("".join(parts))


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class FormatHard(evaluate.Metric):
    """Fraction of predictions worded exactly as their reference, numbers aside."""

    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
            ),
        )

    def _compute(self, predictions, references):
        if not predictions:
            raise ValueError("Format-hard is undefined without predictions: pass at least one.")
        matches = [_format_pattern(r).fullmatch(p.strip()) is not None for p, r in zip(predictions, references)]
        return {"format_hard": float(np.mean(matches))}
