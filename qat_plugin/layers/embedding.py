"""Embedding tables quantized as the int8 TFLite kernels store them.

GATHER keeps its table's scale and zero point: the gathered vectors are on
the table's int8 grid, so an embedding has no output fake-quant; its table
is fake-quantized asymmetrically over its own `[min, max]` (the converter's
PTQ does the same, measured: zero points 1, 0, -1 on random tables), and
the token ids stay int32 as in PTQ. keras-hub's `PositionEmbedding` is a
constant table sliced and broadcast to the input's shape (STRIDED_SLICE /
BROADCAST_TO of an int8 constant); `TokenAndPositionEmbedding` adds the two
(an int8 ADD with its own output scale). `ReversibleEmbedding` called with
`reverse=True` is a FULLY_CONNECTED by the (transposed) table: there the
table is a weight, symmetric int8 per vocabulary row, and the logits get
an output fake-quant.
"""

import keras
from keras import ops

from qat_plugin.layers.base import QuantizedLayer
from qat_plugin.layers.modes import is_exporting
from qat_plugin.quantizers import fake_quant_table, fake_quant_weight, select


@keras.saving.register_keras_serializable(package="qat_plugin")
class QuantizedEmbedding(QuantizedLayer):
    """An Embedding, ReversibleEmbedding or PositionEmbedding with an int8 table.

    The table is fake-quantized over its own range (no observer: the table
    is a constant of the export); the output keeps that scale. A
    `ReversibleEmbedding` called with `reverse=True` multiplies by the
    transposed table (or its `reverse_embeddings`) fake-quantized as a
    FULLY_CONNECTED weight, one scale per vocabulary entry, and
    fake-quantizes the logits.

    Args:
        layer: a fresh copy of the `keras.layers.Embedding`,
            `keras.layers.ReversibleEmbedding` (or keras-hub's) or keras-hub
            `PositionEmbedding`.
        num_bits: activation bit width.
        ema_decay: decay of the logits' range observer (reverse calls).
        reverse: the layer is called with `reverse=True` somewhere in the
            model (its logits get an observed range; a ReversibleEmbedding
            only ever called forward, as in BERT, has none to observe).

    Examples:
        >>> import numpy as np
        >>> layer = QuantizedEmbedding(keras.layers.Embedding(10, 4))
        >>> ids = np.array([[1, 2, 3]], "int32")
        >>> y = layer(ids, training=True)
        >>> table = layer.layer.embeddings.numpy()
        >>> step = (table.max() - min(table.min(), 0)) / 255
        >>> bool(np.abs(y.numpy() - table[ids]).max() <= step / 2 + 1e-7)
        True
    """

    _sublayer_keys = ("layer",)

    def __init__(self, layer, num_bits=8, ema_decay=0.99, reverse=False, **kwargs):
        kwargs.setdefault("name", layer.name)
        super().__init__(num_bits=num_bits, ema_decay=ema_decay, **kwargs)
        self.layer = layer
        self.positional = hasattr(layer, "sequence_length")
        self.reverse = bool(reverse)
        self.output_quantizer = (
            self._activation_quantizer("output") if self.reverse else None
        )
        self.supports_masking = layer.supports_masking

    def build(self, input_shape):
        if not self.layer.built:
            self.layer.build(input_shape)
        self._build_quantization_state()

    def _table(self):
        name = "position_embeddings" if self.positional else "embeddings"
        return ops.convert_to_tensor(getattr(self.layer, name))

    def _reverse_kernel(self):
        """The `[vocabulary, dim]` matrix the reverse FULLY_CONNECTED stores."""
        if self.layer.tie_weights:
            return self._table()
        return ops.transpose(ops.convert_to_tensor(self.layer.reverse_embeddings))

    def export_constants(self):
        constants = {"table": ops.convert_to_numpy(self._table())}
        if self.output_quantizer is not None:
            kernel = fake_quant_weight(self._reverse_kernel(), (1,))
            constants["reverse"] = ops.convert_to_numpy(kernel)
        return constants

    def call(self, inputs, reverse=False, start_index=0, training=False):
        quantize, _, ranges_frozen = self._phase(training)
        if reverse:
            if not self.reverse:
                raise ValueError(
                    f"Layer '{self.name}' was quantized without reverse calls; "
                    "quantize the model that calls it with reverse=True."
                )
            if is_exporting():
                kernel = ops.convert_to_tensor(self._export_constants["reverse"])
            else:
                kernel = self._reverse_kernel()
                kernel = select(quantize, fake_quant_weight(kernel, (1,)), kernel)
            logits = ops.matmul(inputs, ops.transpose(kernel))
            return self._finish(logits, quantize, ranges_frozen, training)
        if is_exporting():
            table = ops.convert_to_tensor(self._export_constants["table"])
        else:
            table = self._table()
        table = select(quantize, fake_quant_table(table, self.num_bits), table)
        if self.positional:
            shape = ops.shape(inputs)
            outputs = ops.slice(table, (start_index, 0), (shape[-2], shape[-1]))
            outputs = ops.broadcast_to(outputs, shape)
        else:
            if inputs.dtype not in ("int32", "int64"):
                inputs = ops.cast(inputs, "int32")
            outputs = ops.take(table, inputs, axis=0)
        self._advance(training)
        return outputs

    def compute_mask(self, inputs, mask=None):
        if self.positional or not getattr(self.layer, "mask_zero", False):
            return None
        return ops.not_equal(inputs, 0)

    def get_config(self):
        config = super().get_config()
        config["reverse"] = self.reverse
        return config

    # No compute_output_shape: the shape of a reverse call differs, and
    # Keras infers both by tracing `call`.


