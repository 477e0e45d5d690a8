"""Model size as an ``evaluate`` measurement: parameters, bytes and MiB, optionally against a reference.

A model's size is a property of the model alone, with nothing to compare it with a ground truth,
so this is an ``evaluate.Measurement`` (like the Hub's ``word_length``), not a ``Metric``.
Inputs are one row per tensor, so mixed precision (an fp16 embedding next to 2.5-bit packed
singular vectors) is measured exactly. Megabytes are MiB (2**20 bytes), the unit the grafting
papers report. The module imports only evaluate, datasets and numpy, so it runs anywhere
``evaluate`` does.
"""

import datasets
import evaluate
import numpy as np


_DESCRIPTION = """
Measures the storage footprint of a model from its tensors: the number of parameters, the bytes
they take at their bit widths (sum of numel * bits / 8), the same in MiB (bytes / 2**20) and,
when a reference size is given, how many times smaller the model is and by how many percent.
"""

_KWARGS_DESCRIPTION = """
Args:
    numel (`list` of `int`): Number of elements of each tensor.
    bits (`list` of `float`): Bits per element of each tensor, e.g. 32 for fp32, 16 for bf16,
        8 for int8, or a fractional average such as 2.5 for a mixed-precision tensor.
    reference_bytes (`float`, *optional*): Size in bytes of the model to compare with, e.g. the
        donor or the uncompressed model.

Returns:
    parameters (`int`): Total number of elements.
    bytes (`float`): Total size in bytes.
    megabytes (`float`): Total size in MiB (bytes / 2**20).
    size_ratio (`float`): reference_bytes / bytes; only with `reference_bytes`.
    reduction_percent (`float`): 100 * (1 - bytes / reference_bytes); only with `reference_bytes`.

Examples:
    >>> footprint = hf_graft.metrics.load("model_footprint")
    >>> footprint.compute(numel=[1000, 24], bits=[8, 32], reference_bytes=4096)
    {'parameters': 1024, 'bytes': 1096.0, 'megabytes': 0.00104522705078125, 'size_ratio': 3.7372262773722627, 'reduction_percent': 73.2421875}
"""

_CITATION = """
@article{knowledge_grafting_2025,
  title={Knowledge Grafting: A Mechanism for Optimizing AI Model Deployment in Resource-Constrained Environments},
  journal={arXiv preprint arXiv:2507.19261},
  year={2025}
}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class ModelFootprint(evaluate.Measurement):
    """Parameter count and storage size of a model, given per tensor as (numel, bits)."""

    def _info(self):
        return evaluate.MeasurementInfo(
            module_type="measurement",
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"numel": datasets.Value("int64"), "bits": datasets.Value("float64")}),
            reference_urls=["https://arxiv.org/abs/2507.19261"],
        )

    def _compute(self, numel, bits, reference_bytes=None):
        numel = np.asarray(numel, dtype=np.int64)
        bits = np.asarray(bits, dtype=np.float64)
        if np.any(numel < 0):
            raise ValueError("numel must be >= 0 for every tensor.")
        if np.any(bits <= 0):
            raise ValueError("bits must be > 0 for every tensor (32 for fp32, 16 for bf16, 8 for int8, ...).")
        size = float(np.sum(numel * bits) / 8)
        result = {"parameters": int(np.sum(numel)), "bytes": size, "megabytes": size / 2**20}
        if reference_bytes is not None:
            if reference_bytes <= 0:
                raise ValueError(f"reference_bytes must be > 0, got {reference_bytes}.")
            if size == 0:
                raise ValueError("The measured tensors hold 0 bytes, so no ratio to reference_bytes exists.")
            result["size_ratio"] = reference_bytes / size
            result["reduction_percent"] = 100 * (1 - size / reference_bytes)
        return result
