"""LayerNormalization as a chain of int8 TFLite ops, each fake-quantized.

The converter's PTQ lowers Keras' `x * inv + (beta - mean * inv)` with a
float NEG between DEQUANTIZE and QUANTIZE (measured, TF 2.21: 12 ops on a
centred, scaled LayerNormalization). Written as

    mean = MEAN(x)                      centred = SUB(x, mean)
    variance = MEAN(SQUARED_DIFFERENCE(x, mean))
    inverse = RSQRT(ADD(variance, epsilon))
    y = ADD(MUL(MUL(centred, inverse), gamma), beta)

every op has an int8 kernel: 9 ops, no float op, no QUANTIZE/DEQUANTIZE.
Each op's output gets a fake-quant of its own, where the int8 kernel
requantizes. `rms_scaling=True` (Keras: `x * rsqrt(var(x) + epsilon) *
gamma`) is MEAN, SQUARED_DIFFERENCE, MEAN, ADD, RSQRT, MUL, MUL.
"""

import keras
from keras import ops

from qat_plugin.layers.base import QuantizedLayer
from qat_plugin.layers.modes import is_exporting

def _squared_difference(x, mean):
    if is_exporting():
        # One int8 SQUARED_DIFFERENCE op (the export always runs on TF).
        import tensorflow as tf

        return tf.math.squared_difference(x, mean)
    return ops.square(x - mean)


