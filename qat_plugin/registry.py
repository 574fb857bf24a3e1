"""The registry of layer kinds: one `LayerSpec` row per Keras layer class.

Every layer in a model is looked up here by its exact class (a subclass
may compute something else in `call`). A row carries everything the engine
knows about the class; `qat_plugin.layer_spec` describes the fields and the
policies.

Functional models also record `keras.ops` calls (`x + 3.0`, `ops.relu`) as
graph nodes; their operation classes (from `keras.src.ops`) have rows here
the same way and are rebuilt as `OperationLayer`s.

Adding a layer kind is one row in `_ROWS`, plus one builder function in
`quantize.builders` (and a name in `layer_spec.POLICIES`) only when it
needs a new policy.
"""

import dataclasses
import sys
import warnings

import keras
from keras.src.applications.convnext import LayerScale
from keras.src.applications.inception_resnet_v2 import CustomScaleLayer
from keras.src.ops import core as core_ops
from keras.src.ops import image as image_ops
from keras.src.ops import nn as nn_ops
from keras.src.ops import numpy as numpy_ops

from qat_plugin.layer_spec import (
    ACTIVATION, AFFINE, ATTENTION, BATCH_NORM, CHANNEL_SCALE, CUSTOM, EMBEDDING, FLOAT,
    LAYER_NORM, LINEAR, OUTPUT, PASSTHROUGH, PATCH_EMBEDDING, POLICIES, PRELU, RECURRENT,
    REGISTRABLE_POLICIES, SCALED_ADD, SHARED_SCALE, LayerQuantization, LayerSpec,
    function_name,
)
from qat_plugin.linear_ops import (
    ConvOp, DenseOp, DepthwiseConvOp, EinsumOp, SeparableConvOp, TransposedConvOp,
)

__all__ = [
    "ACTIVATION", "AFFINE", "ATTENTION", "BATCH_NORM", "CHANNEL_SCALE", "CUSTOM", "EMBEDDING",
    "FLOAT", "LAYER_NORM", "LINEAR", "OUTPUT", "PASSTHROUGH", "PATCH_EMBEDDING",
    "POLICIES", "PRELU",
    "RECURRENT", "REGISTRABLE_POLICIES",
    "SCALED_ADD", "SHARED_SCALE", "LayerQuantization", "LayerSpec",
    "function_name", "register_layer", "spec_for", "policy_for",
    "linear_op_for", "linear_class_names", "activation_name",
    "holds_registered_activation",
]


def _relu_name(layer):
    if float(layer.negative_slope) != 0.0 or float(layer.threshold) != 0.0:
        return None  # A leaky or thresholded ReLU.
    if layer.max_value is None:
        return "relu"
    return "relu6" if float(layer.max_value) == 6.0 else None


def _softmax_name(layer):
    """SOFTMAX runs over the last axis: -1, or its index (MultiHeadAttention
    gives `(3,)` for its rank-4 scores)."""
    axes = list(layer.axis) if isinstance(layer.axis, (list, tuple)) else [layer.axis]
    if len(axes) != 1:
        return None
    if axes[0] == -1:
        return "softmax"
    nodes = getattr(layer, "_inbound_nodes", [])
    ranks = {len(node.arguments.keras_tensors[0].shape) for node in nodes}
    return "softmax" if ranks == {axes[0] + 1} else None


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
    # MEAN, SUM and REDUCE_PROD have an output scale of their own.
    **_rows((_L.GlobalAveragePooling1D, _L.GlobalAveragePooling2D,
             _L.GlobalAveragePooling3D, numpy_ops.Mean, numpy_ops.Sum,
             numpy_ops.Prod), policy=OUTPUT),
    _L.PReLU: LayerSpec(PRELU),
    CustomScaleLayer: LayerSpec(SCALED_ADD, fuses_activation=True),
    LayerScale: LayerSpec(CHANNEL_SCALE),
    _L.Rescaling: LayerSpec(AFFINE),
    _L.Normalization: LayerSpec(AFFINE),
    # A Lambda whose function traces into keras.ops with rows is inlined as
    # those ops (`quantize.graph`); one that does not stays float.
    **_rows((_L.Conv3DTranspose, _L.Lambda), policy=FLOAT),
    # Unrolled over a fixed sequence length into int8 FULLY_CONNECTED, ADD,
    # MUL, LOGISTIC and TANH ops.
    **_rows((_L.LSTM, _L.GRU, _L.SimpleRNN, _L.Bidirectional), policy=RECURRENT),
    # A mask: Masking's output is its input (mask_value 0: the masked steps
    # are zeros already); the mask it records is NOT_EQUAL then REDUCE_ANY
    # on the int8 input (bool outputs, no scale), read by the recurrent
    # layers' SELECT_V2s.
    **_rows((_L.Masking, numpy_ops.NotEqual, numpy_ops.Any), policy=PASSTHROUGH),
    **_rows((_L.Concatenate, _L.Maximum, _L.Minimum, numpy_ops.Concatenate,
             numpy_ops.Maximum, numpy_ops.Minimum), policy=SHARED_SCALE),
    **_rows((_L.AveragePooling1D, _L.AveragePooling2D, _L.AveragePooling3D),
            policy=PASSTHROUGH, averages=True),
    # RESIZE_BILINEAR / RESIZE_NEAREST_NEIGHBOR keep the input's scale.
    **_rows((_L.UpSampling2D, _L.Resizing, image_ops.Resize),
            policy=PASSTHROUGH, averages=_bilinear),
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
    # -- transformer layers --
    # FULLY_CONNECTED for the equations EinsumOp accepts; no constant folds.
    _L.EinsumDense: LayerSpec(LINEAR, EinsumOp(), fuses_activation=True),
    **_rows((_L.Embedding, _L.ReversibleEmbedding), policy=EMBEDDING),
    # All int8 (PTQ leaves a float NEG in it): qat_plugin.layers.normalization.
    # GroupNormalization: the same chain on groups (PTQ: NEG, SQUARE float).
    **_rows((_L.LayerNormalization, _L.GroupNormalization), policy=LAYER_NORM),
    # Inside composite layers (MultiHeadAttention, keras-hub blocks), traced
    # by `quantize.graph`. A matmul of two activations is BATCH_MATMUL, with
    # an output scale of its own.
    **_rows((numpy_ops.Einsum, numpy_ops.Matmul), policy=OUTPUT),
    nn_ops.DotProductAttention: LayerSpec(ATTENTION),
    numpy_ops.Pad: LayerSpec(PASSTHROUGH),
    # Masks: boolean and integer ops, never quantized (as in PTQ); a cast to
    # float of an integer tensor gets a fake-quant, like a float input.
    **_rows((core_ops.Cast, numpy_ops.LogicalAnd, numpy_ops.LogicalOr,
             numpy_ops.LogicalNot, numpy_ops.Equal, numpy_ops.Greater,
             numpy_ops.GreaterEqual, numpy_ops.Less, numpy_ops.LessEqual),
            policy=PASSTHROUGH),
}


