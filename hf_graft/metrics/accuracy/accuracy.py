"""Classification accuracy as an ``evaluate`` metric module.

Same inputs, options and output as the Hub's ``accuracy`` metric (which wraps scikit-learn's
``accuracy_score``), computed directly with numpy so the arithmetic is visible in one place.
The module imports only evaluate, datasets and numpy, so it runs anywhere ``evaluate`` does.
"""

import datasets
import evaluate
import numpy as np


_DESCRIPTION = """
Accuracy is the proportion of correct predictions among all predictions:
Accuracy = (TP + TN) / (TP + TN + FP + FN). With sample weights, each example counts with its
weight instead of 1.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `int`): Predicted class labels.
    references (`list` of `int`): Ground-truth class labels.
    normalize (`bool`, defaults to `True`): If `True`, return the (weighted) fraction of correct
        predictions; if `False`, return the (weighted) number of correct predictions.
    sample_weight (`list` of `float`, *optional*): One weight per example. Defaults to `None`
        (every example weighs 1).

Returns:
    accuracy (`float`): The fraction of correct predictions, between 0.0 and 1.0, or their count
        when `normalize=False`.

Examples:
    >>> accuracy = hf_graft.metrics.load("accuracy")
    >>> accuracy.compute(references=[0, 1, 2, 0, 1, 2], predictions=[0, 1, 1, 2, 1, 0])
    {'accuracy': 0.5}
    >>> accuracy.compute(references=[0, 1, 2, 0, 1, 2], predictions=[0, 1, 1, 2, 1, 0], normalize=False)
    {'accuracy': 3.0}
    >>> accuracy.compute(references=[0, 1, 2, 0, 1, 2], predictions=[0, 1, 1, 2, 1, 0],
    ...                  sample_weight=[0.5, 2, 0.7, 0.5, 9, 0.4])
    {'accuracy': 0.8778625954198473}
"""

_CITATION = """
@article{scikit-learn,
  title={Scikit-learn: Machine Learning in {P}ython},
  author={Pedregosa, F. and Varoquaux, G. and Gramfort, A. and Michel, V.
         and Thirion, B. and Grisel, O. and Blondel, M. and Prettenhofer, P.
         and Weiss, R. and Dubourg, V. and Vanderplas, J. and Passos, A. and
         Cournapeau, D. and Brucher, M. and Perrot, M. and Duchesnay, E.},
  journal={Journal of Machine Learning Research},
  volume={12},
  pages={2825--2830},
  year={2011}
}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Accuracy(evaluate.Metric):
    """Fraction (or weighted count) of predictions equal to their references."""

    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}
            ),
            reference_urls=["https://scikit-learn.org/stable/modules/generated/sklearn.metrics.accuracy_score.html"],
        )

    def _compute(self, predictions, references, normalize=True, sample_weight=None):
        correct = np.asarray(predictions) == np.asarray(references)
        weights = np.ones(len(correct)) if sample_weight is None else np.asarray(sample_weight, dtype=np.float64)
        if weights.shape != correct.shape:
            raise ValueError(
                f"sample_weight has {weights.size} values for {correct.size} predictions: pass one weight per example."
            )
        correct_weight = float(np.sum(weights[correct]))
        if not normalize:
            return {"accuracy": correct_weight}
        total_weight = float(np.sum(weights))
        if total_weight == 0:
            raise ValueError("Accuracy is undefined: there are no predictions, or their sample weights sum to 0.")
        return {"accuracy": correct_weight / total_weight}
