"""Recurrent layers (LSTM, GRU, SimpleRNN, Bidirectional) unrolled into int8 ops.

Real converter and LiteRT, tiny models (8 time steps): every kind exports
with no float op, with the op counts of the unrolled steps, and the
interpreter computes what the QAT model computes. The converter's PTQ of
the float model converts through an unrolled clone.
"""

import collections

import keras
import numpy as np
import pytest

import qat_plugin
from qat_plugin.errors import UnsupportedLayerError
from qat_plugin.layers import QuantizedRecurrent
from tests.conftest import assert_keras_round_trip, assert_parity

L = keras.layers
STEPS, FEATURES, UNITS = 4, 3, 4


def sequences(n=64, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, STEPS, FEATURES)).astype("float32")
    y = (x[:, :, 0].sum(axis=1) > 0).astype("int64") + 2 * (x[:, -1, 1] > 0)
    return x, y


def classifier(*layers, flatten=False):
    inputs = keras.Input((STEPS, FEATURES))
    return keras.Model(inputs, head(inputs, *layers, flatten=flatten))


def head(x, *layers, flatten=False):
    for layer in layers:
        x = layer(x)
    if flatten:
        x = L.Flatten()(x)
    return L.Dense(4)(x)


_T = STEPS
# Each kind: its layers, whether its output is a sequence, and its
# FULLY_CONNECTED count: per recurrent layer one input projection per step
# and one recurrent projection per step after the first (the first starts
# from zero states); GRU with reset_after=False projects twice per step.
KINDS = {
    "lstm": (lambda: [L.LSTM(UNITS)], False, 2 * _T - 1),
    "lstm_stacked": (lambda: [L.LSTM(UNITS, return_sequences=True), L.LSTM(UNITS)],
                     False, 2 * (2 * _T - 1)),
    "lstm_sequences_backwards": (
        lambda: [L.LSTM(UNITS, return_sequences=True, go_backwards=True)], True,
        2 * _T - 1),
    "gru": (lambda: [L.GRU(UNITS)], False, 2 * _T - 1),
    "gru_reset_before": (lambda: [L.GRU(UNITS, reset_after=False)], False,
                         _T + 2 * (_T - 1)),
    "simple_rnn_sequences": (lambda: [L.SimpleRNN(UNITS, return_sequences=True)],
                             True, 2 * _T - 1),
    "simple_rnn_relu": (lambda: [L.SimpleRNN(UNITS, activation="relu")], False,
                        2 * _T - 1),
    "bidirectional_lstm_sequences": (
        lambda: [L.Bidirectional(L.LSTM(UNITS, return_sequences=True))], True,
        2 * (2 * _T - 1)),
    "bidirectional_gru": (lambda: [L.Bidirectional(L.GRU(UNITS))], False,
                          2 * (2 * _T - 1)),
}
INT8_OPS = {
    "FULLY_CONNECTED", "ADD", "SUB", "MUL", "LOGISTIC", "TANH", "SPLIT",
    "STRIDED_SLICE", "UNPACK", "PACK", "CONCATENATION", "RESHAPE", "SHAPE",
}


def every_kind():
    """One model with one classifier head per kind: one conversion for all."""
    inputs = keras.Input((STEPS, FEATURES))
    outputs = [head(inputs, *make(), flatten=flat)
               for make, flat, _ in KINDS.values()]
    return keras.Model(inputs, outputs)


@pytest.mark.slow
def test_every_kind_exports_fully_int8_with_parity():
    x, _ = sequences()
    qat = qat_plugin.quantize_model(every_kind())
    assert sum(isinstance(l, QuantizedRecurrent) for l in qat.layers) == 10
    qat_plugin.calibrate(qat, x)
    data = qat_plugin.export_tflite(qat)
    report = qat_plugin.inspect_tflite(data)
    assert report.is_fully_int8, [op.name for op in report.float_ops]
    counts = collections.Counter(op.name for op in report.ops)
    assert set(counts) <= INT8_OPS, counts
    heads = len(KINDS)
    assert counts["FULLY_CONNECTED"] == heads + sum(n for *_, n in KINDS.values())
    # TANH: LSTM 2 per step, GRU 1, tanh SimpleRNN 1 (ReLU fuses).
    lstm_layers, gru_layers = 1 + 2 + 1 + 2, 1 + 1 + 2
    assert counts["TANH"] == _T * (2 * lstm_layers + gru_layers + 1)
    # LOGISTIC: LSTM i, f, o (no f on the first step: the cell starts at 0);
    # GRU z, r (no r on a first step without recurrent bias).
    assert counts["LOGISTIC"] == lstm_layers * (3 * _T - 1) + (
        3 * 2 * _T + (2 * _T - 1))
    parity = assert_parity(qat, data, x)
    assert len(parity.max_error_steps) == heads


