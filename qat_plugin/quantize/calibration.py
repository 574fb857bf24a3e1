"""`calibrate`: sets a quantized model's activation ranges from sample data."""

import warnings

import keras
from keras import ops, tree

from qat_plugin.data.batches import (
    input_arrays,
    input_specs,
    is_in_memory,
    split_element,
    stream,
)
from qat_plugin.errors import ExportError
from qat_plugin.layers.base import is_quantized, quantized_layers
from qat_plugin.layers.modes import calibration_mode


def calibrate(model, data, steps=None, batch_size=32):
    """Runs `data` through a quantized model so its observers learn ranges.

    The model runs in inference mode (BatchNormalization uses its moving
    statistics and does not update them; dropout is off; the QAT schedule
    does not advance) while every activation range observer updates its
    exponential moving average. Use it before exporting a model that is not
    fine-tuned, or to seed the ranges before QAT.

    Args:
        model: a model built by `quantize_model`.
        data: the inputs: an array (or a list/dict of arrays, one per input),
            split into batches of `batch_size`; or a `tf.data.Dataset`,
            `keras.utils.PyDataset` or iterable of batches (`(x, y)` tuples
            are read as in `fit`).
        steps: the number of batches to run (default: all of `data`).
        batch_size: batch size for in-memory data.

    Returns:
        The number of batches run.

    Examples:
        >>> import keras, numpy as np, qat_plugin
        >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
        >>> qat = qat_plugin.quantize_model(model)
        >>> qat_plugin.calibrate(qat, np.random.rand(64, 4).astype("float32"))
        2
        >>> qat_plugin.inspect_tflite(qat_plugin.export_tflite(qat)).is_fully_int8
        True
    """
    if not is_quantized(model):
        raise ValueError(
            f"calibrate expects a model built by qat_plugin.quantize_model; "
            f"model '{model.name}' has no quantized layers."
        )
    if steps is not None and steps < 1:
        raise ValueError(f"calibrate: steps must be at least 1, got {steps}.")
    if batch_size < 1:
        raise ValueError(f"calibrate: batch_size must be at least 1, got {batch_size}.")
    specs = input_specs(model)
    streamed = not is_in_memory(data)
    skipped_before = nonfinite_batches(model)
    run = 0
    with calibration_mode():
        observe = _eager_call(model)
        for batch in _batches(data, streamed, specs, batch_size):
            if steps is not None and run == steps:
                break
            if run == _EAGER_BATCHES:
                # Traced inside the context: the compiled call observes.
                observe = _compiled_call(model)
            observe(tree.pack_sequence_as(model._inputs_struct, batch))
            run += 1
    if run == 0:
        raise ValueError("calibrate: data yielded no batches.")
    warn_nonfinite(model, "calibrate", since=skipped_before)
    return run


def nonfinite_batches(model):
    """The batches holding NaN or inf that each layer's range observers skipped.

    Returns:
        A dict `{layer name: batches}` of the layers that skipped any.

    Examples:
        >>> import keras, numpy as np, qat_plugin
        >>> qat = qat_plugin.quantize_model(
        ...     keras.Sequential([keras.Input((2,), name="x"), keras.layers.Dense(2, name="head")]))
        >>> _ = qat(np.array([[1.0, 2.0]], "float32"), training=True)
        >>> _ = qat(np.array([[1.0, np.nan]], "float32"), training=True)
        >>> nonfinite_batches(qat)
        {'x_quantize': 1, 'head': 1}
    """
    counts = {}
    for layer in quantized_layers(model):
        for quantizer in layer.activation_quantizers():
            if quantizer.fixed_range is None:
                count = int(ops.convert_to_numpy(quantizer.nonfinite_batches))
                if count:
                    counts[layer.name] = max(counts.get(layer.name, 0), count)
    return counts


