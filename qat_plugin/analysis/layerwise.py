"""Layer-wise error: where an int8 model departs from the float model.

`layerwise_error` runs a .tflite model in the LiteRT interpreter with every
intermediate tensor kept, dequantizes each op's output and compares it with
the output of the Keras layer it stands for, run on the same samples. The
error accumulates through the network, so the table shows where the int8
model drifts from float and how fast; the layer whose SQNR drops most is the
one to keep in float (`quantize_model(..., skip=[...])`) or to look at.

It serves PTQ and QAT exports alike. Tensors are matched to layers by name:
the converter names a tensor after the TensorFlow ops that produced it,
which carry the Keras layer names (`model/conv/Relu6;model/conv/BiasAdd`).
A Conv -> BatchNormalization -> ReLU chain is one int8 op, so its tensor is
compared with the last layer of the chain (found with the same fusion rules
as `quantize_model`), which is also where a QAT model's fused layer ends.

`ptq_local_error` adds the converter's own view for PTQ,
`tf.lite.experimental.QuantizationDebugger`: each op's error when it is fed
the float model's exact input, so it isolates the error a layer adds itself.

Limits: only layers of the reference model's top level are probed (a nested
model's inner layers are not, its output is); ops whose output has no Keras
counterpart (QUANTIZE, a RESHAPE the converter inserted) and tensors whose
shape differs from the layer's output are left out.
"""

import dataclasses
import io
import math
import re

import keras
import numpy as np
from keras import tree

from qat_plugin.data.batches import calibration_samples, model_call_inputs
from qat_plugin.tflite.convert import CALIBRATED_MODES, float_converter
from qat_plugin.quantize.fusion import find_fusions
from qat_plugin.quantize.graph import LayerGraph
from qat_plugin.tflite.interpreter import TFLiteModel, dequantize_array, load_model_bytes


@dataclasses.dataclass(frozen=True)
class LayerError:
    """The error of one layer's output in the .tflite model.

    Attributes:
        layer: the Keras layer whose output is compared.
        op: the TFLite op that produces the tensor.
        dtype: the tensor's type in the .tflite model.
        rmse: root mean square error against the float output.
        sqnr_db: signal-to-quantization-noise ratio,
            `10 log10(sum f^2 / sum (q - f)^2)`; `inf` when equal.
        scale: the tensor's quantization step (0 for float tensors).
    """

    layer: str
    op: str
    dtype: str
    rmse: float
    sqnr_db: float
    scale: float

    @property
    def rmse_in_steps(self):
        """RMSE in quantization steps (None for float tensors)."""
        return self.rmse / self.scale if self.scale else None


@dataclasses.dataclass(frozen=True)
class LayerwiseReport:
    """Per-layer errors in execution order; `str()` is a Markdown table."""

    rows: tuple
    num_samples: int
    title: str = "layer-wise error"

    def __getitem__(self, layer):
        for row in self.rows:
            if row.layer == layer:
                return row
        raise KeyError(f"No row for layer '{layer}'; layers: {[r.layer for r in self.rows]}.")

    def worst(self, count=3):
        """The `count` rows with the lowest SQNR."""
        return sorted(self.rows, key=lambda r: r.sqnr_db)[:count]

    def to_dict(self):
        return {
            "title": self.title,
            "num_samples": self.num_samples,
            "layers": [
                dict(
                    dataclasses.asdict(r),
                    sqnr_db=None if math.isinf(r.sqnr_db) else r.sqnr_db,
                    rmse_in_steps=r.rmse_in_steps,
                )
                for r in self.rows
            ],
        }

    def to_markdown(self):
        lines = [
            f"{self.title} ({self.num_samples} samples)",
            "",
            "| layer | op | type | RMSE | RMSE (steps) | SQNR (dB) |",
            "|---|---|---|---|---|---|",
        ]
        for r in self.rows:
            steps = "" if r.rmse_in_steps is None else f"{r.rmse_in_steps:.2f}"
            sqnr = "inf" if math.isinf(r.sqnr_db) else f"{r.sqnr_db:.1f}"
            lines.append(
                f"| {r.layer} | {r.op} | {r.dtype} | {r.rmse:.4g} | {steps} | {sqnr} |"
            )
        return "\n".join(lines)

    def __str__(self):
        return self.to_markdown()


