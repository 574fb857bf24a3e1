"""The core acceptance run: float -> QAT -> fully-int8 .tflite on Fashion-MNIST.

Trains a small CNN with BatchNorm, depthwise convolutions, a residual Add
and a Concatenate in float, fine-tunes it with quantization-aware training
for one epoch, exports the int8 .tflite and compares it with the float
model (Keras accuracy) and with the converter's own full-int8 post-training
quantization (op count, interpreter accuracy). Prints a Markdown table and
writes it, with the raw figures as JSON, to benchmarks/results/.

Usage:
    python benchmarks/bench_core.py [--float-epochs 5] [--qat-epochs 1]
"""

import argparse
import os
import platform
import sys
import time

import keras
import numpy as np

import qat_plugin
from qat_plugin.data.datasets import fashion_mnist
from _results import write_results

L = keras.layers


def build_model():
    inputs = keras.Input((28, 28, 1))
    x = L.Conv2D(16, 3, strides=2, padding="same", use_bias=False)(inputs)
    x = L.BatchNormalization()(x)
    x = L.ReLU()(x)
    # Depthwise-separable residual block.
    y = L.DepthwiseConv2D(3, padding="same", use_bias=False)(x)
    y = L.BatchNormalization()(y)
    y = L.ReLU(6.0)(y)
    y = L.Conv2D(16, 1, use_bias=False)(y)
    y = L.BatchNormalization()(y)
    x = L.ReLU()(L.Add()([x, y]))
    # Two branches joined by a Concatenate.
    a = L.Conv2D(16, 1, activation="relu")(x)
    b = L.DepthwiseConv2D(3, padding="same", use_bias=False)(x)
    b = L.BatchNormalization()(b)
    b = L.ReLU()(b)
    b = L.Conv2D(16, 1, activation="relu")(b)
    x = L.Concatenate()([a, b])
    x = L.MaxPooling2D()(x)
    x = L.Conv2D(48, 3, padding="same", use_bias=False)(x)
    x = L.BatchNormalization()(x)
    x = L.ReLU()(x)
    x = L.GlobalAveragePooling2D()(x)
    x = L.Dropout(0.2)(x)
    outputs = L.Dense(10)(x)
    return keras.Model(inputs, outputs, name="core_cnn")


