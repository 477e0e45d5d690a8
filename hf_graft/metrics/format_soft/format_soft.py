"""Format-soft: whether an output holds a single number, as an ``evaluate`` metric module.

The weakest of the layer-grafting paper's three task metrics: the model answers with a number at
all, whatever the wording around it and whatever its value (format-hard checks the wording,
factual the value). It needs no reference; ``references``, when given (as ``evaluate.combine``
passes them), are ignored. The module imports only evaluate, datasets and numpy, so it runs
anywhere ``evaluate`` does.
"""

import re

import datasets
import evaluate
import numpy as np


# A number: an optional minus sign, ASCII digits, an optional fractional part ("3." is 3 then a dot).
_NUMBER = re.compile(r"-?[0-9]+(?:\.[0-9]+)?")

_DESCRIPTION = """
Format-soft is the fraction of predictions that contain exactly one number. A number is an optional
"-", a run of ASCII digits and an optional fractional part ("-2", "17", "2.5"); "1,000" holds two
numbers, "3." one (the dot ends the sentence), and digits inside a word count ("x2" holds 2).
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `str`): Generated answers.

Returns:
    format_soft (`float`): The fraction of predictions holding exactly one number, between 0.0 and 1.0.

Examples:
    >>> format_soft = hf_graft.metrics.load("format_soft")
    >>> format_soft.compute(predictions=["The result is -2.", "2 + 2", "no number", "It is 2.5 maybe"])
    {'format_soft': 0.5}
"""

_CITATION = """
@misc{zimmermann_boussard_layer_grafting,
  title={Transplanting Knowledge: A Study on Layer-Specific Grafting in {LLMs}},
  author={Zimmermann, Bastien and Boussard, Matthieu},
  howpublished={craft ai}
}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class FormatSoft(evaluate.Metric):
    """Fraction of predictions that contain exactly one number."""

    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("string")}),
        )

    def _compute(self, predictions):
        if not predictions:
            raise ValueError("Format-soft is undefined without predictions: pass at least one.")
        return {"format_soft": float(np.mean([len(_NUMBER.findall(p)) == 1 for p in predictions]))}