@keras.saving.register_keras_serializable(package="qat_plugin")
class QuantizedLayerNormalization(QuantizedLayer):
    """A LayerNormalization computed by int8 TFLite ops, each output fake-quantized.

    A GroupNormalization is the same chain on its input reshaped into
    groups (the converter's PTQ keeps its NEG and SQUARE float).

    Args:
        layer: a fresh copy of the `keras.layers.LayerNormalization` or
            `keras.layers.GroupNormalization`.
        num_bits: activation bit width.
        ema_decay: decay of the activation range observers.

    Examples:
        >>> import numpy as np
        >>> layer = QuantizedLayerNormalization(keras.layers.LayerNormalization())
        >>> x = np.random.default_rng(0).normal(size=(4, 3, 8)).astype("float32")
        >>> y = layer(x, training=True).numpy()
        >>> want = keras.layers.LayerNormalization()(x).numpy()
        >>> [q.name for q in layer.activation_quantizers()][-3:]
        ['normalized', 'scaled', 'output']
        >>> bool(np.abs(y - want).max() < 0.1)
        True
    """

    _sublayer_keys = ("layer",)

    def __init__(self, layer, num_bits=8, ema_decay=0.99, **kwargs):
        kwargs.setdefault("name", layer.name)
        super().__init__(num_bits=num_bits, ema_decay=ema_decay, **kwargs)
        self.layer = layer
        self.rms_scaling = getattr(layer, "rms_scaling", False)  # LayerNormalization's
        # The fake-quantized tensors, in order; the last one is "output".
        stages = ["mean", "squares", "variance", "shifted", "inverse"]
        stages += [] if self.rms_scaling else ["centred"]
        stages += ["normalized"] + (["scaled"] if layer.scale else [])
        stages += ["centre"] if layer.center and not self.rms_scaling else []
        self.stages = stages
        self.quantizers = {
            stage: self._activation_quantizer(
                "output" if stage == stages[-1] else stage
            )
            for stage in stages
        }
        self.output_quantizer = self.quantizers[stages[-1]]

    def build(self, input_shape):
        if not self.layer.built:
            self.layer.build(input_shape)
        self._build_quantization_state()

    def activation_quantizers(self):
        return [self.quantizers[stage] for stage in self.stages]

    def _layout(self, inputs):
        """`(x, axes, vector_shape, restore_shape)`: the tensor normalized over
        `axes`, the shape gamma and beta take against it (None: as they are)
        and the shape to give the result back (None: x's own).

        A GroupNormalization normalizes its input reshaped into groups
        (`[..., groups, channels // groups]`, as Keras computes it; two
        int8 RESHAPEs that keep the scale).
        """
        layer = self.layer
        rank = len(inputs.shape)
        if not isinstance(layer, keras.layers.GroupNormalization):
            axes = sorted(a % rank for a in layer.axis)
            vector = None if axes == [rank - 1] else [
                inputs.shape[a] if a in axes else 1 for a in range(rank)]
            return inputs, axes, vector, None
        axis = layer.axis % rank
        channels = inputs.shape[axis]
        grouped = (list(inputs.shape[1:axis]) + [layer.groups, channels // layer.groups]
                   + list(inputs.shape[axis + 1:]))
        vector = [1] * (len(grouped) + 1)
        vector[axis], vector[axis + 1] = layer.groups, channels // layer.groups
        axes = [a for a in range(1, len(grouped) + 1) if a != axis]
        return (ops.reshape(inputs, [-1] + grouped), axes, vector,
                [-1] + list(inputs.shape[1:]))

    def call(self, inputs, training=False):
        quantize, _, ranges_frozen = self._phase(training)

        def fq(step, x):
            return self._quantize_activation(
                self.quantizers[step], x, quantize, ranges_frozen, training
            )

        layer = self.layer
        inputs, axes, vector_shape, restore_shape = self._layout(inputs)

        def broadcast(weight):
            vector = ops.convert_to_tensor(weight)
            return vector if vector_shape is None else ops.reshape(vector, vector_shape)

        mean = fq("mean", ops.mean(inputs, axis=axes, keepdims=True))
        centred = None if self.rms_scaling else fq("centred", inputs - mean)
        if len(inputs.shape) > 4 and centred is not None:
            # TFLite's int8 SQUARED_DIFFERENCE takes up to 4 dimensions (the
            # converter splits a 5-D one into SUB and a float SQUARE): the
            # grouped input of a GroupNormalization squares its centred
            # values with an int8 MUL.
            squares = fq("squares", centred * centred)
        else:
            squares = fq("squares", _squared_difference(inputs, mean))
        variance = fq("variance", ops.mean(squares, axis=axes, keepdims=True))
        shifted = fq("shifted", variance + layer.epsilon)
        if not is_exporting():
            # A variance below the grid's first step rounds to 0: int8
            # RSQRT then saturates to its output range, where rsqrt(0)
            # would be inf (NaN after the next op); the fake-quant of
            # rsqrt(epsilon) clips to that range the same way.
            shifted = ops.maximum(shifted, max(float(layer.epsilon), 1e-12))
        inverse = fq("inverse", ops.rsqrt(shifted))
        x = inputs if self.rms_scaling else centred
        x = fq("normalized", x * inverse)
        folded = self._export_constants if is_exporting() else {}
        if layer.scale and not folded.get("unit_gamma"):
            x = fq("scaled", x * broadcast(layer.gamma))
        if "centre" in self.stages and not folded.get("zero_beta"):
            x = fq("centre", x + broadcast(layer.beta))
        self._advance(training)
        return x if restore_shape is None else ops.reshape(x, restore_shape)

    def export_constants(self):
        # The converter folds a MUL by ones and an ADD of zeros away (an
        # untrained gamma and beta): the fake-quants around such an op then
        # meet on one tensor, and a RESHAPE after it fails to convert
        # ("same scale constraint"). The export leaves those ops out; their
        # ranges equal their input's (they observe the same values).
        def all_equal(weight, value):
            return not bool(ops.convert_to_numpy(ops.any(ops.not_equal(weight, value))))

        return {
            "unit_gamma": self.layer.scale and all_equal(self.layer.gamma, 1.0),
            "zero_beta": "centre" in self.stages and all_equal(self.layer.beta, 0.0),
        }

    def compute_output_shape(self, input_shape):
        return input_shape
