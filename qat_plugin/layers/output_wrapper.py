"""Wraps a weightless layer whose int8 kernel has an output scale of its own."""

import keras

from qat_plugin.layers.base import QuantizedLayer, check_fused_activation


@keras.saving.register_keras_serializable(package="qat_plugin")
class QuantizeOutputWrapper(QuantizedLayer):
    """Runs a layer, its fused activation, then one fake-quant on the output.

    For layers that become one int8 TFLite op with its own output scale and
    no weights to quantize: ADD, MUL, SUB, MEAN (global pooling), the
    activations (RELU, LOGISTIC, SOFTMAX, ...), CONCATENATION, MAXIMUM and
    MINIMUM (whose inputs share this output's `range_group`), average
    pooling and MUL/ADD by a constant (Rescaling).

    Args:
        layer: the wrapped layer.
        activation: `"linear"`, `"relu"` or `"relu6"` fused after the layer
            (TFLite fuses these into ADD, SUB and MUL).
        fixed_range: the output range fixed by the int8 kernel (sigmoid,
            softmax, tanh) instead of an observed one.
        average_divisor: for an average pooling (whose output keeps its
            input's scale), a multiple of every count it divides by: the
            output rounds ties as the kernel does (see
            `quantizers.fake_quant_average`). None for other layers.
        num_bits: activation bit width.
        ema_decay: decay of the range observer.

    Examples:
        >>> import numpy as np
        >>> add = QuantizeOutputWrapper(keras.layers.Add(), activation="relu")
        >>> a = np.array([[1.0, -3.0]], "float32")
        >>> tuple(add([a, a], training=True).shape)
        (1, 2)
    """

    _sublayer_keys = ("layer",)

    def __init__(
        self,
        layer,
        activation="linear",
        fixed_range=None,
        average_divisor=None,
        num_bits=8,
        ema_decay=0.99,
        **kwargs,
    ):
        kwargs.setdefault("name", layer.name)
        super().__init__(num_bits=num_bits, ema_decay=ema_decay, **kwargs)
        check_fused_activation(layer.name, activation)
        self.layer = layer
        self.activation = activation
        self.fixed_range = None if fixed_range is None else tuple(fixed_range)
        self.average_divisor = average_divisor
        self.output_quantizer = self._activation_quantizer(
            "output", self.fixed_range, average_divisor
        )

    def build(self, input_shape):
        if not self.layer.built:
            self.layer.build(input_shape)
        self._build_quantization_state()

    def call(self, inputs, training=False):
        quantize, _, ranges_frozen = self._phase(training)
        outputs = self.layer(inputs)
        return self._finish(outputs, quantize, ranges_frozen, training, self.activation)

    def compute_output_shape(self, input_shape):
        return self.layer.compute_output_shape(input_shape)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "activation": self.activation,
                "average_divisor": self.average_divisor,
                "fixed_range": None
                if self.fixed_range is None
                else list(self.fixed_range),
            }
        )
        return config
