"""MultiHeadAttention and composite layers quantized inside: fully int8.

Real converter and LiteRT, tiny models. Measured here (TF 2.21): the
converter's PTQ of a pre-norm attention block leaves LayerNormalization's
NEG float and has more ops than the QAT export, which quantizes the
attention's projections (FULLY_CONNECTED), its BATCH_MATMULs, the scaling
MUL and SOFTMAX (fixed 1/256 range), all int8.
"""

import keras
import numpy as np
import pytest

import qat_plugin
from qat_plugin.config.constants import NEVER
from qat_plugin.layers import QuantizedDotProductAttention, QuantizedMaskedSoftmax
from qat_plugin.layers.base import quantized_layers
from qat_plugin.range_groups import RangeGroup
from tests.conftest import assert_keras_round_trip, assert_parity

L = keras.layers
STEPS, WIDTH = 6, 8


def sequences(n=48, seed=0):
    return np.random.default_rng(seed).normal(size=(n, STEPS, WIDTH)).astype("float32")


def attention_block(**mha):
    inputs = keras.Input((STEPS, WIDTH))
    h = L.LayerNormalization(name="norm")(inputs)
    a = L.MultiHeadAttention(2, 4, name="mha", **mha)(h, h)
    x = L.Add(name="residual")([inputs, a])
    return keras.Model(inputs, L.Dense(3)(L.GlobalAveragePooling1D()(x)))


def assert_int8(report):
    """No float op and no float<->int8 conversion (token inputs stay int32)."""
    assert not report.float_ops and not report.conversion_ops, report.summary()


def exported(model, x):
    qat = qat_plugin.quantize_model(model)
    qat_plugin.calibrate(qat, x)
    data = qat_plugin.export_tflite(qat)
    ptq = qat_plugin.export_tflite(model, mode="int8", representative_data=x)
    return qat, data, qat_plugin.inspect_tflite(data), qat_plugin.inspect_tflite(ptq)


@pytest.mark.parametrize("dropout", [0.0, 0.1], ids=["dot_product", "einsum"])
def test_attention_block_is_fully_int8_with_fewer_ops_than_ptq(dropout):
    x = sequences()
    qat, data, report, ptq = exported(attention_block(dropout=dropout), x)
    names = [layer.name for layer in qat.layers]
    assert {"mha_query", "mha_key", "mha_value", "mha_attention_output"} <= set(names)
    assert_int8(report)
    assert report.op_counts["BATCH_MATMUL"] == 2
    assert report.op_counts["SOFTMAX"] == 1
    assert "QUANTIZE" not in report.op_counts and "DEQUANTIZE" not in report.op_counts
    assert len(report.ops) <= len(ptq.ops)
    softmax = next(op for op in report.ops if op.name == "SOFTMAX")
    assert softmax.outputs[0].scales == (pytest.approx(1 / 256),)
    assert_parity(qat, data, x)


@pytest.mark.parametrize("dropout, causal", [(0.0, True), (0.1, False)],
                         ids=["dot_product_causal", "einsum_padding"])
def test_attention_with_padding_and_causal_masks_is_int8(dropout, causal):
    inputs = keras.Input((STEPS,), dtype="int32")
    h = L.Embedding(20, WIDTH, mask_zero=True)(inputs)
    a = L.MultiHeadAttention(2, 4, dropout=dropout, name="mha")(
        h, h, use_causal_mask=causal)
    model = keras.Model(inputs, L.Dense(3)(L.Flatten()(a)))
    rng = np.random.default_rng(0)
    ids = rng.integers(1, 20, (48, STEPS)).astype("int32")
    ids[:, -2:] = 0  # Padding.
    qat, data, report, ptq = exported(model, ids)
    assert_int8(report)
    assert "SELECT_V2" in report.op_counts
    assert len(report.ops) <= len(ptq.ops)
    assert_parity(qat, data, ids)
    # Before fake-quant starts, the QAT model is the float model: the
    # masks are applied as Keras applies them.
    for layer in quantized_layers(qat):
        layer.set_qat_schedule([NEVER, NEVER, NEVER])
    np.testing.assert_allclose(qat.predict(ids, verbose=0),
                               model.predict(ids, verbose=0), atol=1e-5)


