"""Weight surgery: rewrites the weights and biases the converter's QAT path gets wrong."""

import numpy as np

from qat_plugin.errors import ExportError
from qat_plugin.tflite.flatbuffer import WEIGHT_OPS, Flatbuffer, dtype_name, set_dtype

# CONV_3D is left as the converter writes it: neither fix below was
# measured on it, so it keeps the weights and biases it always had.
RETOUCHED_OPS = frozenset(WEIGHT_OPS) - {"CONV_3D"}


def retouched_weights(data, *, per_tensor=False, int64_bias=False):
    """Fixes what the converter's QAT path gets wrong in weights and biases.

    - `per_tensor`: the kernels of a per-tensor recipe export as constants
      snapped to one int8 grid per tensor, but the converter requantizes
      every CONV_2D / DEPTHWISE_CONV_2D weight per channel and has no switch
      against it (`_experimental_disable_per_channel` is not passed on in
      the QAT path). The weights go back on the single grid
      `s = max|w| / 127`: every per-channel scale is at most `s`, so
      `round(q_c * s_c / s)` recovers the trained integers exactly; the
      bias (scale `input_scale * weight_scale`) is rescaled to match.
    - `int64_bias`: TFLite's 16x8 kernels take int64 biases; the QAT path
      writes int32 ones, which DEPTHWISE_CONV_2D refuses and CONV_2D reads
      wrong (measured: saturated outputs). The values are widened.

    Returns `data` itself when nothing needed a change.

    Examples:
        >>> import keras, numpy as np, qat_plugin
        >>> from qat_plugin.tflite.weights import retouched_weights
        >>> model = keras.Sequential([keras.Input((4, 4, 2)), keras.layers.Conv2D(3, 2)])
        >>> qat = qat_plugin.quantize_model(model, "int8-per-tensor")
        >>> _ = qat(np.random.rand(8, 4, 4, 2).astype("float32"), training=True)
        >>> data = qat_plugin.export_tflite(qat)  # calls retouched_weights
        >>> [len(w.tensor.scales) for w in qat_plugin.inspect_tflite(data).weights]
        [1]
        >>> retouched_weights(data, per_tensor=True) is data  # already per tensor
        True
    """
    flatbuffer = Flatbuffer(data)
    changed = False
    for graph in flatbuffer.model.subgraphs:
        for op in graph.operators:
            if flatbuffer.op_name(op) not in RETOUCHED_OPS:
                continue
            if int64_bias and _widen_bias(flatbuffer, graph, op):
                changed = True
            weight = graph.tensors[op.inputs[1]]
            quant = weight.quantization
            if (not per_tensor or dtype_name(weight) != "int8"
                    or quant is None or len(quant.scale) < 2):
                continue
            buffer = flatbuffer.buffer(weight)
            if buffer.data is None:
                raise ExportError(
                    f"Cannot rewrite weight '{weight.name.decode()}' per tensor: its "
                    "data is stored outside the flatbuffer (a model over 2 GB)."
                )
            axis = quant.quantizedDimension
            shape = [1] * len(weight.shape)
            shape[axis] = -1
            channel_scales = np.asarray(quant.scale, np.float64)
            real = np.asarray(buffer.data, np.uint8).view(np.int8).reshape(
                weight.shape
            ) * channel_scales.reshape(shape)
            scale = float(np.max(np.abs(real)) / 127) or 1.0
            buffer.data = (
                np.clip(np.round(real / scale), -127, 127).astype(np.int8).view(np.uint8)
            ).ravel()
            quant.scale, quant.zeroPoint, quant.quantizedDimension = [scale], [0], 0
            if len(op.inputs) > 2 and op.inputs[2] >= 0:
                _rescale_bias(flatbuffer, graph.tensors[op.inputs[2]], channel_scales, scale)
            changed = True
    return flatbuffer.to_bytes() if changed else data


def _bias_dtype(bias):
    return np.int64 if dtype_name(bias) == "int64" else np.int32


def _widen_bias(flatbuffer, graph, op):
    """Turns the int32 bias of `op` into an int64 one; True when it did."""
    if len(op.inputs) < 3 or op.inputs[2] < 0:
        return False
    bias = graph.tensors[op.inputs[2]]
    buffer = flatbuffer.buffer(bias)
    if dtype_name(bias) != "int32" or buffer.data is None:
        return False
    values = np.asarray(buffer.data, np.uint8).view(np.int32).astype(np.int64)
    buffer.data = values.view(np.uint8)
    set_dtype(bias, "int64")
    return True


def _rescale_bias(flatbuffer, bias, channel_scales, scale):
    """Puts an integer bias on `input_scale * scale` instead of per-channel scales."""
    quant = bias.quantization
    buffer = flatbuffer.buffer(bias)
    if quant is None or buffer.data is None or len(quant.scale) < 2:
        return
    dtype = _bias_dtype(bias)
    input_scale = np.asarray(quant.scale, np.float64) / channel_scales
    real = np.asarray(buffer.data, np.uint8).view(dtype) * np.asarray(quant.scale)
    new_scale = float(input_scale[0] * scale)
    buffer.data = np.round(real / new_scale).astype(dtype).view(np.uint8)
    quant.scale, quant.zeroPoint, quant.quantizedDimension = (
        [new_scale], [0], 0
    )
