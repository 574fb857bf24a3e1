"""How each Keras linear layer exposes its kernels and computes its op.

A `LinearOp` lets `QuantizedLinear` run a Conv/Dense-like layer with kernels
of its choosing (BN-folded, fake-quantized, or export constants) without
calling the layer itself, and says along which axes each kernel gets one
scale, so that the scales are the ones the TFLite kernel uses (per output
channel for CONV_2D, FULLY_CONNECTED, DEPTHWISE_CONV_2D and TRANSPOSE_CONV).
"""

import re

import numpy as np
from keras import ops

from qat_plugin.errors import UnsupportedLayerError


def channel_vector(vector, rank, axis):
    """Shapes a per-channel `vector` to broadcast along `axis` of a rank-`rank` tensor.

    Examples:
        >>> import numpy as np
        >>> tuple(channel_vector(np.ones(3), 4, 1).shape)
        (1, 3, 1, 1)
    """
    axis = axis % rank
    if axis == rank - 1:
        return vector
    shape = [1] * rank
    shape[axis] = -1
    return ops.reshape(vector, shape)


def _depthwise(layer, inputs, kernel):
    """The depthwise convolution of a (separable) depthwise layer."""
    return ops.depthwise_conv(
        inputs,
        kernel,
        strides=layer.strides,
        padding=layer.padding,
        dilation_rate=layer.dilation_rate,
        data_format=layer.data_format,
    )


class LinearOp:
    """Base: one kernel named `kernel`, output channels on the last axis."""

    kernel_names = ("kernel",)
    # Index (in `kernel_names`) of the kernel a following BatchNorm folds into.
    fold_index = 0

    # Trailing kernel axes that index output channels, per kernel.
    channel_axes = (1,)

    def reduce_axes(self, kernel_index, kernel_rank, per_channel):
        """Axes of kernel `kernel_index` that share one scale."""
        if not per_channel:
            return tuple(range(kernel_rank))
        return tuple(range(kernel_rank - self.channel_axes[kernel_index]))

    def fold(self, layer, kernel, channel_scale):
        """Multiplies the fold kernel by a per-output-channel scale."""
        return kernel * channel_scale

    def channel_axis(self, layer):
        """The output channel axis of the op's result."""
        if getattr(layer, "data_format", "channels_last") == "channels_first":
            return 1
        return -1

    def check(self, layer):
        """Raises `UnsupportedLayerError` where `layer` has no int8 TFLite op."""

    def for_layer(self, layer):
        """The op for one layer (one whose axes depend on the layer binds to it)."""
        self.check(layer)
        return self

    def bias(self, layer):
        """The layer's bias variable, or None."""
        return layer.bias if layer.use_bias else None

    def splits_activation(self, layer, batch_norm, activation):
        """True when the TFLite op cannot fuse `activation`: it is an op of its own."""
        return False

    def export_bias(self, bias, activation):
        """The bias constant the export writes (NumPy)."""
        return bias

    def apply(self, layer, inputs, kernels, quantize_intermediate):
        """Computes the op without bias and activation."""
        raise NotImplementedError

    def restore_rank(self, layer, outputs):
        """The layer's output from the op's (after the output fake-quant)."""
        return outputs

    def add_channel_vector(self, layer, x, vector):
        """Adds a per-output-channel vector (a bias) to the op's result."""
        return x + channel_vector(vector, len(x.shape), self.channel_axis(layer))


class DenseOp(LinearOp):
    def channel_axis(self, layer):
        return -1

    def apply(self, layer, inputs, kernels, quantize_intermediate):
        if len(inputs.shape) > 2:
            # Measured (TF 2.21): a matmul of a sequence lowers through
            # tensordot's dynamic RESHAPE, and the converter leaves the bias
            # ADD after it, with the FULLY_CONNECTED, in float; this einsum
            # lowers to FULLY_CONNECTED with the bias folded in.
            return ops.einsum("...i,io->...o", inputs, kernels[0])
        return ops.matmul(inputs, kernels[0])


