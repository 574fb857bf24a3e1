"""`calibrate`: sets a quantized model's activation ranges from sample data."""

from keras import tree

from qat_plugin.data.batches import (
    input_arrays,
    input_specs,
    is_in_memory,
    split_element,
    stream,
)
from qat_plugin.layers.base import is_quantized
from qat_plugin.layers.base import calibration_mode


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
    run = 0
    with calibration_mode():
        for batch in _batches(data, streamed, specs, batch_size):
            if steps is not None and run == steps:
                break
            inputs = tree.pack_sequence_as(model._inputs_struct, batch)
            model(inputs, training=False)
            run += 1
    if run == 0:
        raise ValueError("calibrate: data yielded no batches.")
    return run


def _batches(data, streamed, specs, batch_size):
    for index, element in enumerate(stream(data, "data")):
        x, _ = split_element(element, streamed)
        arrays = input_arrays(x, specs, "data", f"batch {index}" if streamed else "")
        if streamed:
            yield arrays
            continue
        for start in range(0, len(arrays[0]), batch_size):
            yield [a[start : start + batch_size] for a in arrays]
