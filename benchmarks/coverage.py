"""Coverage of keras.applications: QAT export vs the converter's own PTQ.

For each architecture (random weights, `weights=None`) this builds the
float model, runs `quantize_model`, a short `calibrate`, `export_tflite` and
the LiteRT interpreter, and the converter's full-int8 post-training
quantization of the float model on the same calibration batch. It prints a
Markdown table: fully int8 or not, op counts (QAT vs PTQ), parity of the
exported model with the Keras QAT model (`measure_parity`: top-1
agreement, also over the samples whose top-1 leads by more than one output
step, and the largest output error in output quantization steps) and the
time taken, beside the same comparison between two LiteRT engines
(XNNPACK and the built-in kernels) running the same file, and the largest
per-op error when each op is fed the interpreter's own inputs
(`measure_local_parity`, over the ops matched to a Keras layer).

Random weights: the outputs are logits (`classifier_activation=None`) of a
10-class head, so that top-1 agreement compares real values rather than
ties of a near-uniform softmax. tfmot 0.8.1 (Keras 2) on the same families
is given beside the table (measured earlier, see the README).

Models beyond keras.applications (an autoencoder, a U-Net, keras-hub's
CSPDarkNet, a Conv1D audio net, PReLU / Resizing / bilinear UpSampling2D /
Lambda nets) come from coverage_models.py, and the attention models and
keras-hub backbones (BERT, DistilBERT, the Whisper encoder, ViT, DeiT,
MiT, MobileNetV3, EfficientNet, ResNet) from coverage_transformers.py,
with their own heads.

Usage:
    python benchmarks/coverage.py                       # every model
    python benchmarks/coverage.py MobileNetV3Small ResNet50V2 --size 96
    python benchmarks/coverage.py --list
    python benchmarks/coverage.py MobileNet --size 32 --train 300 --samples 256

With `--train STEPS` the model is first trained on Fashion-MNIST (resized,
RGB) and parity is measured on held-out test images.
"""

import argparse
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import qat_plugin  # noqa: E402
from qat_plugin.data.datasets import fashion_mnist  # noqa: E402
import coverage_models  # noqa: E402
import coverage_transformers  # noqa: E402
from _results import write_results  # noqa: E402

A = keras.applications

# Variants measured beside the defaults: name -> (constructor, arguments).
_VARIANTS = {
    "MobileNetV3Small-nopreproc": (
        A.MobileNetV3Small, {"include_preprocessing": False}),
    "EfficientNetV2B0-nopreproc": (
        A.EfficientNetV2B0, {"include_preprocessing": False}),
}
# Inception needs 75 pixels, Xception 71; the others take 32 and up.
_SMALLEST = {"InceptionV3": 75, "InceptionResNetV2": 75, "Xception": 71}

# name: (constructor, smallest input side it accepts, extra arguments):
# every keras.applications architecture, the variants above, and the models
# of coverage_models.py (extra arguments None: a builder taking the side).
MODELS = {
    **{
        name: (getattr(A, name), _SMALLEST.get(name, 32), {})
        for name in sorted(n for n in dir(A) if n[0].isupper())
    },
    **{
        name: (constructor, 32, extra)
        for name, (constructor, extra) in _VARIANTS.items()
    },
    **{name: (builder, 32, None) for name, builder in coverage_models.MODELS.items()},
    **{name: (builder, 32, None)
       for name, builder in coverage_transformers.MODELS.items()},
}


# tfmot 0.8.1 on the tf_keras.applications counterparts (Keras 2), measured
# earlier on this machine kind (shared/notes/quantization-facts.md).
TFMOT = {
    "MobileNet": "fully int8",
    "MobileNetV2": "fully int8",
    "ResNet50": "fully int8",
    "Xception": "fully int8",
    "VGG16": "fully int8",
    "InceptionV3": "float CONV_2D left",
    "MobileNetV3Small": "refused (op layers)",
    "ResNet50V2": "refused (BN not after conv)",
    "DenseNet121": "refused (BN not after conv)",
    "NASNetMobile": "refused (BN not after conv)",
    "EfficientNetB0": "refused (Rescaling)",
    "EfficientNetV2B0": "refused (Rescaling)",
    "ConvNeXtTiny": "refused (nested model)",
}


