"""Pruning + QAT on Fashion-MNIST: accuracy, size and latency of the int8 .tflite.

One float CNN (Conv-BN-ReLU x3, Dense 128, Dense 10) is trained, then each
variant gets the same budget: one epoch of pruning fine-tune (plain float
fine-tune for the dense reference) and one epoch of QAT, then a fully-int8
export that runs in the LiteRT interpreter:

- float -> QAT int8 (no pruning);
- 50% and 75% unstructured magnitude pruning (`PolynomialDecay` from 0
  over the first 60% of the pruning epoch, Zhu & Gupta), pruning kept
  through QAT;
- 2:4 structured pruning (one-shot, then fine-tuned), kept through QAT;
- the same pruned int8 models exported with the converter's sparse
  encoding (`export_tflite(..., sparse_weights=True)`);
- tfmot: `prune_low_magnitude` at 50% (same schedule) and
  pruning-preserving QAT (`Default8BitPrunePreserveQuantizeScheme`) on the
  same architecture built in `tf_keras`, trained with the same budget, run
  in a subprocess with `TF_USE_LEGACY_KERAS=1`.

The first convolution (one input channel) is kept dense everywhere.
Latency is one-sample `invoke()` time on one thread: the mean of 200
invokes, the best of 5 rounds that visit every file in turn (the machine
is shared, so single runs are noisy). Prints a Markdown table and writes it
with the raw figures to benchmarks/results/pruning.{md,json}.

Usage:
    python benchmarks/bench_pruning.py [--float-epochs 2] [--train-samples 60000]
"""

import argparse
import gzip
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

import numpy as np

WORKER_FLAG = "--tfmot-worker"
SKIP = ("conv1",)


def architecture(layers):
    """The benchmark CNN, built with `layers` (Keras 3 or tf_keras)."""
    return [
        layers.Conv2D(16, 3, strides=2, padding="same", use_bias=False, name="conv1"),
        layers.BatchNormalization(name="bn1"),
        layers.ReLU(name="relu1"),
        layers.Conv2D(32, 3, strides=2, padding="same", use_bias=False, name="conv2"),
        layers.BatchNormalization(name="bn2"),
        layers.ReLU(name="relu2"),
        layers.Conv2D(32, 3, padding="same", use_bias=False, name="conv3"),
        layers.BatchNormalization(name="bn3"),
        layers.ReLU(name="relu3"),
        layers.Flatten(name="flatten"),
        layers.Dense(128, activation="relu", name="dense"),
        layers.Dense(10, name="classifier"),
    ]


def latency_us(data, use_xnnpack=True, runs=200):
    """Mean one-sample invoke time in microseconds, one thread."""
    from qat_plugin.tflite.interpreter import make_interpreter

    interpreter = make_interpreter(data, num_threads=1, use_xnnpack=use_xnnpack)
    interpreter.allocate_tensors()
    detail = interpreter.get_input_details()[0]
    interpreter.set_tensor(detail["index"], np.zeros(detail["shape"], detail["dtype"]))
    for _ in range(20):
        interpreter.invoke()
    start = time.perf_counter()
    for _ in range(runs):
        interpreter.invoke()
    return (time.perf_counter() - start) / runs * 1e6


def measure(name, data, x, y, use_xnnpack=True):
    """Interpreter accuracy, sizes and int8 weight sparsity of one file."""
    import qat_plugin

    report = qat_plugin.inspect_tflite(data)
    predictions = qat_plugin.TFLiteModel(data, use_xnnpack=use_xnnpack).predict(
        x, batch_size=500
    )
    return {
        "name": name,
        "accuracy": float(np.mean(predictions.argmax(1) == y)),
        "size_bytes": len(data),
        "gzip_bytes": len(gzip.compress(data, compresslevel=9)),
        "weight_sparsity": report.weight_sparsity,
        "two_of_four": [w.is_2_4 for w in report.weights],
        "fully_int8": report.is_fully_int8,
        "xnnpack_runs_it": use_xnnpack,
    }


def add_latencies(rows, files, rounds=5):
    """Best-of-`rounds` latencies, the files visited in turn each round."""
    for row in rows:
        row["latency_xnnpack_us"] = None
        row["latency_builtin_us"] = None
    for _ in range(rounds):
        for row in rows:
            if row["name"] not in files:
                continue
            data = files[row["name"]]
            for key, use_xnnpack in (("latency_xnnpack_us", True),
                                     ("latency_builtin_us", False)):
                if use_xnnpack and not row["xnnpack_runs_it"]:
                    continue
                value = latency_us(data, use_xnnpack)
                row[key] = value if row[key] is None else min(row[key], value)


