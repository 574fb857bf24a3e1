"""How closely an int8 export computes its Keras QAT model.

`measure_parity` compares the outputs; `measure_local_parity` compares each
op on its own, fed the interpreter's own input tensors. Deep networks
amplify the one-step rounding differences any two int8 engines have (ties
rounded their own way), so the outputs of a faithful export can drift far
while every op is within one step: the local view tells the two apart.
"""

import dataclasses

import keras
import numpy as np

from qat_plugin.analysis.matching import LayerMatcher, match_tensors
from qat_plugin.analysis.metrics import as_list
from qat_plugin.quantize.graph import LayerGraph
from qat_plugin.tflite.interpreter import TFLiteModel, dequantize_array


@dataclasses.dataclass(frozen=True)
class Parity:
    """The export's outputs against the Keras QAT model's, on one batch.

    Attributes:
        max_error_steps: the largest |Keras - LiteRT| of each output, in that
            output's quantization steps.
        agreement: per output, the fraction of samples with the same top-1
            class (None for outputs that are not class scores).
        decided_agreement: the same, over the samples whose Keras top-1
            leads the runner-up by more than one output step. Kernels round
            exact ties in their own ways (half up, half away from zero, half
            to even), so a one-step lead is not decided by the model.
        ties: per output, the number of samples left out of
            `decided_agreement`.
        samples: the batch size.

    Examples:
        >>> from qat_plugin.analysis.parity import Parity
        >>> parity = Parity(max_error_steps=(1.0,), agreement=(0.97,),
        ...     decided_agreement=(1.0,), ties=(3,), samples=100)
        >>> parity.decided_agreement[0] >= parity.agreement[0]
        True
    """

    max_error_steps: tuple
    agreement: tuple
    decided_agreement: tuple
    ties: tuple
    samples: int


def measure_parity(qat_model, tflite_model, x, batch_size=32):
    """Runs `x` through the QAT model and its export and compares them.

    Args:
        qat_model: the quantized Keras model (after `calibrate` or `fit`),
            or a `TFLiteModel` to compare two interpreters (XNNPACK against
            the built-in kernels: how far two correct int8 engines differ).
        tflite_model: its export: bytes, a path or a `TFLiteModel`.
        x: a batch of model inputs (an array, or a list or dict for
            several inputs) of the shapes the export has: an input of
            undefined size in Keras has the size `export_tflite(...,
            input_shape=...)` fixed (a `ValueError` names a misfit).
        batch_size: Keras prediction batch size.

    Returns:
        A `Parity`.

    Examples:
        >>> import keras, numpy as np, qat_plugin
        >>> from qat_plugin.analysis.parity import measure_parity
        >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
        >>> qat = qat_plugin.quantize_model(model)
        >>> x = np.random.default_rng(0).normal(size=(64, 4)).astype("float32")
        >>> _ = qat_plugin.calibrate(qat, x)
        >>> parity = measure_parity(qat, qat_plugin.export_tflite(qat), x)
        >>> parity.max_error_steps[0] <= 1.0
        True
    """
    runner = (
        tflite_model if isinstance(tflite_model, TFLiteModel)
        else TFLiteModel(tflite_model)
    )
    runner.check_inputs(x)  # Data the export's fixed shapes refuse fails first.
    if isinstance(qat_model, TFLiteModel):
        keras_outputs = as_list(qat_model.predict(x))
    else:
        keras_outputs = as_list(
            qat_model.predict(x, batch_size=batch_size, verbose=0)
        )
    tflite_outputs = as_list(runner.predict(x))
    if len(keras_outputs) != len(tflite_outputs):
        raise ValueError(
            f"The export has {len(tflite_outputs)} outputs, the reference "
            f"{len(keras_outputs)}: the .tflite file is not this model's export."
        )
    if not all(step > 0 for step in runner.output_steps()):
        raise ValueError(
            "measure_parity compares int8/int16 exports; this .tflite has "
            "float outputs (no quantization step to measure in)."
        )
    errors, agreements, decided, ties = [], [], [], []
    for k, t, step in zip(keras_outputs, tflite_outputs, runner.output_steps()):
        k, t = np.asarray(k, "float64"), np.asarray(t, "float64")
        if k.shape != t.shape:
            raise ValueError(
                f"The export's output has shape {t.shape}, the Keras model's "
                f"{k.shape}: the .tflite file is not this model's export."
            )
        errors.append(float(np.abs(k - t).max() / step))
        if k.ndim < 2 or k.shape[-1] < 2:
            agreements.append(None)
            decided.append(None)
            ties.append(0)
            continue
        same = k.argmax(-1) == t.argmax(-1)
        top2 = np.sort(k, axis=-1)[..., -2:]
        # Dequantized values carry float rounding: one step may read 1.00001.
        clear = (top2[..., 1] - top2[..., 0]) / step > 1.0 + 1e-3
        agreements.append(float(same.mean()))
        decided.append(float(same[clear].mean()) if clear.any() else None)
        ties.append(int((~clear).sum()))
    return Parity(
        max_error_steps=tuple(errors),
        agreement=tuple(agreements),
        decided_agreement=tuple(decided),
        ties=tuple(ties),
        samples=int(np.shape(as_list(x)[0])[0]),
    )


def _activation_quantizers(layer):
    quantizers = getattr(layer, "activation_quantizers", None)
    return quantizers() if quantizers is not None else []


@dataclasses.dataclass(frozen=True)
class LocalError:
    """One op against its Keras layer, both fed the interpreter's inputs.

    Attributes:
        layer: the Keras QAT layer.
        op: the TFLite op producing the compared tensor.
        max_error_steps: the largest difference, in the tensor's steps.
        share_off: the fraction of elements that differ (by a step or more).

    Examples:
        >>> from qat_plugin.analysis.parity import LocalError
        >>> LocalError("conv", "CONV_2D", max_error_steps=1.0, share_off=0.02).op
        'CONV_2D'
    """

    layer: str
    op: str
    max_error_steps: float
    share_off: float


