"""TensorFlow Lite Micro itself: run a .tflite model in the real runtime.

With the optional extra (`pip install "qat-plugin[mcu]"`, which brings the
`tflite-micro` wheel), `run_micro(tflite)` loads the model in TFLM's Python
interpreter in a worker process (`qat_plugin.tflite.micro_worker`) and
measures what a board is sized by:

- the arena TFLM allocates (`print_allocations()`: head = activations and
  kernel scratch, tail = persistent structures), and the smallest arena in
  which the model starts and runs, found by bisection (too small an arena
  can crash TFLM, so each try runs in a forked child);
- whether the ops are registered, from the runtime's own op lookup;
- TFLM's outputs on sample inputs against LiteRT's reference kernels
  (`OpResolverType.BUILTIN_REF`), in quantization steps: the two share
  their integer arithmetic, so they should agree bit for bit;
- host-side latency per inference, a relative figure (the host is no
  microcontroller).

Examples:
    >>> import keras, numpy as np, qat_plugin
    >>> from qat_plugin.tflite.micro import run_micro, tflm_available
    >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    >>> qat = qat_plugin.quantize_model(model)
    >>> _ = qat(np.random.rand(8, 4).astype("float32"), training=True)
    >>> run = run_micro(qat_plugin.export_tflite(qat)) if tflm_available() else None
    >>> run is None or (run.bit_exact and run.smallest_arena_bytes > run.arena_bytes)
    True
"""

import dataclasses
import functools
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

from qat_plugin.tflite import micro_worker
from qat_plugin.tflite.flatbuffer import read_graph
from qat_plugin.tflite.interpreter import load_model_bytes

# The builtin ops of TensorFlow Lite Micro, for the check without the
# runtime: one per `AddBuiltin(BuiltinOperator_...)` of `MicroMutableOpResolver`
# in tensorflow/tflite-micro, tensorflow/lite/micro/micro_mutable_op_resolver.h
# (August 2026; custom ops such as CIRCULAR_BUFFER, ETHOSU and the signal ops
# left out). The `tflite-micro` 0.dev20261023 wheel registers exactly these
# (tests/test_micro.py compares them with the installed wheel). An op missing
# here is refused, never silently accepted.
TFLM_BUILTIN_OPS = frozenset({
    "ABS", "ADD", "ADD_N", "ARG_MAX", "ARG_MIN", "ASSIGN_VARIABLE",
    "AVERAGE_POOL_2D", "BATCH_MATMUL", "BATCH_TO_SPACE_ND", "BROADCAST_ARGS",
    "BROADCAST_TO", "CALL_ONCE", "CAST", "CEIL", "CONCATENATION", "CONV_2D",
    "COS", "CUMSUM", "DEPTHWISE_CONV_2D", "DEPTH_TO_SPACE", "DEQUANTIZE", "DIV",
    "DYNAMIC_UPDATE_SLICE", "ELU", "EMBEDDING_LOOKUP", "EQUAL", "EXP",
    "EXPAND_DIMS", "FILL", "FLOOR", "FLOOR_DIV", "FLOOR_MOD", "FULLY_CONNECTED",
    "GATHER", "GATHER_ND", "GREATER", "GREATER_EQUAL", "HARD_SWISH", "IF",
    "L2_NORMALIZATION", "L2_POOL_2D", "LEAKY_RELU", "LESS", "LESS_EQUAL", "LOG",
    "LOGICAL_AND", "LOGICAL_NOT", "LOGICAL_OR", "LOGISTIC", "LOG_SOFTMAX",
    "MAXIMUM", "MAX_POOL_2D", "MEAN", "MINIMUM", "MIRROR_PAD", "MUL", "NEG",
    "NOT_EQUAL", "PACK", "PAD", "PADV2", "PRELU", "QUANTIZE", "READ_VARIABLE",
    "REDUCE_ALL", "REDUCE_MAX", "REDUCE_MIN", "RELU", "RELU6", "RESHAPE",
    "RESIZE_BILINEAR", "RESIZE_NEAREST_NEIGHBOR", "REVERSE_V2", "ROUND",
    "RSQRT", "SELECT_V2", "SHAPE", "SIN", "SLICE", "SOFTMAX",
    "SPACE_TO_BATCH_ND", "SPACE_TO_DEPTH", "SPLIT", "SPLIT_V", "SQRT", "SQUARE",
    "SQUARED_DIFFERENCE", "SQUEEZE", "STRIDED_SLICE", "SUB", "SUM", "SVDF",
    "TANH", "TRANSPOSE", "TRANSPOSE_CONV", "UNIDIRECTIONAL_SEQUENCE_LSTM",
    "UNPACK", "VAR_HANDLE", "WHILE", "ZEROS_LIKE",
})

