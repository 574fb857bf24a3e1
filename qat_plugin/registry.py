"""The registry of layer kinds: one `LayerSpec` row per Keras layer class.

Every layer in a model is looked up here by its exact class (a subclass
may compute something else in `call`). A row carries everything the engine
knows about the class:

- `policy`: where the int8 TFLite kernel puts its quantization (below);
  `quantize.build` turns each policy into quantized layers through one
  builder function per policy.
- `linear_op`: for Conv/Dense-like layers, how the op computes with
  kernels of the engine's choosing and along which axes each kernel gets
  its scales (`qat_plugin.linear_ops`).
- `folds_output_scale`: a constant scale or shift right after the layer
  (a LayerScale, Inception-ResNet's residual scale, `conv + 3`) folds into
  its kernel and bias, as the converter folds it.
- `folds_input_scale`: a scalar Rescaling right before the layer folds into
  its kernel.
- `averages`: the output keeps the input's scale but rounds to it (average
  pooling, bilinear upsampling): a bool, or a function of the layer.
- `pads_with_zeros`: zero padding, through which a folded input scale
  still reaches the layer after it.
- `fuses_activation`: a following ReLU/ReLU6 fuses into the op.
- `activation`: for activation layers and ops, the activation computed: a
  name, or a function of the layer returning one (None: not a plain one).
- `custom`: a user's `LayerQuantization`, for `register_layer`.

The policies, following the TFLite 8-bit specification:

- `LINEAR`: Conv/Dense-like; weights quantized per output channel, a
  following BatchNormalization folded in, ReLU/ReLU6 fused, one output
  fake-quant.
- `OUTPUT`: a weightless op with its own output scale (ADD, MUL, MEAN):
  one output fake-quant.
- `SHARED_SCALE`: inputs and output share one scale (CONCATENATION,
  MAXIMUM, MINIMUM): they and every tensor linked to them through
  passthrough ops fake-quantize with one shared range (a `RangeGroup`).
- `PASSTHROUGH`: the output keeps the input's scale and zero point (max
  pooling, reshape, pad, dropout): no fake-quant, except for the layers
  that average (a fake-quant with their input's range).
- `BATCH_NORM`: a BatchNormalization; folded into the op before it when
  there is one, otherwise a per-channel affine (MUL, ADD).
- `ACTIVATION`: fused into the op before it where TFLite allows, otherwise
  an op with its own (or a fixed) output scale.
- `AFFINE`: Rescaling / Normalization, exported as MUL/ADD/SUB by
  constants; one fake-quant after each of those ops.
- `SCALED_ADD`: `inputs[0] + inputs[1] * scale` (Inception-ResNet's
  CustomScaleLayer): ADD with a fused ReLU; the scale folds into the
  convolution producing `inputs[1]` where it can, otherwise a MUL.
- `CHANNEL_SCALE`: a per-channel scale by a weight (ConvNeXt's LayerScale):
  folded into the convolution/Dense before it where it can, otherwise a MUL
  with its own output scale.
- `FLOAT`: no int8 lowering worth having (LayerNormalization: the
  converter's own PTQ leaves a float NEG in it too); kept in float like a
  `skip=` layer, with QUANTIZE/DEQUANTIZE around it.
- `CUSTOM`: a user's layer declared with a `LayerQuantization`.

Functional models also record `keras.ops` calls (`x + 3.0`, `ops.relu`) as
graph nodes; their operation classes (from `keras.src.ops`) have rows here
the same way and are rebuilt as `OperationLayer`s.

Adding a layer kind is one row in `_ROWS`, plus one builder function in
`quantize.build` only when it needs a new policy.
"""

import dataclasses

import keras
from keras.src.applications.convnext import LayerScale
from keras.src.applications.inception_resnet_v2 import CustomScaleLayer
from keras.src.ops import nn as nn_ops
from keras.src.ops import numpy as numpy_ops

from qat_plugin.linear_ops import ConvOp, DenseOp, DepthwiseConvOp, LinearOp, SeparableConvOp, TransposedConvOp

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
CUSTOM = "custom"

POLICIES = (
    LINEAR, OUTPUT, SHARED_SCALE, PASSTHROUGH, BATCH_NORM, ACTIVATION, AFFINE,
    SCALED_ADD, CHANNEL_SCALE, FLOAT, CUSTOM,
)
# The policies `register_layer` takes by name.
REGISTRABLE_POLICIES = (PASSTHROUGH, OUTPUT, SHARED_SCALE, FLOAT)