@dataclasses.dataclass(frozen=True)
class LocalParity:
    """Per-op errors in execution order; `str()` is a Markdown table.

    Examples:
        >>> from qat_plugin.analysis.parity import LocalError, LocalParity
        >>> local = LocalParity((LocalError("fc", "FULLY_CONNECTED", 1.0, 0.25),), samples=4)
        >>> local.max_error_steps
        1.0
        >>> print(str(local).splitlines()[-1])
        | fc | FULLY_CONNECTED | 1.00 | 25.00% |
    """

    rows: tuple
    samples: int

    @property
    def max_error_steps(self):
        """The largest local error over all ops (0 when nothing matched)."""
        return max((r.max_error_steps for r in self.rows), default=0.0)

    def to_markdown(self):
        """The rows as a Markdown table under a heading."""
        lines = [
            f"local error per op ({self.samples} samples)",
            "",
            "| layer | op | max error (steps) | elements off |",
            "|---|---|---|---|",
        ]
        lines += [
            f"| {r.layer} | {r.op} | {r.max_error_steps:.2f} | {r.share_off:.2%} |"
            for r in self.rows
        ]
        return "\n".join(lines)

    def __str__(self):
        return self.to_markdown()


def measure_local_parity(qat_model, tflite_model, x):
    """Compares every int8 op with its Keras layer, both fed the same inputs.

    The export runs in LiteRT's built-in kernels with every tensor kept.
    Then the Keras QAT model's layers run in order, each fed the
    interpreter's own (dequantized) tensors wherever the interpreter has
    them, and each layer's output is compared with the interpreter's tensor
    in that tensor's steps. A faithful export is within one step everywhere
    (ties round differently in each engine); a wrong zero point, fold or
    padding shows as more. Layers that export to several int8 ops (one per
    activation quantizer: separable convolutions, a BatchNormalization with
    nothing to fold into, swish) are run, not compared: their differences
    show in the next op compared.

    Args:
        qat_model: the quantized Keras model.
        tflite_model: its export: bytes or a path.
        x: a batch of inputs (one array, or a list for several inputs).

    Returns:
        A `LocalParity`.

    Examples:
        >>> import keras, numpy as np, qat_plugin
        >>> from qat_plugin.analysis.parity import measure_local_parity
        >>> x = np.random.default_rng(0).normal(size=(32, 4)).astype("float32")
        >>> qat = qat_plugin.quantize_model(
        ...     keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, name="fc")]))
        >>> _ = qat_plugin.calibrate(qat, x)
        >>> local = measure_local_parity(qat, qat_plugin.export_tflite(qat), x)
        >>> [row.layer for row in local.rows], local.max_error_steps <= 1.0 + 1e-3
        (['fc'], True)
    """
    runner = TFLiteModel(tflite_model, use_xnnpack=False, preserve_all_tensors=True)
    first = next(iter(x.values())) if isinstance(x, dict) else as_list(x)[0]
    samples = len(np.asarray(first))
    if not runner.dynamic_batch and samples != runner.input_details[0]["shape"][0]:
        raise ValueError(
            "measure_local_parity keeps the tensors of one invocation: give "
            f"a batch of the model's fixed size {runner.input_details[0]['shape'][0]}, "
            f"not {samples} (export_tflite writes a dynamic batch)."
        )
    runner.predict(x, batch_size=samples)
    interpreter = runner.interpreter
    tensors = match_tensors(  # layer name -> (op name, tensor detail)
        runner,
        LayerMatcher(qat_model),
        keep=lambda layer, detail: detail["dtype"] in (np.int8, np.int16),
        own_name_only=True,
    )

    graph = LayerGraph.from_model(qat_model)
    # The inputs as the interpreter holds them (quantized), in its order.
    values = {
        graph_input.key: dequantize_array(interpreter.get_tensor(detail["index"]), detail)
        for graph_input, detail in zip(graph.inputs, runner.input_details)
    }
    rows = []
    for node in graph.nodes:
        feed = {
            id(t): values[key]
            for t, key in zip(node.arguments.keras_tensors, node.inputs)
        }
        args, kwargs = node.arguments.fill_in(feed)
        outputs = keras.tree.flatten(node.layer(*args, **kwargs))
        for key, output in zip(node.outputs, outputs):
            values[key] = keras.ops.convert_to_numpy(output)
        if (
            node.name not in tensors
            or len(node.outputs) != 1
            or len(_activation_quantizers(node.layer)) > 1
        ):
            # Not matched, or several int8 ops (separable conv, standalone
            # BatchNorm, swish): a name can only point at one of their
            # tensors, so they are computed here, not compared.
            continue
        op_name, detail = tensors[node.name]
        reference = dequantize_array(interpreter.get_tensor(detail["index"]), detail)
        if reference.shape != values[node.outputs[0]].shape:
            continue
        steps = np.abs(values[node.outputs[0]] - reference) / detail["quantization"][0]
        rows.append(
            LocalError(node.name, op_name, float(steps.max()), float(np.mean(steps > 0.5)))
        )
        # Downstream layers read what the interpreter computed.
        values[node.outputs[0]] = reference
    if not rows:
        raise ValueError(
            f"No op of the .tflite file matched a layer of '{qat_model.name}' "
            "by name: give the QAT model this file was exported from (its "
            "top-level layers are matched, not those of a model nested in it)."
        )
    return LocalParity(tuple(rows), samples)
