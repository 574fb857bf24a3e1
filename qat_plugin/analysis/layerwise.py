"""Layer-wise error: where an int8 model departs from the float model.

`layerwise_error` runs a .tflite model in the LiteRT interpreter with every
intermediate tensor kept, dequantizes each op's output and compares it with
the output of the Keras layer it stands for, run on the same samples. The
error accumulates through the network, so the table shows where the int8
model drifts from float and how fast; the layer whose SQNR drops most is the
one to keep in float (`quantize_model(..., skip=[...])`) or to look at.

It serves PTQ and QAT exports alike. Tensors are matched to layers by name
(`qat_plugin.analysis.matching`): a Conv -> BatchNormalization -> ReLU chain
is one int8 op, so its tensor is compared with the last layer of the chain,
which is also where a QAT model's fused layer ends.

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

import keras
import numpy as np
from keras import tree

from qat_plugin.analysis.matching import LayerMatcher, match_tensors
from qat_plugin.data.batches import calibration_samples, model_call_inputs
from qat_plugin.config.constants import CALIBRATED_MODES
from qat_plugin.tflite.convert import float_converter
from qat_plugin.tflite.input_shapes import export_input_specs
from qat_plugin.tflite.interpreter import TFLiteModel, dequantize_array


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

    Examples:
        >>> from qat_plugin.analysis.layerwise import LayerError
        >>> row = LayerError("conv", "CONV_2D", "int8", rmse=0.02, sqnr_db=31.5, scale=0.01)
        >>> row.rmse_in_steps
        2.0
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
    """Per-layer errors in execution order; `str()` is a Markdown table.

    Examples:
        >>> import math
        >>> from qat_plugin.analysis.layerwise import LayerError, LayerwiseReport
        >>> report = LayerwiseReport((LayerError("fc", "FULLY_CONNECTED", "int8", 0.1, 25.0, 0.05),
        ...     LayerError("out", "SOFTMAX", "int8", 0.0, math.inf, 0.004)), num_samples=16)
        >>> [r.layer for r in report.worst(1)], report["out"].op
        (['fc'], 'SOFTMAX')
        >>> print(report.to_markdown().splitlines()[-1])
        | out | SOFTMAX | int8 | 0 | 0.00 | inf |
    """

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
        """The report as plain data (an infinite SQNR as None)."""
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
        """The rows as a Markdown table under the title."""
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

    Examples:
        >>> import numpy as np
        >>> from qat_plugin.analysis.layerwise import error_stats
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

    Examples:
        >>> import keras, numpy as np, qat_plugin
        >>> from qat_plugin.analysis.layerwise import layerwise_error
        >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, name="fc")])
        >>> x = np.random.rand(32, 4).astype("float32")
        >>> tflite = qat_plugin.export_tflite(model, mode="int8", representative_data=x)
        >>> report = layerwise_error(model, tflite, x)
        >>> [row.layer for row in report.rows], report.rows[0].sqnr_db > 20
        (['fc'], True)
    """
    inputs = _stack(calibration_samples(reference_model, data, max_samples, "data"))
    matcher = LayerMatcher(reference_model)
    layers = matcher.layers
    probe = keras.Model(
        model_call_inputs(reference_model, reference_model.inputs),
        [layer.output for layer in layers],
    )
    float_outputs = probe.predict(model_call_inputs(reference_model, inputs), verbose=0)
    float_outputs = dict(zip([l.name for l in layers], tree.flatten(float_outputs)))

    # Given a path, a file LiteRT cannot read fails naming it.
    runner = TFLiteModel(tflite_model, use_xnnpack=False, preserve_all_tensors=True)
    if not runner.dynamic_batch:
        raise ValueError(
            "layerwise_error needs a .tflite model with a dynamic batch axis "
            "(export_tflite writes one)."
        )
    runner.predict(inputs, batch_size=len(inputs[0]))
    interpreter = runner.interpreter
    # Tensors whose shape differs from the layer's output are left out.
    matches = match_tensors(
        runner,
        matcher,
        keep=lambda layer, detail: tuple(detail["shape"]) == float_outputs[layer].shape,
    )

    rows = []
    for layer in sorted(matches, key=matcher.order.get):
        op_name, detail = matches[layer]
        index = detail["index"]
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
                    calibration_steps=200, max_samples=64, input_shape=None):
    """Per-op error of a PTQ model from `tf.lite.experimental.QuantizationDebugger`.

    Unlike `layerwise_error`, each op is fed the float model's own input, so
    a row shows the error that op adds by itself, not the accumulated one.
    Only for PTQ: the debugger re-runs the converter's calibration.
    `input_shape` fixes inputs of undefined size, as in `export_tflite`.

    Returns:
        A list of dicts in execution order: `layer` (the Keras layer the
        tensor stands for, or None), `op`, `tensor`, `rmse`, `scale`,
        `rmse_in_steps`, `max_abs_error`.

    Examples:
        >>> import keras, numpy as np
        >>> from qat_plugin.analysis.layerwise import ptq_local_error
        >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, name="fc")])
        >>> x = np.random.default_rng(0).random((16, 4), dtype="float32")
        >>> rows = ptq_local_error(model, x, x, calibration_steps=16, max_samples=8)
        >>> "fc" in [row["layer"] for row in rows]
        True
    """
    import csv

    import tensorflow as tf

    if mode not in CALIBRATED_MODES:
        raise ValueError(f"mode must be one of {CALIBRATED_MODES}, got {mode!r}.")
    specs = export_input_specs(float_model, input_shape)
    debug = calibration_samples(float_model, data, max_samples, "data", specs=specs)
    converter = float_converter(
        float_model, mode, representative_data, calibration_steps, integer_io=False,
        input_shape=input_shape,
    )
    debugger = tf.lite.experimental.QuantizationDebugger(
        converter=converter, debug_dataset=lambda: iter(debug)
    )
    debugger.run()
    buffer = io.StringIO()
    debugger.layer_statistics_dump(buffer)
    matcher = LayerMatcher(float_model)
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