def interpreter_accuracy(data, x, y):
    probabilities = qat_plugin.TFLiteModel(data).predict(x, batch_size=500)
    return float(np.mean(probabilities.argmax(1) == y))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--float-epochs", type=int, default=5)
    parser.add_argument("--qat-epochs", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default=os.path.join(os.path.dirname(__file__), "results"))
    args = parser.parse_args(argv)
    keras.utils.set_random_seed(args.seed)
    data = fashion_mnist()
    if data.is_synthetic:
        sys.exit("Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist).")
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    model = build_model()
    # Cosine decay: the float model ends converged, a fair starting point.
    steps = args.float_epochs * int(np.ceil(len(data.x_train) / 128))
    schedule = keras.optimizers.schedules.CosineDecay(2e-3, steps, alpha=0.05)
    model.compile(keras.optimizers.Adam(schedule), loss, metrics=["accuracy"])
    start = time.time()
    model.fit(data.x_train, data.y_train, epochs=args.float_epochs, batch_size=128, verbose=2)
    float_time = time.time() - start
    float_accuracy = model.evaluate(data.x_test, data.y_test, verbose=0)[1]

    # The fair float reference: the same extra epochs at the QAT learning rate.
    tuned = keras.models.clone_model(model)
    tuned.set_weights(model.get_weights())
    tuned.compile(keras.optimizers.Adam(1e-4), loss, metrics=["accuracy"])
    tuned.fit(data.x_train, data.y_train, epochs=args.qat_epochs, batch_size=128, verbose=2)
    tuned_accuracy = tuned.evaluate(data.x_test, data.y_test, verbose=0)[1]

    qat = qat_plugin.quantize_model(model)
    qat.compile(keras.optimizers.Adam(1e-4), loss, metrics=["accuracy"])
    start = time.time()
    qat.fit(data.x_train, data.y_train, epochs=args.qat_epochs, batch_size=128, verbose=2)
    qat_time = time.time() - start
    qat_keras_accuracy = qat.evaluate(data.x_test, data.y_test, verbose=0)[1]

    qat_tflite = qat_plugin.export_tflite(qat)
    ptq_tflite = qat_plugin.export_tflite(model, representative_data=data.x_train[:500])
    qat_report = qat_plugin.inspect_tflite(qat_tflite)
    ptq_report = qat_plugin.inspect_tflite(ptq_tflite)
    keras_predictions = qat.predict(data.x_test, verbose=0)
    runner = qat_plugin.TFLiteModel(qat_tflite)
    tflite_predictions = runner.predict(data.x_test, batch_size=500)
    results = {
        "float_accuracy": float_accuracy,
        "float_finetuned_accuracy": tuned_accuracy,
        "qat_keras_tflite_top1_agreement": float(
            np.mean(keras_predictions.argmax(1) == tflite_predictions.argmax(1))
        ),
        "qat_keras_tflite_max_error_steps": float(
            np.abs(keras_predictions - tflite_predictions).max() / runner.output_steps()[0]
        ),
        "qat_keras_accuracy": qat_keras_accuracy,
        "qat_int8_accuracy": float(np.mean(tflite_predictions.argmax(1) == data.y_test)),
        "ptq_int8_accuracy": interpreter_accuracy(ptq_tflite, data.x_test, data.y_test),
        "qat_fully_int8": qat_report.is_fully_int8,
        "ptq_fully_int8": ptq_report.is_fully_int8,
        "qat_op_count": len(qat_report.ops),
        "ptq_op_count": len(ptq_report.ops),
        "qat_ops": dict(qat_report.op_counts),
        "ptq_ops": dict(ptq_report.op_counts),
        "qat_size_bytes": qat_report.size_bytes,
        "ptq_size_bytes": ptq_report.size_bytes,
        "float_epoch_seconds": float_time / args.float_epochs,
        "qat_epoch_seconds": qat_time / args.qat_epochs,
        "args": vars(args),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, keras {keras.__version__}",
        "date": time.strftime("%Y-%m-%d"),
        "command": "python benchmarks/bench_core.py " + " ".join(argv or sys.argv[1:]),
    }
    table = "\n".join(
        [
            "| model | accuracy (Fashion-MNIST test) | fully int8 | ops | size (bytes) |",
            "|---|---|---|---|---|",
            f"| float (Keras), {args.float_epochs} epochs | {float_accuracy:.4f} | no | - | - |",
            f"| float fine-tuned +{args.qat_epochs} epoch (Keras) | {tuned_accuracy:.4f} | no | - | - |",
            f"| PTQ int8 (interpreter) | {results['ptq_int8_accuracy']:.4f} | "
            f"{'yes' if ptq_report.is_fully_int8 else 'no'} | {len(ptq_report.ops)} | {ptq_report.size_bytes} |",
            f"| QAT int8, +{args.qat_epochs} epoch (interpreter) | {results['qat_int8_accuracy']:.4f} | "
            f"{'yes' if qat_report.is_fully_int8 else 'no'} | {len(qat_report.ops)} | {qat_report.size_bytes} |",
        ]
    )
    print(table)
    print(f"QAT ops == PTQ ops: {qat_report.op_counts == ptq_report.op_counts}")
    print(
        "QAT Keras vs interpreter: top-1 agreement "
        f"{results['qat_keras_tflite_top1_agreement']:.4f}, max error "
        f"{results['qat_keras_tflite_max_error_steps']:.2f} output steps"
    )
    write_results(args.output, "core", table, results)


if __name__ == "__main__":
    main()
