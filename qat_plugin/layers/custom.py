"""A user's own layer, quantized as its registered `LayerQuantization` says."""

import contextlib

import keras
from keras import ops

from qat_plugin.layers.base import QuantizedLayer
from qat_plugin.layers.modes import is_exporting
from qat_plugin.quantizers import fake_quant_weight


def _reduce_axes(name, shape, axis):
    rank = len(shape)
    if axis is None:
        return tuple(range(rank))
    if not -rank <= axis < rank:
        raise ValueError(
            f"Weight '{name}' has rank {rank}; its per-channel axis {axis} "
            "is out of range."
        )
    return tuple(i for i in range(rank) if i != axis % rank)


@contextlib.contextmanager
def _substituted(layer, values):
    """Points `layer`'s weight attributes at `values` while it runs.

    The attributes are set without Keras' tracking, so the layer's weights
    (and the model's weight list) stay the original variables.
    """
    originals = {name: getattr(layer, name) for name in values}
    try:
        for name, value in values.items():
            object.__setattr__(layer, name, value)
        yield
    finally:
        for name, value in originals.items():
            object.__setattr__(layer, name, value)


@keras.saving.register_keras_serializable(package="qat_plugin")
class QuantizedCustomLayer(QuantizedLayer):
    """Runs a registered custom layer with fake-quantized weights and output.

    While the wrapped layer's `call` runs, each declared weight attribute
    holds the weight snapped to its symmetric int8 grid (a straight-through
    gradient reaches the variable), in export the snapped NumPy constant.
    The layer's `call` must read its weights through those attributes (as
    `self.kernel`), in `keras.ops`, and the attributes must be plain ones
    (not properties, as Keras' own Dense and Conv kernels are: those layers
    are built in).

    Args:
        layer: the custom layer (a fresh copy).
        weights: `{attribute: axis or None}`, see `LayerQuantization`.
        quantize_output: add an observed output fake-quant.
        fixed_output_range: a fixed output range instead.
        weight_bits: weight bit width.
        num_bits: activation bit width.
        ema_decay: decay of the range observer.

    Examples:
        >>> import numpy as np
        >>> class Project(keras.layers.Layer):
        ...     def build(self, input_shape):
        ...         self.kernel = self.add_weight(shape=(input_shape[-1], 2))
        ...     def call(self, x):
        ...         return keras.ops.matmul(x, self.kernel)
        >>> layer = QuantizedCustomLayer(Project(), weights={"kernel": -1})
        >>> tuple(layer(np.ones((1, 3), "float32"), training=True).shape)
        (1, 2)
    """

    _sublayer_keys = ("layer",)

    def __init__(
        self,
        layer,
        weights=None,
        quantize_output=True,
        fixed_output_range=None,
        weight_bits=8,
        num_bits=8,
        ema_decay=0.99,
        **kwargs,
    ):
        kwargs.setdefault("name", layer.name)
        super().__init__(num_bits=num_bits, ema_decay=ema_decay, **kwargs)
        self.layer = layer
        self.weight_axes = dict(weights or {})
        self.quantize_output = quantize_output
        self.fixed_output_range = (
            None if fixed_output_range is None else tuple(fixed_output_range)
        )
        self.weight_bits = weight_bits
        self.output_quantizer = (
            self._activation_quantizer("output", self.fixed_output_range)
            if quantize_output or self.fixed_output_range is not None
            else None
        )

    def build(self, input_shape):
        if not self.layer.built:
            self.layer.build(input_shape)
        for name in self.weight_axes:
            if isinstance(getattr(type(self.layer), name, None), property):
                raise ValueError(
                    f"Layer '{self.layer.name}' ({type(self.layer).__name__}) "
                    f"was registered with quantized weight '{name}', which is "
                    "a property; QuantizedCustomLayer substitutes plain "
                    "attributes only. Store the variable in a plain "
                    "attribute (`self.kernel = self.add_weight(...)`)."
                )
            weight = getattr(self.layer, name, None)
            if not isinstance(weight, keras.Variable):
                raise ValueError(
                    f"Layer '{self.layer.name}' ({type(self.layer).__name__}) "
                    f"was registered with quantized weight '{name}', but after "
                    f"build its attribute '{name}' is "
                    f"{type(weight).__name__}, not a keras.Variable. List the "
                    "attributes the layer stores its weights in."
                )
            _reduce_axes(name, weight.shape, self.weight_axes[name])
        self._build_quantization_state()

    def _quantized_weights(self):
        return {
            name: fake_quant_weight(
                getattr(self.layer, name),
                _reduce_axes(name, getattr(self.layer, name).shape, axis),
                self.weight_bits,
            )
            for name, axis in self.weight_axes.items()
        }

    def export_constants(self):
        return {
            name: ops.convert_to_numpy(value)
            for name, value in self._quantized_weights().items()
        }

    def call(self, inputs, training=False):
        quantize, _, ranges_frozen = self._phase(training)
        if is_exporting():
            values = {
                name: ops.convert_to_tensor(value)
                for name, value in self._export_constants.items()
            }
        else:
            values = {
                # jnp.where does not read Keras variables: pass the value.
                name: ops.where(
                    quantize, q, ops.convert_to_tensor(getattr(self.layer, name))
                )
                for name, q in self._quantized_weights().items()
            }
        with _substituted(self.layer, values):
            outputs = self.layer.call(inputs)
        if self.output_quantizer is None:
            self._advance(training)
            return outputs
        return self._finish(outputs, quantize, ranges_frozen, training)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "weights": dict(self.weight_axes),
                "quantize_output": self.quantize_output,
                "fixed_output_range": None
                if self.fixed_output_range is None
                else list(self.fixed_output_range),
                "weight_bits": self.weight_bits,
            }
        )
        return config