@dataclasses.dataclass(frozen=True)
class LayerQuantization:
    """Declares how a custom layer quantizes; pass it to `register_layer`.

    The layer then becomes one int8 TFLite op (or a chain the converter
    fuses into one): its declared weights are fake-quantized symmetrically
    while it runs, and its output gets one fake-quant, unless it keeps its
    input's scale (`passthrough`) or has a fixed output range.

    Attributes:
        weights: `{attribute name: axis}` for each weight the int8 kernel
            stores as int8: `axis` is the per-channel axis (one scale per
            index along it, e.g. `-1` for a `[in, out]` kernel), or None for
            one scale per tensor. Weights not listed stay float in training
            (biases: the converter makes them int32 itself).
        quantize_output: give the output its own observed int8 range.
        passthrough: the output keeps the input's scale and zero point
            (reshapes, slicing, max pooling); implies no output fake-quant.
        fixed_output_range: `(min, max)` the int8 kernel fixes for the
            output (e.g. `(0.0, 255 / 256)` for a sigmoid-like output).

    Examples:
        >>> import keras, qat_plugin
        >>> @keras.saving.register_keras_serializable(package="doc")
        ... class Scale(keras.layers.Layer):
        ...     def build(self, input_shape):
        ...         self.kernel = self.add_weight(shape=(input_shape[-1],))
        ...     def call(self, x):
        ...         return x * self.kernel
        >>> qat_plugin.register_layer(
        ...     Scale, qat_plugin.LayerQuantization(weights={"kernel": None}))
        >>> model = keras.Sequential([keras.Input((3,)), Scale()])
        >>> [type(l).__name__ for l in qat_plugin.quantize_model(model).layers][1:]
        ['FakeQuant', 'QuantizedCustomLayer']
    """

    weights: dict = dataclasses.field(default_factory=dict)
    quantize_output: bool = True
    passthrough: bool = False
    fixed_output_range: tuple = None

    def __post_init__(self):
        if not isinstance(self.weights, dict) or not all(
            isinstance(k, str) and (v is None or isinstance(v, int))
            for k, v in self.weights.items()
        ):
            raise TypeError(
                "LayerQuantization.weights must map weight attribute names to "
                f"a per-channel axis (int) or None, got {self.weights!r}."
            )
        if self.passthrough and (
            self.weights or self.fixed_output_range is not None
        ):
            raise ValueError(
                "LayerQuantization: a passthrough layer keeps its input's "
                "scale, so it can have neither quantized weights nor a fixed "
                "output range."
            )
        if self.fixed_output_range is not None:
            low, high = self.fixed_output_range
            if not low <= 0.0 <= high or low == high:
                raise ValueError(
                    "LayerQuantization.fixed_output_range must contain 0 and "
                    f"be non-empty, got {self.fixed_output_range!r}."
                )

    @property
    def has_output_quantizer(self):
        return not self.passthrough and (
            self.quantize_output or self.fixed_output_range is not None
        )


@dataclasses.dataclass(frozen=True)
class LayerSpec:
    """Everything the engine knows about one layer class (see the module doc)."""

    policy: str
    linear_op: LinearOp = None
    folds_output_scale: bool = False
    folds_input_scale: bool = False
    averages: object = False
    pads_with_zeros: bool = False
    fuses_activation: bool = False
    activation: object = None
    custom: LayerQuantization = None

    def __post_init__(self):
        if self.policy not in POLICIES:
            raise ValueError(
                f"LayerSpec: policy must be one of {list(POLICIES)}, got "
                f"{self.policy!r}."
            )
        if (self.policy == LINEAR) != (self.linear_op is not None):
            raise ValueError(
                "LayerSpec: a linear_op goes with policy 'linear', and only "
                f"with it (policy {self.policy!r}, linear_op {self.linear_op!r})."
            )
        if (self.policy == CUSTOM) != (self.custom is not None):
            raise ValueError(
                "LayerSpec: a LayerQuantization goes with policy 'custom', and "
                f"only with it (policy {self.policy!r})."
            )
        if (self.policy == ACTIVATION) != (self.activation is not None):
            raise ValueError(
                "LayerSpec: an activation goes with policy 'activation', and "
                f"only with it (policy {self.policy!r})."
            )

    def averages_for(self, layer):
        """True when `layer` rounds its outputs to its input's scale."""
        return self.averages(layer) if callable(self.averages) else self.averages

    def activation_for(self, layer):
        """The name of the activation `layer` computes, or None."""
        if callable(self.activation):
            return self.activation(layer)
        return self.activation


