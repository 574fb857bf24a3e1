"""Vision-transformer patch embeddings (keras-hub's ViT and DeiT) in int8.

keras-hub's `ViTPatchingAndEmbedding` and `DeiTEmbeddings` compute

    patches = RESHAPE(CONV_2D(image))             one vector per patch
    x = CONCATENATION([tokens, patches])          class (and distillation) token
    y = ADD(x, positions)                         a constant position table

The converter's PTQ of that graph (measured, TF 2.21) stores the conv
kernel int8 per output channel, gives the conv output, the tiled tokens
and the CONCATENATION one shared scale (the tokens are int8 constants on
that grid), stores the position table int8 per tensor over its own range
(asymmetric, as a GATHER table) and gives the ADD an output scale of its
own. `QuantizedPatchEmbedding` fake-quantizes exactly there: the kernel as
`QuantizedLinear` does, the concatenation once (in export the conv output
and the tokens each with that one range), the table over its own range
(`quantizers.fake_quant_table`, as a GATHER table) and the sum.

keras-hub's layers do not rebuild from their own config (ViT's
`get_config` holds `num_patches`, which `__init__` refuses, and drops
`use_patch_bias`), so the quantized layer wraps `PatchEmbedding`, a float
layer of this module holding the same weights, made by
`patch_embedding_like`.
"""

import keras
import numpy as np
from keras import ops

from qat_plugin.errors import UnsupportedLayerError
from qat_plugin.layers.base import QuantizedLayer
from qat_plugin.layers.modes import is_exporting
from qat_plugin.quantizers import fake_quant_table, fake_quant_weight, select
from qat_plugin.registry import linear_op_for


def _pair(value):
    return tuple(value) if isinstance(value, (list, tuple)) else (value, value)


@keras.saving.register_keras_serializable(package="qat_plugin")
class PatchEmbedding(keras.layers.Layer):
    """A float patch embedding: convolution, leading tokens, position table.

    Computes `concat([tokens, reshape(conv(x))], axis=1) + positions`
    (channels last), what keras-hub's ViT and DeiT embedding layers compute
    in inference, with a config that rebuilds it.

    Args:
        image_size: `(height, width)` of the input image.
        patch_size: `(height, width)` of a patch (the kernel and strides).
        hidden_dim: the embedding width (conv filters).
        num_tokens: learned tokens put before the patches: 0, 1 (ViT's
            class token) or 2 (DeiT's class and distillation tokens).
        use_bias: the convolution has a bias.
        dropout_rate: dropout after the sum, in training (DeiT's).

    Examples:
        >>> import numpy as np
        >>> layer = PatchEmbedding((8, 8), (4, 4), hidden_dim=6, num_tokens=1)
        >>> tuple(layer(np.zeros((2, 8, 8, 3), "float32")).shape)
        (2, 5, 6)
    """

    def __init__(self, image_size, patch_size, hidden_dim, num_tokens=1,
                 use_bias=True, dropout_rate=0.0, **kwargs):
        super().__init__(**kwargs)
        self.image_size = _pair(image_size)
        self.patch_size = _pair(patch_size)
        self.hidden_dim = hidden_dim
        self.num_tokens = num_tokens
        self.use_bias = use_bias
        self.dropout_rate = dropout_rate
        self.num_patches = (self.image_size[0] // self.patch_size[0]) * (
            self.image_size[1] // self.patch_size[1]
        )
        self.num_positions = self.num_patches + num_tokens
        self.dropout = keras.layers.Dropout(dropout_rate, name="dropout")

    def build(self, input_shape):
        self.tokens = (
            self.add_weight(shape=(self.num_tokens, self.hidden_dim),
                            initializer="zeros", name="tokens")
            if self.num_tokens else None
        )
        self.positions = self.add_weight(
            shape=(self.num_positions, self.hidden_dim),
            initializer=keras.initializers.RandomNormal(stddev=0.02),
            name="positions",
        )
        self.conv = keras.layers.Conv2D(
            self.hidden_dim, self.patch_size, strides=self.patch_size,
            padding="valid", use_bias=self.use_bias, name="patch_embedding",
        )
        self.conv.build(input_shape)

    def join(self, patches, tokens):
        """`concat([tokens, patches], axis=1)` for a batch of conv outputs."""
        # A constant shape: one RESHAPE, where keras-hub's reads the batch.
        patches = ops.reshape(patches, (-1, self.num_patches, self.hidden_dim))
        if tokens is None:
            return patches
        tokens = ops.tile(ops.expand_dims(tokens, 0), (ops.shape(patches)[0], 1, 1))
        return ops.concatenate([tokens, patches], axis=1)

    def call(self, inputs, training=False):
        outputs = self.join(self.conv(inputs), self.tokens)
        outputs = outputs + ops.expand_dims(self.positions, 0)
        return self.dropout(outputs, training=training)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self.num_positions, self.hidden_dim)

    def get_config(self):
        config = super().get_config()
        config.update({
            "image_size": list(self.image_size),
            "patch_size": list(self.patch_size),
            "hidden_dim": self.hidden_dim,
            "num_tokens": self.num_tokens,
            "use_bias": self.use_bias,
            "dropout_rate": self.dropout_rate,
        })
        return config


