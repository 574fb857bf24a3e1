"""The layer registry: how each Keras layer class quantizes.

Every layer in a model is looked up here by its exact class. The policy
says where the int8 TFLite kernel puts its quantization, following the
TFLite 8-bit specification:

- `LINEAR`: Conv/Dense-like; weights quantized per output channel, a
  following BatchNormalization folded in, ReLU/ReLU6 fused, one output
  fake-quant.
- `OUTPUT`: a weightless op with its own output scale (ADD, MUL, MEAN,
  activations): one output fake-quant.
- `SHARED_SCALE`: inputs and output share one scale (CONCATENATION): one
  output fake-quant whose range the inputs adopt.
- `PASSTHROUGH`: the output keeps the input's scale and zero point
  (pooling, reshape, pad, dropout): no fake-quant.
- `BATCH_NORM`: a BatchNormalization; folded into the op before it when
  there is one, otherwise a per-channel affine (MUL, ADD).
- `ACTIVATION`: fused into the op before it where TFLite allows, otherwise
  an op with its own (or a fixed) output scale.
"""

import keras

LINEAR = "linear"
OUTPUT = "output"
SHARED_SCALE = "shared_scale"
PASSTHROUGH = "passthrough"
BATCH_NORM = "batch_norm"
ACTIVATION = "activation"

POLICIES = (LINEAR, OUTPUT, SHARED_SCALE, PASSTHROUGH, BATCH_NORM, ACTIVATION)

_L = keras.layers
_REGISTRY = {
    **{
        cls: LINEAR
        for cls in (
            _L.Dense,
            _L.Conv1D,
            _L.Conv2D,
            _L.Conv3D,
            _L.DepthwiseConv1D,
            _L.DepthwiseConv2D,
            _L.SeparableConv1D,
            _L.SeparableConv2D,
        )
    },
    _L.BatchNormalization: BATCH_NORM,
    **{cls: ACTIVATION for cls in (_L.ReLU, _L.Activation, _L.Softmax)},
    **{
        cls: OUTPUT
        for cls in (
            _L.Add,
            _L.Subtract,
            _L.Multiply,
            _L.GlobalAveragePooling1D,
            _L.GlobalAveragePooling2D,
            _L.GlobalAveragePooling3D,
            _L.Rescaling,
        )
    },
    _L.Concatenate: SHARED_SCALE,
    **{
        cls: PASSTHROUGH
        for cls in (
            _L.MaxPooling1D,
            _L.MaxPooling2D,
            _L.MaxPooling3D,
            _L.AveragePooling1D,
            _L.AveragePooling2D,
            _L.AveragePooling3D,
            _L.GlobalMaxPooling1D,
            _L.GlobalMaxPooling2D,
            _L.GlobalMaxPooling3D,
            _L.Flatten,
            _L.Reshape,
            _L.Dropout,
            _L.SpatialDropout1D,
            _L.SpatialDropout2D,
            _L.SpatialDropout3D,
            _L.GaussianNoise,
            _L.GaussianDropout,
            _L.ZeroPadding1D,
            _L.ZeroPadding2D,
            _L.ZeroPadding3D,
            _L.Identity,
        )
    },
}


def register_layer(layer_class, policy):
    """Declares how instances of `layer_class` quantize.

    Args:
        layer_class: a Keras layer class (matched exactly, not subclasses).
        policy: one of `"passthrough"` (output keeps the input's int8
            scale: reshapes, pooling), `"output"` (a weightless op with an
            output scale of its own), `"shared_scale"` (inputs and output
            share one scale, like concatenation).

    Example:

    >>> class Swap(keras.layers.Layer):
    ...     def call(self, x):
    ...         return x[:, ::-1]
    >>> register_layer(Swap, "passthrough")
    >>> policy_for(Swap())
    'passthrough'
    """
    if not (isinstance(layer_class, type) and issubclass(layer_class, keras.layers.Layer)):
        raise TypeError(
            f"register_layer expects a Keras layer class, got {layer_class!r}."
        )
    allowed = (PASSTHROUGH, OUTPUT, SHARED_SCALE)
    if policy not in allowed:
        raise ValueError(
            f"register_layer({layer_class.__name__}): policy must be one of "
            f"{list(allowed)}, got {policy!r}."
        )
    _REGISTRY[layer_class] = policy


def policy_for(layer):
    """Returns the registered policy of `layer`'s class, or None."""
    return _REGISTRY.get(type(layer))


# Activations TFLite fuses into the op before them.
FUSABLE_ACTIVATIONS = ("linear", "relu", "relu6")


def activation_name(layer):
    """Returns the name of the activation an activation layer computes.

    `"relu"`, `"relu6"`, `"softmax"`, `"sigmoid"`, ... or None where the
    layer is not a plain activation (a leaky or thresholded ReLU, a softmax
    over another axis).
    """
    if isinstance(layer, keras.layers.ReLU):
        if float(layer.negative_slope) != 0.0 or float(layer.threshold) != 0.0:
            return None
        if layer.max_value is None:
            return "relu"
        if float(layer.max_value) == 6.0:
            return "relu6"
        return None
    if isinstance(layer, keras.layers.Softmax):
        return "softmax" if layer.axis in (-1, [-1], (-1,)) else None
    if isinstance(layer, keras.layers.Activation):
        return function_name(layer.activation)
    return None


def function_name(activation):
    """Returns the registered name of a Keras activation function."""
    if activation is None:
        return "linear"
    name = keras.activations.serialize(activation)
    if isinstance(name, dict):
        name = name.get("config", name.get("class_name"))
    return name if isinstance(name, str) else None