def function_name(activation):
    """Returns the registered name of a Keras activation function."""
    if activation is None:
        return "linear"
    name = keras.activations.serialize(activation)
    if isinstance(name, dict):
        name = name.get("config", name.get("class_name"))
    return name if isinstance(name, str) else None


def _relu_name(layer):
    if float(layer.negative_slope) != 0.0 or float(layer.threshold) != 0.0:
        return None  # A leaky or thresholded ReLU.
    if layer.max_value is None:
        return "relu"
    return "relu6" if float(layer.max_value) == 6.0 else None


def _softmax_name(layer):
    return "softmax" if layer.axis in (-1, [-1], (-1,)) else None


def _bilinear(layer):
    return layer.interpolation != "nearest"


def _rows(classes, **spec):
    return {cls: LayerSpec(**spec) for cls in classes}


_L = keras.layers
_ROWS = {
    # Conv/Dense: a constant scale after the op folds into the kernel only
    # where the kernel's last axis is the output channel axis.
    _L.Dense: LayerSpec(LINEAR, DenseOp(), folds_output_scale=True,
                        folds_input_scale=True, fuses_activation=True),
    **_rows((_L.Conv1D, _L.Conv2D, _L.Conv3D), policy=LINEAR, linear_op=ConvOp(),
            folds_output_scale=True, folds_input_scale=True, fuses_activation=True),
    **_rows((_L.DepthwiseConv1D, _L.DepthwiseConv2D), policy=LINEAR,
            linear_op=DepthwiseConvOp(), folds_input_scale=True, fuses_activation=True),
    **_rows((_L.SeparableConv1D, _L.SeparableConv2D), policy=LINEAR,
            linear_op=SeparableConvOp(), folds_input_scale=True, fuses_activation=True),
    # TRANSPOSE_CONV. CONV_3D_TRANSPOSE is float only: Conv3DTranspose is FLOAT.
    **_rows((_L.Conv1DTranspose, _L.Conv2DTranspose), policy=LINEAR,
            linear_op=TransposedConvOp(), folds_input_scale=True, fuses_activation=True),
    _L.BatchNormalization: LayerSpec(BATCH_NORM, fuses_activation=True),
    _L.ReLU: LayerSpec(ACTIVATION, activation=_relu_name),
    _L.Activation: LayerSpec(ACTIVATION, activation=lambda l: function_name(l.activation)),
    _L.Softmax: LayerSpec(ACTIVATION, activation=_softmax_name),
    _L.LeakyReLU: LayerSpec(ACTIVATION, activation="leaky_relu"),
    # `keras.ops` activations recorded as Functional graph nodes.
    nn_ops.Relu: LayerSpec(ACTIVATION, activation="relu"),
    nn_ops.Relu6: LayerSpec(ACTIVATION, activation="relu6"),
    nn_ops.Sigmoid: LayerSpec(ACTIVATION, activation="sigmoid"),
    nn_ops.Silu: LayerSpec(ACTIVATION, activation="silu"),
    nn_ops.HardSilu: LayerSpec(ACTIVATION, activation="hard_silu"),
    nn_ops.HardSigmoid: LayerSpec(ACTIVATION, activation="hard_sigmoid"),
    nn_ops.Gelu: LayerSpec(ACTIVATION, activation="gelu"),
    nn_ops.LeakyRelu: LayerSpec(ACTIVATION, activation="leaky_relu"),
    numpy_ops.Tanh: LayerSpec(ACTIVATION, activation="tanh"),
    nn_ops.Softmax: LayerSpec(ACTIVATION, activation=_softmax_name),
    # ADD, SUB and MUL take a fused activation; MEAN does not.
    **_rows((_L.Add, _L.Subtract, _L.Multiply, numpy_ops.Add, numpy_ops.Subtract,
             numpy_ops.Multiply), policy=OUTPUT, fuses_activation=True),
    **_rows((_L.GlobalAveragePooling1D, _L.GlobalAveragePooling2D,
             _L.GlobalAveragePooling3D, numpy_ops.Mean), policy=OUTPUT),
    CustomScaleLayer: LayerSpec(SCALED_ADD, fuses_activation=True),
    LayerScale: LayerSpec(CHANNEL_SCALE),
    _L.Rescaling: LayerSpec(AFFINE),
    _L.Normalization: LayerSpec(AFFINE),
    **_rows((_L.LayerNormalization, _L.Conv3DTranspose), policy=FLOAT),
    **_rows((_L.Concatenate, _L.Maximum, _L.Minimum, numpy_ops.Concatenate,
             numpy_ops.Maximum, numpy_ops.Minimum), policy=SHARED_SCALE),
    **_rows((_L.AveragePooling1D, _L.AveragePooling2D, _L.AveragePooling3D),
            policy=PASSTHROUGH, averages=True),
    _L.UpSampling2D: LayerSpec(PASSTHROUGH, averages=_bilinear),
    **_rows((_L.ZeroPadding1D, _L.ZeroPadding2D, _L.ZeroPadding3D),
            policy=PASSTHROUGH, pads_with_zeros=True),
    **_rows((
        _L.MaxPooling1D, _L.MaxPooling2D, _L.MaxPooling3D,
        _L.GlobalMaxPooling1D, _L.GlobalMaxPooling2D, _L.GlobalMaxPooling3D,
        _L.Flatten, _L.Reshape, _L.Dropout, _L.SpatialDropout1D,
        _L.SpatialDropout2D, _L.SpatialDropout3D, _L.GaussianNoise,
        _L.GaussianDropout, _L.Identity, _L.Cropping1D, _L.Cropping2D,
        _L.Cropping3D, _L.UpSampling1D, _L.UpSampling3D, _L.Permute,
        _L.RepeatVector, numpy_ops.Reshape, numpy_ops.Transpose,
        numpy_ops.ExpandDims, numpy_ops.Squeeze, numpy_ops.GetItem,
        # SPLIT, REDUCE_MAX and REDUCE_MIN keep their input's scale.
        numpy_ops.Split, numpy_ops.Max, numpy_ops.Min,
    ), policy=PASSTHROUGH),
}


