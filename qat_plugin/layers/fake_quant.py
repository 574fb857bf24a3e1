"""A standalone activation fake-quant: model inputs, float-island outputs."""

import keras

from qat_plugin.layers.base import QuantizedLayer


@keras.saving.register_keras_serializable(package="qat_plugin")
class FakeQuant(QuantizedLayer):
    """Observes its input's range and fake-quantizes it to int8.

    `quantize_model` puts one after each model input (its range becomes the
    int8 input's scale and zero point) and after each layer kept in float,
    where the int8 graph resumes.

    Args:
        num_bits: 8 or 16.
        ema_decay: decay of the range observer.
        fixed_range: `(min, max)` to quantize to instead of observing.

    Examples:
        >>> import numpy as np
        >>> layer = FakeQuant()
        >>> _ = layer(np.linspace(-1, 1, 8, dtype="float32")[None], training=True)
        >>> y = layer(np.array([[0.1]], "float32"))
        >>> bool(abs(float(y[0, 0]) - 0.1) < 2 / 255)
        True
    """

    def __init__(self, num_bits=8, ema_decay=0.99, fixed_range=None, **kwargs):
        super().__init__(num_bits=num_bits, ema_decay=ema_decay, **kwargs)
        self.fixed_range = fixed_range
        self.output_quantizer = self._activation_quantizer(
            "output", fixed_range
        )

    def build(self, input_shape):
        self._build_quantization_state()

    def call(self, inputs, training=False):
        quantize, _, ranges_frozen = self._phase(training)
        return self._finish(inputs, quantize, ranges_frozen, training)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config["fixed_range"] = (
            None if self.fixed_range is None else list(self.fixed_range)
        )
        return config
