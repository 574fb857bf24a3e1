"""Attention inside the int8 graph: dot-product attention and masked softmax.

Keras' `ops.dot_product_attention` (what MultiHeadAttention computes
without dropout) lowers on TensorFlow to

    logits = BATCH_MATMUL(query, key)    scaled = MUL(logits, scale)
    probs = SOFTMAX(scaled)              output = BATCH_MATMUL(probs, value)

(with TRANSPOSE/RESHAPE around the matmuls), all int8: each op's output
gets a fake-quant of its own, SOFTMAX's the fixed 1/256 range.

A mask cannot fill masked logits with a large negative number in int8:
the value is clipped to the tensor's range. Masked positions are
therefore set to the lowest value of the logits' int8 range (SELECT_V2,
which keeps its input's scale): softmax gives them `exp(min - max)`,
which rounds to 0 on the 1/256 output grid once the unmasked logits lie
more than about 5.5 (ln 256) above the range's floor. The QAT model
computes exactly that. (The converter's PTQ of Keras' masked softmax
calibrates the range over the fill value -1e9 itself, which leaves the
unmasked logits no resolution at all.)
"""

import keras
from keras import ops

from qat_plugin.layers.base import QuantizedLayer
from qat_plugin.layers.modes import is_calibrating, is_exporting
from qat_plugin.quantizers import FIXED_RANGES, select

# What Keras' Softmax fills masked float32 inputs with.
_LARGE_NEGATIVE = -1e9
# How far below the largest score the range floor lies, at least, where
# masked scores are set to it: exp(-8) * 256 < 0.5.
_HEADROOM = 8.0


def _headroom(scores):
    """What the range observer of masked scores sees: their min and max, and
    `max - 8`, so the range floor (the masked value) lies at least 8 below
    the largest score: exp(-8) rounds to 0 on SOFTMAX's 1/256 grid."""
    top = ops.max(scores)
    return ops.stack([ops.min(scores), top, top - _HEADROOM])


def masked_softmax(layer, scores_quantizer, probabilities_quantizer, scores, mask,
                   axis, phase, training, quantize_scores=False, zero_float=True):
    """SELECT_V2, SOFTMAX, SELECT_V2 on int8 `scores`, on the grid of
    `scores_quantizer` (fake-quantized here with `quantize_scores`, else
    already), whose range it observes with headroom.

    Masked scores become the range floor; masked probabilities then 0, as
    Keras' Softmax sets them. Before fake-quant starts (`quantize` false)
    this is Keras' float masked softmax, which zeroes the masked
    probabilities (`zero_float`) or, as `ops.dot_product_attention` on
    TensorFlow, does not (a fully masked row is then uniform).
    """
    quantize, ranges_frozen = phase
    quantizing = True if is_exporting() else quantize
    if (training or is_calibrating()) and not is_exporting():
        scores_quantizer.observe(_headroom(scores), ranges_frozen)
    if quantize_scores:
        scores = layer._quantize_activation(
            scores_quantizer, scores, quantize, ranges_frozen, training,
            observe=False)
    mask = ops.cast(mask, "bool")
    low, _ = layer.range_of(scores_quantizer)
    fill = select(quantizing, ops.cast(low, scores.dtype),
                  ops.cast(_LARGE_NEGATIVE, scores.dtype))
    masked = layer._quantize_activation(
        scores_quantizer, ops.where(mask, scores, fill), quantize, ranges_frozen,
        training, observe=False)
    probabilities = layer._quantize_activation(
        probabilities_quantizer, ops.softmax(masked, axis=axis), quantize,
        ranges_frozen, training)
    zeroed = layer._quantize_activation(
        probabilities_quantizer,
        ops.where(mask, probabilities, ops.cast(0.0, probabilities.dtype)),
        quantize, ranges_frozen, training)
    return zeroed if zero_float else select(quantizing, zeroed, probabilities)


def _causal_mask(logits):
    """Lower-triangular `[T, S]` mask of a `[B, N, T, S]` logits tensor."""
    steps, keys = logits.shape[-2], logits.shape[-1]
    return ops.tril(ops.ones((steps, keys), "bool"))


