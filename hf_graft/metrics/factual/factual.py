"""Factual: whether an output's first number is the right answer, as an ``evaluate`` metric module.

The most demanding of the layer-grafting paper's three task metrics: the first number in the
output (positive or negative) must equal the expected answer, whatever the wording around it
(format-hard checks the wording, format-soft that there is one number). Values are compared as
exact decimals, so "2.0" equals 2 and no float rounding enters. The module imports only evaluate,
datasets and numpy, so it runs anywhere ``evaluate`` does.
"""

import re
from decimal import Decimal

import datasets
import evaluate
import numpy as np


# A number: an optional minus sign, ASCII digits, an optional fractional part ("3." is 3 then a dot).
_NUMBER = re.compile(r"-?[0-9]+(?:\.[0-9]+)?")

_DESCRIPTION = """
Factual is the fraction of predictions whose first number equals the reference answer. A number is
an optional "-", a run of ASCII digits and an optional fractional part; the first one in the
prediction is compared, by value, with the first one in the reference, so the reference can be the
bare answer (2, "-3") or the full expected answer ("The result is 2"). A prediction without a number
is wrong.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `str`): Generated answers.
    references (`list` of `int`, or `list` of `str`): Expected answers, one per prediction: the
        integer itself, or a text whose first number is the value ("-3", "The result is 2"). All of
        one type; each text must contain a number.

Returns:
    factual (`float`): The fraction of predictions whose first number is the answer, between 0.0 and 1.0.

Examples:
    >>> factual = hf_graft.metrics.load("factual")
    >>> factual.compute(predictions=["The result is -2.", "3 or 2", "two", "2.0"], references=[-2, 2, 2, 2])
    {'factual': 0.5}
    >>> factual.compute(predictions=["The result is 1"], references=["The result is 1"])
    {'factual': 1.0}
"""

_CITATION = """
@misc{zimmermann_boussard_layer_grafting,
  title={Transplanting Knowledge: A Study on Layer-Specific Grafting in {LLMs}},
  author={Zimmermann, Bastien and Boussard, Matthieu},
  howpublished={craft ai}
}
"""


def _first_number(text: str) -> Decimal | None:
    found = _NUMBER.search(text)
    return None if found is None else Decimal(found.group())


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Factual(evaluate.Metric):
    """Fraction of predictions whose first number equals the reference answer."""

    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=[
                datasets.Features({"predictions": datasets.Value("string"), "references": datasets.Value("string")}),
                datasets.Features({"predictions": datasets.Value("string"), "references": datasets.Value("int64")}),
            ],
        )

    def _compute(self, predictions, references):
        if not predictions:
            raise ValueError("Factual is undefined without predictions: pass at least one.")
        answers = [_first_number(str(r)) for r in references]
        missing = [i for i, answer in enumerate(answers) if answer is None]
        if missing:
            raise ValueError(
                f"The references at positions {missing[:5]} contain no number: pass the expected value (e.g. 2) "
                "or the expected answer text (e.g. 'The result is 2')."
            )
        correct = [_first_number(p) == answer for p, answer in zip(predictions, answers)]
        return {"factual": float(np.mean(correct))}
