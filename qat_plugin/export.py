"""`export_tflite`: Keras 3 model to .tflite, QAT int8 or a PTQ baseline."""


import keras
import numpy as np
from keras import tree

from qat_plugin.files import write_bytes_atomic
from qat_plugin.layers.base import QuantizedLayer, export_mode

MODES = ("float", "dynamic", "float16", "int8", "int16x8")


class ExportError(RuntimeError):
    """The model cannot be exported as asked."""


def quantized_layers(model):
    """Returns the `QuantizedLayer`s of a model built by `quantize_model`."""
    return [layer for layer in model.layers if isinstance(layer, QuantizedLayer)]


def is_quantized(model):
    """True when `model` was built by `quantize_model`."""
    return bool(quantized_layers(model))


def export_tflite(
    model,
    path=None,
    *,
    representative_data=None,
    mode=None,
    calibration_steps=200,
):
    """Converts `model` to a .tflite flatbuffer and returns its bytes.

    A model built by `quantize_model` exports with the ranges it learned:
    fully int8 (int8 input and output, no float op), or 16-bit activations
    with 8-bit weights when its recipe asked for them. No calibration data
    is needed. Kernels are exported already folded and snapped to their
    per-channel int8 grid, so the int8 weights equal the ones trained.

    A float model exports as a post-training quantization (PTQ) baseline by
    `mode`: `"float"`, `"dynamic"` (int8 weights, float activations),
    `"float16"`, `"int8"` (full integer, calibrated on
    `representative_data`, int8 input and output) or `"int16x8"`.

    The model is traced in inference mode in a `tf.function` whose variables
    are frozen to constants before conversion (unfrozen variables become
    READ_VARIABLE ops that fail in the interpreter).

    Args:
        model: a Keras 3 model (TensorFlow backend).
        path: where to write the .tflite; written atomically.
        representative_data: calibration inputs for `"int8"`/`"int16x8"`:
            a NumPy array (or a list of arrays, one per input) whose first
            axis is the sample axis.
        mode: for float models, one of `MODES` (default `"int8"` when
            `representative_data` is given, else `"float"`).
        calibration_steps: samples used for calibration.

    Returns:
        The .tflite model as bytes.

    Example:

    >>> import keras, numpy as np, qat_plugin
    >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    >>> qat = qat_plugin.quantize_model(model)
    >>> _ = qat(np.random.rand(8, 4).astype("float32"), training=True)
    >>> report = qat_plugin.inspect_tflite(qat_plugin.export_tflite(qat))
    >>> report.is_fully_int8
    True
    """
    if keras.backend.backend() != "tensorflow":
        raise ExportError(
            "export_tflite traces the model with TensorFlow, but the Keras "
            f"backend is '{keras.backend.backend()}'. Save the model "
            "(`model.save('m.keras')`) and export it from a process started "
            "with KERAS_BACKEND=tensorflow."
        )
    if is_quantized(model):
        if mode not in (None, "int8", "int16x8"):
            raise ValueError(
                f"Model '{model.name}' is a QAT model; it exports as int8 (or "
                f"int16x8 from a 16-bit recipe), not mode={mode!r}. Export "
                "the float model for PTQ baselines."
            )
        data = _convert_qat(model)
    else:
        if mode is None:
            mode = "float" if representative_data is None else "int8"
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}.")
        data = _convert_float(model, mode, representative_data, calibration_steps)
    if path is not None:
        write_bytes_atomic(path, data)
    return data


def _frozen_function(model):
    import tensorflow as tf
    from tensorflow.python.framework.convert_to_constants import (
        convert_variables_to_constants_v2,
    )

    specs = [
        tf.TensorSpec(
            (None,) + tuple(t.shape[1:]), t.dtype, name=t._keras_history.operation.name
        )
        for t in model.inputs
    ]

    @tf.function
    def serve(*args):
        inputs = tree.pack_sequence_as(model._inputs_struct, list(args))
        return tree.flatten(model(inputs, training=False))

    concrete = serve.get_concrete_function(*specs)
    return convert_variables_to_constants_v2(concrete)


def _check_observed(model):
    unobserved = [
        f"'{layer.name}' ({quantizer.name})"
        for layer in quantized_layers(model)
        for quantizer in layer.activation_quantizers()
        if not bool(keras.ops.convert_to_numpy(quantizer.observed))
    ]
    if unobserved:
        raise ExportError(
            "These activation ranges were never observed: "
            f"{', '.join(unobserved)}. Train the model with fit() or run "
            "qat_plugin.calibrate(model, data) before exporting."
        )


def _convert_qat(model):
    import tensorflow as tf

    _check_observed(model)
    for layer in quantized_layers(model):
        layer.prepare_export()
    with export_mode():
        function = _frozen_function(model)
    converter = tf.lite.TFLiteConverter.from_concrete_functions([function])
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    # The fake-quant ops carry every range, so the default op set (which
    # also admits the float islands kept by `skip=`) converts without a
    # representative dataset; inspect_tflite tells whether it is all int8.
    io_type = tf.int8
    if any(layer.num_bits == 16 for layer in quantized_layers(model)):
        converter.target_spec.supported_ops = [
            tf.lite.OpsSet.EXPERIMENTAL_TFLITE_BUILTINS_ACTIVATIONS_INT16_WEIGHTS_INT8
        ]
        io_type = tf.int16
    if all("float" in str(t.dtype) for t in model.inputs):
        converter.inference_input_type = io_type
    converter.inference_output_type = io_type
    return converter.convert()


def _convert_float(model, mode, representative_data, calibration_steps):
    import tensorflow as tf

    function = _frozen_function(model)
    converter = tf.lite.TFLiteConverter.from_concrete_functions([function])
    if mode == "float":
        return converter.convert()
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if mode == "float16":
        converter.target_spec.supported_types = [tf.float16]
        return converter.convert()
    if mode == "dynamic":
        return converter.convert()
    if representative_data is None:
        raise ValueError(
            f"mode={mode!r} calibrates activation ranges: pass "
            "representative_data (samples of the model's inputs)."
        )
    samples = _calibration_samples(model, representative_data, calibration_steps)
    converter.representative_dataset = lambda: iter(samples)
    if mode == "int8":
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        io_type = tf.int8
    else:
        converter.target_spec.supported_ops = [
            tf.lite.OpsSet.EXPERIMENTAL_TFLITE_BUILTINS_ACTIVATIONS_INT16_WEIGHTS_INT8
        ]
        io_type = tf.int16
    converter.inference_input_type = io_type
    converter.inference_output_type = io_type
    return converter.convert()


def _calibration_samples(model, data, steps):
    """Splits calibration data into single-sample lists, one array per input."""
    arrays = list(data) if isinstance(data, (list, tuple)) else [data]
    if len(arrays) != len(model.inputs):
        raise ValueError(
            f"representative_data has {len(arrays)} arrays but model "
            f"'{model.name}' has {len(model.inputs)} inputs."
        )
    arrays = [np.asarray(a, dtype=np.float32) for a in arrays]
    for array, tensor in zip(arrays, model.inputs):
        if tuple(array.shape[1:]) != tuple(tensor.shape[1:]):
            raise ValueError(
                f"representative_data samples have shape {array.shape[1:]}, "
                f"model input '{tensor.name}' expects {tuple(tensor.shape[1:])}."
            )
        if len(array) == 0:
            raise ValueError("representative_data is empty.")
        if not np.all(np.isfinite(array)):
            raise ValueError("representative_data contains NaN or inf values.")
    count = min(len(arrays[0]), steps)
    return [[a[i : i + 1] for a in arrays] for i in range(count)]
