"""The layer registry: how each Keras layer class quantizes.

Every layer in a model is looked up here by its exact class. The policy
says where the int8 TFLite kernel puts its quantization, following the
TFLite 8-bit specification:

- `LINEAR`: Conv/Dense-like; weights quantized per output channel, a
  following BatchNormalization folded in, ReLU/ReLU6 fused, one output
  fake-quant.
- `OUTPUT`: a weightless op with its own output scale (ADD, MUL, MEAN,
  activations): one output fake-quant.
- `SHARED_SCALE`: inputs and output share one scale (CONCATENATION,
  MAXIMUM, MINIMUM): they and every tensor linked to them through
  passthrough ops fake-quantize with one shared range (a `RangeGroup`).
- `PASSTHROUGH`: the output keeps the input's scale and zero point (max
  pooling, reshape, pad, dropout): no fake-quant. Average pooling and
  bilinear upsampling round to that scale: they get a fake-quant with their
  input's range.
- `BATCH_NORM`: a BatchNormalization; folded into the op before it when
  there is one, otherwise a per-channel affine (MUL, ADD).
- `ACTIVATION`: fused into the op before it where TFLite allows, otherwise
  an op with its own (or a fixed) output scale.
- `AFFINE`: Rescaling / Normalization, exported as MUL/ADD/SUB by constants;
  one fake-quant after each of those ops.
- `SCALED_ADD`: `inputs[0] + inputs[1] * scale` (Inception-ResNet's
  CustomScaleLayer): ADD with a fused ReLU; the scale folds into the
  convolution producing `inputs[1]` where it can (as the converter folds
  it), otherwise it is a MUL with its own fake-quant.
- `CHANNEL_SCALE`: a per-channel scale by a weight (ConvNeXt's LayerScale):
  folded into the convolution/Dense before it where it can, otherwise a MUL
  with its own output scale.
- `FLOAT`: no int8 lowering worth having (LayerNormalization: the
  converter's own PTQ leaves a float NEG in it too); kept in float like a
  `skip=` layer, with QUANTIZE/DEQUANTIZE around it.

A `LayerQuantization` (see `register_layer`) declares a custom layer's
weights and output instead of a policy name.

Functional models also record `keras.ops` calls (`x + 3.0`, `ops.relu`) as
graph nodes; their operation classes (from `keras.src.ops`) are registered
here the same way and rebuilt as `OperationLayer`s.
"""

import keras
from keras.src.applications.convnext import LayerScale
from keras.src.applications.inception_resnet_v2 import CustomScaleLayer
from keras.src.ops import nn as _nn_ops
from keras.src.ops import numpy as _numpy_ops

from qat_plugin.layers.custom import LayerQuantization
from qat_plugin.layers.pruned import PrunedLayer

LINEAR = "linear"
OUTPUT = "output"
SHARED_SCALE = "shared_scale"
PASSTHROUGH = "passthrough"
BATCH_NORM = "batch_norm"
ACTIVATION = "activation"
AFFINE = "affine"
SCALED_ADD = "scaled_add"
CHANNEL_SCALE = "channel_scale"
FLOAT = "float"

POLICIES = (
    LINEAR, OUTPUT, SHARED_SCALE, PASSTHROUGH, BATCH_NORM, ACTIVATION, AFFINE,
    SCALED_ADD, CHANNEL_SCALE, FLOAT,
)

