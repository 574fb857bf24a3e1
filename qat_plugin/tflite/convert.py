"""`export_tflite`: Keras 3 model to .tflite, QAT int8 or a PTQ baseline."""

import keras
import numpy as np
from keras import tree

from qat_plugin.data.batches import calibration_samples, model_call_inputs
from qat_plugin.files import write_bytes_atomic
from qat_plugin.quiet import converter_quiet
from qat_plugin.distribution import is_primary_process
from qat_plugin.layers.base import is_quantized, quantized_layers
from qat_plugin.layers.modes import export_mode
from qat_plugin.quantize.calibration import check_observed
from qat_plugin.quantize.qat_model import set_litert_exporter
from qat_plugin.tflite.input_shapes import export_input_specs, signature_input_shape
from qat_plugin.tflite.io_names import with_keras_io_names
from qat_plugin.tflite.select_ops import select_tf_ops_error, warn_select_tf_ops
from qat_plugin.tflite.tensorflow_process import run_on_tensorflow
from qat_plugin.tflite.targets import check_target
from qat_plugin.tflite.unrolled import with_unrolled_rnns
from qat_plugin.tflite.weights import retouched_weights
from qat_plugin.config.constants import CALIBRATED_MODES, MODES, TARGETS
from qat_plugin.errors import ExportError