# How long one worker may take before it counts as hung (seconds).
_WORKER_TIMEOUT = 600


@dataclasses.dataclass(frozen=True)
class MicroRun:
    """What TensorFlow Lite Micro did with a model.

    Attributes:
        version: the `tflite_micro` version that ran it.
        runs: True when the model loaded and ran.
        error: TFLM's message when it did not.
        missing_ops: builtin ops the runtime does not register.
        arena_bytes: the arena TFLM allocated (head + tail) after loading.
        head_bytes: its non-persistent part (activations, kernel scratch).
        tail_bytes: its persistent part (tensor and node structures,
            quantization data, kernel state).
        smallest_arena_bytes: the smallest `arena_size` in which the model
            loads and runs: above `arena_bytes`, as preparing the kernels
            needs temporary memory on top.
        allocations: TFLM's bytes per record kind (`print_allocations()`).
        max_diff_steps: the largest difference, in quantization steps,
            between TFLM's outputs and LiteRT's reference kernels on the
            sample inputs (0: bit-exact).
        num_samples: the number of sample inputs compared.
        seconds_per_inference: host-side TFLM time per inference.
        reference_seconds_per_inference: LiteRT's reference kernels' time
            on the same host and samples.

    Examples:
        >>> from qat_plugin.tflite.micro import MicroRun
        >>> MicroRun("0.dev", False, error="x", missing_ops=("GELU",)).bit_exact
        False
    """

    version: str
    runs: bool
    error: str = None
    missing_ops: tuple = ()
    arena_bytes: int = 0
    head_bytes: int = 0
    tail_bytes: int = 0
    smallest_arena_bytes: int = 0
    allocations: dict = dataclasses.field(default_factory=dict, compare=False)
    max_diff_steps: int = None
    num_samples: int = 0
    seconds_per_inference: float = dataclasses.field(default=None, compare=False)
    reference_seconds_per_inference: float = dataclasses.field(default=None, compare=False)

    @property
    def bit_exact(self):
        """True when TFLM's outputs equal LiteRT's reference kernels' on every sample."""
        return self.runs and self.max_diff_steps == 0

    @property
    def relative_latency(self):
        """TFLM's host time per inference over LiteRT's reference kernels'."""
        if not self.seconds_per_inference or not self.reference_seconds_per_inference:
            return None
        return self.seconds_per_inference / self.reference_seconds_per_inference


def tflm_available():
    """True when the `tflite-micro` wheel (the `mcu` extra) is installed.

    Examples:
        >>> from qat_plugin.tflite.micro import tflm_available
        >>> tflm_available() in (True, False)
        True
    """
    return importlib.util.find_spec("tflite_micro") is not None


def _worker(request):
    """Runs the worker on `request` (arrays); returns (report, outputs)."""
    with tempfile.TemporaryDirectory(prefix="qat_plugin_tflm_") as folder:
        request_path = os.path.join(folder, "request.npz")
        result_path = os.path.join(folder, "result.npz")
        np.savez(request_path, **request)
        done = subprocess.run(
            [sys.executable, micro_worker.__file__, request_path, result_path],
            capture_output=True, text=True, timeout=_WORKER_TIMEOUT,
        )
        if done.returncode != 0:
            from qat_plugin.errors import ExportError

            raise ExportError(
                f"The TensorFlow Lite Micro worker failed (exit {done.returncode}): "
                f"{done.stderr.strip()[-1500:]}"
            )
        with np.load(result_path) as result:
            outputs = {k: result[k] for k in result.files if k != "report"}
            return json.loads(str(result["report"])), outputs


@functools.lru_cache(maxsize=1)
def micro_builtin_ops():
    """The builtin ops the installed TFLM registers (from its own op lookup).

    Each builtin is looked up through a probe model in a worker process;
    the answer is cached for the session.

    Examples:
        >>> from qat_plugin.tflite.micro import micro_builtin_ops, tflm_available
        >>> not tflm_available() or {"CONV_2D", "BATCH_MATMUL"} <= micro_builtin_ops()
        True
    """
    report, _ = _worker({"mode": "ops"})
    return frozenset(report["registered_ops"])


