"""How each Keras linear layer exposes its kernels and computes its op.

A `LinearOp` lets `QuantizedLinear` run a Conv/Dense-like layer with kernels
of its choosing (BN-folded, fake-quantized, or export constants) without
calling the layer itself, and says along which axes each kernel gets one
scale, so that the scales are the ones the TFLite kernel uses (per output
channel for CONV_2D, FULLY_CONNECTED and DEPTHWISE_CONV_2D).
"""

from keras import ops


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

    def apply(self, layer, inputs, kernels, quantize_intermediate):
        """Computes the op without bias and activation."""
        raise NotImplementedError

    def add_channel_vector(self, layer, x, vector):
        """Adds a per-output-channel vector (a bias) to the op's result."""
        return x + channel_vector(vector, len(x.shape), self.channel_axis(layer))


class DenseOp(LinearOp):
    def channel_axis(self, layer):
        return -1

    def apply(self, layer, inputs, kernels, quantize_intermediate):
        return ops.matmul(inputs, kernels[0])


class ConvOp(LinearOp):
    def apply(self, layer, inputs, kernels, quantize_intermediate):
        padding = layer.padding
        if padding == "causal":
            inputs = ops.pad(inputs, layer._compute_causal_padding())
            padding = "valid"
        if layer.groups > 1:
            return layer.convolution_op(inputs, kernels[0])
        return ops.conv(
            inputs,
            kernels[0],
            strides=list(layer.strides),
            padding=padding,
            dilation_rate=layer.dilation_rate,
            data_format=layer.data_format,
        )


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
