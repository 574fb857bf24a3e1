"""Deployment targets: can a .tflite model run on a CPU, a GPU or a microcontroller?

`check_target(tflite, target)` returns a `TargetCheck`: whether the model
meets the target, the offending ops and what else the target needs to know:

- `"cpu"`: TFLite's CPU runtime. Every op must be a TFLite builtin (Select
  TF "Flex" ops need the Flex delegate: allowed only with
  `allow_select_tf_ops=True`). Measured by running the interpreter with its
  default XNNPACK delegate and reading which ops stay outside the DELEGATE
  node(s): those run on TFLite's reference/optimized builtin kernels, not
  XNNPACK (reported, not an error).
- `"gpu"`: the converter's GPU-delegate compatibility check
  (`tf.lite.experimental.Analyzer.analyze(..., gpu_compatibility=True)`),
  whose printed report is captured and parsed, plus two rules of the GPU
  delegate the analyzer of this TensorFlow build does not flag (builtin
  ops only, no int16 tensors).
- `"mcu"`: TensorFlow Lite Micro. int8 only (int8 activations, int8 weights,
  int32 biases), every op in TFLM's builtin op set (`TFLM_BUILTIN_OPS`), and
  the tensor arena the activations need (`arena_plan`), beside the weights.

Examples:
    >>> import keras, numpy as np, qat_plugin
    >>> from qat_plugin.tflite.targets import check_target
    >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    >>> x = np.random.rand(8, 4).astype("float32")
    >>> qat = qat_plugin.quantize_model(model)
    >>> _ = qat(x, training=True)  # observes the activation ranges
    >>> check = check_target(qat_plugin.export_tflite(qat), "mcu")
    >>> check.compatible, check.arena.peak_live_bytes
    (True, 6)
"""

import contextlib
import dataclasses
import io

from qat_plugin.config.constants import TARGETS
from qat_plugin.tflite.flatbuffer import read_graph
from qat_plugin.tflite.interpreter import load_model_bytes, make_interpreter

# The builtin ops of TensorFlow Lite Micro: one per `Add*` method of
# `MicroMutableOpResolver` that registers a builtin (custom ops such as
# CIRCULAR_BUFFER, ETHOSU and TFLite_Detection_PostProcess left out), read
# from tensorflow/tflite-micro, tensorflow/lite/micro/micro_mutable_op_resolver.h
# at commit 03c312b17dfae17a8ed7e21c5bdf66bb967a07cd. Newer TFLM releases add
# ops; an op missing here is refused, never silently accepted.
TFLM_BUILTIN_OPS = frozenset({
    "ABS", "ADD", "ADD_N", "ARG_MAX", "ARG_MIN", "AVERAGE_POOL_2D",
    "BATCH_TO_SPACE_ND", "CAST", "CEIL", "CONCATENATION", "CONV_2D", "COS",
    "CUMSUM", "DEPTH_TO_SPACE", "DEPTHWISE_CONV_2D", "DEQUANTIZE", "ELU",
    "EQUAL", "EXP", "EXPAND_DIMS", "FILL", "FLOOR", "FLOOR_DIV", "FLOOR_MOD",
    "FULLY_CONNECTED", "GATHER", "GATHER_ND", "GREATER", "GREATER_EQUAL",
    "HARD_SWISH", "IF", "L2_NORMALIZATION", "L2_POOL_2D", "LEAKY_RELU",
    "LESS", "LESS_EQUAL", "LOG", "LOGICAL_AND", "LOGICAL_NOT", "LOGICAL_OR",
    "LOGISTIC", "MAXIMUM", "MAX_POOL_2D", "MEAN", "MINIMUM", "MUL", "NEG",
    "NOT_EQUAL", "PACK", "PAD", "PADV2", "PRELU", "QUANTIZE", "REDUCE_MAX",
    "RELU", "RELU6", "RESHAPE", "RESIZE_BILINEAR", "RESIZE_NEAREST_NEIGHBOR",
    "ROUND", "RSQRT", "SHAPE", "SIN", "SOFTMAX", "SPACE_TO_BATCH_ND",
    "SPACE_TO_DEPTH", "SPLIT", "SPLIT_V", "SQUEEZE", "SQRT", "SQUARE",
    "STRIDED_SLICE", "SUB", "SVDF", "TANH", "TRANSPOSE_CONV", "TRANSPOSE",
    "UNPACK", "ZEROS_LIKE",
})