def _as_conv_2d(layer):
    """True for a Conv1D computed as the CONV_2D it exports as (see ConvOp)."""
    return (
        layer.rank == 1 and layer.groups == 1
        and getattr(layer, "data_format", "channels_last") == "channels_last"
    )


class ConvOp(LinearOp):
    """Conv1D/2D/3D; a Conv1D computes as CONV_2D on `[N, 1, W, C]`.

    TFLite runs a Conv1D as EXPAND_DIMS, CONV_2D, RESHAPE. Its output
    fake-quant sits on the 4-D CONV_2D output, before the squeeze, as in
    the converter's PTQ graph: the converter then moves the squeezes of a
    residual ADD's two inputs past the ADD (one RESHAPE, as PTQ); a
    fake-quant after the squeeze blocks that move (a RESHAPE more per
    residual block).
    """

    def apply(self, layer, inputs, kernels, quantize_intermediate):
        padding = layer.padding
        if padding == "causal":
            inputs = ops.pad(inputs, layer._compute_causal_padding())
            padding = "valid"
        if layer.groups > 1:
            return layer.convolution_op(inputs, kernels[0])
        if _as_conv_2d(layer):
            return ops.conv(
                ops.expand_dims(inputs, 1),
                ops.expand_dims(kernels[0], 0),
                strides=[1, layer.strides[0]],
                padding=padding,
                dilation_rate=[1, layer.dilation_rate[0]],
                data_format="channels_last",
            )
        return ops.conv(
            inputs,
            kernels[0],
            strides=list(layer.strides),
            padding=padding,
            dilation_rate=layer.dilation_rate,
            data_format=layer.data_format,
        )

    def restore_rank(self, layer, outputs):
        return ops.squeeze(outputs, 1) if _as_conv_2d(layer) else outputs


class DepthwiseConvOp(LinearOp):
    """Depthwise kernels `[*k, in, multiplier]`: one scale per (in, m)."""

    channel_axes = (2,)

    def fold(self, layer, kernel, channel_scale):
        return kernel * ops.reshape(channel_scale, kernel.shape[-2:])

    def apply(self, layer, inputs, kernels, quantize_intermediate):
        return _depthwise(layer, inputs, kernels[0])


class SeparableConvOp(LinearOp):
    """Depthwise then pointwise; the tensor between them is int8 on device.

    The converter splits a separable convolution into DEPTHWISE_CONV_2D and
    CONV_2D, so the intermediate tensor gets a fake-quant of its own.
    """

    kernel_names = ("depthwise_kernel", "pointwise_kernel")
    fold_index = 1
    channel_axes = (2, 1)

    def apply(self, layer, inputs, kernels, quantize_intermediate):
        depthwise = quantize_intermediate(_depthwise(layer, inputs, kernels[0]))
        return ops.conv(
            depthwise,
            kernels[1],
            strides=1,
            padding="valid",
            data_format=layer.data_format,
        )


