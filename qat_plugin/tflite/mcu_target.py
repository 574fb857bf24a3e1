"""The `mcu` target: can TensorFlow Lite Micro run the model, and in how much memory?

With the `tflite-micro` wheel (`pip install "qat-plugin[mcu]"`) the model
runs in TFLM (`qat_plugin.tflite.micro.run_micro`): op support comes from
the runtime's own registrations, the arena is the one TFLM allocates (and
the smallest one it runs in), and TFLM's outputs are compared with LiteRT's
reference kernels. Without it the check says it is an estimate: the op
list of a recent TFLM (`TFLM_BUILTIN_OPS`) and `arena_plan`'s arena.

Both take integer models as TFLM does: int8 (int8 activations and
weights, int32 biases) and int16x8 (int16 activations, int8 weights, int64
or int32 biases); float tensors are refused.

Examples:
    >>> import keras, numpy as np, qat_plugin
    >>> from qat_plugin.tflite.mcu_target import check_mcu
    >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    >>> qat = qat_plugin.quantize_model(model)
    >>> _ = qat(np.random.rand(8, 4).astype("float32"), training=True)
    >>> found = check_mcu(qat_plugin.export_tflite(qat), use_runtime=False)
    >>> found.offending, found.notes[0].startswith("estimate")
    ((), True)
"""

import dataclasses

from qat_plugin.tflite.arena import arena_plan
from qat_plugin.tflite.flatbuffer import read_graph
from qat_plugin.tflite.interpreter import load_model_bytes
from qat_plugin.tflite.micro import (
    TFLM_BUILTIN_OPS,
    micro_builtin_ops,
    run_micro,
    tflm_available,
)

# Tensor types of the integer models TFLM runs: int8 or int16 activations,
# int8 weights, int32 or int64 biases (and int32 shapes and axes).
_MICRO_TYPES = ("int8", "int16", "int32", "int64")
_IO_TYPES = ("int8", "int16")
# The per-op table lists this many of the largest buffers alive at each op.
_LARGEST = 3


@dataclasses.dataclass(frozen=True)
class McuFindings:
    """What `check_mcu` found: offending ops, notes, the plan and the TFLM run.

    Examples:
        >>> from qat_plugin.tflite.mcu_target import McuFindings
        >>> McuFindings((), ("estimate",), None).required_arena_bytes is None
        True
    """

    offending: tuple
    notes: tuple
    plan: object
    run: object = None

    @property
    def required_arena_bytes(self):
        """The arena the model needs: TFLM's smallest, else the estimate."""
        if self.run is not None and self.run.runs:
            return self.run.smallest_arena_bytes
        return self.plan.estimated_bytes if self.plan is not None else None


def _type_offences(graph):
    offending = []
    for op, (name, ins, outs) in enumerate(
        zip(graph.op_names, graph.op_inputs, graph.op_outputs)
    ):
        types = sorted({graph.dtypes[t] for t in ins + outs} - set(_MICRO_TYPES))
        if types:
            offending.append(
                (f"{name}#{op}", f"has {'/'.join(types)} tensors; the mcu target takes "
                 "integer models (int8, or int16 activations with int8 weights)")
            )
    for t in graph.inputs + graph.outputs:
        if graph.dtypes[t] not in _IO_TYPES:
            offending.append(
                (graph.names[t], f"model input/output is {graph.dtypes[t]}, not int8 or int16")
            )
    return offending


def op_table(graph, plan, largest=_LARGEST):
    """Lines of a per-op table: the bytes alive at each op and the largest buffers.

    Examples:
        >>> import keras, qat_plugin
        >>> from qat_plugin.tflite.arena import arena_plan
        >>> from qat_plugin.tflite.flatbuffer import read_graph
        >>> from qat_plugin.tflite.mcu_target import op_table
        >>> model = keras.Sequential([keras.Input((4,), name="x"), keras.layers.Dense(2, name="y")])
        >>> data = qat_plugin.export_tflite(model, mode="float")
        >>> print(op_table(read_graph(data), arena_plan(data))[1])
            0 FULLY_CONNECTED            24 B <- peak: x 16, y 8
    """
    live = [plan.live_bytes(op) for op in range(len(graph.op_names))]
    peak = max(live, default=0)
    lines = ["   op name                     live  largest buffers alive (bytes)"]
    for op, name in enumerate(graph.op_names):
        # A fused tensor's name lists every op folded in: the first says enough.
        buffers = ", ".join(f"{n.split(';')[0]} {size}"
                            for n, size in plan.largest_live(op, largest))
        flag = " <- peak:" if live[op] == peak else ""
        lines.append(f"  {op:3d} {name:20s} {live[op]:8d} B{flag} {buffers}")
    return lines


