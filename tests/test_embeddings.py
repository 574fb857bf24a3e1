"""Embeddings: GATHER of an int8 table, as the converter's PTQ.

Real converter and LiteRT, tiny models. Measured here (TF 2.21): PTQ
stores an embedding table as int8 per tensor over its own range
(asymmetric) and GATHER keeps that scale; the token ids stay int32;
keras-hub's PositionEmbedding is an int8 constant through BROADCAST_TO and
TokenAndPositionEmbedding an int8 ADD; ReversibleEmbedding's reverse call
is FULLY_CONNECTED with one weight scale per vocabulary entry.
"""

import keras
import keras_hub
import numpy as np
import pytest

import qat_plugin
from qat_plugin.layers import QuantizedEmbedding, QuantizedTokenAndPositionEmbedding
from tests.conftest import assert_keras_round_trip, assert_parity, qat_fit

L = keras.layers
H = keras_hub.layers
VOCABULARY, LENGTH, DIM = 20, 5, 6


def tokens(n=64, seed=0):
    x = np.random.default_rng(seed).integers(0, VOCABULARY, (n, LENGTH)).astype("int32")
    return x, x.sum(axis=1) % 4


def embedding():
    inputs = keras.Input((LENGTH,), dtype="int32")
    return inputs, L.Embedding(VOCABULARY, DIM, name="embed")(inputs)


def token_and_position():
    inputs = keras.Input((LENGTH,), dtype="int32")
    return inputs, H.TokenAndPositionEmbedding(VOCABULARY, LENGTH, DIM, name="embed")(inputs)


def position_added():
    inputs = keras.Input((LENGTH,), dtype="int32")
    x = L.Embedding(VOCABULARY, DIM, name="embed")(inputs)
    return inputs, L.Add()([x, H.PositionEmbedding(LENGTH, name="position")(x)])


def reversible(tie_weights):
    def make():
        inputs = keras.Input((LENGTH,), dtype="int32")
        embed = H.ReversibleEmbedding(VOCABULARY, DIM, tie_weights=tie_weights, name="embed")
        x = L.Dense(DIM)(embed(inputs))
        return inputs, embed(x, reverse=True)
    return make


def classifier(make):
    inputs, x = make()
    return keras.Model(inputs, L.Dense(4)(L.Flatten()(x)))


@pytest.mark.tf_only
@pytest.mark.parametrize(
    "make", [embedding, token_and_position, position_added, reversible(True),
             reversible(False)],
    ids=["embedding", "token_and_position", "position", "reverse_tied", "reverse_untied"],
)
def test_embedding_is_int8_as_in_ptq_with_no_more_ops(make):
    model = classifier(make)
    x, y = tokens()
    ptq = qat_plugin.inspect_tflite(
        qat_plugin.export_tflite(model, mode="int8", representative_data=x)
    )
    qat = qat_fit(model, x, y)
    assert isinstance(qat.get_layer("embed"),
                      (QuantizedEmbedding, QuantizedTokenAndPositionEmbedding))
    tflite = qat_plugin.export_tflite(qat)
    report = qat_plugin.inspect_tflite(tflite)
    for exported in (ptq, report):  # int32 ids in, no float op, no conversion
        assert not exported.float_ops and not exported.conversion_ops, exported.summary()
        assert [t.dtype for t in exported.inputs + exported.outputs] == ["int32", "int8"]
    assert len(report.ops) <= len(ptq.ops)
    assert set(report.op_counts) <= set(ptq.op_counts)
    gather = next(op for op in report.ops if op.name == "GATHER" and op.inputs[0].dtype == "int8")
    assert gather.outputs[0].scales == gather.inputs[0].scales  # the table's scale
    assert_parity(qat, tflite, x)


@pytest.mark.tf_only
def test_the_table_is_the_trained_one_on_its_own_int8_grid():
    model = classifier(embedding)
    x, y = tokens()
    qat = qat_fit(model, x, y)
    table = qat.get_layer("embed").layer.embeddings.numpy()
    report = qat_plugin.inspect_tflite(qat_plugin.export_tflite(qat))
    stored = next(op for op in report.ops if op.name == "GATHER").inputs[0]
    low, high = min(table.min(), 0.0), max(table.max(), 0.0)
    assert stored.dtype == "int8" and stored.shape == (VOCABULARY, DIM)
    np.testing.assert_allclose(stored.scales[0], (high - low) / 255, rtol=1e-4)


def test_reverse_logits_use_the_table_as_a_per_row_weight():
    layer = QuantizedEmbedding(H.ReversibleEmbedding(VOCABULARY, DIM), reverse=True)
    ids = np.arange(4, dtype="int32")[None]
    hidden = np.random.default_rng(1).normal(size=(1, 4, DIM)).astype("float32")
    layer(ids, training=True)
    logits = keras.ops.convert_to_numpy(layer(hidden, reverse=True, training=True))
    table = layer.layer.embeddings.numpy()
    scale = np.abs(table).max(axis=1, keepdims=True) / 127
    want = hidden @ (np.round(table / scale) * scale).T
    low, high = [float(v) for v in layer.output_quantizer.current_range()]
    assert logits.shape == (1, 4, VOCABULARY)
    np.testing.assert_allclose(logits, np.clip(want, low, high), atol=(high - low) / 255)


@pytest.mark.parametrize("make", [embedding, token_and_position, reversible(False)])
def test_qat_model_round_trips_through_keras_file(make, tmp_path):
    model = classifier(make)
    x, y = tokens(32)
    qat = qat_fit(model, x, y)
    restored = assert_keras_round_trip(qat, x, tmp_path / "qat.keras")
    assert type(restored.get_layer("embed")) is type(qat.get_layer("embed"))