def _tokens_of(layer):
    """The leading token weights of a keras-hub ViT or DeiT embedding layer."""
    if hasattr(layer, "distillation_token"):  # DeiTEmbeddings
        return [layer.class_token, layer.distillation_token]
    return [layer.class_token] if layer.use_class_token else []


def patch_embedding_like(layer):
    """A `PatchEmbedding` computing what keras-hub's `layer` computes, and its weights.

    `layer` is a built `ViTPatchingAndEmbedding` or `DeiTEmbeddings`
    (matched by its attributes: keras-hub stays an optional import). Returns
    `(float_layer, weights)` where `weights()` gives `layer`'s current
    weights in `float_layer`'s `set_weights` order.

    Examples:
        >>> from keras_hub.src.models.vit.vit_layers import ViTPatchingAndEmbedding
        >>> source = ViTPatchingAndEmbedding((8, 8), (4, 4), hidden_dim=6)
        >>> source.build((None, 8, 8, 3))
        >>> copy, weights = patch_embedding_like(source)
        >>> copy.num_tokens, [w.shape for w in weights()]
        (1, [(1, 6), (5, 6), (4, 4, 3, 6), (6,)])
    """
    if getattr(layer, "data_format", "channels_last") != "channels_last":
        raise UnsupportedLayerError(
            f"Layer '{layer.name}' ({type(layer).__name__}): only "
            "data_format='channels_last' is supported; skip it to keep it float."
        )
    conv = layer.patch_embedding
    tokens = _tokens_of(layer)
    copy = PatchEmbedding(
        layer.image_size, layer.patch_size, layer.hidden_dim,
        num_tokens=len(tokens), use_bias=conv.use_bias,
        dropout_rate=getattr(layer, "dropout_rate", 0.0), name=layer.name,
    )

    def weights():
        table = layer.position_embedding
        table = table.embeddings if hasattr(table, "embeddings") else table
        own = [np.concatenate([ops.convert_to_numpy(t).reshape(1, -1) for t in tokens])
               ] if tokens else []
        own.append(ops.convert_to_numpy(table).reshape(copy.num_positions, -1))
        return own + conv.get_weights()

    return copy, weights