def _runtime_findings(data, graph, plan):
    """Offending ops and notes from TFLM itself."""
    registered = micro_builtin_ops()
    offending = [(name, "not registered in TensorFlow Lite Micro (the runtime's "
                  "own op resolver)") for name in sorted(set(graph.op_names) - registered)]
    run = run_micro(data)
    if not run.runs:
        if not offending:
            reason = " ".join(run.error.split())[:500]
            offending.append(("model", f"TensorFlow Lite Micro does not run it: {reason}"))
        return offending, (f"TensorFlow Lite Micro {run.version}",), run
    notes = [
        f"TensorFlow Lite Micro {run.version}: runs",
        f"flash: {len(data)} bytes (model), {plan.weight_bytes} of them weights",
        f"arena: {run.arena_bytes} bytes allocated by TFLM ({run.head_bytes} "
        f"activations and scratch + {run.tail_bytes} persistent); the smallest "
        f"arena it starts in: {run.smallest_arena_bytes} bytes (estimate without "
        f"the runtime: {plan.estimated_bytes})",
    ]
    if run.bit_exact:
        notes.append(f"outputs: bit-exact with LiteRT's reference kernels on "
                     f"{run.num_samples} random inputs")
    else:
        notes.append(f"outputs: differ from LiteRT's reference kernels by up to "
                     f"{run.max_diff_steps} steps on {run.num_samples} random inputs")
    notes.append(
        f"host latency: {1e6 * run.seconds_per_inference:.0f} us per inference, "
        f"{run.relative_latency:.2f}x LiteRT's reference kernels on this host "
        "(relative only: the host is no microcontroller)"
    )
    return offending, tuple(notes), run


def _estimated_findings(data, graph, plan):
    """Offending ops and notes without the runtime: the op list and the estimate."""
    offending = [(name, "not in TensorFlow Lite Micro's builtin op set")
                 for name in sorted(set(graph.op_names) - TFLM_BUILTIN_OPS)]
    notes = (
        "estimate (TensorFlow Lite Micro not installed: pip install "
        "\"qat-plugin[mcu]\" to run the model in it)",
        f"flash: {len(data)} bytes (model), {plan.weight_bytes} of them weights",
        f"arena: {plan.estimated_bytes} bytes estimated ({plan.arena_bytes} "
        f"activations and scratch, greedy plan, 16-byte aligned + "
        f"{plan.persistent_bytes} persistent + {plan.temporary_bytes} while "
        f"preparing); peak of live activations {plan.peak_live_bytes} bytes",
    )
    return offending, notes, None


def check_mcu(tflite, arena_limit=None, use_runtime=None):
    """Checks a .tflite model (bytes or path) against TensorFlow Lite Micro.

    Args:
        tflite: .tflite bytes or a path.
        arena_limit: the arena the device has (bytes): a model needing more
            is refused, naming the peak op and its largest tensors.
        use_runtime: run the model in TFLM (default: when installed).

    Returns:
        A `McuFindings`.

    Examples:
        >>> import keras, numpy as np, qat_plugin
        >>> from qat_plugin.tflite.mcu_target import check_mcu
        >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
        >>> qat = qat_plugin.quantize_model(model)
        >>> _ = qat(np.random.rand(8, 4).astype("float32"), training=True)
        >>> check_mcu(qat_plugin.export_tflite(qat), arena_limit=64).offending[0][0]
        'arena'
    """
    data = load_model_bytes(tflite)
    graph = read_graph(data)
    plan = arena_plan(data)
    if use_runtime is None:
        use_runtime = tflm_available()
    offending = _type_offences(graph)
    found = _runtime_findings if use_runtime else _estimated_findings
    more, notes, run = found(data, graph, plan)
    offending += more
    findings = McuFindings((), notes, plan, run)
    required = findings.required_arena_bytes
    if arena_limit is not None and required is not None and required > arena_limit:
        live = [plan.live_bytes(op) for op in range(len(graph.op_names))]
        peak = live.index(max(live)) if live else 0
        tensors = ", ".join(f"'{n}' ({size} B)" for n, size in plan.largest_live(peak))
        offending.append((
            "arena",
            f"needs {required} bytes, over the limit of {arena_limit}; the peak is at "
            f"op {peak} ({graph.op_names[peak]}) with {tensors} alive: shrink "
            "those activations (fewer channels, a smaller input, an earlier "
            "stride) or raise the limit",
        ))
    return McuFindings(tuple(offending), notes + tuple(op_table(graph, plan)), plan, run)
