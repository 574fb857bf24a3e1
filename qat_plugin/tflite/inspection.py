"""`inspect_tflite`: what a .tflite model computes, and in which types."""

import collections
import dataclasses
import gzip

import numpy as np

from qat_plugin.config.constants import TARGETS
from qat_plugin.sparsity import holds_n_of_m
from qat_plugin.tflite.flatbuffer import WEIGHT_OPS, Flatbuffer
from qat_plugin.tflite.interpreter import load_model_bytes, make_interpreter, model_source
from qat_plugin.tflite.targets import check_target

# Ops that only convert between float and integer tensors.
CONVERSION_OPS = ("QUANTIZE", "DEQUANTIZE")


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """One tensor of the flatbuffer.

    Examples:
        >>> from qat_plugin.tflite.inspection import TensorInfo
        >>> weight = TensorInfo(1, "kernel", "int8", (2, 4), (0.1, 0.2), (0, 0), 0)
        >>> weight.is_float, weight.per_channel
        (False, True)
    """

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
    """One op of the flatbuffer with its input and output tensors.

    Examples:
        >>> from qat_plugin.tflite.inspection import OpInfo, TensorInfo
        >>> x = TensorInfo(0, "x", "float32", (1, 4), (), (), 0)
        >>> q = TensorInfo(1, "q", "int8", (1, 4), (0.1,), (0,), 0)
        >>> OpInfo(0, "QUANTIZE", (x,), (q,)).computes_in_float
        False
        >>> OpInfo(1, "TANH", (x,), (x,)).computes_in_float
        True
    """

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
class WeightInfo:
    """One weight tensor of a CONV/FULLY_CONNECTED op and its sparsity.

    Attributes:
        tensor: the weight tensor.
        op: the name of the op it feeds.
        zero_fraction: the fraction of its stored values that are zero
            (int8 zeros in an int8 model).
        is_2_4: every 4 consecutive values along the last (input-channel)
            axis hold at least 2 zeros: the 2:4 pattern.
        sparse_encoded: stored in the converter's sparse format (expanded
            by a DENSIFY op or read sparse by the op itself;
            `export_tflite(..., sparse_weights=True)`).
        values: the stored values as a dense NumPy array (decoded when
            sparse-encoded).

    Examples:
        >>> import keras, qat_plugin
        >>> from qat_plugin.tflite.inspection import inspect_tflite
        >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
        >>> weight, = inspect_tflite(qat_plugin.export_tflite(model, mode="float")).weights
        >>> weight.op, weight.tensor.shape, weight.values.shape, weight.sparse_encoded
        ('FULLY_CONNECTED', (2, 4), (2, 4), False)
    """

    tensor: TensorInfo
    op: str
    zero_fraction: float
    is_2_4: bool
    sparse_encoded: bool
    values: np.ndarray = dataclasses.field(default=None, compare=False, repr=False)


@dataclasses.dataclass(frozen=True)
class TFLiteReport:
    """What `inspect_tflite` found.

    Attributes:
        ops: every op, in execution order.
        inputs, outputs: the model's input and output tensors.
        size_bytes: the flatbuffer's size.
        gzip_size_bytes: its size after gzip (level 9): what zeros buy in
            a compressed download.
        weights: a `WeightInfo` per weight tensor, in op order.
        targets: a `qat_plugin.tflite.targets.TargetCheck` per deployment
            target asked for with `inspect_tflite(..., targets=...)`.

    Examples:
        >>> import keras, qat_plugin
        >>> from qat_plugin.tflite.inspection import inspect_tflite
        >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
        >>> data = qat_plugin.export_tflite(model, mode="float")
        >>> report = inspect_tflite(data, targets="mcu")
        >>> report.size_bytes == len(data), report.is_fully_int8, report.target("mcu").compatible
        (True, False, False)
    """

    ops: tuple
    inputs: tuple
    outputs: tuple
    size_bytes: int
    gzip_size_bytes: int = 0
    weights: tuple = ()
    targets: tuple = ()

    def target(self, name):
        """The `TargetCheck` of target `name` (asked for in `inspect_tflite`)."""
        for check in self.targets:
            if check.target == name:
                return check
        raise KeyError(
            f"Target '{name}' was not checked; pass targets=('{name}',) to "
            f"inspect_tflite (checked: {[c.target for c in self.targets]})."
        )

    @property
    def weight_sparsity(self):
        """The fraction of zeros over all weight tensors' values."""
        sizes = [int(np.prod(w.tensor.shape)) for w in self.weights]
        if not sum(sizes):
            return 0.0
        zeros = sum(w.zero_fraction * n for w, n in zip(self.weights, sizes))
        return zeros / sum(sizes)

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
            f"{len(self.ops)} ops, {self.size_bytes} bytes "
            f"({self.gzip_size_bytes} gzipped), "
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
        for w in self.weights:
            lines.append(
                f"  weight {w.tensor.name} ({w.op}, {w.tensor.dtype}"
                f"{list(w.tensor.shape)}): {w.zero_fraction:.1%} zeros"
                + (", 2:4" if w.is_2_4 else "")
                + (", sparse-encoded" if w.sparse_encoded else "")
            )
        lines.extend(check.summary() for check in self.targets)
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