def build(name, size, include_top):
    constructor, smallest, extra = MODELS[name]
    side = max(size, smallest)
    if extra is None:  # coverage_models.py: its own head.
        return constructor(side)
    arguments = dict(weights=None, input_shape=(side, side, 3), **extra)
    if include_top:
        arguments.update(classes=10, classifier_activation=None)
    else:
        arguments.update(include_top=False, pooling="avg")
    return constructor(**arguments)


def images(model, count, seed=0, name=None):
    """Noise pixels, scaled for `model` (see `scaled`); token ids or noise
    features for the sequence models of coverage_transformers.py."""
    if name in coverage_transformers.SAMPLES:
        return coverage_transformers.SAMPLES[name](model, count, seed)
    rng = np.random.default_rng(seed)
    shape = (count,) + tuple(model.inputs[0].shape[1:])
    return scaled(model, rng.uniform(0, 255, shape).astype("float32"))


def scaled(model, pixels):
    """Pixels in [0, 255]; models without built-in preprocessing get [-1, 1]."""
    preprocessing = (keras.layers.Rescaling, keras.layers.Normalization)
    if any(isinstance(layer, preprocessing) for layer in model.layers):
        return pixels
    return pixels / 127.5 - 1.0


def fashion_pixels(model, images):
    """Fashion-MNIST images ([0, 1], 28x28x1) as `model`'s RGB input."""
    side = model.inputs[0].shape[1]
    resized = keras.ops.image.resize(images, (side, side))
    rgb = np.repeat(keras.ops.convert_to_numpy(resized), 3, axis=-1)
    return scaled(model, np.clip(rgb, 0.0, 1.0) * 255.0)