def test_attention_scores_key_value_dims_and_output_shape():
    inputs = keras.Input((STEPS, WIDTH))
    mha = L.MultiHeadAttention(2, 3, value_dim=5, output_shape=(7,), name="mha")
    out, scores = mha(inputs, inputs, return_attention_scores=True)
    model = keras.Model(inputs, [L.Flatten()(out), L.Flatten()(scores)])
    x = sequences()
    qat, data, report, _ = exported(model, x)
    assert_int8(report)
    assert [tuple(o.shape) for o in qat.outputs] == [(None, STEPS * 7), (None, 2 * STEPS * STEPS)]
    assert_parity(qat, data, x, max_steps=3.0)


def test_dot_product_attention_matches_keras_and_masks_to_zero():
    rng = np.random.default_rng(0)
    q, k, v = (rng.normal(size=(2, 4, 2, 3)).astype("float32") for _ in "qkv")
    mask = np.ones((2, 1, 4, 4), bool)
    mask[..., -1] = False
    layer = QuantizedDotProductAttention(scale=0.5)
    for _ in range(3):  # Ranges observed on the batch.
        y = keras.ops.convert_to_numpy(layer(q, k, v, mask, training=True))
    want = keras.ops.convert_to_numpy(
        keras.ops.dot_product_attention(q, k, v, mask=mask, scale=0.5))
    step = float(np.ptp(want)) / 255
    assert np.abs(y - want).max() < 10 * step
    # The masked key gets probability 0: v[:, -1] has no say.
    v2 = v.copy()
    v2[:, -1] += 100.0
    y2 = keras.ops.convert_to_numpy(layer(q, k, v2, mask))
    assert np.abs(y2 - keras.ops.convert_to_numpy(layer(q, k, v, mask))).max() <= step


def test_masked_softmax_sets_masked_inputs_to_the_range_floor():
    layer = QuantizedMaskedSoftmax(axis=[-1], range_group=RangeGroup("scores"))
    x = np.array([[2.0, 9.0, -6.0, 0.5]], "float32")
    mask = np.array([[True, False, True, True]])
    y = keras.ops.convert_to_numpy(layer(x, mask, training=True))
    reference = np.exp(x - x.max(axis=-1, keepdims=True))
    reference[~mask] = 0.0
    reference /= reference.sum()
    assert y[0, 1] == 0.0
    np.testing.assert_allclose(y, reference, atol=1.5 / 256)


def test_attention_qat_model_round_trips_through_keras_file(tmp_path):
    inputs = keras.Input((STEPS,), dtype="int32")
    h = L.Embedding(20, WIDTH, mask_zero=True)(inputs)
    a = L.MultiHeadAttention(2, 4, name="mha")(h, h)
    model = keras.Model(inputs, L.Dense(3)(L.GlobalAveragePooling1D()(a)))
    ids = np.random.default_rng(0).integers(0, 20, (16, STEPS)).astype("int32")
    qat = qat_plugin.quantize_model(model)
    qat_plugin.calibrate(qat, ids)
    assert_keras_round_trip(qat, ids, tmp_path / "attention.keras")


@keras.saving.register_keras_serializable(package="test_attention")
class FeedForward(L.Layer):
    """A user's composite block: Dense, GELU, Dense, residual, LayerNorm."""

    def __init__(self, width, **kwargs):
        super().__init__(**kwargs)
        self.inner = L.Dense(2 * width, activation="gelu", name="inner")
        self.outer = L.Dense(width, name="outer")
        self.norm = L.LayerNormalization(name="norm")

    def call(self, x):
        return self.norm(x + self.outer(self.inner(x)))

    def get_config(self):
        return {**super().get_config(), "width": self.outer.units}