def sample_inputs(tflite, num_samples=8, seed=0):
    """Random inputs over each model input's full integer range (or [0, 1) for floats).

    Examples:
        >>> import keras, numpy as np, qat_plugin
        >>> from qat_plugin.tflite.micro import sample_inputs
        >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
        >>> qat = qat_plugin.quantize_model(model)
        >>> _ = qat(np.random.rand(8, 4).astype("float32"), training=True)
        >>> [(x.shape, x.dtype.name) for x in sample_inputs(qat_plugin.export_tflite(qat), 3)]
        [((3, 1, 4), 'int8')]
    """
    graph = read_graph(load_model_bytes(tflite))
    rng = np.random.default_rng(seed)
    samples = []
    for index in graph.inputs:
        dtype = np.dtype(graph.dtypes[index])
        shape = (num_samples,) + tuple(max(int(s), 1) for s in graph.shapes[index])
        if np.issubdtype(dtype, np.integer):
            info = np.iinfo(dtype)
            samples.append(rng.integers(info.min, info.max, shape, endpoint=True, dtype=dtype))
        else:
            samples.append(rng.random(shape).astype(dtype))
    return samples


def _reference_outputs(data, inputs, num_outputs):
    """LiteRT's reference kernels' outputs per sample, and the time per inference."""
    from ai_edge_litert import interpreter as litert

    reference = litert.Interpreter(
        model_content=data,
        experimental_op_resolver_type=litert.OpResolverType.BUILTIN_REF,
    )
    reference.allocate_tensors()
    ins, outs = reference.get_input_details(), reference.get_output_details()
    outputs = []
    start = time.perf_counter()
    for sample in range(len(inputs[0])):
        for detail, samples in zip(ins, inputs):
            reference.set_tensor(detail["index"], samples[sample])
        reference.invoke()
        outputs.append([reference.get_tensor(outs[i]["index"]) for i in range(num_outputs)])
    return outputs, (time.perf_counter() - start) / len(inputs[0])


def _steps(a, b):
    """The largest difference of two outputs in quantization steps (integer types)."""
    if np.issubdtype(a.dtype, np.integer):
        return int(np.max(np.abs(a.astype(np.int64) - b.astype(np.int64)), initial=0))
    return float(np.max(np.abs(a - b), initial=0.0))


def run_micro(tflite, samples=None, *, num_samples=8, seed=0, arena=None):
    """Runs a .tflite model (bytes or path) in TensorFlow Lite Micro.

    Args:
        tflite: .tflite bytes or a path.
        samples: one array per model input, samples along the first axis,
            in the input's type (default: `sample_inputs(...)`).
        num_samples, seed: for the default samples.
        arena: the first arena size to try (doubled until the model runs;
            default 10 times the model size, as TFLM's Python runtime does).

    Returns:
        A `MicroRun`.

    Raises:
        ModuleNotFoundError: when the `tflite-micro` wheel is not installed.

    Examples:
        >>> import keras, numpy as np, qat_plugin
        >>> from qat_plugin.tflite.micro import run_micro, tflm_available
        >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
        >>> run = run_micro(qat_plugin.export_tflite(model)) if tflm_available() else None
        >>> run is None or run.bit_exact  # a float model: TFLM's float kernels agree too
        True
    """
    if not tflm_available():
        raise ModuleNotFoundError(
            "TensorFlow Lite Micro is not installed: pip install \"qat-plugin[mcu]\" "
            "(x86_64 Linux wheels, Python 3.10-3.13)."
        )
    data = load_model_bytes(tflite)
    graph = read_graph(data)
    inputs = samples if samples is not None else sample_inputs(data, num_samples, seed)
    inputs = [np.asarray(x) for x in inputs]
    num_outputs = len(graph.outputs)
    request = {f"input_{i}": x for i, x in enumerate(inputs)}
    request.update(mode="run", model=np.frombuffer(data, np.uint8),
                   arena=arena or 10 * len(data), num_inputs=len(inputs),
                   num_outputs=num_outputs)
    report, outputs = _worker(request)
    if "error" in report:
        return MicroRun(report["version"], False, error=report["error"],
                        missing_ops=tuple(report["missing_ops"]))
    expected, reference_seconds = _reference_outputs(data, inputs, num_outputs)
    diff = max(
        (_steps(outputs[f"output_{i}_{s}"], expected[s][i])
         for s in range(len(inputs[0])) for i in range(num_outputs)),
        default=0,
    )
    allocations = report["allocations"]
    return MicroRun(
        version=report["version"],
        runs=True,
        arena_bytes=allocations["total"],
        head_bytes=allocations["head"],
        tail_bytes=allocations["tail"],
        smallest_arena_bytes=report["smallest_arena"],
        allocations=allocations,
        max_diff_steps=diff,
        num_samples=len(inputs[0]),
        seconds_per_inference=report["seconds_per_inference"],
        reference_seconds_per_inference=reference_seconds,
    )