def run_ours(args, data):
    import keras

    import qat_plugin
    from qat_plugin.callbacks import PruningScheduler

    L = keras.layers
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    x, y = data.x_train[: args.train_samples], data.y_train[: args.train_samples]
    steps = int(np.ceil(len(x) / args.batch_size))
    fit = dict(batch_size=args.batch_size, verbose=2)

    keras.utils.set_random_seed(args.seed)
    model = keras.Sequential([keras.Input((28, 28, 1))] + architecture(L), name="cnn")
    model.compile(keras.optimizers.Adam(2e-3), loss, metrics=["accuracy"])
    start = time.time()
    model.fit(x, y, epochs=args.float_epochs, **fit)
    float_seconds = time.time() - start
    float_accuracy = model.evaluate(data.x_test, data.y_test, verbose=0)[1]
    print(f"float: {float_accuracy:.4f}", flush=True)

    end_step = int(0.6 * steps)
    frequency = max(end_step // 20, 1)
    variants = {
        "dense": None,
        "50% unstructured": dict(
            schedule=qat_plugin.PolynomialDecay(0.0, 0.5, 0, end_step, frequency=frequency)
        ),
        "75% unstructured": dict(
            schedule=qat_plugin.PolynomialDecay(0.0, 0.75, 0, end_step, frequency=frequency)
        ),
        "2:4": dict(structure="2:4"),
    }
    rows, timings, files = [], {}, {}
    for name, options in variants.items():
        keras.utils.set_random_seed(args.seed)
        if options is None:
            tuned = keras.models.clone_model(model)
            tuned.set_weights(model.get_weights())
        else:
            tuned = qat_plugin.prune_model(model, skip=SKIP, **options)
        tuned.compile(keras.optimizers.Adam(1e-3), loss, metrics=["accuracy"])
        callbacks = [] if options is None else [PruningScheduler()]
        start = time.time()
        tuned.fit(x, y, epochs=1, callbacks=callbacks, **fit)
        prune_seconds = time.time() - start
        qat = qat_plugin.quantize_model(tuned)
        qat.compile(keras.optimizers.Adam(1e-4), loss, metrics=["accuracy"])
        start = time.time()
        qat.fit(x, y, epochs=1, callbacks=callbacks, **fit)
        timings[name] = {"prune_epoch_s": prune_seconds, "qat_epoch_s": time.time() - start}
        files[f"qat_plugin {name}, QAT int8"] = qat_plugin.export_tflite(qat)
        rows.append(measure(f"qat_plugin {name}, QAT int8",
                            files[f"qat_plugin {name}, QAT int8"], data.x_test, data.y_test))
        print(rows[-1], flush=True)
        if options is not None:
            try:
                sparse = qat_plugin.export_tflite(qat, sparse_weights=True)
            except qat_plugin.ExportError as error:
                rows.append({"name": f"qat_plugin {name}, sparse_weights", "error": str(error)})
            else:
                files[f"qat_plugin {name}, QAT int8, sparse_weights=True"] = sparse
                rows.append(measure(f"qat_plugin {name}, QAT int8, sparse_weights=True",
                                    sparse, data.x_test, data.y_test, use_xnnpack=False))
            print(rows[-1], flush=True)
    return files, {"float_accuracy": float_accuracy,
                   "float_epoch_s": float_seconds / args.float_epochs,
                   "timings": timings, "rows": rows}


def run_tfmot(args, output_path):
    """In a `TF_USE_LEGACY_KERAS=1` process: tfmot prune + PQAT at 50%."""
    import tensorflow as tf
    import tensorflow_model_optimization as tfmot
    import tf_keras

    from qat_plugin.data.datasets import fashion_mnist

    data = fashion_mnist()
    x, y = data.x_train[: args.train_samples], data.y_train[: args.train_samples]
    steps = int(np.ceil(len(x) / args.batch_size))
    fit = dict(batch_size=args.batch_size, verbose=2)
    loss = tf_keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    tf_keras.utils.set_random_seed(args.seed)
    model = tf_keras.Sequential(
        [tf_keras.Input((28, 28, 1))] + architecture(tf_keras.layers), name="cnn"
    )
    model.compile(tf_keras.optimizers.Adam(2e-3), loss, metrics=["accuracy"])
    model.fit(x, y, epochs=args.float_epochs, **fit)
    float_accuracy = model.evaluate(data.x_test, data.y_test, verbose=0)[1]

    end_step = int(0.6 * steps)
    schedule = tfmot.sparsity.keras.PolynomialDecay(
        0.0, 0.5, begin_step=0, end_step=end_step, frequency=max(end_step // 20, 1)
    )

    def prune(layer):
        if layer.name in SKIP or not isinstance(
            layer, (tf_keras.layers.Conv2D, tf_keras.layers.Dense)
        ):
            return layer
        return tfmot.sparsity.keras.prune_low_magnitude(layer, pruning_schedule=schedule)

    pruned = tf_keras.models.clone_model(model, clone_function=prune)
    pruned.compile(tf_keras.optimizers.Adam(1e-3), loss, metrics=["accuracy"])
    start = time.time()
    pruned.fit(x, y, epochs=1, callbacks=[tfmot.sparsity.keras.UpdatePruningStep()], **fit)
    prune_seconds = time.time() - start
    stripped = tfmot.sparsity.keras.strip_pruning(pruned)
    annotated = tfmot.quantization.keras.quantize_annotate_model(stripped)
    qat = tfmot.quantization.keras.quantize_apply(
        annotated, tfmot.experimental.combine.Default8BitPrunePreserveQuantizeScheme()
    )
    qat.compile(tf_keras.optimizers.Adam(1e-4), loss, metrics=["accuracy"])
    start = time.time()
    qat.fit(x, y, epochs=1, **fit)
    qat_seconds = time.time() - start
    converter = tf.lite.TFLiteConverter.from_keras_model(qat)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.inference_input_type = tf.int8
    converter.inference_output_type = tf.int8
    tflite = converter.convert()
    row = measure("tfmot 50% prune_low_magnitude + PQAT int8", tflite,
                  data.x_test, data.y_test)
    result = {"float_accuracy": float_accuracy, "row": row,
              "timings": {"prune_epoch_s": prune_seconds, "qat_epoch_s": qat_seconds}}
    with open(output_path + ".tflite", "wb") as f:
        f.write(tflite)
    with open(output_path, "w") as f:
        json.dump(result, f)


def table(results):
    def cell(value, fmt):
        return "-" if value is None else format(value, fmt)

    lines = [
        "| model | int8 accuracy (interpreter) | int8 weight sparsity | size (bytes) "
        "| gzip (bytes) | latency XNNPACK (us) | latency builtin (us) |",
        "|---|---|---|---|---|---|---|",
        f"| float (Keras), {results['args']['float_epochs']} epochs | "
        f"{results['ours']['float_accuracy']:.4f} (Keras) | - | - | - | - | - |",
    ]
    rows = list(results["ours"]["rows"])
    if results.get("tfmot"):
        rows.append(results["tfmot"]["row"])
    for row in rows:
        if "error" in row:
            lines.append(f"| {row['name']} | refused: the converter changed weights | "
                         "- | - | - | - | - |")
            continue
        name = row["name"] + ("" if row["fully_int8"] else " (not fully int8)")
        lines.append(
            f"| {name} | {row['accuracy']:.4f} | {row['weight_sparsity']:.1%} | "
            f"{row['size_bytes']} | {row['gzip_bytes']} | "
            f"{cell(row['latency_xnnpack_us'], '.0f')} | {row['latency_builtin_us']:.0f} |"
        )
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--float-epochs", type=int, default=2)
    parser.add_argument("--train-samples", type=int, default=60000)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-tfmot", action="store_true")
    parser.add_argument("--output", default=os.path.join(os.path.dirname(__file__), "results"))
    parser.add_argument(WORKER_FLAG, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.tfmot_worker:
        run_tfmot(args, args.tfmot_worker)
        return

    from qat_plugin.data.datasets import fashion_mnist
    from _results import write_results

    data = fashion_mnist()
    if data.is_synthetic:
        sys.exit("Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist).")
    results = {"args": {k: v for k, v in vars(args).items() if k != "tfmot_worker"}}
    files, results["ours"] = run_ours(args, data)
    if not args.no_tfmot:
        # After ours, not beside it (two trainings on two cores would distort
        # each other's timings); tfmot needs Keras 2 selected before
        # TensorFlow is imported, hence a fresh process.
        tfmot_output = os.path.join(tempfile.mkdtemp(), "tfmot.json")
        command = [sys.executable, os.path.abspath(__file__), WORKER_FLAG, tfmot_output,
                   "--float-epochs", str(args.float_epochs), "--train-samples",
                   str(args.train_samples), "--batch-size", str(args.batch_size),
                   "--seed", str(args.seed)]
        process = subprocess.run(command, env=dict(os.environ, TF_USE_LEGACY_KERAS="1"),
                                 capture_output=True, text=True)
        if process.returncode == 0:
            with open(tfmot_output) as f:
                results["tfmot"] = json.load(f)
            with open(tfmot_output + ".tflite", "rb") as f:
                files[results["tfmot"]["row"]["name"]] = f.read()
        else:
            results["tfmot_error"] = process.stderr[-3000:]
            print(results["tfmot_error"], file=sys.stderr)
    rows = results["ours"]["rows"] + ([results["tfmot"]["row"]] if "tfmot" in results else [])
    add_latencies([row for row in rows if "error" not in row], files)
    import keras

    results["machine"] = (
        f"{platform.machine()}, {os.cpu_count()} cores (shared), keras {keras.__version__}"
    )
    results["date"] = time.strftime("%Y-%m-%d")
    results["command"] = "python benchmarks/bench_pruning.py " + " ".join(
        argv if argv is not None else sys.argv[1:]
    )
    text = table(results)
    print(text)
    write_results(args.output, "pruning", text, results)


if __name__ == "__main__":
    main()