@keras.saving.register_keras_serializable(package="test_attention")
class OwnScale(L.Layer):
    """A composite layer with a weight of its own, used outside its sublayers."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.dense = L.Dense(WIDTH)

    def build(self, input_shape):
        self.scale = self.add_weight(shape=(WIDTH,), initializer="ones", name="scale")

    def call(self, x):
        return self.dense(x) * self.scale


def test_a_users_composite_block_is_quantized_inside_without_registration():
    inputs = keras.Input((STEPS, WIDTH))
    x = FeedForward(WIDTH, name="ffn_0")(inputs)
    x = FeedForward(WIDTH, name="ffn_1")(x)
    model = keras.Model(inputs, L.Dense(3)(L.GlobalAveragePooling1D()(x)))
    x_data = sequences()
    qat, data, report, ptq = exported(model, x_data)
    names = {layer.name for layer in qat.layers}
    assert {"ffn_0_inner", "ffn_0_outer", "ffn_1_norm"} <= names
    assert_int8(report)
    assert len(report.ops) <= len(ptq.ops)
    assert_parity(qat, data, x_data)
    # Named, the block is kept float as one layer.
    kept = qat_plugin.quantize_model(model, skip=["ffn_1"])
    assert "ffn_1" in {layer.name for layer in kept.layers}


def test_a_composite_layer_with_its_own_weights_is_refused_with_the_reason():
    inputs = keras.Input((STEPS, WIDTH))
    model = keras.Model(inputs, OwnScale(name="scaled")(inputs))
    with pytest.raises(qat_plugin.UnsupportedLayerError,
                       match=r"'scaled'.*composite.*weights outside sublayer calls"):
        qat_plugin.quantize_model(model)


class Classifier(keras.Model):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.block = FeedForward(WIDTH)
        self.pool = L.GlobalAveragePooling1D()
        self.head = L.Dense(3)

    def call(self, x):
        return self.head(self.pool(self.block(x)))


def test_a_subclassed_model_called_on_inputs_is_traced_and_alone_is_refused():
    model = Classifier(name="classifier")
    x = sequences()
    model(x)
    with pytest.raises(qat_plugin.UnsupportedModelError,
                       match=r"'classifier'.*keras.Model\(inputs, model\(inputs\)\)"):
        qat_plugin.quantize_model(model)
    inputs = keras.Input((STEPS, WIDTH))
    wrapped = keras.Model(inputs, model(inputs))
    qat, data, report, ptq = exported(wrapped, x)
    assert_int8(report)
    assert len(report.ops) <= len(ptq.ops)
    assert_parity(qat, data, x)


def test_three_way_add_and_hard_sigmoid_are_int8_chains():
    inputs = keras.Input((STEPS, WIDTH))
    a, b = L.Dense(WIDTH)(inputs), L.Dense(WIDTH)(inputs)
    x = L.Add()([inputs, a, b])
    x = L.Activation("hard_sigmoid")(x)
    model = keras.Model(inputs, L.Dense(3)(L.Flatten()(x)))
    x_data = sequences()
    qat, data, report, ptq = exported(model, x_data)
    assert_int8(report)
    assert report.op_counts["ADD"] == 3 and report.op_counts["MUL"] == 1
    assert len(report.ops) <= len(ptq.ops)
    assert_parity(qat, data, x_data)


def test_attention_over_two_axes_softmax_is_one_int8_softmax():
    """keras.io MobileViT attends over 4-D patches: Keras' softmax over two
    axes is exp(x - logsumexp(x)); merged into one axis it is SOFTMAX."""
    inputs = keras.Input((2, STEPS, WIDTH))
    a = L.MultiHeadAttention(2, 4, dropout=0.1, name="mha")(inputs, inputs)
    model = keras.Model(inputs, L.Dense(3)(L.Flatten()(a)))
    x = np.random.default_rng(0).normal(size=(32, 2, STEPS, WIDTH)).astype("float32")
    qat, data, report, ptq = exported(model, x)
    assert_int8(report)
    assert report.op_counts["SOFTMAX"] == 1 and "EXP" not in report.op_counts
    assert len(report.ops) <= len(ptq.ops)
    assert_parity(qat, data, x)
