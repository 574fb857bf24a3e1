"""Recurrent layers reading a mask (Masking upstream): int8 SELECT_V2 per step.

Real converter and LiteRT, tiny models: sequences whose trailing steps are
padded with zeros, behind a `keras.layers.Masking`. The QAT model computes
what the float model computes with fake-quant off, its export has no float
op but the mask's NOT_EQUAL (the converter keeps NOT_EQUAL float, in its
own PTQ too), the interpreter computes what the QAT model computes, and
the export has no more ops than the converter's PTQ of the unroll=True
float clone.
"""

import collections

import keras
import numpy as np
import pytest

import qat_plugin
from qat_plugin.errors import UnsupportedLayerError
from qat_plugin.tflite.convert import _convert_float
from tests.conftest import assert_parity

L = keras.layers
STEPS, FEATURES, UNITS = 5, 3, 4

HEADS = {
    "lstm": lambda: L.LSTM(UNITS),
    "lstm_sequences": lambda: L.LSTM(UNITS, return_sequences=True),
    "gru": lambda: L.GRU(UNITS),
    "gru_sequences": lambda: L.GRU(UNITS, return_sequences=True),
    # Bidirectional sets zero_output_for_mask with return_sequences.
    "bidirectional_lstm_sequences": lambda: L.Bidirectional(
        L.LSTM(UNITS, return_sequences=True)),
}


def padded(n=64, seed=0):
    """Sequences with 0 to 2 trailing steps of zeros (masked)."""
    x = np.random.default_rng(seed).normal(size=(n, STEPS, FEATURES)).astype("float32")
    for i in range(n):
        x[i, STEPS - i % 3:] = 0.0
    return x


def masked_model():
    inputs = keras.Input((STEPS, FEATURES))
    masked = L.Masking()(inputs)
    return keras.Model(inputs, [L.Dense(2)(L.Flatten()(make()(masked)))
                                for make in HEADS.values()])


def ptq_counts(model, x):
    data = _convert_float(model, "int8", x, calibration_steps=32)
    return collections.Counter(op.name for op in qat_plugin.inspect_tflite(data).ops)


def test_masked_rnns_equal_the_float_model_without_fake_quant():
    x = padded(16)
    model = masked_model()
    qat = qat_plugin.quantize_model(model)
    for layer in qat.layers:
        if hasattr(layer, "qat_schedule"):  # Never quantize.
            layer.qat_schedule.assign([10**6, 10**6, 10**6])
    for name, got, expected in zip(HEADS, qat(x), model(x)):
        np.testing.assert_allclose(keras.ops.convert_to_numpy(got),
                                   keras.ops.convert_to_numpy(expected),
                                   atol=1e-5, err_msg=name)


@pytest.mark.slow
def test_masked_rnns_export_int8_with_parity_and_no_more_ops_than_ptq():
    x = padded(32)
    model = masked_model()
    qat = qat_plugin.quantize_model(model)
    qat_plugin.calibrate(qat, x)
    data = qat_plugin.export_tflite(qat)
    report = qat_plugin.inspect_tflite(data)
    # The mask's one comparison reads the dequantized input; all else int8.
    assert [op.name for op in report.float_ops] == ["NOT_EQUAL"]
    counts = collections.Counter(op.name for op in report.ops)
    assert counts["DEQUANTIZE"] == 1 and counts["QUANTIZE"] == 0, counts
    # At most one SELECT_V2 per state and step (LSTM h and c, GRU h), and
    # one per step for Bidirectional's zero outputs (the converter drops the
    # unused and merges the equal ones); Masking itself exports none.
    assert counts["SELECT_V2"] <= 2 * (2 * STEPS) + 2 * STEPS + 2 * (3 * STEPS), counts
    ptq = ptq_counts(model, x)
    assert sum(counts.values()) <= sum(ptq.values()), (counts, ptq)
    for name in ("FULLY_CONNECTED", "SELECT_V2", "QUANTIZE", "DEQUANTIZE"):
        assert counts[name] <= ptq[name], (name, counts, ptq)
    assert_parity(qat, data, x)


@pytest.mark.slow
def test_rnn_concatenated_with_another_tensor_needs_no_requantize():
    x = padded(32)
    inputs = keras.Input((STEPS, FEATURES))
    sequence = L.LSTM(UNITS, return_sequences=True)(L.Masking()(inputs))
    joined = L.Concatenate()([sequence, L.Dense(UNITS)(inputs)])
    model = keras.Model(inputs, L.Dense(2)(L.Flatten()(joined)))
    qat = qat_plugin.quantize_model(model)
    qat_plugin.calibrate(qat, x)
    data = qat_plugin.export_tflite(qat)
    counts = collections.Counter(op.name for op in qat_plugin.inspect_tflite(data).ops)
    assert counts["QUANTIZE"] <= ptq_counts(model, x)["QUANTIZE"], counts
    assert_parity(qat, data, x)


def test_nonzero_mask_value_is_refused_naming_the_layer():
    inputs = keras.Input((STEPS, FEATURES))
    masked = L.Masking(mask_value=-1.0, name="pad")(inputs)
    model = keras.Model(inputs, L.Dense(2)(L.LSTM(UNITS)(masked)))
    with pytest.raises(UnsupportedLayerError, match="'pad'.*mask_value"):
        qat_plugin.quantize_model(model)


def test_embedding_mask_zero_reaches_the_lstm_fully_int8():
    rng = np.random.default_rng(0)
    tokens = rng.integers(1, 10, (32, STEPS))
    for i in range(len(tokens)):
        tokens[i, STEPS - i % 3:] = 0  # Padding id 0: masked.
    inputs = keras.Input((STEPS,), dtype="int32")
    embedded = L.Embedding(10, FEATURES, mask_zero=True)(inputs)
    model = keras.Model(inputs, L.Dense(2)(L.LSTM(UNITS)(embedded)))
    qat = qat_plugin.quantize_model(model)
    qat_plugin.calibrate(qat, tokens)
    data = qat_plugin.export_tflite(qat)
    report = qat_plugin.inspect_tflite(data)
    # NOT_EQUAL compares the int32 ids (the input): no float op at all.
    assert not report.float_ops and not report.conversion_ops, report.summary()
    assert {"NOT_EQUAL", "SELECT_V2"} <= {op.name for op in report.ops}
    assert_parity(qat, data, tokens)
