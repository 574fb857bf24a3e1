"""QAT on TensorFlow, on JAX and on two JAX processes: step times and export parity.

Trains bench_core's Fashion-MNIST CNN (dropout off, so that every backend
computes the same thing) in float for a short while on TensorFlow, then
fine-tunes the same float weights with QAT on the same batches three ways,
each in its own process: on TensorFlow, on JAX, and on JAX in two processes
joined by `jax.distributed` (localhost coordinator, gloo CPU collectives,
`keras.distribution.DataParallel`), each process feeding half of every
batch. Reports the float and QAT step times (median of the steps after the
first few, which compile), the QAT/float ratio, and the parity of the
exported int8 models: the JAX one against the TensorFlow one, the
two-process one against the single-process JAX one. Prints a Markdown table
and writes it with the raw figures to benchmarks/results/.

Usage:
    python benchmarks/bench_backends.py [--float-steps 300] [--qat-steps 100]
"""

import argparse
import json
import os
import socket
import subprocess
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
# Steps left out of the timing: the first ones trace and compile.
WARMUP_STEPS = 5


def _model():
    import keras

    sys.path.insert(0, HERE)
    from bench_core import build_model

    model = build_model()
    for layer in model.layers:
        if isinstance(layer, keras.layers.Dropout):
            layer.rate = 0.0
    return model


def _timer():
    import keras

    class StepTimer(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.seconds = []

        def on_train_batch_begin(self, batch, logs=None):
            self.start = time.perf_counter()

        def on_train_batch_end(self, batch, logs=None):
            self.seconds.append(time.perf_counter() - self.start)

        def median(self):
            return float(np.median(self.seconds[WARMUP_STEPS:]))

    return StepTimer()


def _compile(model, learning_rate):
    import keras

    model.compile(
        optimizer=keras.optimizers.SGD(learning_rate, momentum=0.9),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )


def _fit(model, x, y, batch_size):
    timer = _timer()
    model.fit(
        x, y, batch_size=batch_size, epochs=1, shuffle=False, verbose=0,
        callbacks=[timer],
    )
    return timer


def _data(args):
    from qat_plugin.data.datasets import fashion_mnist

    data = fashion_mnist(synthetic=False, download=False)
    n_float = args.float_steps * args.batch
    n_qat = args.qat_steps * args.batch
    x, y = data.x_train, data.y_train.astype("int32")
    return (
        (x[:n_float], y[:n_float]),
        (x[n_float : n_float + n_qat], y[n_float : n_float + n_qat]),
        (data.x_test[:2000], data.y_test[:2000]),
    )


def run_backend(args):
    """One backend: float step time, QAT step time, QAT export."""
    import keras

    import qat_plugin

    (xf, yf), (xq, yq), _ = _data(args)
    model = _model()
    _compile(model, 0.05)
    float_timer = _fit(model, xf, yf, args.batch)
    # Every backend's QAT starts from the float weights trained on TensorFlow.
    weights = os.path.join(args.out, "float.weights.h5")
    if keras.backend.backend() == "tensorflow":
        model.save_weights(weights)
    else:
        model.load_weights(weights)
    qat = qat_plugin.quantize_model(model)
    _compile(qat, 0.005)
    qat_timer = _fit(qat, xq, yq, args.batch)
    start = time.perf_counter()
    path = os.path.join(args.out, f"{keras.backend.backend()}.tflite")
    qat_plugin.export_tflite(qat, path)
    result = {
        "float_step_ms": 1000 * float_timer.median(),
        "qat_step_ms": 1000 * qat_timer.median(),
        "export_s": time.perf_counter() - start,
        "tflite": path,
    }
    result["qat_float_ratio"] = result["qat_step_ms"] / result["float_step_ms"]
    return result


def run_data_parallel(args):
    """One of two JAX processes: QAT with DataParallel on half of each batch."""
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=f"localhost:{args.port}",
        num_processes=2,
        process_id=args.process_id,
    )
    import keras

    import qat_plugin

    keras.distribution.set_distribution(
        keras.distribution.DataParallel(devices=jax.devices(), auto_shard_dataset=False)
    )
    # Every process must create identical initial variables (JAX checks).
    keras.utils.set_random_seed(0)
    _, (xq, yq), _ = _data(args)
    local = args.batch // 2
    steps = len(xq) // args.batch
    rows = np.arange(steps * args.batch).reshape(steps, args.batch)
    mine = rows[:, args.process_id * local : (args.process_id + 1) * local].ravel()
    model = _model()
    model.load_weights(os.path.join(args.out, "float.weights.h5"))
    qat = qat_plugin.quantize_model(model)
    _compile(qat, 0.005)
    timer = _fit(qat, xq[mine], yq[mine], local)
    start = time.perf_counter()
    path = os.path.join(args.out, "data_parallel.tflite")
    qat_plugin.export_tflite(qat, path)
    return {
        "process": jax.process_index(),
        "qat_step_ms": 1000 * timer.median(),
        "export_s": time.perf_counter() - start,
        "tflite": path,
    }