# `keras.ops` operations recorded as Functional graph nodes, by activation.
_OP_ACTIVATIONS = {
    _nn_ops.Relu: "relu",
    _nn_ops.Relu6: "relu6",
    _nn_ops.Sigmoid: "sigmoid",
    _nn_ops.Silu: "silu",
    _nn_ops.HardSilu: "hard_silu",
    _nn_ops.HardSigmoid: "hard_sigmoid",
    _nn_ops.Gelu: "gelu",
    _nn_ops.LeakyRelu: "leaky_relu",
    _numpy_ops.Tanh: "tanh",
}

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
            PrunedLayer,  # QuantizedLinear keeps its masks.
        )
    },
    _L.BatchNormalization: BATCH_NORM,
    **{
        cls: ACTIVATION
        for cls in (_L.ReLU, _L.Activation, _L.Softmax, _L.LeakyReLU)
    },
    **{cls: ACTIVATION for cls in _OP_ACTIVATIONS},
    _nn_ops.Softmax: ACTIVATION,
    **{
        cls: OUTPUT
        for cls in (
            _L.Add,
            _L.Subtract,
            _L.Multiply,
            _L.GlobalAveragePooling1D,
            _L.GlobalAveragePooling2D,
            _L.GlobalAveragePooling3D,
            _numpy_ops.Add,
            _numpy_ops.Subtract,
            _numpy_ops.Multiply,
            _numpy_ops.Mean,
        )
    },
    CustomScaleLayer: SCALED_ADD,
    LayerScale: CHANNEL_SCALE,
    _L.Rescaling: AFFINE,
    _L.Normalization: AFFINE,
    _L.LayerNormalization: FLOAT,
    **{
        cls: SHARED_SCALE
        for cls in (
            _L.Concatenate,
            _L.Maximum,
            _L.Minimum,
            _numpy_ops.Concatenate,
            _numpy_ops.Maximum,
            _numpy_ops.Minimum,
        )
    },
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
            _L.Cropping1D,
            _L.Cropping2D,
            _L.Cropping3D,
            _L.UpSampling1D,
            _L.UpSampling2D,
            _L.UpSampling3D,
            _L.Permute,
            _L.RepeatVector,
            _numpy_ops.Reshape,
            _numpy_ops.Transpose,
            _numpy_ops.ExpandDims,
            _numpy_ops.Squeeze,
            _numpy_ops.GetItem,
        )
    },
}


def register_layer(layer_class, policy):
    """Declares how instances of `layer_class` quantize.

    `quantize_model` then handles the layer like a built-in one. Register a
    custom layer whose `call` is one op the int8 TFLite runtime computes in
    int8 (the converter lowers it to a single op, or to a chain it fuses).

    Args:
        layer_class: a Keras layer class (matched exactly, not subclasses).
        policy: a `qat_plugin.LayerQuantization` declaring which weights are
            int8 (and their per-channel axis) and how the output quantizes;
            or a policy name: `"passthrough"` (output keeps the input's int8
            scale: reshapes, pooling), `"output"` (a weightless op with an
            output scale of its own), `"shared_scale"` (inputs and output
            share one scale, like concatenation) or `"float"` (always kept in
            float, with QUANTIZE/DEQUANTIZE around it).

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
    allowed = (PASSTHROUGH, OUTPUT, SHARED_SCALE, FLOAT)
    if not isinstance(policy, LayerQuantization) and policy not in allowed:
        raise ValueError(
            f"register_layer({layer_class.__name__}): policy must be one of "
            f"{list(allowed)} or a qat_plugin.LayerQuantization, got "
            f"{policy!r}."
        )
    _REGISTRY[layer_class] = policy


def policy_for(layer):
    """Returns the registered policy of `layer`'s class, or None.

    A `LayerQuantization` without quantized weights that only passes its
    input's scale through is the `PASSTHROUGH` policy.
    """
    policy = _REGISTRY.get(type(layer))
    if isinstance(policy, LayerQuantization) and policy.passthrough:
        return PASSTHROUGH
    return policy


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
    if isinstance(layer, keras.layers.LeakyReLU):
        return "leaky_relu"
    if isinstance(layer, _nn_ops.Softmax):
        return "softmax" if layer.axis in (-1, [-1], (-1,)) else None
    if type(layer) in _OP_ACTIVATIONS:
        return _OP_ACTIVATIONS[type(layer)]
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