def test_trained_lstm_keeps_parity_and_matches_float_before_quantizing(tmp_path):
    x, y = sequences(128)
    model = classifier(*KINDS["lstm"][0]())
    qat = qat_plugin.quantize_model(model)
    # The weights are the float model's; without fake-quant it computes
    # what the float LSTM computes.
    qat_plugin.calibrate(qat, x)
    qat.compile(keras.optimizers.Adam(1e-3),
                keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    qat.fit(x, y, epochs=1, batch_size=32, verbose=0)
    layer = next(l for l in qat.layers if isinstance(l, QuantizedRecurrent))
    assert {q.name for q in layer.activation_quantizers()} >= {"cell", "hidden"}
    data = qat_plugin.export_tflite(qat)
    assert qat_plugin.inspect_tflite(data).is_fully_int8
    assert_parity(qat, data, x)
    assert_keras_round_trip(qat, x, tmp_path / "lstm.keras")


def test_float_path_equals_the_float_layers():
    x, _ = sequences(16)
    model = every_kind()
    qat = qat_plugin.quantize_model(model)
    for layer in qat.layers:
        if hasattr(layer, "qat_schedule"):  # Never quantize.
            layer.qat_schedule.assign([10**6, 10**6, 10**6])
    for name, got, expected in zip(KINDS, qat(x), model(x)):
        np.testing.assert_allclose(keras.ops.convert_to_numpy(got),
                                   keras.ops.convert_to_numpy(expected),
                                   atol=1e-5, err_msg=name)


def test_none_time_dimension_is_refused_naming_the_layer():
    inputs = keras.Input((None, FEATURES))
    model = keras.Model(inputs, L.Dense(2)(L.LSTM(UNITS, name="encoder")(inputs)))
    with pytest.raises(UnsupportedLayerError, match="'encoder'.*fixed sequence length"):
        qat_plugin.quantize_model(model)


@pytest.mark.parametrize("layer, message", [
    (L.LSTM(UNITS, stateful=True), "stateful=True"),
    (L.GRU(UNITS, return_state=True), "returns its states"),
    (L.LSTM(UNITS, activation="relu"), "activation 'relu'"),
    (L.SimpleRNN(UNITS, activation="sigmoid"), "activation 'sigmoid'"),
    (L.Bidirectional(L.LSTM(UNITS), merge_mode="sum"), "merge_mode='sum'"),
])
def test_unsupported_settings_are_refused(layer, message):
    inputs = keras.Input((STEPS, FEATURES), batch_size=2)
    outputs = layer(inputs)
    if isinstance(outputs, (list, tuple)):
        outputs = outputs[0]
    model = keras.Model(inputs, L.Dense(2)(outputs))
    with pytest.raises(UnsupportedLayerError, match=message):
        qat_plugin.quantize_model(model)


def test_initial_states_are_refused_clearly():
    inputs = keras.Input((STEPS, FEATURES))
    state = keras.Input((UNITS,))
    outputs = L.GRU(UNITS, name="rnn")(inputs, initial_state=[state])
    model = keras.Model([inputs, state], L.Dense(2)(outputs))
    with pytest.raises(UnsupportedLayerError, match="'rnn'.*initial states"):
        qat_plugin.quantize_model(model)


def calibrated(model, x):
    qat = qat_plugin.quantize_model(model)
    qat_plugin.calibrate(qat, x)
    return qat


@pytest.mark.slow
def test_compare_has_a_ptq_baseline_of_the_float_rnn():
    x, y = sequences(32)
    model = classifier(*KINDS["gru"][0]())
    qat = calibrated(model, x)
    report = qat_plugin.compare(model, qat, eval_data=(x, y), representative_data=x,
                                modes=("int8",), latency_runs=1, warmup_runs=0)
    rows = {row.name: row for row in report.rows}
    assert rows["ptq-int8"].fully_int8 and rows["qat-int8"].fully_int8
    # The converter's PTQ converts the unroll=True clone: no WHILE loop.
    ops = {op.name for op in qat_plugin.inspect_tflite(rows["ptq-int8"].tflite).ops}
    assert "WHILE" not in ops and "FULLY_CONNECTED" in ops
