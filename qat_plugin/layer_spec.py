"""The row type of the layer registry: `LayerSpec`, its policies, and
`LayerQuantization` for users' own layers.

`qat_plugin.registry` holds one row per Keras layer class. A row carries
everything the engine knows about the class:

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
- `RECURRENT`: LSTM, GRU, SimpleRNN (and Bidirectional of them): unrolled
  over the input's fixed sequence length into int8 FULLY_CONNECTED, ADD,
  MUL, LOGISTIC, TANH ops; a fake-quant at each of those outputs
  (`layers.recurrent`).
- `PRELU`: PReLU, one PRELU op: its alpha int8 with one scale for the
  tensor (as the converter writes it), an output scale of its own.
- `FLOAT`: no int8 lowering worth having (Conv3DTranspose:
  CONV_3D_TRANSPOSE has float kernels only); kept in float like a `skip=`
  layer, with QUANTIZE/DEQUANTIZE around it.
- `CUSTOM`: a user's layer declared with a `LayerQuantization`.
- `EMBEDDING`: an embedding table (Embedding, keras-hub's
  ReversibleEmbedding, PositionEmbedding, TokenAndPositionEmbedding):
  GATHER keeps the table's int8 scale, so the table is fake-quantized over
  its own range and the gathered output has no fake-quant of its own (a
  sum of token and position embeddings has one, a reverse call's logits too).
- `LAYER_NORM`: LayerNormalization as MEAN, SUB, SQUARED_DIFFERENCE, MEAN,
  ADD, RSQRT, MUL, MUL, ADD, all int8, one fake-quant after each
  (`qat_plugin.layers.normalization`); GroupNormalization as the same chain
  between two RESHAPEs into and out of its groups.
- `ATTENTION`: `ops.dot_product_attention` (inside MultiHeadAttention) as
  BATCH_MATMUL, MUL, SOFTMAX, BATCH_MATMUL, all int8, one fake-quant after
  each (`qat_plugin.layers.attention`).
- `PATCH_EMBEDDING`: a vision transformer's patch embedding (keras-hub's
  ViTPatchingAndEmbedding, DeiTEmbeddings) as CONV_2D, RESHAPE, TILE,
  CONCATENATION, ADD, all int8: the kernel per output channel, the conv
  output and the tokens on the CONCATENATION's one scale, the position
  table per tensor over its own range, the sum with its own scale
  (`qat_plugin.layers.patch_embedding`).
"""

import dataclasses

import keras

from qat_plugin.linear_ops import LinearOp

LINEAR = "linear"
OUTPUT = "output"
SHARED_SCALE = "shared_scale"
PASSTHROUGH = "passthrough"
BATCH_NORM = "batch_norm"
ACTIVATION = "activation"
AFFINE = "affine"
SCALED_ADD = "scaled_add"
CHANNEL_SCALE = "channel_scale"
RECURRENT = "recurrent"
PRELU = "prelu"
FLOAT = "float"
CUSTOM = "custom"
EMBEDDING = "embedding"
LAYER_NORM = "layer_norm"
ATTENTION = "attention"
PATCH_EMBEDDING = "patch_embedding"

POLICIES = (
    LINEAR, OUTPUT, SHARED_SCALE, PASSTHROUGH, BATCH_NORM, ACTIVATION, AFFINE,
    SCALED_ADD, CHANNEL_SCALE, RECURRENT, PRELU, FLOAT, CUSTOM,
    EMBEDDING, LAYER_NORM, ATTENTION, PATCH_EMBEDDING,
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
