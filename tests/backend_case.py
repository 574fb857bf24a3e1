"""One QAT training run, identical on every Keras backend, for parity tests.

`run_case` builds a small model that exercises every quantized layer kind
(Conv+BN+ReLU folding, depthwise and separable convolutions, a BatchNorm
with nothing to fold into, Add, Concatenate, pooling, Dense), loads the
same NumPy initial weights, moves the QAT schedule switches into the run,
trains a few SGD steps on fixed batches and saves what the tests compare:
every variable, the `.keras` file and the exported .tflite.

Run as a script it does the same in a fresh process; the backend is the
one in `KERAS_BACKEND`:

    KERAS_BACKEND=jax python tests/backend_case.py OUT_DIR [OTHER_MODEL]
"""

import json
import os
import sys
import time

import numpy as np

BATCH = 16
STEPS = 6
# [quantize_start, bn_freeze, range_freeze]: every switch fires in the run.
SCHEDULE = (1, 3, 5)


def float_model():
    """The float model, with explicit layer names (variable paths match)."""
    import keras

    layers = keras.layers
    inputs = keras.Input((8, 8, 2), name="image")
    x = layers.Conv2D(6, 3, padding="same", use_bias=False, name="conv")(inputs)
    x = layers.BatchNormalization(name="conv_bn")(x)
    x = layers.ReLU(name="conv_relu")(x)
    branch = layers.DepthwiseConv2D(3, padding="same", name="depthwise")(x)
    branch = layers.BatchNormalization(name="depthwise_bn")(branch)
    branch = layers.ReLU(6.0, name="depthwise_relu6")(branch)
    x = layers.Add(name="add")([x, branch])
    x = layers.BatchNormalization(name="lone_bn")(x)
    a = layers.SeparableConv2D(4, 3, padding="same", name="separable")(x)
    b = layers.Conv2D(4, 1, activation="relu", name="pointwise")(x)
    x = layers.Concatenate(name="concat")([a, b])
    x = layers.MaxPooling2D(name="pool")(x)
    x = layers.GlobalAveragePooling2D(name="gap")(x)
    outputs = layers.Dense(4, name="logits")(x)
    return keras.Model(inputs, outputs, name="parity_net")


def initial_weights(model, seed=0):
    """Deterministic NumPy weights: kernels random, the rest as initialized."""
    rng = np.random.RandomState(seed)
    weights = []
    for variable in model.weights:
        value = np.asarray(variable.numpy())
        if "kernel" in variable.path:
            fan_in = int(np.prod(value.shape[:-1]))
            value = rng.normal(0.0, 1.0 / np.sqrt(fan_in), value.shape)
        elif variable.path.endswith(("bias", "beta")):
            value = rng.normal(0.0, 0.1, value.shape)
        weights.append(value.astype(np.float32))
    return weights


def batches(seed=1):
    """`STEPS` fixed (x, y) batches."""
    rng = np.random.RandomState(seed)
    x = rng.normal(0.5, 1.0, (STEPS, BATCH, 8, 8, 2)).astype(np.float32)
    y = rng.randint(0, 4, (STEPS, BATCH)).astype(np.int32)
    return x, y


def set_schedule(qat_model, schedule=SCHEDULE):
    import qat_plugin

    for layer in qat_model.layers:
        if isinstance(layer, qat_plugin.QuantizedLayer):
            layer.set_qat_schedule(list(schedule))


def compiled_qat_model():
    """The case's QAT model: fixed initial weights, schedule, SGD."""
    import keras

    import qat_plugin

    model = float_model()
    model.set_weights(initial_weights(model))
    qat = qat_plugin.quantize_model(model)
    set_schedule(qat)
    qat.compile(
        optimizer=keras.optimizers.SGD(0.05),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    return qat


def variables_by_path(model):
    return {v.path: np.asarray(v.numpy()) for v in model.weights}


def run_case(out_dir, other_model=None):
    """Trains the case on the running backend and writes its results.

    Writes to `out_dir`: `variables.npz` (every model variable after
    training), `model.keras`, `model.tflite` (exported from this process,
    through a TensorFlow child process on other backends), `info.json`
    (backend, losses, step time). With `other_model` (a `.keras` path) it
    also exports that model to `other.tflite` from this process.
    """
    import keras

    import qat_plugin

    os.makedirs(out_dir, exist_ok=True)
    qat = compiled_qat_model()
    x, y = batches()
    losses = []
    for step in range(STEPS):
        losses.append(float(qat.train_on_batch(x[step], y[step])))
    np.savez(os.path.join(out_dir, "variables.npz"), **variables_by_path(qat))
    qat.save(os.path.join(out_dir, "model.keras"))
    start = time.perf_counter()
    qat_plugin.export_tflite(qat, os.path.join(out_dir, "model.tflite"))
    export_seconds = time.perf_counter() - start
    if other_model is not None:
        loaded = keras.saving.load_model(other_model, compile=False)
        qat_plugin.export_tflite(loaded, os.path.join(out_dir, "other.tflite"))
    info = {
        "backend": keras.backend.backend(),
        "losses": losses,
        "export_seconds": export_seconds,
    }
    with open(os.path.join(out_dir, "info.json"), "w") as f:
        json.dump(info, f)
    return info


if __name__ == "__main__":
    run_case(*sys.argv[1:])
