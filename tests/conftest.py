"""Shared fixtures: tiny data, a QAT fine-tune and the parity check."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras
import numpy as np
import pytest

import qat_plugin


def images(n=128, shape=(12, 12, 1), seed=0):
    """Random images with labels that depend on them (learnable)."""
    rng = np.random.default_rng(seed)
    x = rng.random((n,) + tuple(shape), dtype=np.float32)
    y = (x.reshape(n, -1).mean(axis=1) * 40).astype("int64") % 4
    return x, y


def qat_fit(model, x, y, epochs=1, batch_size=32, recipe="int8", **kwargs):
    """quantize_model + a short fit: returns the trained QAT model."""
    qat = qat_plugin.quantize_model(model, recipe=recipe, **kwargs)
    qat.compile(
        keras.optimizers.Adam(1e-3),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    qat.fit(x, y, epochs=epochs, batch_size=batch_size, verbose=0, shuffle=False)
    return qat


def assert_parity(qat_model, tflite_bytes, x, max_steps=2.0, min_agreement=0.99):
    """The core issue's parity bounds: interpreter vs Keras QAT model.

    Top-1 agreement is counted over the samples whose Keras top-1 leads by
    more than one output step (`Parity.decided_agreement`); the max-error
    bound holds for every sample.
    """
    parity = qat_plugin.measure_parity(qat_model, tflite_bytes, x)
    for error, agreement in zip(parity.max_error_steps, parity.decided_agreement):
        # Dequantized values carry float rounding: 2 steps may read 2.000003.
        assert error <= max_steps + 1e-4, f"max error {error:.4f} steps"
        if agreement is not None:
            assert agreement >= min_agreement, f"top-1 agreement {agreement:.3f}"
    return parity


def assert_keras_round_trip(model, x, path):
    """Saves `model` to `.keras`, loads it without custom_objects, compares."""
    model.save(path)
    restored = keras.saving.load_model(path)
    np.testing.assert_allclose(
        restored.predict(x, verbose=0), model.predict(x, verbose=0), atol=1e-6
    )
    return restored


@pytest.fixture(autouse=True)
def _fresh_keras_session():
    keras.backend.clear_session()
    keras.utils.set_random_seed(0)
    yield
