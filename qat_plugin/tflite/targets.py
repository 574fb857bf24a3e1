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
- `"mcu"`: TensorFlow Lite Micro (`qat_plugin.tflite.mcu_target`): int8 or
  int16x8 models. With the `mcu` extra the model runs in TFLM itself (its
  registered ops, the arena it allocates and the smallest it starts in,
  outputs against LiteRT's reference kernels, host latency); without it,
  TFLM's op list and an arena estimate (`arena_plan`). `arena_limit=`
  refuses a model that needs a larger arena.

Examples:
    >>> import keras, numpy as np, qat_plugin
    >>> from qat_plugin.tflite.targets import check_target
    >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    >>> x = np.random.rand(8, 4).astype("float32")
    >>> qat = qat_plugin.quantize_model(model)
    >>> _ = qat(x, training=True)  # observes the activation ranges
    >>> check = check_target(qat_plugin.export_tflite(qat), "mcu")
    >>> check.compatible, check.arena.peak_live_bytes, check.arena.arena_bytes
    (True, 6, 32)
"""

import contextlib
import dataclasses
import io

from qat_plugin.config.constants import TARGETS
from qat_plugin.tflite.arena import ArenaPlan, arena_plan
from qat_plugin.tflite.flatbuffer import read_graph
from qat_plugin.tflite.interpreter import load_model_bytes, make_interpreter
from qat_plugin.tflite.mcu_target import check_mcu

# `arena_plan` and `ArenaPlan` are re-exported here, beside the checks.
__all__ = ["ArenaPlan", "TargetCheck", "arena_plan", "check_target", "flex_ops",
           "gpu_analysis", "xnnpack_partition"]

@dataclasses.dataclass(frozen=True)
class TargetCheck:
    """Whether a .tflite model meets a deployment target.

    Attributes:
        target: `"cpu"`, `"gpu"` or `"mcu"`.
        compatible: True when the model meets it.
        offending: `(op_name, reason)` pairs that stop it.
        notes: what else the target should know (ops XNNPACK leaves to
            TFLite's builtin kernels; for `"mcu"` flash, arena, bit-exactness,
            latency and a per-op table of the live activations).
        arena: the `ArenaPlan` (for `"mcu"`): the offline plan and estimate.
        micro: the `qat_plugin.tflite.micro.MicroRun` (for `"mcu"` with the
            `tflite-micro` wheel installed): what TFLM itself measured.

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
    micro: object = None

    @property
    def arena_bytes(self):
        """The arena the model needs (`"mcu"`): TFLM's smallest, else the estimate."""
        if self.micro is not None and self.micro.runs:
            return self.micro.smallest_arena_bytes
        return self.arena.estimated_bytes if self.arena is not None else None

    def summary(self):
        """A readable verdict: the target, then one line per offending op and note."""
        lines = [f"{self.target}: {'compatible' if self.compatible else 'NOT compatible'}"]
        lines += [f"  - {op}: {reason}" for op, reason in self.offending]
        lines += [f"  {note}" for note in self.notes]
        return "\n".join(lines)

    def __str__(self):
        return self.summary()


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


def check_target(tflite, target, *, allow_select_tf_ops=False, arena_limit=None):
    """Checks a .tflite model (bytes or path) against a deployment target.

    Args:
        tflite: .tflite bytes or a path.
        target: one of `TARGETS`.
        allow_select_tf_ops: for `"cpu"`, accept Select TF (Flex) ops.
        arena_limit: for `"mcu"`, the tensor arena the device has (bytes):
            a model that needs more fails the check, naming the peak
            tensors.

    Returns:
        A `TargetCheck`.

    Examples:
        >>> import keras, qat_plugin
        >>> from qat_plugin.tflite.targets import check_target
        >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
        >>> check = check_target(qat_plugin.export_tflite(model), "mcu")
        >>> check.compatible, check.offending[0][1][:19]
        (False, 'has float32 tensors')
    """
    if target not in TARGETS:
        raise ValueError(f"target must be one of {TARGETS}, got {target!r}.")
    if arena_limit is not None and target != "mcu":
        raise ValueError(f"arena_limit applies to target 'mcu', not {target!r}.")
    if arena_limit is not None and (not isinstance(arena_limit, int) or arena_limit <= 0):
        raise ValueError(f"arena_limit must be a positive number of bytes, got {arena_limit!r}.")
    data = load_model_bytes(tflite)
    graph = read_graph(data)
    if target == "cpu":
        return _check_cpu(data, graph, allow_select_tf_ops)
    if target == "gpu":
        return _check_gpu(data, graph)
    found = check_mcu(data, arena_limit=arena_limit)
    return TargetCheck("mcu", not found.offending, found.offending, found.notes,
                       found.plan, found.run)
