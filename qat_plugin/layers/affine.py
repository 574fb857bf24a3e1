"""Rescaling and Normalization as the int8 MUL/ADD/SUB ops they export to."""

import keras
import numpy as np
from keras import ops

from qat_plugin.layers.base import QuantizedLayer


def is_constant(value, constant):
    """True when every element of `value` equals `constant`."""
    return bool(np.all(np.asarray(value, dtype="float64") == constant))


@keras.saving.register_keras_serializable(package="qat_plugin")
class QuantizedAffine(QuantizedLayer):
    """A Rescaling or Normalization, one fake-quant after each int8 op.

    The converter exports `Rescaling` as MUL by `scale` then ADD of
    `offset` (no ADD when the offset is 0) and `Normalization` as SUB of the
    mean then MUL by `1 / std` (DIV by a constant becomes MUL). Each of these
    ops has an int8 output with its own scale, so each gets its own
    fake-quant: the tensor between them is int8 on the device too.

    Args:
        layer: the `keras.layers.Rescaling` or `keras.layers.Normalization`
            (not inverted) layer.
        num_bits: activation bit width.
        ema_decay: decay of the range observers.

    Examples:
        >>> import numpy as np
        >>> layer = QuantizedAffine(keras.layers.Rescaling(1 / 127.5, offset=-1))
        >>> y = layer(np.array([[0.0, 255.0]], "float32"), training=True)
        >>> [round(float(v), 1) for v in y[0]]
        [-1.0, 1.0]
    """

    _sublayer_keys = ("layer",)

    def __init__(self, layer, num_bits=8, ema_decay=0.99, **kwargs):
        kwargs.setdefault("name", layer.name)
        super().__init__(num_bits=num_bits, ema_decay=ema_decay, **kwargs)
        if isinstance(layer, keras.layers.Normalization) and layer.invert:
            raise ValueError(
                f"QuantizedAffine cannot quantize '{layer.name}': an inverted "
                "Normalization (invert=True) is not supported; keep it float "
                f"with quantize_model(..., skip=['{layer.name}'])."
            )
        if not isinstance(layer, (keras.layers.Rescaling, keras.layers.Normalization)):
            raise ValueError(
                f"QuantizedAffine wraps Rescaling or Normalization layers, got "
                f"'{layer.name}' of class {type(layer).__name__}."
            )
        self.layer = layer
        self.quantizers = [
            self._activation_quantizer(name) for name in self._step_names()
        ]

    def _step_names(self):
        layer = self.layer
        if isinstance(layer, keras.layers.Rescaling):
            if is_constant(layer.offset, 0.0):
                return ["output"]
            if is_constant(layer.scale, 1.0):
                return ["output"]
            return ["scaled", "output"]
        return ["centered", "output"]

    def build(self, input_shape):
        if not self.layer.built:
            self.layer.build(input_shape)
        self._build_quantization_state()

    def activation_quantizers(self):
        return list(self.quantizers)

    def _steps(self, dtype):
        """The elementwise ops, in order, as functions of the input."""
        layer = self.layer
        if isinstance(layer, keras.layers.Rescaling):
            scale = ops.cast(layer.scale, dtype)
            offset = ops.cast(layer.offset, dtype)
            if is_constant(layer.offset, 0.0):
                return [lambda x: x * scale]
            if is_constant(layer.scale, 1.0):
                return [lambda x: x + offset]
            return [lambda x: x * scale, lambda x: x + offset]
        std = ops.maximum(ops.sqrt(layer.variance), keras.config.epsilon())
        return [lambda x: x - layer.mean, lambda x: x / std]

    def call(self, inputs, training=False):
        quantize, _, ranges_frozen = self._phase(training)
        outputs = ops.cast(inputs, self.compute_dtype)
        for step, quantizer in zip(self._steps(outputs.dtype), self.quantizers):
            outputs = self._quantize_activation(
                quantizer, step(outputs), quantize, ranges_frozen, training
            )
        self._advance(training)
        return outputs

    def compute_output_shape(self, input_shape):
        return input_shape
