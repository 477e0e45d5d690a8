"""Edge export of a vision graft: ONNX through Optimum's exporter, then static int8 (QDQ).

``export_onnx`` hands the model to ``optimum.exporters.onnx.export`` with an ``OnnxConfig`` for
the ``grafted_vision`` model type (optimum does not know it), checks ONNX Runtime against PyTorch
on real images and writes an Optimum ONNX model folder (``model.onnx`` + ``config.json``, which
``optimum.onnxruntime.ORTModelForImageClassification`` loads once hf_graft is imported).
``quantize_int8`` calibrates activation ranges on sample images and writes a QDQ int8 model;
``compare_onnx`` measures what the int8 model keeps of the fp32 one.

optimum and onnxruntime are the ``export`` extra: they are imported inside the functions, so this
module imports without them and each function says how to install them.
"""

import functools
import importlib
import importlib.metadata
import os
import tempfile
import warnings
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from ..errors import HfGraftError

ONNX_FILE_NAME = "model.onnx"
_INSTALL_HINT = 'pip install "hf-graft[export]"'
_TASK = "image-classification"


def _require(module_name: str):
    """Import an optional dependency of the export extra, or say how to install it."""
    try:
        return importlib.import_module(module_name)
    except ImportError as err:
        raise HfGraftError(
            f"ONNX export and int8 quantization need {module_name.split('.')[0]}, which is not "
            f"installed ({err}). Install the export extra: {_INSTALL_HINT}"
        ) from err


def _distribution_version(name: str) -> Optional[str]:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


@functools.cache
def _onnx_config_class():
    """Build the ``OnnxConfig`` subclass on first use, once optimum is known to be installed."""
    onnx_config = _require("optimum.exporters.onnx.config")
    normalized_config = _require("optimum.utils.normalized_config")

    class GraftedVisionOnnxConfig(onnx_config.VisionOnnxConfig):
        """Optimum's description of a ``grafted_vision`` model for the ONNX exporter.

        Input ``pixel_values`` [batch, num_channels, image_size, image_size] with a dynamic batch
        axis; output ``logits`` [batch, num_labels]. Dummy inputs take ``num_channels`` and
        ``image_size`` from the graft's config through ``NormalizedVisionConfig``. Height and width
        stay static: the graft is trained, calibrated and benchmarked at its config's size.
        """

        NORMALIZED_CONFIG_CLASS = normalized_config.NormalizedVisionConfig

        @property
        def inputs(self) -> dict:
            return {"pixel_values": {0: "batch_size"}}

    # Named as the module attribute that ``__getattr__`` serves, so pickle finds the class.
    GraftedVisionOnnxConfig.__qualname__ = "GraftedVisionOnnxConfig"
    return GraftedVisionOnnxConfig


def __getattr__(name):
    """Expose ``GraftedVisionOnnxConfig`` lazily, as it subclasses a class from optimum."""
    if name == "GraftedVisionOnnxConfig":
        return _onnx_config_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def onnx_session(path, threads: Optional[int] = None):
    """An ONNX Runtime CPU session with all graph optimisations.

    ``threads`` sets the intra-op thread count (``None`` lets ONNX Runtime use every core); latency
    benchmarks pin it so that runs compare like with like.
    """
    ort = _require("onnxruntime")
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads is not None:
        options.intra_op_num_threads = int(threads)
    return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])


def _image_batch(images, shape: tuple, what: str) -> np.ndarray:
    """``images`` as a contiguous float32 array [N, *shape], or a clear error.

    ``shape`` is (channels, height, width); a ``None`` entry accepts any size on that axis.
    """
    if isinstance(images, torch.Tensor):
        images = images.detach().cpu().numpy()
    array = np.asarray(images)
    fits = array.ndim == 4 and all(want is None or want == got for want, got in zip(shape, array.shape[1:]))
    if not fits or len(array) == 0:
        expected = ", ".join("*" if want is None else str(want) for want in shape)
        raise HfGraftError(
            f"{what} must be a non-empty float batch [N, {expected}], got shape {tuple(array.shape)}. "
            "Resize the images to the model's image_size and normalise them with its "
            "image_mean/image_std, as for training."
        )
    return np.ascontiguousarray(array, dtype=np.float32)


def _session_image_batch(session, images, what: str) -> np.ndarray:
    """Check ``images`` against the image dimensions of an ONNX model's input."""
    shape = tuple(dim if isinstance(dim, int) else None for dim in session.get_inputs()[0].shape[1:])
    return _image_batch(images, shape, what)


