"""Perplexity from per-sequence negative log-likelihoods, as an ``evaluate`` metric module.

The Hub's ``perplexity`` metric downloads a model and runs it; this one takes what any causal LM
evaluation already has, each sequence's summed negative log-likelihood (natural log) and its
number of predicted tokens, so it needs no model and no network. The corpus perplexity weights
every token equally: ``exp(sum(nll) / sum(num_tokens))``. The module imports only evaluate,
datasets and numpy, so it runs anywhere ``evaluate`` does.
"""

import datasets
import evaluate
import numpy as np


_DESCRIPTION = """
Perplexity is the exponential of the mean negative log-likelihood per token: how many equally
likely choices the model hesitates between at each token, on average. Lower is better; 1 is a
model that is always certain and right.
"""

_KWARGS_DESCRIPTION = """
Args:
    nll (`list` of `float`): Summed negative log-likelihood (natural log) of each sequence's
        predicted tokens.
    num_tokens (`list` of `int`): Number of predicted tokens of each sequence (> 0).

Returns:
    perplexity (`float`): exp(sum(nll) / sum(num_tokens)), every token weighted equally.
    mean_perplexity (`float`): The mean of the per-sequence perplexities exp(nll / num_tokens),
        as the Hub's perplexity metric reports it.
    nll_per_token (`float`): sum(nll) / sum(num_tokens), in nats.
    num_tokens (`int`): sum(num_tokens).

Examples:
    >>> perplexity = hf_graft.metrics.load("perplexity")
    >>> perplexity.compute(nll=[2.0, 6.0], num_tokens=[2, 2])
    {'perplexity': 7.38905609893065, 'mean_perplexity': 11.401909375823356, 'nll_per_token': 2.0, 'num_tokens': 4}
"""

_CITATION = """
@article{jelinek1977perplexity,
  title={Perplexity---a measure of the difficulty of speech recognition tasks},
  author={Jelinek, Fred and Mercer, Robert L. and Bahl, Lalit R. and Baker, James K.},
  journal={The Journal of the Acoustical Society of America},
  volume={62},
  number={S1},
  pages={S63--S63},
  year={1977}
}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Perplexity(evaluate.Metric):
    """Corpus and mean per-sequence perplexity from summed NLLs and token counts."""

    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"nll": datasets.Value("float64"), "num_tokens": datasets.Value("int64")}),
            reference_urls=["https://huggingface.co/docs/transformers/perplexity"],
        )

    def _compute(self, nll, num_tokens):
        nll = np.asarray(nll, dtype=np.float64)
        counts = np.asarray(num_tokens, dtype=np.int64)
        if counts.size == 0:
            raise ValueError("Perplexity is undefined without sequences: pass at least one.")
        if np.any(counts <= 0):
            raise ValueError("num_tokens must be > 0 for every sequence.")
        if not np.all(np.isfinite(nll)) or np.any(nll < 0):
            raise ValueError("nll must be finite and >= 0 for every sequence (a sum of -log p).")
        total, tokens = float(nll.sum()), int(counts.sum())
        return {
            "perplexity": float(np.exp(total / tokens)),
            "mean_perplexity": float(np.mean(np.exp(nll / counts))),
            "nll_per_token": total / tokens,
            "num_tokens": tokens,
        }