def _keras_hub_rows():
    """keras-hub's embedding classes, ViT's and DeiT's patch embeddings and
    its leaf layers, once keras-hub is imported (an optional dependency: a
    model holding its layers has imported it)."""
    if "keras_hub" not in sys.modules or _KERAS_HUB_ADDED:
        return
    from keras_hub.src.layers.modeling.position_embedding import PositionEmbedding
    from keras_hub.src.models.mit.mit_layers import DropPath
    from keras_hub.src.models.whisper.whisper_backbone import Padder
    from keras_hub.src.layers.modeling.reversible_embedding import ReversibleEmbedding
    from keras_hub.src.layers.modeling.token_and_position_embedding import (
        TokenAndPositionEmbedding,
    )
    from keras_hub.src.models.deit.deit_layers import DeiTEmbeddings
    from keras_hub.src.models.vit.vit_layers import ViTPatchingAndEmbedding

    _KERAS_HUB_ADDED.append(True)
    for cls in (PositionEmbedding, ReversibleEmbedding, TokenAndPositionEmbedding):
        _ROWS.setdefault(cls, LayerSpec(EMBEDDING))
    # Stochastic depth: the identity at inference.
    _ROWS.setdefault(DropPath, LayerSpec(PASSTHROUGH))
    # Whisper's one zero row in front of the frames: PAD keeps the scale.
    _ROWS.setdefault(Padder, LayerSpec(PASSTHROUGH, pads_with_zeros=True))
    for cls in (ViTPatchingAndEmbedding, DeiTEmbeddings):
        _ROWS.setdefault(cls, LayerSpec(PATCH_EMBEDDING))


_KERAS_HUB_ADDED = []


def register_layer(layer_class, policy):
    """Declares how instances of `layer_class` quantize.

    `quantize_model` then handles the layer like a built-in one: the class
    gets a row in the registry, as the built-in classes have. Register a
    custom layer whose `call` is one op the int8 TFLite runtime computes in
    int8 (the converter lowers it to a single op, or to a chain it fuses).

    Args:
        layer_class: a Keras layer class (matched exactly, not subclasses),
            or the operation class of a `keras.ops` call a Functional model
            records (these live only under `keras.src.ops`, e.g.
            `keras.src.ops.numpy.Cumsum`; `UnsupportedLayerError` names it).
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
    if not (isinstance(layer_class, type) and issubclass(layer_class, keras.Operation)):
        raise TypeError(
            "register_layer expects a Keras layer class (or a keras.ops "
            f"operation class from keras.src.ops), got {layer_class!r}."
        )
    is_op = not issubclass(layer_class, keras.layers.Layer)
    if is_op and isinstance(policy, LayerQuantization) and not policy.passthrough:
        raise ValueError(
            f"register_layer({layer_class.__name__}): a keras.ops operation "
            "has no weights to declare; give it a policy name "
            f"{list(REGISTRABLE_POLICIES)}."
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


# An `Activation` holding a function Keras does not know by name (a Python
# lambda, a plain function): its config does not rebuild it, so it is kept
# float as the float model's layer itself, or traced like a Lambda
# (`quantize.graph`).
_UNREGISTERED_ACTIVATION = LayerSpec(FLOAT)


def holds_registered_activation(layer):
    """False for an `Activation` whose function Keras does not know by name.

    A Python lambda or a plain function is not a registered Keras
    activation: `keras.activations.get` of its name fails, and so does the
    layer's `from_config(get_config())`.

    Examples:
        >>> holds_registered_activation(keras.layers.Activation("gelu"))
        True
        >>> holds_registered_activation(keras.layers.Activation(lambda t: t * 2.0))
        False
    """
    if type(layer) is not _L.Activation:
        return True
    try:
        with warnings.catch_warnings():  # Keras warns of a lambda.
            warnings.simplefilter("ignore")
            name = function_name(layer.activation)
    except Exception:  # Keras cannot serialize it (no source code).
        return False
    if not isinstance(name, str):
        return False
    try:
        keras.activations.get(name)
    except Exception:  # A function of the user's, not registered.
        return False
    return True


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
    _keras_hub_rows()
    if not holds_registered_activation(layer):
        return _UNREGISTERED_ACTIVATION
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