def register_layer(layer_class, policy):
    """Declares how instances of `layer_class` quantize.

    `quantize_model` then handles the layer like a built-in one: the class
    gets a row in the registry, as the built-in classes have. Register a
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

    Examples:
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
    if isinstance(policy, LayerQuantization):
        spec = (LayerSpec(PASSTHROUGH) if policy.passthrough
                else LayerSpec(CUSTOM, custom=policy))
    elif policy in REGISTRABLE_POLICIES:
        spec = LayerSpec(policy)
    else:
        raise ValueError(
            f"register_layer({layer_class.__name__}): policy must be one of "
            f"{list(REGISTRABLE_POLICIES)} or a qat_plugin.LayerQuantization, "
            f"got {policy!r}."
        )
    if spec.policy == PASSTHROUGH:
        # A subclass of an averaging or padding layer still averages or pads.
        base = next((_ROWS[cls] for cls in layer_class.__mro__[1:] if cls in _ROWS), None)
        if base is not None and base.policy == PASSTHROUGH:
            spec = dataclasses.replace(spec, averages=base.averages,
                                       pads_with_zeros=base.pads_with_zeros)
    _ROWS[layer_class] = spec


def spec_for(layer):
    """Returns the `LayerSpec` of `layer`'s class, or None.

    A wrapper that quantizes as the layer it wraps (a `PrunedLayer`) says so
    with a `quantizes_as` attribute; it gets that layer's row, without the
    scale folds (its kernels are masked variables, not plain weights).
    """
    inner = getattr(layer, "quantizes_as", None)
    if inner is not None:
        spec = _ROWS.get(type(inner))
        if spec is None:
            return None
        return dataclasses.replace(spec, folds_output_scale=False,
                                   folds_input_scale=False)
    return _ROWS.get(type(layer))


def policy_for(layer):
    """Returns the policy of `layer`'s class, or None where it has no row."""
    spec = spec_for(layer)
    return None if spec is None else spec.policy


def linear_op_for(layer):
    """Returns the `LinearOp` of a Conv/Dense-like layer's class, or None."""
    spec = _ROWS.get(type(layer))
    return None if spec is None else spec.linear_op


def linear_class_names():
    """The names of the Conv/Dense-like classes (the ones with kernels)."""
    return sorted(cls.__name__ for cls, spec in _ROWS.items() if spec.linear_op)


def activation_name(layer):
    """Returns the name of the activation an activation layer computes.

    `"relu"`, `"relu6"`, `"softmax"`, `"sigmoid"`, ... or None where the
    layer is not a plain activation (a leaky or thresholded ReLU, a softmax
    over another axis) or not an activation layer at all.
    """
    spec = spec_for(layer)
    return None if spec is None else spec.activation_for(layer)