@keras.saving.register_keras_serializable(package="qat_plugin")
class QuantizedDotProductAttention(QuantizedLayer):
    """`ops.dot_product_attention` as int8 BATCH_MATMUL, MUL, SOFTMAX, BATCH_MATMUL.

    Inputs are `[B, T, N, H]` query, `[B, S, N, H]` key and value (already
    int8: the projections' outputs), and an optional boolean mask
    broadcastable to `[B, N, T, S]`.

    Args:
        scale: the factor the logits are multiplied by (None:
            `1 / sqrt(H)`, as Keras).
        is_causal: mask each query from the keys after it.
        num_bits: activation bit width.
        ema_decay: decay of the activation range observers.

    Examples:
        >>> import numpy as np
        >>> rng = np.random.default_rng(0)
        >>> q, k, v = (rng.normal(size=(2, 3, 2, 4)).astype("float32") for _ in "qkv")
        >>> layer = QuantizedDotProductAttention(scale=0.5)
        >>> y = layer(q, k, v, training=True)
        >>> want = keras.ops.dot_product_attention(q, k, v, scale=0.5)
        >>> bool(np.abs(keras.ops.convert_to_numpy(y - want)).max() < 0.1)
        True
        >>> [q.name for q in layer.activation_quantizers()]
        ['logits', 'scaled', 'probabilities', 'output']
    """

    def __init__(self, scale=None, is_causal=False, num_bits=8, ema_decay=0.99,
                 **kwargs):
        super().__init__(num_bits=num_bits, ema_decay=ema_decay, **kwargs)
        self.scale = None if scale is None else float(scale)
        self.is_causal = bool(is_causal)
        self.logits_quantizer = self._activation_quantizer("logits")
        self.scaled_quantizer = self._activation_quantizer("scaled")
        self.probabilities_quantizer = self._activation_quantizer(
            "probabilities", fixed_range=FIXED_RANGES["softmax"]
        )
        self.output_quantizer = self._activation_quantizer("output")

    def build(self, *input_shapes, **kwargs):
        self._build_quantization_state()

    def activation_quantizers(self):
        return [self.logits_quantizer, self.scaled_quantizer,
                self.probabilities_quantizer, self.output_quantizer]

    def call(self, query, key, value, mask=None, training=False):
        quantize, _, ranges_frozen = self._phase(training)

        def fq(quantizer, x, observe=True):
            return self._quantize_activation(
                quantizer, x, quantize, ranges_frozen, training, observe
            )

        scale = self.scale
        if scale is None:
            scale = 1.0 / float(query.shape[-1]) ** 0.5
        logits = fq(self.logits_quantizer, ops.einsum("BTNH,BSNH->BNTS", query, key))
        scaled = logits * ops.cast(scale, logits.dtype)
        if self.is_causal:
            causal = _causal_mask(scaled)
            mask = causal if mask is None else ops.logical_and(
                ops.cast(mask, "bool"), causal)
        if mask is None:
            scaled = fq(self.scaled_quantizer, scaled)
            probabilities = fq(self.probabilities_quantizer,
                               ops.softmax(scaled, axis=-1))
        else:
            probabilities = masked_softmax(
                self, self.scaled_quantizer, self.probabilities_quantizer, scaled,
                mask, -1, (quantize, ranges_frozen), training, quantize_scores=True,
                zero_float=False)
        output = ops.einsum("BNTS,BSNH->BTNH", probabilities, value)
        output = fq(self.output_quantizer, output)
        self._advance(training)
        return output

    def compute_output_spec(self, query, key, value, mask=None, training=False):
        shape = tuple(query.shape[:-1]) + (value.shape[-1],)
        return keras.KerasTensor(shape, query.dtype)

    def get_config(self):
        config = super().get_config()
        config.update({"scale": self.scale, "is_causal": self.is_causal})
        return config


@keras.saving.register_keras_serializable(package="qat_plugin")
class QuantizedMaskedSoftmax(QuantizedLayer):
    """A Softmax with a mask, as int8 SELECT_V2, SOFTMAX, SELECT_V2.

    The masked inputs become the lowest value of the input's int8 range
    (see the module doc); the input's range is read through `range_group`,
    which the producer of the input shares. As in Keras' Softmax, the
    masked outputs are then set to 0.

    Args:
        axis: the softmax axis (-1), or a list of one axis (as
            MultiHeadAttention gives its Softmax).
        range_group: the `RangeGroup` of the input tensor.
        num_bits: activation bit width.
        ema_decay: decay of the activation range observers.

    Examples:
        >>> import numpy as np
        >>> from qat_plugin.range_groups import RangeGroup
        >>> layer = QuantizedMaskedSoftmax(range_group=RangeGroup("scores"))
        >>> x = np.array([[1.0, 8.0, -2.0]], "float32")
        >>> mask = np.array([[True, False, True]])
        >>> y = keras.ops.convert_to_numpy(layer(x, mask, training=True))
        >>> float(y[0, 1]), bool(y[0, 0] > y[0, 2])
        (0.0, True)
    """

    def __init__(self, axis=-1, num_bits=8, ema_decay=0.99, **kwargs):
        super().__init__(num_bits=num_bits, ema_decay=ema_decay, **kwargs)
        if isinstance(axis, (list, tuple)):
            if len(axis) != 1:
                raise ValueError(
                    f"QuantizedMaskedSoftmax '{kwargs.get('name')}': SOFTMAX "
                    f"runs over one axis, got axis={axis!r}."
                )
            axis = axis[0]
        self.axis = int(axis)
        # Quantizes with the input's (shared) range: the SELECT_V2 output.
        self.masked_quantizer = self._activation_quantizer("masked", grouped=True)
        self.output_quantizer = self._activation_quantizer(
            "output", fixed_range=FIXED_RANGES["softmax"]
        )

    def build(self, *input_shapes, **kwargs):
        self._build_quantization_state()

    def activation_quantizers(self):
        return [self.masked_quantizer, self.output_quantizer]

    def call(self, inputs, mask, training=False):
        quantize, _, ranges_frozen = self._phase(training)
        # The inputs are on their producer's grid, whose range this shares.
        outputs = masked_softmax(
            self, self.masked_quantizer, self.output_quantizer, inputs, mask,
            self.axis, (quantize, ranges_frozen), training)
        self._advance(training)
        return outputs

    def compute_output_spec(self, inputs, mask, training=False):
        return keras.KerasTensor(inputs.shape, inputs.dtype)

    def get_config(self):
        config = super().get_config()
        config["axis"] = self.axis
        return config