def trained_on_fashion_mnist(model, steps, samples):
    """Trains `model` on Fashion-MNIST; returns calibration and test batches.

    `steps` of Adam (1e-3, batch 32) on the training images, then the
    BatchNorm statistics are set from 512 of them (a few hundred steps at
    momentum 0.99 leave them far from settled). Calibration uses `samples`
    training images, parity `samples` test images.
    """
    data = fashion_mnist(download=False, synthetic=False)
    count = steps * 32
    x = fashion_pixels(model, data.x_train[: count + 512 + samples])
    model.compile(
        keras.optimizers.Adam(1e-3),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    model.fit(x[:count], data.y_train[:count], batch_size=32, epochs=1, verbose=0)
    settle_batch_norm(model, x[count : count + 512])
    return x[-samples:], fashion_pixels(model, data.x_test[:samples])


def settle_batch_norm(model, x):
    """Sets every BatchNormalization's moving statistics to `x`'s batch ones.

    Random weights with the initial statistics (mean 0, variance 1) make
    the activations of deep nets vanish or explode; one training-mode pass
    with momentum 0 gives each layer the statistics of its real input, as a
    trained model has them.
    """
    norms = [
        layer for layer in _all_layers(model)
        if isinstance(layer, keras.layers.BatchNormalization)
    ]
    momenta = [bn.momentum for bn in norms]
    for bn in norms:
        bn.momentum = 0.0
    model(x, training=True)
    for bn, momentum in zip(norms, momenta):
        bn.momentum = momentum


def _all_layers(model):
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            yield from _all_layers(layer)
        else:
            yield layer


def measure(name, size, include_top, samples, train_steps=0):
    start = time.perf_counter()
    model = build(name, size, include_top)
    if train_steps:
        x, test = trained_on_fashion_mnist(model, train_steps, samples)
    else:
        x = test = images(model, samples, name=name)
        settle_batch_norm(model, x)
    qat = qat_plugin.quantize_model(model)
    qat_plugin.calibrate(qat, x, batch_size=8)
    data = qat_plugin.export_tflite(qat)
    report = qat_plugin.inspect_tflite(data)
    parity = qat_plugin.measure_parity(qat, data, test, batch_size=8)
    # The same .tflite in the built-in kernels against XNNPACK: how far two
    # correct int8 engines differ on this network.
    engines = qat_plugin.measure_parity(
        qat_plugin.TFLiteModel(data, use_xnnpack=False), data, test
    )
    local = qat_plugin.measure_local_parity(qat, data, test)
    qat_seconds = time.perf_counter() - start
    ptq = qat_plugin.inspect_tflite(
        qat_plugin.export_tflite(model, representative_data=x)
    )
    # Token ids stay int32 in both exports (as in PTQ): "fully int8" is
    # then no float op and no float<->int8 conversion.
    fully_int8 = report.is_fully_int8 or _int8_inside(report)
    float_ops = sorted({op.name for op in report.float_ops})
    return {
        "model": name,
        "input": model.inputs[0].shape[1],
        "top": "yes" if include_top else "no",
        "int8": "yes" if fully_int8 else f"no ({', '.join(float_ops)})",
        "ops": len(report.ops),
        "ptq_ops": len(ptq.ops),
        "ptq_int8": "yes" if ptq.is_fully_int8 or _int8_inside(ptq) else (
            f"no ({', '.join(sorted({op.name for op in ptq.float_ops}))})"),
        "op_diff": _op_difference(report.op_counts, ptq.op_counts),
        "agreement": parity.agreement[0],
        "decided": parity.decided_agreement[0],
        "ties": parity.ties[0],
        "steps": parity.max_error_steps[0],
        "engines": engines,
        "local": local.max_error_steps,
        "local_ops": len(local.rows),
        "seconds": qat_seconds,
        "tfmot": TFMOT.get(name, "not measured"),
    }


def _int8_inside(report):
    """No float op, no float<->int8 conversion, and no float input or output."""
    return not report.float_ops and not report.conversion_ops and not any(
        "float" in t.dtype for t in report.inputs + report.outputs)


def _op_difference(qat_counts, ptq_counts):
    names = sorted(set(qat_counts) | set(ptq_counts))
    parts = [
        f"{n} {qat_counts.get(n, 0) - ptq_counts.get(n, 0):+d}"
        for n in names
        if qat_counts.get(n, 0) != ptq_counts.get(n, 0)
    ]
    return ", ".join(parts) or "same"


HEADER = (
    "| model | input | top | fully int8 | ops (QAT / PTQ) | PTQ int8 | "
    "op difference | top-1 agreement | decided agreement (ties) | "
    "max error (steps) | XNNPACK vs built-in kernels | "
    "local max error (steps, ops) | time (s) | tfmot (Keras 2) |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
)


def row(r):
    return (
        f"| {r['model']} | {r['input']} | {r['top']} | {r['int8']} | "
        f"{r['ops']} / {r['ptq_ops']} | {r['ptq_int8']} | {r['op_diff']} | "
        f"{r['agreement']:.1%} | {_percent(r['decided'])} ({r['ties']}) | "
        f"{r['steps']:.2f} | {r['engines'].agreement[0]:.1%} / "
        f"{r['engines'].max_error_steps[0]:.0f} steps | "
        f"{r['local']:.2f} ({r['local_ops']}) | {r['seconds']:.0f} | "
        f"{r['tfmot']} |"
    )


def _percent(value):
    return "-" if value is None else f"{value:.1%}"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="*", help="names (default: all)")
    parser.add_argument("--size", type=int, default=96, help="input side")
    parser.add_argument("--samples", type=int, default=32,
                        help="calibration / parity batch size")
    parser.add_argument("--headless", action="store_true",
                        help="include_top=False, pooling='avg'")
    parser.add_argument("--train", type=int, default=0, metavar="STEPS",
                        help="train on Fashion-MNIST for STEPS steps first; "
                        "parity then on --samples test images")
    parser.add_argument("--list", action="store_true", help="list the names")
    parser.add_argument("--output", metavar="STEM",
                        help="also write benchmarks/results/STEM.{md,json}")
    args = parser.parse_args(argv)
    if args.list:
        print("\n".join(MODELS))
        return 0
    unknown = [m for m in args.models if m not in MODELS]
    if unknown:
        parser.error(f"unknown models {unknown}; see --list")
    print(HEADER, flush=True)
    lines, figures = [HEADER], []
    for name in args.models or list(MODELS):
        keras.backend.clear_session()
        try:
            result = measure(
                name, args.size, not args.headless, args.samples, args.train
            )
            line = row(result)
            figures.append(_figures(result))
        except Exception as error:  # one failing model must not end the run
            line = (f"| {name} | | | error: {type(error).__name__}: "
                    f"{str(error).splitlines()[0][:150]} | | | | | | | | | | |")
            figures.append({"model": name, "error": str(error)})
        print(line, flush=True)
        lines.append(line)
    if args.output:
        write_results(
            os.path.join(os.path.dirname(__file__), "results"),
            args.output,
            "\n".join(lines),
            {"arguments": vars(args), "models": figures},
        )
    return 0


def _figures(result):
    engines = result.pop("engines")
    return dict(
        result,
        engines_agreement=engines.agreement[0],
        engines_max_error_steps=engines.max_error_steps[0],
    )


if __name__ == "__main__":
    sys.exit(main())
