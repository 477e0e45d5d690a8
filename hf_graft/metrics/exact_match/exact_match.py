"""Exact match of generated strings as an ``evaluate`` metric module.

Same inputs, options and output as the Hub's ``exact_match`` metric (regexes to strip, case,
punctuation and digits ignored on request), computed directly with ``re`` and numpy. The module
imports only evaluate, datasets and numpy, so it runs anywhere ``evaluate`` does.
"""

import re
import string

import datasets
import evaluate
import numpy as np


_DESCRIPTION = """
Exact match is the fraction of predictions that are identical, character for character, to their
references, after the optional normalisations (regexes removed, case, punctuation or digits ignored).
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `str`): Generated strings.
    references (`list` of `str`): Expected strings, one per prediction.
    regexes_to_ignore (`list` of `str`, *optional*): Regular expressions whose matches are removed
        from both sides before comparing.
    ignore_case (`bool`, defaults to `False`): Compare in lower case.
    ignore_punctuation (`bool`, defaults to `False`): Remove ``string.punctuation`` first.
    ignore_numbers (`bool`, defaults to `False`): Remove the digits 0-9 first.

Returns:
    exact_match (`float`): The fraction of exact matches, between 0.0 and 1.0.

Examples:
    >>> exact_match = hf_graft.metrics.load("exact_match")
    >>> exact_match.compute(predictions=["357", "The result is 2", "41 "], references=["357", "The result is 3", "41"])
    {'exact_match': 0.3333333333333333}
    >>> exact_match.compute(predictions=["The Result is 2"], references=["the result is 2"], ignore_case=True)
    {'exact_match': 1.0}
"""

_CITATION = """
@inproceedings{rajpurkar-etal-2016-squad,
  title={{SQ}u{AD}: 100,000+ Questions for Machine Comprehension of Text},
  author={Rajpurkar, Pranav and Zhang, Jian and Lopyrev, Konstantin and Liang, Percy},
  booktitle={Proceedings of the 2016 Conference on Empirical Methods in Natural Language Processing},
  year={2016},
  pages={2383--2392}
}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class ExactMatch(evaluate.Metric):
    """Fraction of predictions identical to their references after optional normalisation."""

    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
            ),
            reference_urls=["https://huggingface.co/spaces/evaluate-metric/exact_match"],
        )

    def _compute(
        self,
        predictions,
        references,
        regexes_to_ignore=None,
        ignore_case=False,
        ignore_punctuation=False,
        ignore_numbers=False,
    ):
        if not predictions:
            raise ValueError("Exact match is undefined without predictions: pass at least one.")
        removed = list(regexes_to_ignore or [])
        if ignore_punctuation:
            removed.append(f"[{re.escape(string.punctuation)}]")
        if ignore_numbers:
            removed.append("[0-9]")

        def normalise(text: str) -> str:
            for pattern in removed:
                text = re.sub(pattern, "", text)
            return text.lower() if ignore_case else text

        matches = [normalise(p) == normalise(r) for p, r in zip(predictions, references)]
        return {"exact_match": float(np.mean(matches))}