@keras.saving.register_keras_serializable(package="qat_plugin")
class QuantizedTokenAndPositionEmbedding(QuantizedLayer):
    """keras-hub's TokenAndPositionEmbedding: GATHER + BROADCAST_TO, then ADD.

    The token and position tables are fake-quantized as `QuantizedEmbedding`
    does; the sum gets one output fake-quant (the int8 ADD's scale).

    Args:
        layer: a fresh copy of the `keras_hub.layers.TokenAndPositionEmbedding`.
        num_bits: activation bit width.
        ema_decay: decay of the output range observer.

    Examples:
        >>> import numpy as np, keras_hub
        >>> layer = QuantizedTokenAndPositionEmbedding(
        ...     keras_hub.layers.TokenAndPositionEmbedding(10, 3, 4))
        >>> tuple(layer(np.array([[1, 2, 3]], "int32"), training=True).shape)
        (1, 3, 4)
    """

    _sublayer_keys = ("layer",)

    def __init__(self, layer, num_bits=8, ema_decay=0.99, **kwargs):
        kwargs.setdefault("name", layer.name)
        super().__init__(num_bits=num_bits, ema_decay=ema_decay, **kwargs)
        self.layer = layer
        self.output_quantizer = self._activation_quantizer("output")

    def build(self, input_shape):
        if not self.layer.built:
            self.layer.build(input_shape)
        self._build_quantization_state()

    def _tables(self):
        return (ops.convert_to_tensor(self.layer.token_embedding.embeddings),
                ops.convert_to_tensor(self.layer.position_embedding.position_embeddings))

    def export_constants(self):
        return {"tables": [ops.convert_to_numpy(t) for t in self._tables()]}

    def call(self, inputs, start_index=0, training=False):
        quantize, _, ranges_frozen = self._phase(training)
        if is_exporting():
            tables = [ops.convert_to_tensor(t) for t in self._export_constants["tables"]]
        else:
            tables = self._tables()
        tokens, positions = (
            select(quantize, fake_quant_table(t, self.num_bits), t) for t in tables
        )
        if inputs.dtype not in ("int32", "int64"):
            inputs = ops.cast(inputs, "int32")
        embedded = ops.take(tokens, inputs, axis=0)
        shape = ops.shape(embedded)
        positions = ops.slice(positions, (start_index, 0), (shape[-2], shape[-1]))
        outputs = embedded + ops.broadcast_to(positions, shape)
        return self._finish(outputs, quantize, ranges_frozen, training)

    def compute_mask(self, inputs, mask=None):
        return self.layer.compute_mask(inputs, mask)

    def compute_output_shape(self, input_shape):
        return self.layer.compute_output_shape(input_shape)
