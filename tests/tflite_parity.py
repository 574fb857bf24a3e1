"""Compares two int8 .tflite models: ops, tensor types, scales, constants, outputs."""

import dataclasses

import numpy as np

from qat_plugin.tflite.interpreter import TFLiteModel, make_interpreter


@dataclasses.dataclass
class Parity:
    """How far apart two .tflite models with the same structure are.

    Attributes:
        ops_equal: same op names in the same order, same tensor dtypes.
        max_scale_rel_diff: largest relative difference of a tensor scale.
        max_weight_steps: largest difference of an int8 constant (weight),
            in quantization steps.
        max_bias_steps: largest difference of an int32 constant (bias, whose
            step is input scale times weight scale, far finer), in its steps.
        weights_differing: int8 weight values that are not equal.
        weights_total: int8 weight values compared.
        max_output_steps: largest output difference on the probe inputs,
            in output quantization steps.
    """

    ops_equal: bool
    max_scale_rel_diff: float
    max_weight_steps: float
    max_bias_steps: float
    weights_differing: int
    weights_total: int
    max_output_steps: float

    def summary(self):
        return (
            f"ops equal: {self.ops_equal}; scales within "
            f"{self.max_scale_rel_diff:.1e} (relative); "
            f"{self.weights_differing}/{self.weights_total} int8 weights "
            f"differ, by at most {self.max_weight_steps:.0f} steps; biases "
            f"within {self.max_bias_steps:.0f} of their (finer) steps; "
            f"outputs within {self.max_output_steps:.0f} steps"
        )


def _structure(data):
    interpreter = make_interpreter(data, use_xnnpack=False)
    interpreter.allocate_tensors()
    ops = interpreter._get_ops_details()
    details = {d["index"]: d for d in interpreter.get_tensor_details()}
    produced = {i for op in ops for i in op["outputs"]}
    inputs = {d["index"] for d in interpreter.get_input_details()}
    constants = sorted(
        {
            i
            for op in ops
            for i in op["inputs"]
            if i >= 0 and i not in produced and i not in inputs
        }
    )
    op_signature = [
        (
            op["op_name"],
            tuple(np.dtype(details[i]["dtype"]).name for i in op["inputs"] if i >= 0),
        )
        for op in ops
    ]
    values = {i: np.array(interpreter.get_tensor(i)) for i in constants}
    return op_signature, details, constants, values


def _dequantized(value, detail):
    q = detail["quantization_parameters"]
    scales = np.asarray(q["scales"], np.float64)
    if scales.size == 0:
        return value.astype(np.float64), None
    zero_points = np.asarray(q["zero_points"], np.float64)
    shape = [1] * value.ndim
    if scales.size > 1:
        shape[q["quantized_dimension"]] = -1
    scales = scales.reshape(shape)
    return (value - zero_points.reshape(shape)) * scales, scales


def compare_tflite(a, b, probe_inputs):
    """Returns the `Parity` of .tflite bytes `a` and `b`.

    `probe_inputs` (float, the model's input shape) run through both models
    in the LiteRT interpreter.
    """
    ops_a, details_a, constants_a, values_a = _structure(a)
    ops_b, details_b, constants_b, values_b = _structure(b)
    ops_equal = ops_a == ops_b and constants_a == constants_b
    scale_diff = 0.0
    for index, detail in details_a.items():
        other = details_b.get(index)
        if other is None:
            ops_equal = False
            continue
        sa = np.asarray(detail["quantization_parameters"]["scales"])
        sb = np.asarray(other["quantization_parameters"]["scales"])
        if sa.shape != sb.shape:
            ops_equal = False
        elif sa.size:
            scale_diff = max(scale_diff, float(np.max(np.abs(sa - sb) / sb)))
    weight_steps, bias_steps, differing, total = 0.0, 0.0, 0, 0
    if ops_equal:
        for index in constants_a:
            va, vb = values_a[index], values_b[index]
            fa, scales_a = _dequantized(va, details_a[index])
            fb, scales_b = _dequantized(vb, details_b[index])
            if scales_a is None:
                continue
            steps = float(np.max(np.abs(fa - fb) / np.maximum(scales_a, scales_b)))
            if va.dtype == np.int8:
                total += va.size
                differing += int(np.sum(va != vb))
                weight_steps = max(weight_steps, steps)
            else:
                bias_steps = max(bias_steps, steps)
    output_steps = float("inf")
    if ops_equal:
        model_a, model_b = TFLiteModel(a), TFLiteModel(b)
        out_a = model_a.predict(probe_inputs)
        out_b = model_b.predict(probe_inputs)
        step = max(model_a.output_steps()[0], model_b.output_steps()[0])
        output_steps = float(np.max(np.abs(np.asarray(out_a) - np.asarray(out_b)))) / step
    return Parity(
        ops_equal, scale_diff, weight_steps, bias_steps, differing, total, output_steps
    )
