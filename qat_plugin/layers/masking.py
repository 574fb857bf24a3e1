"""`keras.layers.Masking` as the int8 graph computes it: no op on its output.

Masking outputs `where(mask, x, 0)`; with `mask_value=0` the masked steps
are zeros already, so its output is its input (the SELECT_V2 and the second
REDUCE_ANY the float layer exports are gone). Its mask (NOT_EQUAL,
REDUCE_ANY) reaches the recurrent layers, which select with it.
"""

import keras
from keras import ops

from qat_plugin.errors import UnsupportedLayerError


@keras.saving.register_keras_serializable(package="qat_plugin")
class QuantizedMasking(keras.layers.Layer):
    """A Masking layer with `mask_value=0`: outputs its input, records the mask.

    Examples:
        >>> import numpy as np
        >>> layer = QuantizedMasking()
        >>> x = np.array([[[1.0], [0.0]]], "float32")
        >>> keras.ops.convert_to_numpy(layer.compute_mask(x)).tolist()
        [[True, False]]
    """

    def __init__(self, mask_value=0.0, **kwargs):
        super().__init__(**kwargs)
        if mask_value != 0:
            raise UnsupportedLayerError(
                f"Layer '{self.name}' (Masking) has mask_value={mask_value!r}; "
                "its int8 export replaces the masked steps by zeros only where "
                "they are zeros already. Pad the sequences with 0 and use "
                "Masking(mask_value=0.0)."
            )
        self.mask_value = mask_value
        self.supports_masking = True

    def call(self, inputs):
        return inputs

    def compute_mask(self, inputs, mask=None):
        return ops.any(ops.not_equal(inputs, self.mask_value), axis=-1)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "mask_value": self.mask_value}