def warn_nonfinite(model, where, since=None):
    """Warns, naming the layers, if observers skipped NaN/inf batches (since `since`).

    Returns the totals (`nonfinite_batches(model)`), the next call's `since`.
    """
    since = since or {}
    totals = nonfinite_batches(model)
    counts = {name: count - since.get(name, 0)
              for name, count in totals.items() if count > since.get(name, 0)}
    if counts:
        warnings.warn(
            f"{where}: the activation range observers of model '{model.name}' "
            f"skipped batches holding NaN or inf ({{layer: batches}}: {counts}); "
            "those values are kept out of the ranges, but NaN in the data or the "
            "loss also reaches the weights: check the inputs, lower the learning "
            "rate, or stop training on it with keras.callbacks.TerminateOnNaN.",
            stacklevel=3,
        )
    return totals


# Measured on MobileNetV2 96x96, batch 32, 2 cores: an eager batch takes
# about 1 s, a compiled one 0.3 s, and tracing 4-5 s. A few batches run
# eagerly; a longer calibration is compiled after them.
_EAGER_BATCHES = 8


def _eager_call(model):
    return lambda inputs: model(inputs, training=False)


def _compiled_call(model):
    """`model(inputs, training=False)` as a compiled function of the backend.

    On JAX the range updates come back from a jitted stateless call and are
    assigned; torch runs eagerly.
    """
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        return tf.function(_eager_call(model), reduce_retracing=True)
    if backend == "jax":
        import jax

        @jax.jit
        def stateless(trainable, non_trainable, inputs):
            _, updated = model.stateless_call(trainable, non_trainable, inputs,
                                              training=False)
            return updated

        def observe(inputs):
            updated = stateless([v.value for v in model.trainable_variables],
                                [v.value for v in model.non_trainable_variables], inputs)
            for variable, value in zip(model.non_trainable_variables, updated):
                variable.assign(value)

        return observe
    return _eager_call(model)


def _batches(data, streamed, specs, batch_size):
    for index, element in enumerate(stream(data, "data")):
        x, _ = split_element(element, streamed)
        arrays = input_arrays(x, specs, "data", f"batch {index}" if streamed else "")
        if streamed:
            yield arrays
            continue
        for start in range(0, len(arrays[0]), batch_size):
            yield [a[start : start + batch_size] for a in arrays]


def check_observed(model):
    """Raises `ExportError` naming the activation ranges a model has not observed.

    A range that saw only batches holding NaN or inf is named as such; a
    constant activation (a zero-width range) counts as observed.

    Examples:
        >>> import keras, qat_plugin
        >>> qat = qat_plugin.quantize_model(
        ...     keras.Sequential([keras.Input((2,), name="x"), keras.layers.Dense(2, name="head")]))
        >>> try:
        ...     check_observed(qat)
        ... except qat_plugin.ExportError as error:
        ...     print(str(error)[:67])
        These activation ranges were never observed: 'x_quantize' (output),
    """
    warn_nonfinite(model, "export_tflite")
    unobserved, nonfinite = [], []
    for layer in quantized_layers(model):
        for quantizer in layer.activation_quantizers():
            if bool(ops.convert_to_numpy(quantizer.observed)):
                continue
            unobserved.append(f"'{layer.name}' ({quantizer.name})")
            if float(ops.convert_to_numpy(quantizer.nonfinite_batches)):
                nonfinite.append(layer.name)
    if nonfinite:
        raise ExportError(
            f"The activation ranges of {', '.join(map(repr, nonfinite))} saw "
            "only batches holding NaN or inf, which their observers skip: the "
            "model produces non-finite values there. Check the inputs and the "
            "training (learning rate, loss), then calibrate on finite data "
            "with qat_plugin.calibrate(model, data)."
        )
    if unobserved:
        raise ExportError(
            "These activation ranges were never observed: "
            f"{', '.join(unobserved)}. Train the model with fit() or run "
            "qat_plugin.calibrate(model, data) before exporting."
        )