def export_tflite(
    model,
    path=None,
    *,
    input_shape=None,
    representative_data=None,
    mode=None,
    calibration_steps=200,
    sparse_weights=False,
    target=None,
    allow_select_tf_ops=False,
    arena_limit=None,
):
    """Converts `model` to a .tflite flatbuffer and returns its bytes.

    A model built by `quantize_model` exports with the ranges it learned:
    fully int8 (int8 input and output, no float op), or 16-bit activations
    with 8-bit weights when its recipe asked for them. No calibration data
    is needed. Kernels are exported already folded and snapped to their
    per-channel int8 grid, so the int8 weights equal the ones trained.

    A float model exports as a post-training quantization (PTQ) baseline by
    `mode`: `"float"`, `"dynamic"` (int8 weights, float activations; the
    converter leaves weights of fewer than 1024 elements in float),
    `"float16"`, `"int8"` (full integer, calibrated on
    `representative_data`, int8 input and output) or `"int16x8"`.

    The model is traced in inference mode in a `tf.function`. A QAT model
    traces as constants only (its kernels, biases and activation ranges are
    read before tracing, and its schedule switches are left out), so the
    converter gets a graph with no variable; a float model's variables are
    frozen to constants before conversion (unfrozen variables become
    READ_VARIABLE ops that fail in the interpreter).

    Args:
        model: a Keras 3 model (TensorFlow backend).
        path: where to write the .tflite; written atomically.
        input_shape: the fixed shape of one sample (no batch axis) for
            inputs with undefined sizes, such as token ids `(None,)` or
            images `(None, None, 3)`: a tuple for one input, a dict keyed
            by input name or a list for several (see
            `qat_plugin.tflite.input_shapes`). Required when a size is
            undefined, for PTQ with `representative_data` too (the data is
            then checked against it): an `ExportError` names the input
            otherwise, so no input is silently exported as size 1. The
            batch axis stays dynamic.
        representative_data: calibration inputs for `"int8"`/`"int16x8"`:
            a NumPy array whose first axis is the sample axis (a list of
            arrays or a dict keyed by input name for several inputs), or a
            `tf.data.Dataset`, `keras.utils.PyDataset` or generator of
            batches (`(x, y)` tuples are fine: targets are ignored). Batches
            are split into single samples; each is checked against the
            input's shape and dtype, and for NaN/inf, before conversion.
        mode: for float models, one of `MODES` (default `"int8"` when
            `representative_data` is given, else `"float"`).
        calibration_steps: the number of samples used for calibration;
            reading stops there, so an endless generator is fine.
        sparse_weights: for a pruned QAT model, store its weights in the
            converter's sparse format (`tf.lite.Optimize.EXPERIMENTAL_SPARSITY`).
            Measured (benchmarks/bench_pruning.py): the raw file shrinks only
            at high unstructured sparsity (>= ~75%; 2:4 gets bigger), the
            gzip size never shrinks, and the default XNNPACK delegate
            refuses the sparse FULLY_CONNECTED: run the file with
            `TFLiteModel(data, use_xnnpack=False)`. The encoded weights are
            checked against the plain export; where the converter changed
            them (FULLY_CONNECTED inputs not a multiple of 16) an
            `ExportError` says so. Zeros are kept without this option.
        target: a deployment target, `"cpu"`, `"gpu"` or `"mcu"` (see
            `qat_plugin.tflite.targets`): the converted model is checked against it
            and an `ExportError` lists the offending ops when it falls short.
            Nothing is written then.
        arena_limit: with `target="mcu"`, the tensor arena the device has
            (bytes): a model that needs more (measured in TensorFlow Lite
            Micro when the `mcu` extra is installed, else estimated) fails
            with an `ExportError` naming the peak tensors.
        allow_select_tf_ops: let ops with no TFLite builtin (in a float
            island kept by `quantize_model(..., skip=...)`, or a float
            model) convert as Select TF ("Flex") ops. Without it such a
            model fails with an `ExportError` naming the ops. With it, a
            `UserWarning` names the Flex ops and their cost: the runtime
            needs the Flex delegate, which links TensorFlow's kernels
            (several MB per ABI, against ~1 MB for the builtin runtime),
            and the model file grows by the serialized TF node definitions.

    Returns:
        The .tflite model as bytes.

    Examples:
        >>> import keras, numpy as np, qat_plugin
        >>> from qat_plugin.tflite.convert import export_tflite
        >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
        >>> qat = qat_plugin.quantize_model(model)
        >>> _ = qat(np.random.rand(8, 4).astype("float32"), training=True)
        >>> report = qat_plugin.inspect_tflite(export_tflite(qat))
        >>> report.is_fully_int8
        True

        An input of undefined size is exported with the size it is given:

        >>> tokens = keras.Input((None,), dtype="int32", name="tokens")
        >>> pooled = keras.layers.GlobalAveragePooling1D()(keras.layers.Embedding(10, 4)(tokens))
        >>> model = keras.Model(tokens, keras.layers.Dense(2)(pooled))
        >>> data = export_tflite(model, mode="float", input_shape=(12,))
        >>> [(t.name, list(t.shape)) for t in qat_plugin.inspect_tflite(data).inputs]
        [('tokens', [1, 12])]
    """
    # A bad or missing input_shape fails here, before any data is read.
    specs = export_input_specs(model, input_shape)
    if keras.backend.backend() != "tensorflow":
        # The converter needs TensorFlow graphs: rebuild the model there.
        return export_on_tensorflow(
            model,
            path,
            input_shape=input_shape,
            representative_data=representative_data,
            mode=mode,
            calibration_steps=calibration_steps,
            sparse_weights=sparse_weights,
            target=target,
            allow_select_tf_ops=allow_select_tf_ops,
            arena_limit=arena_limit,
        )
    if target is not None and target not in TARGETS:
        raise ValueError(f"target must be None or one of {TARGETS}, got {target!r}.")
    if arena_limit is not None and target != "mcu":
        raise ValueError(f"arena_limit applies to target='mcu', got target={target!r}.")
    if sparse_weights and not is_quantized(model):
        raise ValueError(
            "sparse_weights=True applies to QAT models (from quantize_model); "
            f"model '{model.name}' is a float model."
        )
    if is_quantized(model):
        if mode not in (None, "int8", "int16x8"):
            raise ValueError(
                f"Model '{model.name}' is a QAT model; it exports as int8 (or "
                f"int16x8 from a 16-bit recipe), not mode={mode!r}. Export "
                "the float model for PTQ baselines."
            )
        data = _convert_qat(model, allow_select_tf_ops=allow_select_tf_ops, specs=specs)
        if sparse_weights:
            data = _sparse_encoded(model, data, allow_select_tf_ops, specs)
    else:
        if mode is None:
            mode = "float" if representative_data is None else "int8"
        data = _convert_float(
            model, mode, representative_data, calibration_steps, allow_select_tf_ops,
            input_shape=input_shape,
        )
    if allow_select_tf_ops:
        warn_select_tf_ops(model, data)
    if target is not None:
        check = check_target(data, target, allow_select_tf_ops=allow_select_tf_ops,
                             arena_limit=arena_limit)
        if not check.compatible:
            offending = "\n".join(f"  - {op}: {why}" for op, why in check.offending)
            raise ExportError(
                f"Model '{model.name}' does not meet target '{target}':\n"
                f"{offending}\nChoose another target, keep those layers out "
                "of the model, or (for a float island) quantize them."
            )
    if path is not None:
        write_bytes_atomic(path, data)
    return data