def error_stats(reference, value):
    """Returns `(rmse, sqnr_db)` of `value` against `reference`.

    Example:

    >>> import numpy as np
    >>> rmse, sqnr = error_stats(np.array([3.0, 4.0]), np.array([3.0, 3.0]))
    >>> round(rmse, 4), round(sqnr, 2)
    (0.7071, 13.98)
    """
    reference = np.asarray(reference, np.float64)
    noise = np.asarray(value, np.float64) - reference
    noise_power = float(np.sum(noise * noise))
    rmse = math.sqrt(noise_power / max(noise.size, 1))
    if noise_power == 0.0:
        return rmse, math.inf
    signal_power = float(np.sum(reference * reference))
    if signal_power == 0.0:
        return rmse, -math.inf
    return rmse, 10.0 * math.log10(signal_power / noise_power)


def _layer_names_in(tensor_name, layer_names):
    """The Keras layer names mentioned in a converter tensor name.

    Only name scopes count: the last component of `model/conv/add_1` is a
    TensorFlow op name, which may equal a layer's name (`add_1`).
    """
    found = set()
    for part in tensor_name.split(";"):
        for component in part.split("/")[:-1]:
            if component in layer_names:
                found.add(component)
            else:
                # TensorFlow uniquifies name scopes as `<name>_<n>`.
                base = re.sub(r"_\d+$", "", component)
                if base in layer_names:
                    found.add(base)
    return found


class _LayerMatcher:
    """Finds the reference layer a converter tensor stands for."""

    def __init__(self, model):
        self.layers = _probe_layers(model)
        self.order = {layer.name: i for i, layer in enumerate(self.layers)}
        self.tails = _fusion_tails(model)
        self.output_layers = [t._keras_history.operation.name for t in model.outputs]

    def match(self, tensor_name, output_position=None):
        """The layer's name, or None; `output_position` for model outputs."""
        found = re.fullmatch(r"Identity(?:_(\d+))?", tensor_name)
        if output_position is None and found:
            output_position = int(found.group(1) or 0)
        if output_position is not None and output_position < len(self.output_layers):
            names = {self.output_layers[output_position]}
        else:
            names = _layer_names_in(tensor_name, self.order)
        names = {self.tails.get(n, n) for n in names} & set(self.order)
        return max(names, key=self.order.get) if names else None


def _fusion_tails(model):
    """Maps each layer name to the name of the last layer of its fused chain."""
    try:
        graph = LayerGraph.from_model(model)
    except Exception:  # Subclassed or unusual models: no fusion known.
        return {}
    tails = {}
    for fusion in {id(f): f for f in find_fusions(graph, skip=()).values()}.values():
        for node in [fusion.head] + fusion.absorbed:
            tails[node.name] = fusion.tail.name
    return tails


def _probe_layers(model):
    """Top-level layers with one output tensor, in topological order."""
    layers = []
    for layer in model.layers:
        if isinstance(layer, keras.layers.InputLayer):
            continue
        try:
            output = layer.output
        except (AttributeError, ValueError):  # Called several times or never.
            continue
        if isinstance(output, keras.KerasTensor):
            layers.append(layer)
    return layers


def _stack(samples):
    return [np.concatenate([s[i] for s in samples]) for i in range(len(samples[0]))]


