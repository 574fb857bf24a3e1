"""Does the QAT schedule beat fake-quant from step 0? Fashion-MNIST, int8 TFLite.

Trains a small CNN with BatchNorm in float (2 epochs on the full 60k, so
the BatchNorm statistics settle), then fine-tunes a QAT copy for one epoch
two ways, from the same float weights and data order:

- "from step 0": fake-quant on from the first step, BatchNorm and ranges
  never frozen (a quantized model's default);
- "scheduled": `QuantizationScheduler` with observers only for the first
  `--start` epochs, BatchNorm frozen from `--bn-freeze`, ranges frozen from
  `--range-freeze` (fractions of the QAT epoch).

Each QAT model is exported by `TFLiteExport` and scored in the LiteRT
interpreter on the 10k test set; the float model and the converter's own
PTQ give context. Prints a Markdown table. With `--seeds 2` each QAT run is
repeated with another shuffle order.

Usage: python benchmarks/bench_schedule.py [--seeds 1] [--float-epochs 2]
"""

import argparse
import os
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import qat_plugin  # noqa: E402
from qat_plugin.data.datasets import fashion_mnist  # noqa: E402
from qat_plugin.callbacks import (  # noqa: E402
    QuantizationMonitor,
    QuantizationScheduler,
    TFLiteExport,
)

def small_cnn():
    inputs = keras.Input((28, 28, 1))
    x = inputs
    for filters in (16, 32):
        x = keras.layers.Conv2D(filters, 3, padding="same", use_bias=False)(x)
        x = keras.layers.BatchNormalization()(x)
        x = keras.layers.ReLU()(x)
        x = keras.layers.MaxPooling2D()(x)
    x = keras.layers.Conv2D(32, 3, use_bias=False)(x)
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.ReLU()(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(10)(x)
    return keras.Model(inputs, outputs)


def compile_model(model, learning_rate):
    model.compile(
        keras.optimizers.Adam(learning_rate),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )


def timed_qat_epoch(float_model, train, batch_size, seed, callbacks):
    """One QAT epoch; returns the model, its history and the fit time."""
    keras.utils.set_random_seed(seed)
    qat = qat_plugin.quantize_model(float_model)
    compile_model(qat, 1e-4)
    start = time.perf_counter()
    history = qat.fit(
        *train, epochs=1, batch_size=batch_size, verbose=0, callbacks=callbacks
    )
    return qat, history, time.perf_counter() - start


def qat_run(float_model, train, test, schedule, seed, batch_size, out_dir, name):
    export = TFLiteExport(
        os.path.join(out_dir, f"{name}-{seed}.tflite"), validation_data=test
    )
    monitor = QuantizationMonitor(data=test[0])
    callbacks = [monitor, export]
    if schedule is not None:
        callbacks.insert(0, schedule)
    qat, history, seconds = timed_qat_epoch(
        float_model, train, batch_size, seed, callbacks
    )
    logs = {k: v[-1] for k, v in history.history.items()}
    keras_accuracy = qat.evaluate(*test, verbose=0, return_dict=True)["accuracy"]
    # The monitor's cost per epoch: one measure() (sample pass + SQNR).
    monitor_seconds = []
    for _ in range(3):
        tick = time.perf_counter()
        monitor.measure()
        monitor_seconds.append(time.perf_counter() - tick)
    return (
        export.int8_accuracy, keras_accuracy, logs, seconds,
        float(np.median(monitor_seconds)), monitor.worst_sqnr_layer,
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--float-epochs", type=int, default=2)
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--start", type=float, default=0.1)
    parser.add_argument("--bn-freeze", type=float, default=0.5)
    parser.add_argument("--range-freeze", type=float, default=0.8)
    args = parser.parse_args()

    data = fashion_mnist(synthetic=False)
    train, test = (data.x_train, data.y_train), (data.x_test, data.y_test)
    keras.utils.set_random_seed(0)
    float_model = small_cnn()
    compile_model(float_model, 1e-3)
    start = time.perf_counter()
    float_model.fit(
        *train, epochs=args.float_epochs, batch_size=args.batch_size, verbose=0
    )
    float_seconds = time.perf_counter() - start
    float_accuracy = float_model.evaluate(*test, verbose=0, return_dict=True)[
        "accuracy"
    ]
    ptq = qat_plugin.export_tflite(float_model, representative_data=train[0][:500])
    ptq_accuracy = float(
        np.mean(qat_plugin.TFLiteModel(ptq).predict(test[0]).argmax(1) == test[1])
    )

    rows = []
    with tempfile.TemporaryDirectory() as out_dir:
        for seed in range(args.seeds):
            for name, schedule in (
                ("from step 0", None),
                (
                    f"scheduled (start {args.start}, BN freeze {args.bn_freeze}, "
                    f"range freeze {args.range_freeze} epoch)",
                    QuantizationScheduler(
                        quantize_start=args.start,
                        bn_freeze=args.bn_freeze,
                        range_freeze=args.range_freeze,
                        unit="epoch",
                    ),
                ),
            ):
                rows.append((name, seed) + qat_run(
                    float_model, train, test, schedule, 1000 + seed,
                    args.batch_size, out_dir, name.split()[0],
                ))

    # Monitor overhead: a QAT epoch on the first 15k samples, with and
    # without the monitor (its cost per epoch is fixed: one sample pass).
    subset = (train[0][:15000], train[1][:15000])
    overhead = {}
    for label, callbacks in (
        ("without", []),
        ("with", [QuantizationMonitor(data=test[0])]),
        ("without, again", []),
    ):
        overhead[label] = timed_qat_epoch(
            float_model, subset, args.batch_size, 1000, callbacks
        )[2]

    steps = int(np.ceil(len(train[0]) / args.batch_size))
    print(
        f"\nFashion-MNIST, small CNN with BN: float {args.float_epochs} epochs "
        f"({args.float_epochs * steps} steps, {float_seconds:.0f} s), then 1 "
        f"QAT epoch ({steps} steps, Adam 1e-4), batch {args.batch_size}.\n"
    )
    print("| model | seed | int8 TFLite acc. | Keras QAT acc. | worst weight SQNR (dB) | clipped activations | QAT epoch (s) | monitor per epoch (s) |")
    print("|---|---|---|---|---|---|---|---|")
    print(f"| float (Keras) | - | - | {float_accuracy:.4f} | - | - | - | - |")
    print(f"| PTQ int8 (converter, 500 samples) | - | {ptq_accuracy:.4f} | - | - | - | - | - |")
    for name, seed, int8, keras_acc, logs, seconds, monitor_s, worst in rows:
        print(
            f"| QAT {name} | {seed} | {int8:.4f} | {keras_acc:.4f} | "
            f"{logs['qat_worst_sqnr_db']:.1f} ({worst}) | "
            f"{logs['qat_clip_fraction']:.2e} | {seconds:.0f} | {monitor_s:.3f} |"
        )
    print(
        "\nQuantizationMonitor overhead, QAT epoch of 15k samples "
        f"({int(np.ceil(15000 / args.batch_size))} steps): "
        + ", ".join(f"{k} {v:.1f} s" for k, v in overhead.items())
        + f"; one QuantizationMonitor.measure() (256-sample pass, SQNR of every "
        f"layer): {rows[0][6]:.3f} s."
    )
    for label in ("from", "scheduled"):
        values = [r[2] for r in rows if r[0].startswith(label)]
        print(f"\nmean int8 accuracy, {label}: {np.mean(values):.4f} over {len(values)} seed(s)")


if __name__ == "__main__":
    main()