@keras.saving.register_keras_serializable(package="qat_plugin")
class QuantizedPatchEmbedding(QuantizedLayer):
    """A patch embedding as int8 CONV_2D, RESHAPE, TILE, CONCATENATION and ADD.

    The conv kernel is fake-quantized symmetrically per output channel (as
    `QuantizedLinear` does); the concatenation of tokens and patches gets
    one fake-quant, so the conv output and the tokens share its scale; the
    position table is on the asymmetric grid of its own range; the sum gets
    the output fake-quant.

    Args:
        layer: a `PatchEmbedding` (see `patch_embedding_like`).
        per_channel: one kernel scale per output channel (True) or per tensor.
        weight_bits: weight bit width.
        num_bits: activation bit width.
        ema_decay: decay of the activation range observers.

    Examples:
        >>> import numpy as np
        >>> layer = QuantizedPatchEmbedding(PatchEmbedding((8, 8), (4, 4), 6))
        >>> x = np.random.default_rng(0).random((2, 8, 8, 3)).astype("float32")
        >>> y = layer(x, training=True)
        >>> [q.name for q in layer.activation_quantizers()], tuple(y.shape)
        (['patches', 'output'], (2, 5, 6))
    """

    _sublayer_keys = ("layer",)

    def __init__(self, layer, per_channel=True, weight_bits=8, num_bits=8,
                 ema_decay=0.99, **kwargs):
        kwargs.setdefault("name", layer.name)
        super().__init__(num_bits=num_bits, ema_decay=ema_decay, **kwargs)
        self.layer = layer
        self.per_channel = per_channel
        self.weight_bits = weight_bits
        self.patches_quantizer = self._activation_quantizer("patches")
        self.output_quantizer = self._activation_quantizer("output")

    def build(self, input_shape):
        if not self.layer.built:
            self.layer.build(input_shape)
        self.linear_op = linear_op_for(self.layer.conv).for_layer(self.layer.conv)
        self._build_quantization_state()

    def activation_quantizers(self):
        return [self.patches_quantizer, self.output_quantizer]

    def _quantized_kernel(self, kernel):
        axes = self.linear_op.reduce_axes(0, len(kernel.shape), self.per_channel)
        return fake_quant_weight(kernel, axes, self.weight_bits)

    def _weights(self):
        layer = self.layer
        tokens = None if layer.tokens is None else ops.convert_to_tensor(layer.tokens)
        bias = ops.convert_to_tensor(layer.conv.bias) if layer.use_bias else None
        return (ops.convert_to_tensor(layer.conv.kernel), bias, tokens,
                ops.convert_to_tensor(layer.positions))

    def export_constants(self):
        kernel, bias, tokens, positions = self._weights()
        return {
            "kernel": ops.convert_to_numpy(self._quantized_kernel(kernel)),
            "bias": None if bias is None else ops.convert_to_numpy(bias),
            "tokens": None if tokens is None else ops.convert_to_numpy(tokens),
            "positions": ops.convert_to_numpy(positions),
        }

    def call(self, inputs, training=False):
        quantize, _, ranges_frozen = self._phase(training)

        def fq(quantizer, x):
            return self._quantize_activation(quantizer, x, quantize, ranges_frozen, training)

        layer = self.layer
        if is_exporting():
            kernel, bias, tokens, positions = (
                None if self._export_constants[key] is None
                else ops.convert_to_tensor(self._export_constants[key])
                for key in ("kernel", "bias", "tokens", "positions")
            )
        else:
            kernel, bias, tokens, positions = self._weights()
            kernel = select(quantize, self._quantized_kernel(kernel), kernel)
        positions = select(quantize, fake_quant_table(positions, self.num_bits), positions)
        patches = self.linear_op.apply(layer.conv, inputs, [kernel], None)
        if bias is not None:
            patches = self.linear_op.add_channel_vector(layer.conv, patches, bias)
        if tokens is None or is_exporting():
            # In export each input of the CONCATENATION carries its range.
            patches = fq(self.patches_quantizer, patches)
            if tokens is not None:
                tokens = fq(self.patches_quantizer, tokens)
            joined = layer.join(patches, tokens)
        else:  # The range observed over the tokens and the patches.
            joined = fq(self.patches_quantizer, layer.join(patches, tokens))
        outputs = self._finish(joined + ops.expand_dims(positions, 0), quantize,
                               ranges_frozen, training)
        return layer.dropout(outputs, training=training)

    def compute_output_shape(self, input_shape):
        return self.layer.compute_output_shape(input_shape)

    def get_config(self):
        config = super().get_config()
        config.update({"per_channel": self.per_channel, "weight_bits": self.weight_bits})
        return config
