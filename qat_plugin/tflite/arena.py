"""The tensor arena a model needs in TensorFlow Lite Micro, estimated offline.

`arena_plan(tflite)` plans the activations as TFLM's `GreedyMemoryPlanner`
does (the same lifetimes, buffer order and first-fit placement, kernel
scratch buffers included) and adds what TFLM keeps and borrows beside
them, so that the estimate is not below what the runtime needs when the
`tflite-micro` wheel is not there to measure it
(`qat_plugin.tflite.micro.run_micro` measures it when it is):

- persistent ("tail"): one `TfLiteEvalTensor` per tensor, one node and
  registration per op, the model input and output `TfLiteTensor`s, each
  kernel's state (per-channel multipliers and shifts for the weight ops),
  and the interpreter's own objects;
- temporary, while the kernels are prepared: the `TfLiteTensor` views and
  quantization arrays of one op's tensors, and the planner's working
  memory; they reuse the activations' space, so the larger of the two
  counts.

The sizes are those of a 64-bit host build (TFLM's Python runtime), which
are above a 32-bit microcontroller's.

Examples:
    >>> import keras, qat_plugin
    >>> from qat_plugin.tflite.arena import arena_plan
    >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    >>> plan = arena_plan(qat_plugin.export_tflite(model, mode="float"))
    >>> plan.estimated_bytes > plan.arena_bytes
    True
"""

import dataclasses

import numpy as np

from qat_plugin.tflite.flatbuffer import WEIGHT_OPS, Flatbuffer, read_graph
from qat_plugin.tflite.interpreter import load_model_bytes

# TFLM aligns every arena buffer to 16 bytes (MicroArenaBufferAlignment()).
ARENA_ALIGNMENT = 16

# Bytes of TFLM's structures in a 64-bit build, measured with the
# `tflite-micro` wheel's print_allocations() and read from its source.
_EVAL_TENSOR = 24          # TfLiteEvalTensor, one per tensor
_NODE = 64                 # NodeAndRegistration, one per op
_IO_TENSOR = 96            # a persistent TfLiteTensor and its quantization
_TEMP_TENSOR = 112         # a temporary TfLiteTensor, its quantization
_PER_CHANNEL = 8           # kernel state: an int32 multiplier and shift
_PER_CHANNEL_TEMP = 4      # a temporary int32 zero point (scales are read
                           # in place from the flatbuffer)
_KERNEL_STATE = 128        # a weight op's kernel data besides its channels
_OTHER_STATE = 96          # any other op's kernel data
_INTERPRETER = 576         # the allocator, planner and graph objects
_PER_TENSOR_BOOKKEEPING = 12
_ALLOCATION_INFO = 32      # the planner's input, one per tensor and scratch
_PLANNER_BUFFER = 40       # GreedyMemoryPlanner::per_buffer_size()
_SCRATCH_REQUEST = 16      # one ScratchBufferRequest
_SCRATCH_REQUESTS = 12     # kMaxScratchBuffersPerOp requests reserved
# Ops whose int8/int16 kernels ask for scratch: (accumulators per output
# element, TFLM's reduce_common.cc).
_REDUCE_OPS = ("MEAN", "SUM", "REDUCE_MAX", "REDUCE_MIN", "REDUCE_PROD", "REDUCE_ALL")


