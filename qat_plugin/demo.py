"""The `qat-plugin demo`: float training, QAT, export and the comparison.

A small MobileNet-style network (depthwise-separable convolutions,
BatchNormalization, ReLU6) is trained on Fashion-MNIST, fine-tuned with
quantization-aware training with the recipe's callbacks (its
`QuantizationScheduler`; for a pruning recipe, a pruning phase first),
exported to an int8 .tflite model checked against the recipe's deployment
target, and compared in the LiteRT interpreter with the
post-training quantization baselines of the same float model. A control run
fine-tunes the float model for the same epochs without quantization, so the
QAT row can be read against the same amount of training. Everything it
makes goes into one folder.
"""

import os
import time

import keras
import numpy as np

from qat_plugin.analysis.compare import compare
from qat_plugin.data.datasets import fashion_mnist
from qat_plugin.files import write_bytes_atomic
from qat_plugin.analysis.layerwise import layerwise_error
from qat_plugin.errors import ExportError
from qat_plugin.tflite.inspection import inspect_tflite
from qat_plugin.recipes import resolve
from qat_plugin.tflite.targets import check_target

DEMO_MODES = ("float", "dynamic", "float16", "int8", "int16x8")


def mobilenet_style(input_shape=(28, 28, 1), num_classes=10, width=16):
    """A small MobileNet-style classifier: a conv stem and 4 separable blocks.

    Examples:
        >>> model = mobilenet_style()
        >>> model.output_shape
        (None, 10)
    """

    def conv_bn_relu6(x, layer, name):
        x = layer(x)
        x = keras.layers.BatchNormalization(name=f"{name}_bn")(x)
        return keras.layers.ReLU(6.0, name=f"{name}_relu6")(x)

    inputs = keras.Input(input_shape, name="image")
    x = conv_bn_relu6(
        inputs,
        keras.layers.Conv2D(width, 3, strides=2, padding="same", use_bias=False, name="stem"),
        "stem",
    )
    for i, (filters, strides) in enumerate(
        [(2 * width, 1), (4 * width, 2), (4 * width, 1), (8 * width, 2)], start=1
    ):
        x = conv_bn_relu6(
            x,
            keras.layers.DepthwiseConv2D(
                3, strides=strides, padding="same", use_bias=False, name=f"block{i}_dw"
            ),
            f"block{i}_dw",
        )
        x = conv_bn_relu6(
            x,
            keras.layers.Conv2D(filters, 1, use_bias=False, name=f"block{i}_pw"),
            f"block{i}_pw",
        )
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    outputs = keras.layers.Dense(num_classes, name="logits")(x)
    return keras.Model(inputs, outputs, name="mobilenet_style")


