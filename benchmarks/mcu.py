"""MLPerf Tiny's four reference models on TensorFlow Lite Micro: what a board needs.

Rebuilds the four closed-division reference architectures of MLPerf Tiny
(mlcommons/tiny, benchmark/training) in Keras 3:

- keyword spotting: DS-CNN (small), 49x10 MFCC input, 12 classes;
- visual wake words: MobileNetV1 alpha 0.25 at 96x96x3, 2 classes;
- image classification: CIFAR-10 ResNet-8, 32x32x3, 10 classes;
- anomaly detection: the dense autoencoder, 640 inputs.

Each trains a few float steps and a few QAT steps with recipe `int8-mcu` on
synthetic data (this measures deployment figures, not accuracy), exports
through the recipe (checked against the `mcu` target), and runs in
TensorFlow Lite Micro: flash (model bytes), the arena TFLM allocates and
the smallest arena that runs, beside the estimate the check gives without
the runtime, TFLM against LiteRT's reference kernels on 16 random inputs,
and host latency. The same float model is also exported by the converter's
own int8 PTQ (calibrated on 32 synthetic samples) and run the same way.

Prints a Markdown table and writes benchmarks/results/mcu.{md,json}.
Timings are wall-clock on a shared machine: noisy, and relative only.

Usage: python benchmarks/mcu.py [--steps 8]
"""

import argparse
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import qat_plugin  # noqa: E402
from qat_plugin import recipes  # noqa: E402
from qat_plugin.tflite.arena import arena_plan  # noqa: E402
from qat_plugin.tflite.micro import run_micro  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _results import write_results  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
layers = keras.layers


def _conv_bn_relu(x, filters, kernel, strides=1):
    x = layers.Conv2D(filters, kernel, strides=strides, padding="same", use_bias=False)(x)
    return layers.ReLU()(layers.BatchNormalization()(x))


def ds_cnn():
    """Keyword spotting, DS-CNN small: a 10x4 stem and four depthwise-separable blocks."""
    inputs = keras.Input((49, 10, 1))
    x = _conv_bn_relu(inputs, 64, (10, 4), strides=2)
    for _ in range(4):
        x = layers.DepthwiseConv2D(3, padding="same", use_bias=False)(x)
        x = layers.ReLU()(layers.BatchNormalization()(x))
        x = _conv_bn_relu(x, 64, 1)
    x = layers.AveragePooling2D(pool_size=(25, 5))(x)
    outputs = layers.Dense(12, activation="softmax")(layers.Flatten()(x))
    return keras.Model(inputs, outputs, name="kws_ds_cnn")