def _aligned(size):
    return -(-size // ARENA_ALIGNMENT) * ARENA_ALIGNMENT


@dataclasses.dataclass(frozen=True)
class ArenaPlan:
    """The memory a model needs in TensorFlow Lite Micro, planned offline.

    Attributes:
        peak_live_bytes: the largest sum, over the ops in execution order,
            of the (unaligned) sizes of the non-constant tensors alive while
            that op runs: a tensor lives from the op that writes it (the
            start for a model input) to the last op that reads it (the end
            for a model output). No allocator can do with less.
        arena_bytes: the activations' part of the arena (TFLM's "head"):
            the plan of TFLM's `GreedyMemoryPlanner`, buffers 16-byte
            aligned and placed largest first (the later tensor first among
            equals) at the lowest offset free during their lifetime, with
            the reduce kernels' scratch buffers.
        weight_bytes: the bytes of constant tensors (weights, biases,
            shapes), which stay in flash.
        tensors: `(index, name, bytes, first_op, last_op, offset)` per
            planned tensor (a scratch buffer has index -1).
        persistent_bytes: the estimated persistent part ("tail").
        temporary_bytes: the estimated memory borrowed while preparing,
            beyond `arena_bytes`.

    Examples:
        >>> import keras, qat_plugin
        >>> from qat_plugin.tflite.arena import arena_plan
        >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2, use_bias=False)])
        >>> plan = arena_plan(qat_plugin.export_tflite(model, mode="float"))
        >>> plan.arena_bytes, plan.weight_bytes  # in/out 16 + 8 bytes, 16-aligned; 2x4 floats
        (32, 32)
    """

    peak_live_bytes: int
    arena_bytes: int
    weight_bytes: int
    tensors: tuple = ()
    persistent_bytes: int = 0
    temporary_bytes: int = 0

    @property
    def estimated_bytes(self):
        """The whole arena estimated: activations, persistent and temporary parts."""
        return self.arena_bytes + self.persistent_bytes + self.temporary_bytes

    def live_bytes(self, op):
        """The bytes of the planned buffers alive while op `op` runs."""
        return sum(size for _, _, size, first, last, _ in self.tensors if first <= op <= last)

    def largest_live(self, op, count=3):
        """`(name, bytes)` of the largest buffers alive while op `op` runs."""
        live = [(size, name) for _, name, size, first, last, _ in self.tensors
                if first <= op <= last]
        return [(name, size) for size, name in sorted(live, reverse=True)[:count]]


def _lifetimes(graph):
    """`{tensor: (first_op, last_op)}` for the non-constant tensors."""
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
    return {t: (first[t], last[t]) for t in sorted(first) if not graph.constant[t]}


def _scratch_buffers(graph):
    """`(bytes, op)` of the scratch buffers TFLM's reference kernels ask for."""
    buffers = []
    for op, (name, ins, outs) in enumerate(
        zip(graph.op_names, graph.op_inputs, graph.op_outputs)
    ):
        if name not in _REDUCE_OPS or len(ins) < 2:
            continue
        rank, axes = len(graph.shapes[ins[0]]), graph.nbytes(ins[1]) // 4
        if name in ("MEAN", "SUM") and graph.dtypes[ins[0]] in ("int8", "int16"):
            buffers.append((4 * (graph.nbytes(outs[0]) // np.dtype(graph.dtypes[outs[0]]).itemsize), op))
        buffers += [(4 * rank, op), (4 * max(axes, 1), op)]
    return buffers


def _greedy(buffers):
    """TFLM's greedy placement of `(bytes, first, last)`; returns the offsets."""
    # TFLM lists buffers backwards, then sorts them stably by aligned size.
    order = sorted(range(len(buffers)), key=lambda i: (-_aligned(buffers[i][0]), -i))
    offsets = {}
    for i in order:
        size, first, last = _aligned(buffers[i][0]), buffers[i][1], buffers[i][2]
        busy = sorted(
            (offsets[o], offsets[o] + _aligned(buffers[o][0])) for o in offsets
            if buffers[o][1] <= last and first <= buffers[o][2]
        )
        offset = 0
        for start, end in busy:
            if offset + size <= start:
                break
            offset = max(offset, end)
        offsets[i] = offset
    return [offsets[i] for i in range(len(buffers))]


def _channels(tensor):
    quantization = tensor.quantization
    return 0 if quantization is None or quantization.scale is None else len(quantization.scale)


def _overheads(data, graph, num_planned, num_scratch):
    """(persistent, temporary) bytes TFLM keeps and borrows beside the activations."""
    subgraph = Flatbuffer(data).subgraph()
    tensors = subgraph.tensors or ()
    num_tensors, num_ops = len(tensors), len(graph.op_names)
    state = 0
    for name, outs in zip(graph.op_names, graph.op_outputs):
        if name in WEIGHT_OPS:
            channels = graph.shapes[outs[0]][-1] if graph.shapes[outs[0]] else 1
            state += _KERNEL_STATE + _PER_CHANNEL * channels
        else:
            state += _OTHER_STATE
    persistent = (
        _INTERPRETER
        + (_EVAL_TENSOR + _PER_TENSOR_BOOKKEEPING) * num_tensors
        + _NODE * num_ops
        + _IO_TENSOR * len(set(graph.inputs + graph.outputs))
        + state
    )
    prepare = max(
        (sum(_TEMP_TENSOR + _PER_CHANNEL_TEMP * _channels(tensors[t]) for t in ins + outs)
         for ins, outs in zip(graph.op_inputs, graph.op_outputs)),
        default=0,
    )
    planner = (
        _ALLOCATION_INFO * (num_tensors + num_scratch)
        + _PLANNER_BUFFER * (num_planned + num_scratch)
        + _SCRATCH_REQUEST * (num_scratch + _SCRATCH_REQUESTS)
    )
    return persistent, max(prepare, planner)


def arena_plan(tflite):
    """Returns the `ArenaPlan` of a .tflite model (bytes or path).

    Exact tensor lifetimes over the ops in execution order give
    `peak_live_bytes`; TFLM's greedy placement gives `arena_bytes`; the
    persistent and temporary parts complete `estimated_bytes`. A dynamic
    batch axis counts as 1, as on a microcontroller.

    Examples:
        >>> import keras, qat_plugin
        >>> from qat_plugin.tflite.arena import arena_plan
        >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
        >>> arena_plan(qat_plugin.export_tflite(model)).peak_live_bytes  # float
        24
    """
    data = load_model_bytes(tflite)
    graph = read_graph(data)
    lifetimes = _lifetimes(graph)
    sizes = {t: graph.nbytes(t) for t in lifetimes}
    peak = max(
        (sum(sizes[t] for t, (first, last) in lifetimes.items() if first <= op <= last)
         for op in range(len(graph.op_names))),
        default=0,
    )
    scratch = _scratch_buffers(graph)
    planned = [(t, graph.names[t], sizes[t], first, last)
               for t, (first, last) in lifetimes.items()]
    planned += [(-1, f"scratch of {graph.op_names[op]}#{op}", size, op, op)
                for size, op in scratch]
    offsets = _greedy([(size, first, last) for _, _, size, first, last in planned])
    arena = max((o + _aligned(p[2]) for o, p in zip(offsets, planned)), default=0)
    persistent, temporary = _overheads(data, graph, len(lifetimes), len(scratch))
    weights = sum(graph.nbytes(t) for t, c in enumerate(graph.constant) if c)
    return ArenaPlan(
        peak_live_bytes=peak,
        arena_bytes=arena,
        weight_bytes=weights,
        tensors=tuple(p + (o,) for p, o in zip(planned, offsets)),
        persistent_bytes=persistent,
        temporary_bytes=max(temporary - arena, 0),
    )