# TFLM aligns every arena buffer to 16 bytes (MicroArenaBufferAlignment()).
ARENA_ALIGNMENT = 16

# Tensor types an int8 microcontroller model may hold: int8 data, int32
# biases (and the int32 shape/axis constants of RESHAPE, MEAN, ...).
_MCU_TYPES = ("int8", "int32")


@dataclasses.dataclass(frozen=True)
class ArenaPlan:
    """The activation memory of a model, from its tensors' lifetimes.

    Attributes:
        peak_live_bytes: the largest sum, over the ops in execution order,
            of the (unaligned) sizes of the non-constant tensors alive while
            that op runs: a tensor lives from the op that writes it (the
            start for a model input) to the last op that reads it (the end
            for a model output). No allocator can do with less.
        arena_bytes: the arena of a greedy plan like TFLM's
            `GreedyMemoryPlanner`: buffers (16-byte aligned) placed largest
            first at the lowest offset free during their lifetime. Kernel
            scratch buffers and TFLM's own bookkeeping come on top.
        weight_bytes: the bytes of constant tensors (weights, biases,
            shapes), which stay in flash.
        tensors: `(index, name, bytes, first_op, last_op, offset)` per
            planned tensor.

    Examples:
        >>> import keras, qat_plugin
        >>> from qat_plugin.tflite.targets import arena_plan
        >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2, use_bias=False)])
        >>> plan = arena_plan(qat_plugin.export_tflite(model, mode="float"))
        >>> plan.arena_bytes, plan.weight_bytes  # in/out 16 + 8 bytes, 16-aligned; 2x4 floats
        (32, 32)
    """

    peak_live_bytes: int
    arena_bytes: int
    weight_bytes: int
    tensors: tuple = ()


@dataclasses.dataclass(frozen=True)
class TargetCheck:
    """Whether a .tflite model meets a deployment target.

    Attributes:
        target: `"cpu"`, `"gpu"` or `"mcu"`.
        compatible: True when the model meets it.
        offending: `(op_name, reason)` pairs that stop it.
        notes: what else the target should know (ops XNNPACK leaves to
            TFLite's builtin kernels, the arena size, ...).
        arena: the `ArenaPlan` (for `"mcu"`).

    Examples:
        >>> from qat_plugin.tflite.targets import TargetCheck
        >>> print(TargetCheck("gpu", False, (("CUMSUM", "not supported"),)))
        gpu: NOT compatible
          - CUMSUM: not supported
    """

    target: str
    compatible: bool
    offending: tuple = ()
    notes: tuple = ()
    arena: ArenaPlan = None

    def summary(self):
        """A readable verdict: the target, then one line per offending op and note."""
        lines = [f"{self.target}: {'compatible' if self.compatible else 'NOT compatible'}"]
        lines += [f"  - {op}: {reason}" for op, reason in self.offending]
        lines += [f"  {note}" for note in self.notes]
        return "\n".join(lines)

    def __str__(self):
        return self.summary()