def mobilenet_v1_025():
    """Visual wake words: MobileNetV1, alpha 0.25, 96x96x3, 2 classes."""
    inputs = keras.Input((96, 96, 3))
    x = _conv_bn_relu(inputs, 8, 3, strides=2)
    blocks = [(64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2)]
    blocks += [(512, 1)] * 5 + [(1024, 2), (1024, 1)]
    for filters, strides in blocks:
        x = layers.DepthwiseConv2D(3, strides=strides, padding="same", use_bias=False)(x)
        x = layers.ReLU()(layers.BatchNormalization()(x))
        x = _conv_bn_relu(x, filters // 4, 1)
    x = layers.GlobalAveragePooling2D()(x)
    outputs = layers.Dense(2, activation="softmax")(x)
    return keras.Model(inputs, outputs, name="vww_mobilenet_v1_025")


def resnet8():
    """CIFAR-10 ResNet-8: a stem and three residual stacks (16, 32, 64 filters)."""
    inputs = keras.Input((32, 32, 3))
    x = _conv_bn_relu(inputs, 16, 3)
    for filters, strides in ((16, 1), (32, 2), (64, 2)):
        y = _conv_bn_relu(x, filters, 3, strides)
        y = layers.BatchNormalization()(layers.Conv2D(filters, 3, padding="same")(y))
        if strides != 1:
            x = layers.Conv2D(filters, 1, strides=strides, padding="same")(x)
        x = layers.ReLU()(layers.Add()([x, y]))
    x = layers.AveragePooling2D(pool_size=8)(x)
    outputs = layers.Dense(10, activation="softmax")(layers.Flatten()(x))
    return keras.Model(inputs, outputs, name="ic_resnet8")


def autoencoder():
    """Anomaly detection: the 640-128-128-128-128-8-128-128-128-128-640 autoencoder."""
    inputs = keras.Input((640,))
    x = inputs
    for units in (128, 128, 128, 128, 8, 128, 128, 128, 128):
        x = layers.ReLU()(layers.BatchNormalization()(layers.Dense(units)(x)))
    return keras.Model(inputs, layers.Dense(640)(x), name="ad_autoencoder")


MODELS = (ds_cnn, mobilenet_v1_025, resnet8, autoencoder)


def synthetic(model, n, seed):
    """Inputs in [0, 1) and targets of the model's output shape."""
    rng = np.random.default_rng(seed)
    x = rng.random((n,) + tuple(model.input_shape[1:]), dtype=np.float32)
    classes = model.output_shape[-1]
    if model.name == "ad_autoencoder":
        return x, x
    return x, rng.integers(0, classes, n)


def _compile(model):
    loss = "mse" if model.name == "ad_autoencoder" else "sparse_categorical_crossentropy"
    model.compile(keras.optimizers.Adam(1e-3), loss)


def deployment(tflite, samples=16):
    """The TFLM figures of one export, beside the estimate."""
    run = run_micro(tflite, num_samples=samples)
    estimate = arena_plan(tflite)
    return {
        "flash_bytes": len(tflite),
        "tflm_arena_bytes": run.arena_bytes,
        "tflm_head_bytes": run.head_bytes,
        "tflm_tail_bytes": run.tail_bytes,
        "tflm_smallest_arena_bytes": run.smallest_arena_bytes,
        "estimate_bytes": estimate.estimated_bytes,
        "max_diff_steps": run.max_diff_steps,
        "samples": run.num_samples,
        "host_ms": 1e3 * run.seconds_per_inference,
        "reference_ms": 1e3 * run.reference_seconds_per_inference,
        "version": run.version,
    }


def measure(builder, steps, batch_size=16, seed=0):
    keras.utils.set_random_seed(seed)
    model = builder()
    x, y = synthetic(model, steps * batch_size, seed)
    _compile(model)
    start = time.perf_counter()
    model.fit(x, y, batch_size=batch_size, epochs=1, verbose=0)
    recipe = recipes.get("int8-mcu")
    qat = recipe.quantize(model)
    _compile(qat)
    qat.fit(x, y, batch_size=batch_size, epochs=1, verbose=0, callbacks=recipe.callbacks(qat))
    qat_tflite = recipe.export_tflite(qat)
    ptq_tflite = qat_plugin.export_tflite(model, representative_data=x[:32],
                                          calibration_steps=32)
    row = {"model": model.name, "parameters": model.count_params(),
           "qat": deployment(qat_tflite), "ptq": deployment(ptq_tflite),
           "seconds": time.perf_counter() - start}
    return row


def table(rows):
    lines = [
        "| model | export | flash (B) | TFLM arena (B) | smallest arena that runs (B) "
        "| estimate without TFLM (B) | TFLM vs LiteRT reference (max steps) "
        "| host ms/inference, TFLM (relative) |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        for export in ("qat", "ptq"):
            d = row[export]
            lines.append(
                f"| {row['model']} | {'QAT int8-mcu' if export == 'qat' else 'PTQ int8'} "
                f"| {d['flash_bytes']:,} | {d['tflm_arena_bytes']:,} "
                f"| {d['tflm_smallest_arena_bytes']:,} | {d['estimate_bytes']:,} "
                f"| {d['max_diff_steps']} | {d['host_ms']:.2f} |"
            )
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8,
                        help="float and QAT training steps per model (synthetic data)")
    args = parser.parse_args(argv)
    rows = []
    for builder in MODELS:
        rows.append(measure(builder, args.steps))
        print(f"{rows[-1]['model']}: {rows[-1]['seconds']:.0f} s", flush=True)
    markdown = table(rows)
    version = rows[0]["qat"]["version"]
    samples = rows[0]["qat"]["samples"]
    markdown += (f"\n\nTensorFlow Lite Micro {version}; {args.steps} training steps per "
                 f"model on synthetic data; {samples} random int8 inputs per comparison.\n")
    print(markdown)
    write_results(RESULTS, "mcu", markdown, {"steps": args.steps, "rows": rows})


if __name__ == "__main__":
    main()