def layerwise_error(reference_model, tflite_model, data, *, max_samples=128,
                    title=None):
    """Compares each op's dequantized output with the reference layer's output.

    Args:
        reference_model: the float Keras model (for a QAT export, either the
            original float model, to see the total loss against float, or
            the QAT model itself, to see how faithfully it exported; fused
            Conv/BN/ReLU chains are matched either way).
        tflite_model: .tflite bytes or path (PTQ or QAT, int8 or int16x8).
        data: input samples, as `representative_data` of `export_tflite`.
        max_samples: samples used.
        title: the report's heading.

    Returns:
        A `LayerwiseReport`, rows in execution order.

    Example:

    >>> import keras, numpy as np, qat_plugin
    >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, name="fc")])
    >>> x = np.random.rand(32, 4).astype("float32")
    >>> tflite = qat_plugin.export_tflite(model, mode="int8", representative_data=x)
    >>> report = layerwise_error(model, tflite, x)
    >>> [row.layer for row in report.rows], report.rows[0].sqnr_db > 20
    (['fc'], True)
    """
    inputs = _stack(calibration_samples(reference_model, data, max_samples, "data"))
    matcher = _LayerMatcher(reference_model)
    layers = matcher.layers
    probe = keras.Model(
        model_call_inputs(reference_model, reference_model.inputs),
        [layer.output for layer in layers],
    )
    float_outputs = probe.predict(model_call_inputs(reference_model, inputs), verbose=0)
    float_outputs = dict(zip([l.name for l in layers], tree.flatten(float_outputs)))

    runner = TFLiteModel(
        load_model_bytes(tflite_model), use_xnnpack=False, preserve_all_tensors=True
    )
    if not runner.dynamic_batch:
        raise ValueError(
            "layerwise_error needs a .tflite model with a dynamic batch axis "
            "(export_tflite writes one)."
        )
    runner.predict(inputs, batch_size=len(inputs[0]))
    interpreter = runner.interpreter
    details = {d["index"]: d for d in interpreter.get_tensor_details()}
    model_outputs = {d["index"]: i for i, d in enumerate(runner.output_details)}

    matches = {}
    for op in interpreter._get_ops_details():
        for index in op["outputs"]:
            if index < 0:
                continue
            detail = details[index]
            layer = matcher.match(detail["name"], model_outputs.get(index))
            if layer is None:
                continue
            if tuple(detail["shape"]) != float_outputs[layer].shape:
                continue
            # A later op writing the same layer's value (a requantize) wins.
            matches[layer] = (op["op_name"], index)

    rows = []
    for layer in sorted(matches, key=matcher.order.get):
        op_name, index = matches[layer]
        detail = details[index]
        scales = detail["quantization_parameters"]["scales"]
        value = interpreter.get_tensor(index)
        if np.issubdtype(value.dtype, np.integer) and len(scales) == 1:
            value = dequantize_array(value, detail)
            scale = float(scales[0])
        else:
            scale = 0.0
        rmse, sqnr = error_stats(float_outputs[layer], value)
        rows.append(
            LayerError(layer, op_name, np.dtype(detail["dtype"]).name, rmse, sqnr, scale)
        )
    return LayerwiseReport(
        tuple(rows),
        len(inputs[0]),
        title or f"layer-wise error against '{reference_model.name}'",
    )


def ptq_local_error(float_model, representative_data, data, *, mode="int8",
                    calibration_steps=200, max_samples=64):
    """Per-op error of a PTQ model from `tf.lite.experimental.QuantizationDebugger`.

    Unlike `layerwise_error`, each op is fed the float model's own input, so
    a row shows the error that op adds by itself, not the accumulated one.
    Only for PTQ: the debugger re-runs the converter's calibration.

    Returns:
        A list of dicts in execution order: `layer` (the Keras layer the
        tensor stands for, or None), `op`, `tensor`, `rmse`, `scale`,
        `rmse_in_steps`, `max_abs_error`.
    """
    import csv

    import tensorflow as tf

    if mode not in CALIBRATED_MODES:
        raise ValueError(f"mode must be one of {CALIBRATED_MODES}, got {mode!r}.")
    debug = calibration_samples(float_model, data, max_samples, "data")
    converter = float_converter(
        float_model, mode, representative_data, calibration_steps, integer_io=False
    )
    debugger = tf.lite.experimental.QuantizationDebugger(
        converter=converter, debug_dataset=lambda: iter(debug)
    )
    debugger.run()
    buffer = io.StringIO()
    debugger.layer_statistics_dump(buffer)
    matcher = _LayerMatcher(float_model)
    rows = []
    for record in csv.DictReader(io.StringIO(buffer.getvalue())):
        scale = float(record["scale"]) if record.get("scale") else 0.0
        rmse = math.sqrt(max(float(record["mean_squared_error"]), 0.0))
        rows.append(
            {
                "layer": matcher.match(record["tensor_name"]),
                "op": record["op_name"],
                "tensor": record["tensor_name"],
                "rmse": rmse,
                "scale": scale,
                "rmse_in_steps": rmse / scale if scale else None,
                "max_abs_error": float(record["max_abs_error"]),
            }
        )
    return rows
