"""The tfmot side of bench_tfmot.py, run in its own process.

tfmot 0.8.1 works only with tf_keras, and `TF_USE_LEGACY_KERAS=1` must be
set before TensorFlow is imported, so bench_tfmot.py starts this script as a
subprocess with a job file (JSON). It builds the tf_keras twin of the
architecture, loads the float weights trained in Keras 3 (`.npz`, layer by
layer), measures the QAT/float train-step ratio, fine-tunes
`tfmot.quantization.keras.quantize_model` with the same optimizer, schedule,
batch size and sample order as qat_plugin, converts it to a fully-int8
.tflite (int8 input and output) and writes the results as JSON.

Usage (by bench_tfmot.py): python benchmarks/_tfmot_worker.py JOB.json
"""

import importlib.util
import json
import os
import sys
import time

if os.environ.get("TF_USE_LEGACY_KERAS") != "1":
    sys.exit("_tfmot_worker.py needs TF_USE_LEGACY_KERAS=1 set before it starts.")

import numpy as np
import tensorflow as tf
import tensorflow_model_optimization as tfmot
import tf_keras

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import _tfmot_models as models  # noqa: E402


def _load_datasets_module():
    """qat_plugin/datasets.py without the package (which imports Keras 3)."""
    path = os.path.join(HERE, os.pardir, "qat_plugin", "datasets.py")
    spec = importlib.util.spec_from_file_location("_fashion_mnist", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main(job_path):
    with open(job_path) as f:
        job = json.load(f)
    tf_keras.utils.set_random_seed(job["seed"])
    data = _load_datasets_module().fashion_mnist(download=False, synthetic=False)
    x_train, y_train = data.x_train, data.y_train
    x_test, y_test = data.x_test[: job["test_samples"]], data.y_test[: job["test_samples"]]
    order = np.load(job["order"])
    weights = dict(np.load(job["weights"]))
    build = models.ARCHITECTURES[job["architecture"]]
    loss = tf_keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    batch = job["batch_size"]

    twin = build(tf_keras)
    models.set_layer_weights(twin, weights)
    twin.compile(tf_keras.optimizers.Adam(1e-4), loss, metrics=["accuracy"])
    twin_accuracy = twin.evaluate(x_test, y_test, batch_size=500, verbose=0)[1]

    # Step time: a float copy and a QAT copy, timed interleaved, same batch.
    float_copy = build(tf_keras)
    models.set_layer_weights(float_copy, weights)
    float_copy.compile(tf_keras.optimizers.Adam(1e-4), loss)
    qat_copy = tfmot.quantization.keras.quantize_model(float_copy)
    qat_copy.compile(tf_keras.optimizers.Adam(1e-4), loss)
    xb, yb = x_train[:batch], y_train[:batch]
    step_ms = models.median_step_ms(
        {"float": float_copy.train_on_batch, "qat": qat_copy.train_on_batch},
        xb, yb, job["timing_steps"], job["timing_warmup"],
    )

    qat = tfmot.quantization.keras.quantize_model(twin)
    flat = order.reshape(-1)  # as bench_tfmot.fit_in_order: one unshuffled fit
    steps = int(np.ceil(flat.size / batch))
    schedule = models.finetune_schedule(
        tf_keras.optimizers.schedules, job["learning_rate"], steps
    )
    qat.compile(tf_keras.optimizers.Adam(schedule), loss, metrics=["accuracy"])
    start = time.perf_counter()
    qat.fit(x_train[flat], y_train[flat], batch_size=batch, epochs=1,
            shuffle=False, verbose=0)
    train_seconds = time.perf_counter() - start
    qat_keras_accuracy = qat.evaluate(x_test, y_test, batch_size=500, verbose=0)[1]

    start = time.perf_counter()
    converter = tf.lite.TFLiteConverter.from_keras_model(qat)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.inference_input_type = tf.int8
    converter.inference_output_type = tf.int8
    tflite = converter.convert()
    conversion_seconds = time.perf_counter() - start
    with open(job["tflite"], "wb") as f:
        f.write(tflite)
    result = {
        "twin_float_accuracy": float(twin_accuracy),
        "step_ms": step_ms,
        "step_ratio": step_ms["qat"] / step_ms["float"],
        "qat_keras_accuracy": float(qat_keras_accuracy),
        "train_seconds": train_seconds,
        "conversion_seconds": conversion_seconds,
        "versions": {
            "tensorflow": tf.__version__,
            "tf_keras": tf_keras.__version__,
            "tfmot": getattr(tfmot, "__version__", "unknown"),
        },
    }
    tmp = job["result"] + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result, f, indent=2)
    os.replace(tmp, job["result"])


if __name__ == "__main__":
    main(sys.argv[1])