def _fine_tune(model, x, y, batch_size, epochs, callbacks, verbose):
    """Pruning and QAT fine-tuning: Adam at 1e-4, 1/20 of the float rate."""
    model.compile(
        optimizer=keras.optimizers.Adam(1e-4),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    model.fit(
        x, y, batch_size=batch_size, epochs=epochs, callbacks=callbacks,
        verbose=verbose,
    )


def _phase(title, verbose):
    if verbose:
        print(f"\n== {title}", flush=True)


def run_demo(
    output_dir="qat-demo",
    recipe="int8",
    *,
    epochs=2,
    qat_epochs=1,
    train_samples=None,
    eval_samples=None,
    batch_size=128,
    modes=DEMO_MODES,
    seed=0,
    verbose=1,
):
    """Trains, quantizes, exports and compares; writes it all to `output_dir`.

    The defaults (2 float epochs, 1 QAT epoch and 1 control epoch over the
    60k training images, about 1900 steps, so that BatchNorm statistics
    settle) take about 4 minutes on 2 CPU cores.

    Args:
        output_dir: the folder for the models, tables and plot.
        recipe: the QAT recipe (a built-in name or a TOML path).
        epochs: float training epochs.
        qat_epochs: QAT fine-tuning epochs.
        train_samples, eval_samples: use only the first samples (for a quick
            try; accuracies after too few steps measure nothing).
        batch_size: training batch size.
        modes: the PTQ baselines.
        seed: the random seed.
        verbose: 1 prints each phase with progress bars, 0 is silent.

    Returns:
        `(report, paths)`: the `ComparisonReport` and a dict of written files.

    Examples:
        A quick try on a slice of the data (its accuracies measure nothing):

        >>> import tempfile
        >>> report, paths = run_demo(tempfile.mkdtemp(), epochs=1, train_samples=256,
        ...                          eval_samples=64, batch_size=32, modes=("int8",),
        ...                          verbose=0)
        >>> [row.name for row in report.rows]
        ['ptq-int8', 'qat-int8']
    """
    started = time.perf_counter()
    keras.utils.set_random_seed(seed)
    recipe = resolve(recipe)
    os.makedirs(output_dir, exist_ok=True)
    fit_verbose = 1 if verbose else 0

    _phase("Data", verbose)
    data = fashion_mnist()
    x_train, y_train = data.x_train[:train_samples], data.y_train[:train_samples]
    x_test, y_test = data.x_test[:eval_samples], data.y_test[:eval_samples]
    if verbose:
        print(
            f"source: {data.source}{'  (SYNTHETIC stand-in task)' if data.is_synthetic else ''}; "
            f"{len(x_train)} training and {len(x_test)} test images"
        )

    _phase(f"Float training ({epochs} epochs)", verbose)
    float_model = mobilenet_style(data.x_train.shape[1:], len(data.class_names))
    float_model.compile(
        optimizer=keras.optimizers.Adam(2e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    float_model.fit(x_train, y_train, batch_size=batch_size, epochs=epochs, verbose=fit_verbose)

    steps_per_epoch = -(-len(x_train) // batch_size)
    start_model = float_model
    pruning_epochs = max(recipe.pruning.epochs, 1) if recipe.pruning.enabled else 0
    if pruning_epochs:
        _phase(f"Pruning ({pruning_epochs} epoch(s), recipe '{recipe.name}')", verbose)
        start_model = recipe.prune(float_model, steps_per_epoch=steps_per_epoch)
        _fine_tune(
            start_model, x_train, y_train, batch_size, pruning_epochs,
            recipe.callbacks(start_model), fit_verbose,
        )

    _phase(f"Quantization-aware training ({qat_epochs} epoch(s), recipe '{recipe.name}')", verbose)
    qat_model = recipe.quantize(start_model)
    _fine_tune(
        qat_model, x_train, y_train, batch_size, qat_epochs,
        recipe.callbacks(qat_model, steps_per_epoch=steps_per_epoch), fit_verbose,
    )

    extra_epochs = qat_epochs + pruning_epochs
    _phase(f"Control: the float model fine-tuned the same {extra_epochs} epoch(s), no quantization", verbose)
    # QAT trains the model further; without this control its gain over the
    # float row would mix the extra training with the quantization.
    control = keras.models.clone_model(float_model)
    control.set_weights(float_model.get_weights())
    control.compile(
        optimizer=keras.optimizers.Adam(1e-4),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    control.fit(x_train, y_train, batch_size=batch_size, epochs=extra_epochs, verbose=fit_verbose)
    control_accuracy = float(control.evaluate(x_test, y_test, verbose=0)[1])
    note = (
        f"Control: the float model fine-tuned for the same {extra_epochs} epoch(s) at "
        f"the QAT learning rate, without quantization, scores "
        f"{100 * control_accuracy:.2f}% (Keras, float32). Compare qat-int8 with "
        "this figure to see what quantization cost or gained; the float row is "
        "the model before that fine-tuning."
    )

    _phase("Export and comparison in the LiteRT interpreter", verbose)
    rng = np.random.default_rng(seed)
    calibration = x_train[rng.choice(len(x_train), min(500, len(x_train)), replace=False)]
    report = compare(
        float_model,
        qat_model,
        eval_data=(x_test, y_test),
        representative_data=calibration,
        modes=modes,
        calibration_steps=len(calibration),
        verbose="auto" if verbose else 0,
    )
    qat_name = report.rows[-1].name
    recipe_note = ""
    if recipe.export.target != "any":
        check = check_target(report[qat_name].tflite, recipe.export.target)
        if not check.compatible:
            raise ExportError(f"Recipe '{recipe.name}': the QAT model does not meet "
                              f"its target.\n{check.summary()}")
        recipe_note = f"\n\nDeployment target of recipe '{recipe.name}' ({qat_name}): {check.summary()}"
    if recipe.pruning.enabled:
        sparsity = inspect_tflite(report[qat_name].tflite).weight_sparsity
        recipe_note += (f"\n\nWeight sparsity of {qat_name} (recipe '{recipe.name}'): "
                        f"{sparsity:.1%} of its int8 weights are zero.")
    paths = report.save(
        output_dir,
        references={f"float, fine-tuned {extra_epochs} more epoch(s) (Keras)": control_accuracy},
    )
    write_bytes_atomic(
        paths["markdown"], f"{report.to_markdown()}\n\n{note}{recipe_note}\n".encode()
    )
    float_path = os.path.join(output_dir, "float.keras")
    qat_path = os.path.join(output_dir, "qat.keras")
    float_model.save(float_path)
    qat_model.save(qat_path)
    paths.update({"float_keras": float_path, "qat_keras": qat_path})

    _phase("Layer-wise error of the int8 models", verbose)
    checks = [
        ("ptq-int8", float_model, "against the float model"),
        (qat_name, float_model, "against the float model (QAT fine-tuning moved "
         "the weights, so this includes that drift)"),
        (qat_name, qat_model, "against the QAT Keras model (export fidelity)"),
    ]
    sections = []
    for name, reference, against in checks:
        if name in [r.name for r in report.rows]:
            layers = layerwise_error(
                reference, report[name].tflite, x_test, max_samples=256,
                title=f"{name}: layer-wise error {against}",
            )
            sections.append(layers.to_markdown())
    paths["layerwise"] = os.path.join(output_dir, "layerwise.md")
    write_bytes_atomic(paths["layerwise"], ("\n\n".join(sections) + "\n").encode())

    if verbose:
        print(f"\nData: {data.source}" + ("  (SYNTHETIC)" if data.is_synthetic else ""))
        print(report.to_markdown())
        print(f"\n{note}{recipe_note}")
        print(f"\nWrote {output_dir}/: comparison.md, comparison.json, comparison.png, "
              f"layerwise.md, *.tflite, float.keras, qat.keras "
              f"({time.perf_counter() - started:.0f} s in all)")
    return report, paths