def _onnx_logits(session, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
    name = session.get_inputs()[0].name
    return np.concatenate(
        [session.run(None, {name: images[i : i + batch_size]})[0] for i in range(0, len(images), batch_size)]
    )


def _torch_logits(model, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
    with torch.no_grad():
        return np.concatenate(
            [
                model(pixel_values=torch.from_numpy(images[i : i + batch_size])).logits.numpy()
                for i in range(0, len(images), batch_size)
            ]
        )


def _onnx_opset(path: Path) -> int:
    onnx = _require("onnx")
    model = onnx.load(str(path), load_external_data=False)
    return next(entry.version for entry in model.opset_import if entry.domain in ("", "ai.onnx"))


def export_onnx(model, output_dir, *, opset: Optional[int] = None, atol: float = 1e-4, validation_images=None) -> dict:
    """Export a vision graft to ``output_dir/model.onnx`` with Optimum and check it in ONNX Runtime.

    Optimum's ``export`` runs ``torch.onnx.export`` (the TorchScript exporter, which optimum selects
    explicitly) with the dummy inputs, input/output names and dynamic batch axis of
    ``GraftedVisionOnnxConfig``, at optimum's default opset unless ``opset`` is given. The file is
    then run in ONNX Runtime (CPU) on ``validation_images`` (a float batch [N, C, H, W], normalised as
    for the model; default: 4 seeded random-normal images) and its logits must be within ``atol``
    of PyTorch's, or ``HfGraftError`` reports the difference. Everything is written to a staging
    folder first and moved into ``output_dir`` only once it passed, with the config as
    ``config.json`` so the folder loads with ``ORTModelForImageClassification``.

    The model must be a ``grafted_vision`` model on the CPU in float32; its train/eval mode is kept.

    Returns a report: ``path``, ``bytes``, ``max_abs_diff``, ``atol``, ``opset``, ``num_images`` and
    the ``versions`` of torch, optimum, optimum-onnx and onnxruntime.
    """
    optimum_onnx = _require("optimum.exporters.onnx")
    ort = _require("onnxruntime")
    config = model.config
    if getattr(config, "model_type", None) != "grafted_vision":
        raise HfGraftError(
            f"export_onnx exports grafted_vision models, got a {type(model).__name__} of model_type "
            f"{getattr(config, 'model_type', None)!r}. Load the graft with "
            "GraftedModelForImageClassification.from_pretrained(...)."
        )
    parameter = next(model.parameters())
    if parameter.device.type != "cpu" or parameter.dtype != torch.float32:
        raise HfGraftError(
            f"export_onnx needs the model on the CPU in float32, got {parameter.device.type} "
            f"{parameter.dtype}. Call model.to('cpu', torch.float32) first."
        )
    size = config.image_size
    if validation_images is None:
        generator = torch.Generator().manual_seed(0)
        validation_images = torch.randn(4, config.num_channels, size, size, generator=generator)
    images = _image_batch(validation_images, (config.num_channels, size, size), "validation_images")

    output_dir = Path(output_dir)
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    onnx_config = _onnx_config_class()(config, task=_TASK)
    was_training = model.training
    with tempfile.TemporaryDirectory(dir=output_dir.parent, prefix=f".{output_dir.name}.") as staging:
        staging = Path(staging)
        onnx_path = staging / ONNX_FILE_NAME
        model.eval()
        try:
            with warnings.catch_warnings():
                # optimum selects the TorchScript exporter on purpose (dynamo=False); torch's notice
                # that it is the legacy path is not something a user of hf-graft can act on.
                for notice in (".*legacy TorchScript-based ONNX export", "The feature will be removed"):
                    warnings.filterwarnings("ignore", message=notice, category=DeprecationWarning)
                optimum_onnx.export(model, onnx_config, onnx_path, opset=opset)
            reference = _torch_logits(model, images)
        finally:
            model.train(was_training)
        max_abs_diff = float(np.abs(_onnx_logits(onnx_session(onnx_path), images) - reference).max())
        if not max_abs_diff <= atol:
            raise HfGraftError(
                f"ONNX Runtime's logits differ from PyTorch's by up to {max_abs_diff:.3g} on "
                f"{len(images)} images, more than atol={atol:g}; nothing was written to {output_dir}. "
                "Check that the model runs the same in eval mode, or raise atol if the difference is expected."
            )
        opset_used = _onnx_opset(onnx_path)
        config.save_pretrained(staging)
        output_dir.mkdir(exist_ok=True)
        for produced in staging.iterdir():
            os.replace(produced, output_dir / produced.name)
    path = output_dir / ONNX_FILE_NAME
    return {
        "path": str(path),
        "bytes": path.stat().st_size,
        "max_abs_diff": max_abs_diff,
        "atol": atol,
        "opset": opset_used,
        "num_images": len(images),
        "versions": {
            "torch": torch.__version__,
            "optimum": _distribution_version("optimum"),
            "optimum-onnx": _distribution_version("optimum-onnx"),
            "onnxruntime": ort.__version__,
        },
    }


class _CalibrationBatches:
    """Feeds calibration images to ONNX Runtime's calibrator in batches.

    ONNX Runtime accepts any object with ``get_next`` (``CalibrationDataReader`` checks for it), so
    this class needs no onnxruntime import.
    """

    def __init__(self, input_name: str, images: np.ndarray, batch_size: int):
        self.input_name = input_name
        self.images = images
        self.batch_size = batch_size
        self.start = 0

    def get_next(self) -> Optional[dict]:
        if self.start >= len(self.images):
            return None
        batch = self.images[self.start : self.start + self.batch_size]
        self.start += self.batch_size
        return {self.input_name: batch}


def _unfused_batch_norms(path: Path) -> list:
    """Names of the BatchNormalization nodes pre-processing left (the head's parameter-free batch norm,
    which follows a pooling, not a convolution). They stay in fp32: quantizing their 1-D scale per
    channel is not defined, and they cost nothing."""
    import onnx

    return [node.name for node in onnx.load(str(path)).graph.node if node.op_type == "BatchNormalization"]


def quantize_int8(
    onnx_path, calibration_images, output_path, *, per_channel: bool = True, batch_size: int = 16
) -> dict:
    """Statically quantize an fp32 ONNX graft to int8 in QDQ format.

    ONNX Runtime's ``quant_pre_process`` first runs shape inference and graph optimisation (folded
    constants and fused nodes quantize better); ``quantize_static`` then records min/max activation
    ranges on ``calibration_images`` (a float batch [N, C, H, W] normalised as for the model, such
    as training images), fed ``batch_size`` at a time, and inserts QuantizeLinear/DequantizeLinear
    pairs with int8 activations and int8 weights (per output channel by default): ONNX Runtime's
    default QDQ setting, its first choice for balancing speed and accuracy on CPUs. The output is
    written atomically to ``output_path``.

    Returns a report: ``path``, ``bytes``, ``fp32_bytes``, ``size_ratio``, ``per_channel``,
    ``num_calibration_images``.
    """
    quantization = _require("onnxruntime.quantization")
    onnx_path, output_path = Path(onnx_path), Path(output_path)
    if not onnx_path.is_file():
        raise HfGraftError(f"No ONNX model at {onnx_path}; export one first with export_onnx(model, output_dir).")
    session = onnx_session(onnx_path)
    images = _session_image_batch(session, calibration_images, "calibration_images")
    reader = _CalibrationBatches(session.get_inputs()[0].name, images, batch_size)
    output_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=output_path.parent, prefix=f".{output_path.name}.") as staging:
        prepared = Path(staging) / "prepared.onnx"
        quantized = Path(staging) / output_path.name
        quantization.quant_pre_process(str(onnx_path), str(prepared))
        quantization.quantize_static(
            str(prepared),
            str(quantized),
            reader,
            nodes_to_exclude=_unfused_batch_norms(prepared),
            quant_format=quantization.QuantFormat.QDQ,
            per_channel=per_channel,
            activation_type=quantization.QuantType.QInt8,
            weight_type=quantization.QuantType.QInt8,
            calibrate_method=quantization.CalibrationMethod.MinMax,
        )
        os.replace(quantized, output_path)
    fp32_bytes, int8_bytes = onnx_path.stat().st_size, output_path.stat().st_size
    return {
        "path": str(output_path),
        "bytes": int8_bytes,
        "fp32_bytes": fp32_bytes,
        "size_ratio": int8_bytes / fp32_bytes,
        "per_channel": per_channel,
        "num_calibration_images": len(images),
    }


def compare_onnx(fp32_path, int8_path, images, labels=None) -> dict:
    """How much of the fp32 ONNX model an int8 one keeps, on the same images.

    Returns ``top1_agreement`` (share of images where both predict the same class),
    ``max_abs_logit_diff``, the file ``fp32_bytes``/``int8_bytes`` and their ``size_ratio``, and with
    ``labels`` (one class index per image) the ``fp32_accuracy`` and ``int8_accuracy``.
    """
    fp32_session, int8_session = onnx_session(fp32_path), onnx_session(int8_path)
    images = _session_image_batch(fp32_session, images, "images")
    fp32_logits = _onnx_logits(fp32_session, images)
    int8_logits = _onnx_logits(int8_session, images)
    fp32_top1, int8_top1 = fp32_logits.argmax(axis=1), int8_logits.argmax(axis=1)
    fp32_bytes, int8_bytes = Path(fp32_path).stat().st_size, Path(int8_path).stat().st_size
    report = {
        "num_images": len(images),
        "top1_agreement": float((fp32_top1 == int8_top1).mean()),
        "max_abs_logit_diff": float(np.abs(fp32_logits - int8_logits).max()),
        "fp32_bytes": fp32_bytes,
        "int8_bytes": int8_bytes,
        "size_ratio": int8_bytes / fp32_bytes,
    }
    if labels is not None:
        labels = np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels).reshape(-1)
        if len(labels) != len(images):
            raise HfGraftError(f"Got {len(labels)} labels for {len(images)} images; pass one class index per image.")
        report["fp32_accuracy"] = float((fp32_top1 == labels).mean())
        report["int8_accuracy"] = float((int8_top1 == labels).mean())
    return report