def inspect_tflite(model, targets=(), arena_limit=None):
    """Reports a .tflite model's ops, tensor types and quantization.

    Args:
        model: .tflite bytes or a path to a .tflite file; an empty, truncated
            or non-TFLite one is a `qat_plugin.errors.ModelFileError` naming
            the file (or "the bytes given").
        targets: deployment targets to check, among `"cpu"`, `"gpu"` and
            `"mcu"` (or `"all"`): `report.target(name)` then says whether
            the model meets each, which ops stand in the way, which ops
            XNNPACK leaves to TFLite's kernels (cpu) and the tensor arena a
            microcontroller needs (mcu). See `qat_plugin.tflite.targets`.
        arena_limit: the tensor arena of the microcontroller (bytes), for
            target `"mcu"`: the check fails when the model needs more.

    Returns:
        A `TFLiteReport`; `str(report)` is a readable table, and
        `report.float_ops` lists every op that still computes in float.

    Examples:
        >>> import keras, qat_plugin
        >>> from qat_plugin.tflite.inspection import inspect_tflite
        >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
        >>> report = inspect_tflite(qat_plugin.export_tflite(model, mode="float"))
        >>> dict(report.op_counts), [op.name for op in report.float_ops]
        ({'FULLY_CONNECTED': 1}, ['FULLY_CONNECTED'])
    """
    if isinstance(targets, str):
        targets = TARGETS if targets == "all" else (targets,)
    if arena_limit is not None and "mcu" not in targets:
        raise ValueError("arena_limit applies to target 'mcu': pass targets=('mcu',).")
    data = load_model_bytes(model)
    # Read by LiteRT first: a file it cannot read fails naming the file.
    interpreter = make_interpreter(data, use_xnnpack=False, source=model_source(model))
    checks = tuple(
        check_target(data, target, arena_limit=arena_limit if target == "mcu" else None)
        for target in targets
    )
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
        gzip_size_bytes=len(gzip.compress(data, compresslevel=9)),
        weights=_weights(data, ops),
        targets=checks,
    )


def _weights(data, ops):
    """A `WeightInfo` per weight tensor, read from a fresh interpreter."""
    densified = {op.outputs[0].index for op in ops if op.name == "DENSIFY"}
    weight_ops = [
        op for op in ops
        if op.name in WEIGHT_OPS and len(op.inputs) > 1
    ]
    if not weight_ops:
        return ()
    interpreter = make_interpreter(data, use_xnnpack=False)
    try:
        interpreter.allocate_tensors()
        allocated = True
    except RuntimeError:
        # Select TF ops allocate only with the Flex delegate: the values
        # are read from the file instead.
        allocated = False
    if allocated and any(op.inputs[1].index in densified for op in weight_ops):
        # DENSIFY expands a sparse-encoded weight into a persistent tensor
        # on the first invoke; the inputs' values do not matter.
        interpreter.invoke()
    details = {d["index"]: d for d in interpreter.get_tensor_details()}
    flatbuffer = None
    weights = []
    for op in weight_ops:
        tensor = op.inputs[1]
        sparsity = details[tensor.index]["sparsity_parameters"]
        if sparsity:  # Read sparse by the op itself: decode the flatbuffer.
            flatbuffer = flatbuffer or Flatbuffer(data)
            stored = flatbuffer.stored_bytes(flatbuffer.subgraph().tensors[tensor.index])
            values = _densify(stored.view(np.dtype(tensor.dtype)), tensor.shape, sparsity)
        elif allocated:
            values = interpreter.get_tensor(tensor.index)
        else:
            flatbuffer = flatbuffer or Flatbuffer(data)
            stored = flatbuffer.stored_bytes(flatbuffer.subgraph().tensors[tensor.index])
            values = stored.view(np.dtype(tensor.dtype)).reshape(tensor.shape)
        weights.append(
            WeightInfo(
                tensor=tensor,
                op=op.name,
                zero_fraction=float(np.mean(values == 0)) if values.size else 0.0,
                is_2_4=holds_n_of_m(values, 2, 4, axis=-1),
                sparse_encoded=tensor.index in densified or bool(sparsity),
                values=values,
            )
        )
    return tuple(weights)


def _densify(values, shape, sparsity):
    """Expands a TFLite sparse tensor (CSR levels, optional blocks) to dense.

    Walks the levels in traversal order as TFLite's FormatConverter does;
    the stored values come in the order of the walk.
    """
    order = [int(d) for d in sparsity["traversal_order"]]
    block_map = [int(d) for d in sparsity["block_map"]]
    levels = sparsity["dim_metadata"]
    rank = len(shape)
    positions = np.zeros(1, np.int64)
    coords = np.zeros((1, 0), np.int64)
    for level in levels:
        if level["format"] == 0:  # dense
            size = int(level["dense_size"])
            coords = np.repeat(coords, size, axis=0)
            index = np.tile(np.arange(size), len(positions))
            positions = np.repeat(positions, size) * size + index
        else:  # CSR
            segments = np.asarray(level["array_segments"], np.int64)
            counts = segments[positions + 1] - segments[positions]
            starts = np.repeat(segments[positions], counts)
            offsets = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
            positions = starts + offsets
            index = np.asarray(level["array_indices"], np.int64)[positions]
            coords = np.repeat(coords, counts, axis=0)
        coords = np.concatenate([coords, index[:, None]], axis=1)
    original = np.zeros((len(positions), rank), np.int64)
    for level in range(rank):
        original[:, order[level]] = coords[:, level]
    for level in range(rank, len(order)):
        dim = block_map[order[level] - rank]
        block_size = int(levels[level]["dense_size"])
        original[:, dim] = original[:, dim] * block_size + coords[:, level]
    # Blocks may run past the tensor's edge (1x16 blocks of an 8-wide
    # FULLY_CONNECTED weight): that part is padding.
    inside = np.all(original < np.asarray(shape), axis=1)
    dense = np.zeros(shape, values.dtype)
    dense[tuple(original[inside].T)] = values[: len(positions)][inside]
    return dense
