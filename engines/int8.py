"""int8 Q/DQ graphs that ONNX Runtime and TensorRT both accept.

Static quantization with ONNX Runtime's quantizer in QDQ format: symmetric int8 activations
and per-channel symmetric int8 weights for MatMul, Gemm and Conv; biases stay float (TensorRT
refuses a DequantizeLinear on an int32 bias) and op outputs are not quantized (quantizing
every op gives non-zero zero points TensorRT refuses, ~7x the error, and an ONNX Runtime
type-mismatch at high optimization levels). Ranges come from calibration inputs captured
along real denoising trajectories (export/calibration.py), so every timestep is represented.
Layers whose PyTorch module path matches a "float layer" pattern are left unquantized.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static

from engines import graph

log = logging.getLogger(__name__)

QUANT_OPS = ["MatMul", "Gemm", "Conv"]

# Default layers kept float per stage: the embedders, patch embedding and head of the DiT
# (tiny compute, and their error reaches every token) and its cross-attentions (measured on the
# previous trained small, training shift 5: int8 end to end 33.8 -> 38.6 dB vs fp32, DiT step
# median time unchanged at 2 threads; the shipped weights give 47.1 dB with them float); the
# first and last convs of the VAE.
DEFAULT_FLOAT_LAYERS = {
    "dit": ("patch_embedding", "condition_embedder", "proj_out", "blocks.*.attn2"),
    "vae_encoder": ("vae.encoder.conv1", "vae.encoder.head", "vae.conv1"),
    "vae_decoder": ("vae.conv2", "vae.decoder.conv1", "vae.decoder.head"),
}


class _Reader(CalibrationDataReader):
    def __init__(self, samples: list[dict[str, np.ndarray]]):
        self._it = iter(samples)

    def get_next(self):
        return next(self._it, None)


def quantize(src: Path, dst: Path, samples: list[dict[str, np.ndarray]],
             float_layers: tuple[str, ...]) -> dict:
    """Write the Q/DQ graph of `src` to `dst`; returns the settings and what stayed float."""
    model = graph.load(src)
    exclude = graph.nodes_matching(model, list(float_layers))
    quantizable = [n.name for n in model.graph.node if n.op_type in QUANT_OPS]
    dst.parent.mkdir(parents=True, exist_ok=True)
    # The quantizer warns on the root logger that shape "pre-processing" is recommended; the
    # exporter's graphs carry full shapes already, so that advice is for --debug only.
    quiet = not log.isEnabledFor(logging.DEBUG)
    if quiet:
        logging.disable(logging.WARNING)
    try:
        _quantize(src, dst, samples, exclude)
    finally:
        if quiet:
            logging.disable(logging.NOTSET)
    excluded = [n for n in exclude if n in set(quantizable)]
    return {
        "format": "QDQ", "activations": "int8 symmetric per-tensor",
        "weights": "int8 symmetric per-channel", "biases": "float", "op_types": QUANT_OPS,
        "calibration_method": "minmax", "calibration_samples": len(samples),
        "float_layers": list(float_layers),
        "quantized_nodes": len(quantizable) - len(excluded), "float_nodes": excluded,
    }


def _quantize(src: Path, dst: Path, samples, exclude: list[str]) -> None:
    quantize_static(
        str(src), str(dst), _Reader(samples),
        quant_format=QuantFormat.QDQ,
        op_types_to_quantize=QUANT_OPS,
        per_channel=True,
        activation_type=QuantType.QInt8,
        weight_type=QuantType.QInt8,
        nodes_to_exclude=exclude,
        use_external_data_format=True,
        calibrate_method=CalibrationMethod.MinMax,
        extra_options={
            "ActivationSymmetric": True,
            "WeightSymmetric": True,
            "QuantizeBias": False,
            "OpTypesToExcludeOutputQuantization": QUANT_OPS,
        },
        calibration_providers=["CPUExecutionProvider"],
    )  # writes the weights to `<dst name>.data`, like every other graph here
