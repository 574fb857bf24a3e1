"""Activations that export to two int8 TFLite ops, each quantized: swish
(SiLU) and hard sigmoid."""

import keras
from keras import ops

from qat_plugin.layers.base import QuantizedLayer
from qat_plugin.quantizers import FIXED_RANGES



@keras.saving.register_keras_serializable(package="qat_plugin")
class QuantizedSwish(QuantizedLayer):
    """`x * sigmoid(x)` with the gate and the product quantized.

    The converter exports swish as LOGISTIC, whose int8 output has the
    fixed range of the int8 kernel (scale 1/256, zero point -128), then MUL
    with an output scale of its own: two int8 tensors, two fake-quants. (The
    activations that are one int8 op, HARD_SWISH, GELU, LOGISTIC, TANH,
    SOFTMAX, are a `QuantizeOutputWrapper` around the activation layer.)

    The input is already int8 (its producer quantized it).

    Args:
        layer: the layer computing swish (an `Activation`, or a recorded
            `keras.ops.silu` call); kept for its name and config, the
            product is computed here to quantize the gate.
        num_bits: activation bit width.
        ema_decay: decay of the range observer.

    Examples:
        >>> import numpy as np
        >>> layer = QuantizedSwish(keras.layers.Activation("silu"))
        >>> y = layer(np.linspace(-4, 4, 9, dtype="float32")[None], training=True)
        >>> tuple(y.shape)
        (1, 9)
    """

    _sublayer_keys = ("layer",)

    def __init__(self, layer, num_bits=8, ema_decay=0.99, **kwargs):
        kwargs.setdefault("name", layer.name)
        super().__init__(num_bits=num_bits, ema_decay=ema_decay, **kwargs)
        self.layer = layer
        self.gate_quantizer = self._activation_quantizer(
            "gate", FIXED_RANGES["sigmoid"]
        )
        self.output_quantizer = self._activation_quantizer("output")

    def build(self, input_shape):
        if not self.layer.built:
            self.layer.build(input_shape)
        self._build_quantization_state()

    def activation_quantizers(self):
        return [self.gate_quantizer, self.output_quantizer]

    def call(self, inputs, training=False):
        quantize, _, ranges_frozen = self._phase(training)
        gate = self._quantize_activation(
            self.gate_quantizer, ops.sigmoid(inputs), quantize, ranges_frozen,
            training,
        )
        return self._finish(inputs * gate, quantize, ranges_frozen, training)

    def compute_output_shape(self, input_shape):
        return input_shape


@keras.saving.register_keras_serializable(package="qat_plugin")
class QuantizedHardSigmoid(QuantizedLayer):
    """`relu6(x + 3) / 6` as int8 ADD (RELU6 fused) then MUL, both quantized.

    TFLite has no HARD_SIGMOID op: the converter lowers Keras'
    `hard_sigmoid` to ADD with a fused RELU6 and MUL by 1/6, each with an
    output scale of its own (keras-hub MobileNetV3's squeeze-and-excite
    gate).

    Args:
        layer: the layer computing hard sigmoid (an `Activation`, or a
            recorded `keras.ops.hard_sigmoid` call); kept for its name and
            config.
        num_bits: activation bit width.
        ema_decay: decay of the range observers.

    Examples:
        >>> import numpy as np
        >>> layer = QuantizedHardSigmoid(keras.layers.Activation("hard_sigmoid"))
        >>> y = layer(np.float32([[-4.0, 0.0, 1.5, 4.0]]), training=True)
        >>> [round(float(v), 2) for v in y[0]]
        [0.0, 0.5, 0.75, 1.0]
    """

    _sublayer_keys = ("layer",)

    def __init__(self, layer, num_bits=8, ema_decay=0.99, **kwargs):
        kwargs.setdefault("name", layer.name)
        super().__init__(num_bits=num_bits, ema_decay=ema_decay, **kwargs)
        self.layer = layer
        self.shifted_quantizer = self._activation_quantizer("shifted")
        self.output_quantizer = self._activation_quantizer("output")

    def build(self, input_shape):
        self._build_quantization_state()

    def activation_quantizers(self):
        return [self.shifted_quantizer, self.output_quantizer]

    def call(self, inputs, training=False):
        quantize, _, ranges_frozen = self._phase(training)
        shifted = self._quantize_activation(
            self.shifted_quantizer, ops.relu6(inputs + 3.0), quantize,
            ranges_frozen, training,
        )
        return self._finish(shifted / 6.0, quantize, ranges_frozen, training)

    def compute_output_shape(self, input_shape):
        return input_shape


# Activations the converter lowers to two int8 ops: their quantized layers.
SPLIT_ACTIVATIONS = {
    "silu": QuantizedSwish,
    "swish": QuantizedSwish,
    "hard_sigmoid": QuantizedHardSigmoid,
}