def _child(args, role, backend, extra=()):
    command = [
        sys.executable, os.path.abspath(__file__), "--role", role,
        "--out", args.out, "--float-steps", str(args.float_steps),
        "--qat-steps", str(args.qat_steps), "--batch", str(args.batch),
        *extra,
    ]
    env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="3")
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, text=True)


def _result(process):
    stdout, _ = process.communicate()
    if process.returncode != 0:
        sys.exit(f"A benchmark process failed (status {process.returncode}).")
    return json.loads(stdout.strip().splitlines()[-1])


def _free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--float-steps", type=int, default=300)
    parser.add_argument("--qat-steps", type=int, default=100)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--out", default=os.path.join(HERE, "results", "backends"))
    parser.add_argument("--role", default="main", help=argparse.SUPPRESS)
    parser.add_argument("--process-id", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.role == "backend":
        print(json.dumps(run_backend(args)))
        return
    if args.role == "data_parallel":
        print(json.dumps(run_data_parallel(args)))
        return

    os.makedirs(args.out, exist_ok=True)
    weights = os.path.join(args.out, "float.weights.h5")
    if os.path.exists(weights):
        os.remove(weights)
    # One at a time: the step times should not compete for the cores.
    tf_run = _result(_child(args, "backend", "tensorflow"))
    jax_run = _result(_child(args, "backend", "jax"))
    port = str(_free_port())
    workers = [
        _child(args, "data_parallel", "jax", ["--process-id", str(i), "--port", port])
        for i in (0, 1)
    ]
    dp_runs = [_result(w) for w in workers]

    import keras

    sys.path.insert(0, ROOT)
    import qat_plugin
    from tests.tflite_parity import compare_tflite

    _, _, (x_test, y_test) = _data(args)

    def read(path):
        with open(path, "rb") as f:
            return f.read()

    def accuracy(path):
        out = qat_plugin.TFLiteModel(read(path)).predict(x_test, batch_size=500)
        return float(np.mean(out.argmax(1) == y_test))

    jax_vs_tf = compare_tflite(read(tf_run["tflite"]), read(jax_run["tflite"]), x_test[:500])
    dp_vs_jax = compare_tflite(
        read(jax_run["tflite"]), read(dp_runs[0]["tflite"]), x_test[:500]
    )
    figures = {
        "keras": keras.__version__,
        "cpu_count": os.cpu_count(),
        "batch": args.batch,
        "tensorflow": tf_run,
        "jax": jax_run,
        "jax_two_processes": dp_runs,
        "accuracy": {
            "tensorflow": accuracy(tf_run["tflite"]),
            "jax": accuracy(jax_run["tflite"]),
            "jax_two_processes": accuracy(dp_runs[0]["tflite"]),
        },
        "parity_jax_vs_tensorflow": vars(jax_vs_tf),
        "parity_two_processes_vs_one": vars(dp_vs_jax),
    }
    acc = figures["accuracy"]
    table = "\n".join(
        [
            f"Batch {args.batch}, {args.qat_steps} QAT steps from the same float "
            f"weights; {os.cpu_count()} CPU cores (shared: timings are noisy).",
            "",
            "| run | float step ms | QAT step ms | QAT/float | int8 accuracy |",
            "| --- | --- | --- | --- | --- |",
            f"| TensorFlow | {tf_run['float_step_ms']:.1f} | {tf_run['qat_step_ms']:.1f} "
            f"| {tf_run['qat_float_ratio']:.2f} | {acc['tensorflow']:.4f} |",
            f"| JAX | {jax_run['float_step_ms']:.1f} | {jax_run['qat_step_ms']:.1f} "
            f"| {jax_run['qat_float_ratio']:.2f} | {acc['jax']:.4f} |",
            *[
                f"| JAX, 2 processes (process {r['process']}) | | "
                f"{r['qat_step_ms']:.1f} | | {acc['jax_two_processes']:.4f} |"
                for r in dp_runs
            ],
            "",
            f"JAX-trained vs TensorFlow-trained export: {jax_vs_tf.summary()}.",
            f"Two-process vs one-process JAX export: {dp_vs_jax.summary()}.",
        ]
    )
    print(table)
    with open(os.path.join(args.out, "backends.md"), "w") as f:
        f.write(table + "\n")
    with open(os.path.join(args.out, "backends.json"), "w") as f:
        json.dump(figures, f, indent=2)


if __name__ == "__main__":
    main()