def export_on_tensorflow(model, path=None, **export_kwargs):
    """`export_tflite` for a model on a non-TensorFlow backend.

    Converts in a TensorFlow child process; writes `path` (atomically) only
    in process 0 when several JAX processes train the model together, and
    returns the .tflite bytes in every process.

    Examples:
        >>> import keras, os, tempfile
        >>> from qat_plugin.tflite.convert import export_on_tensorflow
        >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
        >>> path = os.path.join(tempfile.mkdtemp(), "model.tflite")
        >>> data = export_on_tensorflow(model, path, mode="float")
        >>> open(path, "rb").read() == data
        True
    """
    data = run_on_tensorflow(export_tflite, model, **export_kwargs)
    if path is not None and is_primary_process():
        write_bytes_atomic(path, data)
    return data


def _frozen_function(model, input_specs):
    """The model traced with a dynamic batch and `input_specs`' fixed shapes,
    its variables frozen to constants."""
    import tensorflow as tf
    from tensorflow.python.framework.convert_to_constants import (
        convert_variables_to_constants_v2,
    )

    specs = [
        tf.TensorSpec(
            (None,) + tuple(spec.shape), t.dtype, name=t._keras_history.operation.name
        )
        for t, spec in zip(model.inputs, input_specs)
    ]

    @tf.function
    def serve(*args):
        return tree.flatten(model(model_call_inputs(model, args), training=False))

    concrete = serve.get_concrete_function(*specs)
    if not concrete.captured_inputs:
        # A QAT model exports its weights and ranges as constants
        # (`prepare_export`): there is nothing to freeze, and the converter's
        # own pass over the graph is then its only one.
        return concrete
    return convert_variables_to_constants_v2(concrete)


def _sparse_encoded(model, dense, allow_select_tf_ops=False, specs=None):
    """Converts `model` again with sparse weights; checks they did not change.

    Measured: for a FULLY_CONNECTED weight whose input size is not a
    multiple of the converter's 1x16 block, the sparse encoding keeps only
    part of the weights; such a file is refused, not returned.
    """
    from qat_plugin.tflite.inspection import inspect_tflite

    sparse = _convert_qat(
        model, sparse_weights=True, allow_select_tf_ops=allow_select_tf_ops, specs=specs
    )
    for expected, got in zip(
        inspect_tflite(dense).weights, inspect_tflite(sparse).weights
    ):
        if not np.array_equal(expected.values, got.values):
            raise ExportError(
                "The converter's sparse encoding (sparse_weights=True) "
                f"changed the int8 values of weight tensor "
                f"'{expected.tensor.name}' ({expected.op}, shape "
                f"{list(expected.tensor.shape)}); export with "
                "sparse_weights=False, which keeps every zero."
            )
    return sparse


def _converted(converter, model, allow_select_tf_ops):
    import tensorflow as tf

    if allow_select_tf_ops:
        converter.target_spec.supported_ops = list(
            converter.target_spec.supported_ops or [tf.lite.OpsSet.TFLITE_BUILTINS]
        ) + [tf.lite.OpsSet.SELECT_TF_OPS]
    try:
        with converter_quiet():
            data = converter.convert()
    except Exception as error:  # The converter raises its own ConverterError.
        friendly = select_tf_ops_error(model, error)
        if friendly is None:
            raise
        raise friendly from None
    return with_keras_io_names(data, model)