class TransposedConvOp(LinearOp):
    """Transposed kernels `[*k, out, in]`: one scale per output channel (axis -2).

    TRANSPOSE_CONV stores its filter as `[out, *k, in]` with per-channel
    scales on dimension 0, Keras' output-channel axis -2. The converter
    lowers a Conv1DTranspose to it through EXPAND_DIMS / RESHAPE, as the
    float layer's own `keras.ops.conv_transpose` does. A ReLU/ReLU6 fuses
    only where there is a bias (`splits_activation`).

    Examples:
        >>> TransposedConvOp().reduce_axes(0, 4, per_channel=True)
        (0, 1, 3)
    """

    def reduce_axes(self, kernel_index, kernel_rank, per_channel):
        if not per_channel:
            return tuple(range(kernel_rank))
        return tuple(i for i in range(kernel_rank) if i != kernel_rank - 2)

    def fold(self, layer, kernel, channel_scale):
        return kernel * ops.reshape(channel_scale, (-1, 1))

    def splits_activation(self, layer, batch_norm, activation):
        # Measured (TF 2.21): the converter fuses RELU/RELU6 into
        # TRANSPOSE_CONV only through a bias add; without a bias (nor a
        # folded BatchNorm, which brings one) RELU stays an op of its own.
        return activation != "linear" and batch_norm is None and not layer.use_bias

    def export_bias(self, bias, activation):
        if activation == "linear" or np.any(bias != 0):
            return bias
        # The converter drops an all-zero bias add, and RELU with it stays
        # unfused, float (measured). The smallest normal float32 on one
        # channel keeps the add; it is an int32 zero in the .tflite.
        bias = bias.copy()
        bias.flat[-1] = np.finfo(np.float32).tiny
        return bias

    def check(self, layer):
        # Measured (TF 2.21): a dilated or channels_first transposed conv
        # leaves Conv2DBackpropInput / DataFormatVecPermute, which have no
        # builtin kernel; the converter's own PTQ fails on them too.
        reason = None
        if any(rate != 1 for rate in layer.dilation_rate):
            reason = f"dilation_rate {tuple(layer.dilation_rate)}"
        elif layer.data_format == "channels_first":
            reason = "data_format 'channels_first'"
        if reason is not None:
            raise UnsupportedLayerError(
                f"Layer '{layer.name}' ({type(layer).__name__} with {reason}) "
                "has no TFLite builtin kernel: the converter leaves a TensorFlow "
                "op (Conv2DBackpropInput or DataFormatVecPermute), and its own "
                "int8 PTQ fails on it too. Use dilation_rate 1 and channels_last, "
                f"or keep it in float with quantize_model(..., skip=['{layer.name}'])"
                " and export_tflite(..., allow_select_tf_ops=True) (Flex ops)."
            )

    def apply(self, layer, inputs, kernels, quantize_intermediate):
        return ops.conv_transpose(
            inputs,
            kernels[0],
            strides=list(layer.strides),
            padding=layer.padding,
            output_padding=layer.output_padding,
            dilation_rate=layer.dilation_rate,
            data_format=layer.data_format,
        )


# -- EinsumDense: FULLY_CONNECTED where the equation is a matmul by the kernel


def einsum_parts(equation):
    """Splits an EinsumDense equation into (input, kernel, output) letters.

    A leading `...` on the input and the output is dropped (it only adds
    leading axes); any other shape of equation returns None.

    Examples:
        >>> einsum_parts("...b,bc->...c")
        ('b', 'bc', 'c')
        >>> einsum_parts("abc,cde->abde")
        ('abc', 'cde', 'abde')
    """
    match = re.fullmatch(r"(\.\.\.)?([a-zA-Z]+),([a-zA-Z]+)->(\.\.\.)?([a-zA-Z]+)",
                         equation.replace(" ", ""))
    if match is None or bool(match.group(1)) != bool(match.group(4)):
        return None
    return match.group(2), match.group(3), match.group(5)


def _einsum_mismatch(layer):
    """Why `layer`'s einsum is not one FULLY_CONNECTED op, or None."""
    parts = einsum_parts(layer.equation)
    if parts is None:
        return "an ellipsis other than a leading '...' on input and output"
    inputs, kernel, outputs = parts
    contracted = [a for a in inputs if a in kernel]
    free = [a for a in kernel if a not in inputs]
    kept = [a for a in inputs if a not in kernel]
    if not contracted or not free:
        return "no contracted or no output axis in the kernel"
    if inputs != "".join(kept + contracted):
        return "contracted axes that are not the input's last axes"
    if outputs[:len(kept)] != "".join(kept) or set(outputs[len(kept):]) != set(free) \
            or len(outputs) != len(kept) + len(free):
        return "an output that is not the input's kept axes followed by the kernel's"
    if any(a not in free for a in (layer.bias_axes or "")):
        return f"bias_axes '{layer.bias_axes}' outside the kernel's output axes"
    if getattr(layer, "quantization_mode", None) is not None or layer.lora_enabled:
        return "Keras' own quantization or LoRA enabled"
    return None


