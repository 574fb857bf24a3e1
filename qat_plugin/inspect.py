"""`inspect_tflite`: what a .tflite model computes, and in which types."""

import collections
import dataclasses

import numpy as np

from qat_plugin.interpreter import load_model_bytes, make_interpreter

# Ops that only convert between float and integer tensors.
CONVERSION_OPS = ("QUANTIZE", "DEQUANTIZE")


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """One tensor of the flatbuffer."""

    index: int
    name: str
    dtype: str
    shape: tuple
    scales: tuple
    zero_points: tuple
    quantized_dimension: int

    @property
    def is_float(self):
        return self.dtype.startswith("float")

    @property
    def per_channel(self):
        return len(self.scales) > 1


@dataclasses.dataclass(frozen=True)
class OpInfo:
    """One op of the flatbuffer with its input and output tensors."""

    index: int
    name: str
    inputs: tuple
    outputs: tuple

    @property
    def computes_in_float(self):
        """True for a compute op with a float input or output."""
        if self.name in CONVERSION_OPS:
            return False
        return any(t.is_float for t in self.inputs + self.outputs)


@dataclasses.dataclass(frozen=True)
class TFLiteReport:
    """What `inspect_tflite` found.

    Attributes:
        ops: every op, in execution order.
        inputs, outputs: the model's input and output tensors.
        size_bytes: the flatbuffer's size.
    """

    ops: tuple
    inputs: tuple
    outputs: tuple
    size_bytes: int

    @property
    def op_counts(self):
        """A `Counter` of op names."""
        return collections.Counter(op.name for op in self.ops)

    @property
    def float_ops(self):
        """Ops that still compute in float."""
        return [op for op in self.ops if op.computes_in_float]

    @property
    def conversion_ops(self):
        """QUANTIZE/DEQUANTIZE ops (float<->int conversions and requantizes)."""
        return [op for op in self.ops if op.name in CONVERSION_OPS]

    @property
    def is_fully_int8(self):
        """No float compute, no float<->int conversion, int8 input and output."""
        return (
            not self.float_ops
            and not any(
                op.name == "DEQUANTIZE"
                or any(t.is_float for t in op.inputs + op.outputs)
                for op in self.conversion_ops
            )
            and all(t.dtype == "int8" for t in self.inputs + self.outputs)
        )

    def summary(self):
        """A human-readable table of the ops and their tensor types."""
        lines = [
            f"{len(self.ops)} ops, {self.size_bytes} bytes, "
            f"fully int8: {'yes' if self.is_fully_int8 else 'no'}"
        ]
        for t in self.inputs:
            lines.append(f"  input  {t.name}: {t.dtype}{list(t.shape)} {_quant(t)}")
        for op in self.ops:
            ins = ", ".join(f"{t.dtype}{_quant(t)}" for t in op.inputs)
            outs = ", ".join(f"{t.dtype}{_quant(t)}" for t in op.outputs)
            flag = "  <- float" if op.computes_in_float else ""
            lines.append(f"  {op.index:3d} {op.name:22s} ({ins}) -> ({outs}){flag}")
        for t in self.outputs:
            lines.append(f"  output {t.name}: {t.dtype}{list(t.shape)} {_quant(t)}")
        if self.float_ops:
            names = ", ".join(f"{op.name}#{op.index}" for op in self.float_ops)
            lines.append(f"float ops: {names}")
        return "\n".join(lines)

    def __str__(self):
        return self.summary()


def _quant(t):
    if not t.scales:
        return ""
    if len(t.scales) == 1:
        return f"[s={t.scales[0]:.4g} z={t.zero_points[0]}]"
    return f"[{len(t.scales)} scales, axis {t.quantized_dimension}]"


def _tensor_info(detail):
    q = detail["quantization_parameters"]
    return TensorInfo(
        index=int(detail["index"]),
        name=detail["name"],
        dtype=np.dtype(detail["dtype"]).name,
        shape=tuple(int(s) for s in detail["shape"]),
        scales=tuple(float(s) for s in q["scales"]),
        zero_points=tuple(int(z) for z in q["zero_points"]),
        quantized_dimension=int(q["quantized_dimension"]),
    )


def inspect_tflite(model):
    """Reports a .tflite model's ops, tensor types and quantization.

    Args:
        model: .tflite bytes or a path to a .tflite file.

    Returns:
        A `TFLiteReport`; `str(report)` is a readable table, and
        `report.float_ops` lists every op that still computes in float.

    Example:

    >>> import keras, numpy as np, qat_plugin
    >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    >>> report = inspect_tflite(qat_plugin.export_tflite(model, mode="float"))
    >>> dict(report.op_counts), [op.name for op in report.float_ops]
    ({'FULLY_CONNECTED': 1}, ['FULLY_CONNECTED'])
    """
    data = load_model_bytes(model)
    interpreter = make_interpreter(data, use_xnnpack=False)
    tensors = {d["index"]: _tensor_info(d) for d in interpreter.get_tensor_details()}
    ops = tuple(
        OpInfo(
            index=int(op["index"]),
            name=op["op_name"],
            inputs=tuple(tensors[i] for i in op["inputs"] if i >= 0),
            outputs=tuple(tensors[i] for i in op["outputs"] if i >= 0),
        )
        for op in interpreter._get_ops_details()
    )
    return TFLiteReport(
        ops=ops,
        inputs=tuple(tensors[d["index"]] for d in interpreter.get_input_details()),
        outputs=tuple(tensors[d["index"]] for d in interpreter.get_output_details()),
        size_bytes=len(data),
    )