def _convert_qat(model, sparse_weights=False, allow_select_tf_ops=False, specs=None):
    import tensorflow as tf

    specs = specs or export_input_specs(model)
    check_observed(model)
    for layer in quantized_layers(model):
        layer.prepare_export()
    with export_mode():
        function = _frozen_function(model, specs)
    with converter_quiet():
        converter = tf.lite.TFLiteConverter.from_concrete_functions([function])
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if sparse_weights:
        converter.optimizations.append(tf.lite.Optimize.EXPERIMENTAL_SPARSITY)
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
    data = _converted(converter, model, allow_select_tf_ops)
    per_tensor = not all(layer.per_channel for layer in quantized_layers(model)
                         if hasattr(layer, "per_channel"))
    if per_tensor or io_type == tf.int16:
        data = retouched_weights(data, per_tensor=per_tensor,
                                 int64_bias=io_type == tf.int16)
    return data


def _convert_float(model, mode, representative_data, calibration_steps,
                   allow_select_tf_ops=False, input_shape=None):
    converter = float_converter(model, mode, representative_data, calibration_steps,
                                input_shape=input_shape)
    return _converted(converter, model, allow_select_tf_ops)


def float_converter(model, mode, representative_data=None, calibration_steps=200,
                    integer_io=True, input_shape=None):
    """Returns the `TFLiteConverter` set up for a PTQ `mode` of a float model.

    The calibration data is read and checked before the model is traced, so
    bad data fails fast and clearly. `integer_io=False` keeps float input and
    output in the integer modes (as `QuantizationDebugger` needs).
    `input_shape` fixes undefined input sizes, as in `export_tflite`.

    Examples:
        >>> import keras, numpy as np
        >>> from qat_plugin.tflite.convert import float_converter
        >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
        >>> samples = np.random.rand(8, 4).astype("float32")
        >>> converter = float_converter(model, "int8", samples, calibration_steps=8)
        >>> converter.inference_input_type.name, len(converter.convert()) > 0
        ('int8', True)
    """
    import tensorflow as tf

    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}.")
    specs = export_input_specs(model, input_shape)
    samples = None
    if mode in CALIBRATED_MODES:
        if representative_data is None:
            raise ValueError(
                f"mode={mode!r} calibrates activation ranges: pass "
                "representative_data (samples of the model's inputs)."
            )
        samples = calibration_samples(model, representative_data, calibration_steps,
                                      specs=specs)
    # Recurrent layers convert unrolled (`tflite.unrolled`); others as they are.
    function = _frozen_function(with_unrolled_rnns(model), specs)
    with converter_quiet():
        converter = tf.lite.TFLiteConverter.from_concrete_functions([function])
    if mode == "float":
        return converter
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if mode == "float16":
        converter.target_spec.supported_types = [tf.float16]
    if mode not in CALIBRATED_MODES:
        return converter
    converter.representative_dataset = lambda: iter(samples)
    if mode == "int8":
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        io_type = tf.int8
    else:
        converter.target_spec.supported_ops = [
            tf.lite.OpsSet.EXPERIMENTAL_TFLITE_BUILTINS_ACTIVATIONS_INT16_WEIGHTS_INT8
        ]
        io_type = tf.int16
    if integer_io:
        if all("float" in str(t.dtype) for t in model.inputs):
            converter.inference_input_type = io_type
        converter.inference_output_type = io_type
    return converter


def _litert_export(model, path, input_shape=None, input_signature=None):
    """`QATModel.export(path, format="litert")`: what `export_tflite` writes."""
    if input_signature is not None:
        if input_shape is not None:
            raise ExportError(
                f"QAT model '{model.name}': give input_shape or input_signature "
                "to export(format='litert'), not both."
            )
        input_shape = signature_input_shape(model, input_signature)
        export_input_specs(model, input_shape, argument="input_signature")
    return export_tflite(model, path, input_shape=input_shape)


set_litert_exporter(_litert_export)
