"""The `qat-plugin demo`: float training, QAT, export and the comparison.

A small MobileNet-style network (depthwise-separable convolutions,
BatchNormalization, ReLU6) is trained on Fashion-MNIST, fine-tuned with
quantization-aware training with the recipe's callbacks (its
`QuantizationScheduler`; for a pruning recipe, a pruning phase first),
exported to an int8 .tflite model checked against the recipe's deployment
target, and compared in the LiteRT interpreter with the
post-training quantization baselines of the same float model. A control run
fine-tunes the float model for the same epochs without quantization, and
its PTQ export (`ptq-int8-finetuned`) joins the table, so that QAT is read
against PTQ and float at the same training budget, not against the model
it started from. Everything it makes goes into one folder.
"""

import dataclasses
import os
import time

import keras
import numpy as np

from qat_plugin.analysis.compare import compare
from qat_plugin.data.datasets import fashion_mnist
from qat_plugin.files import write_bytes_atomic
from qat_plugin.analysis.layerwise import layerwise_error
from qat_plugin.analysis.metrics import agreement
from qat_plugin.errors import ExportError
from qat_plugin.tflite.inspection import inspect_tflite
from qat_plugin.tflite.interpreter import TFLiteModel
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


def _headline(qat, ptq_finetuned, control, ptq, epochs, mode="int8"):
    """The demo's summary: QAT against PTQ and float at the same training budget.

    Args:
        qat: the QAT int8 export's accuracy (LiteRT).
        ptq_finetuned: PTQ int8 of the fine-tuned float model (LiteRT).
        control: the fine-tuned float model's accuracy (Keras, float32).
        ptq: PTQ int8 of the float model before the fine-tuning (LiteRT).
        epochs: the fine-tuning epochs that QAT and the control both had.
        mode: the QAT export's mode, `"int8"` or `"int16x8"`.

    Examples:
        >>> print(_headline(0.8889, 0.8895, 0.8889, 0.8313, 1))  # doctest: +NORMALIZE_WHITESPACE
        Same training budget (1 fine-tuning epoch(s) each): QAT int8 scores
        88.89%, PTQ int8 of the fine-tuned float model 88.95%, the fine-tuned
        float model itself 88.89% (Keras, float32). Against that float model,
        quantization cost nothing with QAT and saved 0.06 points with PTQ:
        QAT int8 is 0.06 points below PTQ int8. The rows ptq-* without
        "-finetuned" (ptq-int8: 83.13%) quantize the float model before the
        fine-tuning: read them against the float row, not against QAT.
        >>> print(_headline(0.885, 0.880, 0.887, 0.85, 1))  # doctest: +NORMALIZE_WHITESPACE
        Same training budget (1 fine-tuning epoch(s) each): QAT int8 scores
        88.50%, PTQ int8 of the fine-tuned float model 88.00%, the fine-tuned
        float model itself 88.70% (Keras, float32). Against that float model,
        quantization cost 0.20 points with QAT and cost 0.70 points with PTQ:
        QAT int8 is 0.50 points above PTQ int8. The rows ptq-* without
        "-finetuned" (ptq-int8: 85.00%) quantize the float model before the
        fine-tuning: read them against the float row, not against QAT.
    """

    def cost(value):
        delta = round(100 * (control - value), 2)
        if not delta:
            return "cost nothing"
        return f"{'cost' if delta > 0 else 'saved'} {abs(delta):.2f} points"

    gain = round(100 * (qat - ptq_finetuned), 2)
    versus = (
        f"{abs(gain):.2f} points {'above' if gain > 0 else 'below'}" if gain else "level with"
    )
    return (
        f"Same training budget ({epochs} fine-tuning epoch(s) each): QAT {mode} scores "
        f"{100 * qat:.2f}%, PTQ {mode} of the fine-tuned float model "
        f"{100 * ptq_finetuned:.2f}%, the fine-tuned float model itself "
        f"{100 * control:.2f}% (Keras, float32). Against that float model, "
        f"quantization {cost(qat)} with QAT and {cost(ptq_finetuned)} with PTQ: "
        f'QAT {mode} is {versus} PTQ {mode}. The rows ptq-* without "-finetuned" '
        + (f"(ptq-{mode}: {100 * ptq:.2f}%) " if ptq is not None else "")
        + "quantize the float model before the fine-tuning: read them against "
        "the float row, not against QAT."
    )


def _finetuned_ptq(control, float_model, mode, x_test, y_test, calibration, verbose):
    """The converter's PTQ of the fine-tuned float model, as one report row.

    Its agreement is counted against `float_model`, like every other row's.
    """
    row = compare(
        control, eval_data=(x_test, y_test), representative_data=calibration,
        modes=(mode,), calibration_steps=len(calibration),
        verbose="auto" if verbose else 0,
    ).rows[0]
    reference = float_model.predict(x_test, batch_size=256, verbose=0)
    y_pred = TFLiteModel(row.tflite).predict(x_test, batch_size=256)
    return dataclasses.replace(
        row, name=f"ptq-{mode}-finetuned", agreement=agreement(reference, y_pred)
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
        modes: the PTQ baselines of the float model. The PTQ of the
            fine-tuned float model, in the QAT model's mode, is always added
            (`ptq-int8-finetuned`).
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
        ['ptq-int8', 'ptq-int8-finetuned', 'qat-int8']
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
    qat_row = report.rows[-1]
    qat_name = qat_row.name
    # PTQ of the control: the baseline with the same training as QAT.
    finetuned = _finetuned_ptq(
        control, float_model, qat_row.mode, x_test, y_test, calibration, verbose
    )
    report = dataclasses.replace(report, rows=(*report.rows[:-1], finetuned, qat_row))
    before = [r.metric for r in report.rows if r.name == f"ptq-{qat_row.mode}"]
    note = (
        f"Control: the float model fine-tuned for the same {extra_epochs} epoch(s) at "
        f"the QAT learning rate, without quantization, scores "
        f"{100 * control_accuracy:.2f}% (Keras, float32); {finetuned.name} is the "
        "converter's PTQ of that model.\n\n"
        + _headline(qat_row.metric, finetuned.metric, control_accuracy,
                    before[0] if before else None, extra_epochs, qat_row.mode)
    )
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
        (finetuned.name, control, "against the fine-tuned float model"),
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