def arena_plan(tflite):
    """Returns the `ArenaPlan` of a .tflite model (bytes or path).

    Exact tensor lifetimes over the ops in execution order give
    `peak_live_bytes`; a greedy, largest-first placement (as TFLM's
    `GreedyMemoryPlanner` does) gives `arena_bytes`. A dynamic batch axis
    counts as 1, as on a microcontroller.

    Examples:
        >>> import keras, qat_plugin
        >>> from qat_plugin.tflite.targets import arena_plan
        >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
        >>> arena_plan(qat_plugin.export_tflite(model)).peak_live_bytes  # float
        24
    """
    graph = read_graph(load_model_bytes(tflite))
    last_op = len(graph.op_names) - 1
    first, last = {}, {}
    for index in graph.inputs:
        first[index] = 0
    for op, (ins, outs) in enumerate(zip(graph.op_inputs, graph.op_outputs)):
        for t in outs:
            first.setdefault(t, op)
            last.setdefault(t, op)
        for t in ins:
            if not graph.constant[t]:
                first.setdefault(t, op)
                last[t] = op
    for index in graph.outputs:
        last[index] = last_op
    planned = sorted(t for t in first if not graph.constant[t])
    sizes = {t: graph.nbytes(t) for t in planned}
    peak = max(
        (sum(sizes[t] for t in planned if first[t] <= op <= last[t])
         for op in range(last_op + 1)),
        default=0,
    )
    aligned = {t: -(-sizes[t] // ARENA_ALIGNMENT) * ARENA_ALIGNMENT for t in planned}
    offsets = {}
    for t in sorted(planned, key=lambda t: (-sizes[t], t)):
        busy = sorted(
            (offsets[o], offsets[o] + aligned[o])
            for o in offsets
            if first[o] <= last[t] and first[t] <= last[o]
        )
        offset = 0
        for start, end in busy:
            if offset + aligned[t] <= start:
                break
            offset = max(offset, end)
        offsets[t] = offset
    arena = max((offsets[t] + aligned[t] for t in planned), default=0)
    weights = sum(graph.nbytes(t) for t, c in enumerate(graph.constant) if c)
    tensors = tuple(
        (t, graph.names[t], sizes[t], first[t], last[t], offsets[t]) for t in planned
    )
    return ArenaPlan(peak_live_bytes=peak, arena_bytes=arena, weight_bytes=weights,
                     tensors=tensors)


def _is_flex(name):
    return name.startswith("Flex")


def flex_ops(tflite):
    """The sorted names of a model's Select TF ("Flex") ops (bytes or path).

    Examples:
        >>> import keras, qat_plugin
        >>> from qat_plugin.tflite.targets import flex_ops
        >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
        >>> flex_ops(qat_plugin.export_tflite(model, mode="float"))
        []
    """
    return sorted({n for n in read_graph(load_model_bytes(tflite)).op_names if _is_flex(n)})


def _non_builtin(graph, allow_select_tf_ops):
    """Ops that are neither TFLite builtins nor (when allowed) Flex ops."""
    offending = []
    for name in sorted(set(graph.op_names)):
        if _is_flex(name) and not allow_select_tf_ops:
            offending.append((name, "a Select TF (Flex) op: needs the Flex "
                              "delegate; export with allow_select_tf_ops=True"))
        elif not name.isupper() and not _is_flex(name):
            offending.append((name, "a custom op: needs its kernel registered"))
    return offending


def xnnpack_partition(tflite):
    """Returns `(delegated, left)`: op names XNNPACK takes and those it leaves.

    Runs the interpreter with its default delegate and walks back from each
    DELEGATE node's outputs to its inputs: the ops on the way are the ones
    it replaced; every other op runs on TFLite's builtin kernels.

    Examples:
        >>> import keras, qat_plugin
        >>> from qat_plugin.tflite.targets import xnnpack_partition
        >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
        >>> xnnpack_partition(qat_plugin.export_tflite(model, mode="float"))
        (['FULLY_CONNECTED'], [])
    """
    interpreter = make_interpreter(tflite, use_xnnpack=True)
    interpreter.allocate_tensors()
    details = interpreter._get_ops_details()
    model_ops = [d for d in details if d["op_name"] != "DELEGATE"]
    producer = {int(t): i for i, d in enumerate(model_ops) for t in d["outputs"]}
    taken = set()
    for delegate in (d for d in details if d["op_name"] == "DELEGATE"):
        boundary = {int(t) for t in delegate["inputs"]}
        stack = [int(t) for t in delegate["outputs"]]
        while stack:
            tensor = stack.pop()
            op = producer.get(tensor)
            if tensor in boundary or op is None or op in taken:
                continue
            taken.add(op)
            stack.extend(int(t) for t in model_ops[op]["inputs"] if t >= 0)
    delegated = [d["op_name"] for i, d in enumerate(model_ops) if i in taken]
    left = [d["op_name"] for i, d in enumerate(model_ops) if i not in taken]
    return delegated, left


def _check_cpu(data, graph, allow_select_tf_ops):
    offending = _non_builtin(graph, allow_select_tf_ops)
    notes = []
    if any(_is_flex(n) for n in graph.op_names):
        notes.append("Select TF ops: run with the Flex delegate (tf.lite.Interpreter "
                     "or the tensorflow-lite-select-tf-ops runtime).")
    elif not offending:
        delegated, left = xnnpack_partition(data)
        notes.append(
            f"XNNPACK delegates {len(delegated)} of {len(graph.op_names)} ops"
            + (f"; left to TFLite's builtin kernels: {', '.join(left)}" if left else "")
        )
    return TargetCheck("cpu", not offending, tuple(offending), tuple(notes))


def gpu_analysis(tflite):
    """Runs the converter's GPU-delegate compatibility check; returns its text.

    Examples:
        >>> import keras, qat_plugin
        >>> from qat_plugin.tflite.targets import gpu_analysis
        >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
        >>> "compatible with GPU delegate" in gpu_analysis(qat_plugin.export_tflite(model))
        True
    """
    import tensorflow as tf

    captured = io.StringIO()
    with contextlib.redirect_stdout(captured):
        tf.lite.experimental.Analyzer.analyze(
            model_content=load_model_bytes(tflite), gpu_compatibility=True
        )
    return captured.getvalue()


def _check_gpu(data, graph):
    # Measured: the analyzer of the TF 2.21 wheel reports every model tried
    # as compatible (TOPK_V2, CUMSUM, Flex ops, int16x8 models), so two
    # rules of the GPU delegate (tensorflow/lite/tools/versioning/
    # gpu_compatibility.cc) are checked here too: builtins only, and no
    # 16-bit integer tensors (it rejects int16 DEQUANTIZE; it runs float and
    # int8 models, dequantizing the latter).
    offending = [(name, "not a TFLite builtin: the GPU delegate cannot run it")
                 for name, _ in _non_builtin(graph, allow_select_tf_ops=False)]
    for op, (name, ins, outs) in enumerate(
        zip(graph.op_names, graph.op_inputs, graph.op_outputs)
    ):
        if any(graph.dtypes[t] == "int16" for t in ins + outs):
            offending.append((f"{name}#{op}", "has int16 tensors; the GPU delegate "
                              "runs float and int8 models only"))
    text = gpu_analysis(data)
    current = None
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("Op#"):
            current = stripped.split()[1].split("(")[0]
        elif "GPU COMPATIBILITY WARNING" in stripped and current is not None:
            reason = stripped.split("GPU COMPATIBILITY WARNING:", 1)[-1].strip()
            offending.append((current, reason))
            current = None
    if not offending and "compatible with GPU delegate" not in text:
        issues = [l.strip() for l in text.splitlines() if "GPU" in l and "WARNING" in l]
        offending = [("model", issue) for issue in issues] or [
            ("model", "the analyzer did not report the model as GPU compatible")
        ]
    return TargetCheck("gpu", not offending, tuple(offending))


def _check_mcu(data, graph):
    offending = []
    for name in sorted(set(graph.op_names)):
        if name not in TFLM_BUILTIN_OPS:
            offending.append((name, "not in TensorFlow Lite Micro's builtin op set"))
    for op, (name, ins, outs) in enumerate(
        zip(graph.op_names, graph.op_inputs, graph.op_outputs)
    ):
        types = sorted({graph.dtypes[t] for t in ins + outs} - set(_MCU_TYPES))
        if types:
            offending.append(
                (f"{name}#{op}", f"has {'/'.join(types)} tensors; the mcu target "
                 "is int8 only")
            )
    for t in graph.inputs + graph.outputs:
        if graph.dtypes[t] != "int8":
            offending.append(
                (graph.names[t], f"model input/output is {graph.dtypes[t]}, not int8")
            )
    plan = arena_plan(data)
    notes = (
        f"arena: {plan.arena_bytes} bytes (greedy plan, 16-byte aligned; "
        f"peak of live activations {plan.peak_live_bytes} bytes) + kernel "
        f"scratch; weights: {plan.weight_bytes} bytes",
    )
    return TargetCheck("mcu", not offending, tuple(offending), notes, plan)


def check_target(tflite, target, *, allow_select_tf_ops=False):
    """Checks a .tflite model (bytes or path) against a deployment target.

    Args:
        tflite: .tflite bytes or a path.
        target: one of `TARGETS`.
        allow_select_tf_ops: for `"cpu"`, accept Select TF (Flex) ops.

    Returns:
        A `TargetCheck`.

    Examples:
        >>> import keras, qat_plugin
        >>> from qat_plugin.tflite.targets import check_target
        >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
        >>> check = check_target(qat_plugin.export_tflite(model), "mcu")
        >>> check.compatible, check.offending[0]
        (False, ('FULLY_CONNECTED#0', 'has float32 tensors; the mcu target is int8 only'))
    """
    if target not in TARGETS:
        raise ValueError(f"target must be one of {TARGETS}, got {target!r}.")
    data = load_model_bytes(tflite)
    graph = read_graph(data)
    if target == "cpu":
        return _check_cpu(data, graph, allow_select_tf_ops)
    if target == "gpu":
        return _check_gpu(data, graph)
    return _check_mcu(data, graph)