class EinsumOp(LinearOp):
    """EinsumDense as FULLY_CONNECTED: one weight scale per kernel output index.

    The converter lowers an einsum `P C, C F -> P F` (the input's last axes
    `C` contracted with the kernel, the kernel's other axes `F` last in the
    output) to RESHAPE / FULLY_CONNECTED / RESHAPE with the kernel as a
    `[prod F, prod C]` matrix, and its PTQ gives it one scale per row, per
    index of `F` (measured, TF 2.21: "abc,cd->abd", "abc,dc->abd",
    "abc,cde->abde", "abcd,cde->abe"). Other equations are refused.
    `for_layer` binds the op to one layer's equation.

    Examples:
        >>> import keras
        >>> layer = keras.layers.EinsumDense("abc,cde->abde", (None, 2, 3))
        >>> EinsumOp().for_layer(layer).reduce_axes(0, 3, per_channel=True)
        (0,)
    """

    def __init__(self, equation=None):
        self.parts = None if equation is None else einsum_parts(equation)

    def for_layer(self, layer):
        self.check(layer)
        return EinsumOp(layer.equation)

    def _kernel_axes(self, contracted):
        inputs, kernel, _ = self.parts
        return tuple(i for i, a in enumerate(kernel) if (a in inputs) == contracted)

    def reduce_axes(self, kernel_index, kernel_rank, per_channel):
        if not per_channel:
            return tuple(range(kernel_rank))
        return self._kernel_axes(contracted=True)

    def fold(self, layer, kernel, channel_scale):
        # A following BatchNormalization normalizes the output's last axis.
        _, kernel_letters, outputs = self.parts or einsum_parts(layer.equation)
        axis = kernel_letters.index(outputs[-1])
        return kernel * channel_vector(channel_scale, len(kernel.shape), axis)

    def channel_axis(self, layer):
        return -1

    def bias(self, layer):
        return layer.bias

    def check(self, layer):
        reason = _einsum_mismatch(layer)
        if reason is not None:
            raise UnsupportedLayerError(
                f"Layer '{layer.name}' (EinsumDense, equation "
                f"'{layer.equation}', bias_axes {layer.bias_axes!r}) has {reason}: "
                "it is not one int8 FULLY_CONNECTED op. Write it as an input's "
                "last axes contracted with the kernel, the kernel's other axes "
                "last in the output (e.g. 'abc,cde->abde', bias on those axes), "
                f"or keep it in float with quantize_model(..., skip=['{layer.name}'])."
            )

    def add_channel_vector(self, layer, x, vector):
        inputs, kernel, outputs = self.parts or einsum_parts(layer.equation)
        free = len(outputs) - len(inputs) + sum(a in kernel for a in inputs)
        if free == 1:
            return x + vector
        # Several output axes: the TFLite einsum is FULLY_CONNECTED then
        # RESHAPE, and a bias added after the RESHAPE would stay a float
        # ADD (measured). Added to the flat FULLY_CONNECTED output, it
        # folds into the op's bias: the reshapes cancel in the converter.
        channels = tuple(x.shape[-free:])
        static = [-1 if d is None else d for d in x.shape]
        shape = static if static.count(-1) <= 1 else ops.shape(x)
        flat = ops.reshape(x, tuple(static[:-free]) + (int(np.prod(channels)),)
                           if static.count(-1) <= 1 else (-1, int(np.prod(channels))))
        flat = flat + ops.reshape(ops.broadcast_to(vector, channels), (-1,))
        return ops.reshape(flat, shape)

    def apply(self, layer, inputs, kernels, quantize_intermediate):
        return ops.einsum(layer.equation, inputs, kernels[0])
