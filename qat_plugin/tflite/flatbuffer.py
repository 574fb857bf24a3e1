"""Reading and writing .tflite flatbuffers through the LiteRT schema's object API.

`Flatbuffer(data)` parses a model once into the schema's object API
(`ModelT`): op names by opcode, tensors, buffers, which tensors are
constant and the bytes a buffer stores; its `ModelT` can be changed in place
and packed back to bytes with `to_bytes()`. `read_graph` takes the plain
facts of subgraph 0 that the target checks and the arena plan read.

Examples:
    >>> import keras, qat_plugin
    >>> from qat_plugin.tflite.flatbuffer import Flatbuffer
    >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    >>> flatbuffer = Flatbuffer(qat_plugin.export_tflite(model, mode="float"))
    >>> [flatbuffer.op_name(op) for op in flatbuffer.subgraph().operators]
    ['FULLY_CONNECTED']
"""

import dataclasses
import functools

import numpy as np

# Ops whose input 1 is a weight tensor (input channels on its last axis).
WEIGHT_OPS = (
    "CONV_2D",
    "CONV_3D",
    "DEPTHWISE_CONV_2D",
    "FULLY_CONNECTED",
    "TRANSPOSE_CONV",
)

# The identifier every .tflite flatbuffer carries after its root offset.
FILE_IDENTIFIER = b"TFL3"


def _schema():
    # Imported on first use: the generated schema (~700 kB of Python, with
    # flatbuffers) takes ~0.08 s to import, which `import qat_plugin` skips.
    from ai_edge_litert import schema_py_generated

    return schema_py_generated


@functools.cache
def _enum_names(enum):
    """`{value: NAME}` of a generated schema enum class."""
    return {value: name for name, value in vars(enum).items() if not name.startswith("_")}


def dtype_name(tensor):
    """The NumPy-style name (`"int8"`, `"float32"`, ...) of a `TensorT`'s type.

    Examples:
        >>> import keras, qat_plugin
        >>> from qat_plugin.tflite.flatbuffer import Flatbuffer, dtype_name
        >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
        >>> flatbuffer = Flatbuffer(qat_plugin.export_tflite(model, mode="float"))
        >>> sorted({dtype_name(t) for t in flatbuffer.subgraph().tensors})
        ['float32']
    """
    return _enum_names(_schema().TensorType)[tensor.type].lower()


def set_dtype(tensor, name):
    """Sets a `TensorT`'s type from its NumPy-style name (`"int64"`, ...).

    Examples:
        >>> from ai_edge_litert import schema_py_generated as schema
        >>> from qat_plugin.tflite.flatbuffer import dtype_name, set_dtype
        >>> tensor = schema.TensorT()
        >>> set_dtype(tensor, "int64")
        >>> dtype_name(tensor)
        'int64'
    """
    tensor.type = getattr(_schema().TensorType, name.upper())


class Flatbuffer:
    """A .tflite model parsed once into the schema's object API.

    Attributes:
        data: the bytes it was parsed from.
        model: the `ModelT`; change it in place, then call `to_bytes()`.
        op_names: the op name of each operator code: the builtin's name,
            the custom code of a custom op (`"FlexCumprod"` for a Select TF
            op).

    Examples:
        >>> import keras, qat_plugin
        >>> from qat_plugin.tflite.flatbuffer import Flatbuffer
        >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
        >>> flatbuffer = Flatbuffer(qat_plugin.export_tflite(model, mode="float"))
        >>> flatbuffer.op_names, len(flatbuffer.to_bytes()) > 0
        (('FULLY_CONNECTED',), True)
    """

    def __init__(self, data):
        self.data = bytes(data)
        self.model = _schema().ModelT.InitFromPackedBuf(self.data, 0)
        builtin_names = _enum_names(_schema().BuiltinOperator)
        names = []
        for code in self.model.operatorCodes or ():
            # Codes under 127 live in the deprecated int8 field, newer ones
            # in the int32 field (the other holds a placeholder below them).
            builtin = max(code.builtinCode, code.deprecatedBuiltinCode)
            name = builtin_names.get(builtin, str(builtin))
            if name == "CUSTOM" and code.customCode is not None:
                name = code.customCode.decode()
            names.append(name)
        self.op_names = tuple(names)

    def subgraph(self, index=0):
        """The `SubGraphT` `index` (0: the main graph)."""
        return self.model.subgraphs[index]

    def op_name(self, op):
        """The name of an `OperatorT`'s op."""
        return self.op_names[op.opcodeIndex]

    def buffer(self, tensor):
        """The `BufferT` holding a `TensorT`'s stored values."""
        return self.model.buffers[tensor.buffer]

    def is_constant(self, tensor):
        """True for a tensor with stored values (weights, biases, shapes)."""
        buffer = self.buffer(tensor)
        # Models over 2 GB keep buffers after the flatbuffer, at `offset`.
        return buffer.offset > 1 or (buffer.data is not None and len(buffer.data) > 0)

    def stored_bytes(self, tensor):
        """The raw bytes a tensor's buffer stores, as a uint8 array."""
        buffer = self.buffer(tensor)
        if buffer.offset > 1:
            return np.frombuffer(self.data, np.uint8, buffer.size, buffer.offset)
        if buffer.data is None:
            return np.zeros(0, np.uint8)
        return np.asarray(buffer.data, np.uint8)

    def to_bytes(self):
        """Packs `model` (as changed) back into .tflite bytes."""
        import flatbuffers

        builder = flatbuffers.Builder(len(self.data))
        builder.Finish(self.model.Pack(builder), file_identifier=FILE_IDENTIFIER)
        return bytes(builder.Output())


def _indices(values):
    return tuple(int(i) for i in values) if values is not None else ()


@dataclasses.dataclass(frozen=True)
class Graph:
    """Subgraph 0 of a flatbuffer: ops, tensors and which tensors are constant.

    Examples:
        >>> import keras, qat_plugin
        >>> from qat_plugin.tflite.flatbuffer import read_graph
        >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
        >>> graph = read_graph(qat_plugin.export_tflite(model, mode="float"))
        >>> graph.op_names, graph.shapes[graph.inputs[0]], graph.nbytes(graph.inputs[0])
        (('FULLY_CONNECTED',), (1, 4), 16)
    """

    op_names: tuple       # per op, in execution order
    op_inputs: tuple      # per op, tensor indices (-1 dropped)
    op_outputs: tuple
    inputs: tuple
    outputs: tuple
    dtypes: tuple         # per tensor, NumPy dtype name
    shapes: tuple
    names: tuple
    constant: tuple       # per tensor, bool

    def nbytes(self, index):
        """The bytes of tensor `index`; a dynamic axis counts as 1, a scalar as 1 value.

        A resource, variant or string tensor (Select TF ops' TensorList
        handles, a hash table) has no fixed size: it counts 0 bytes.
        """
        shape = self.shapes[index]
        size = int(np.prod(shape)) if shape else 1
        return size * itemsize(self.dtypes[index])


def itemsize(name):
    """The bytes of one value of tensor type `name`; 0 where it has no fixed size.

    Examples:
        >>> from qat_plugin.tflite.flatbuffer import itemsize
        >>> itemsize("int8"), itemsize("float32"), itemsize("variant"), itemsize("resource")
        (1, 4, 0, 0)
    """
    if name in _UNSIZED_TYPES:
        return 0
    return np.dtype(name).itemsize


# TensorType names with no NumPy dtype and no size of their own.
_UNSIZED_TYPES = ("resource", "variant", "string")


def read_graph(data):
    """Returns the `Graph` of subgraph 0 of .tflite `data` (bytes).

    Examples:
        >>> import keras, qat_plugin
        >>> from qat_plugin.tflite.flatbuffer import read_graph
        >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2, use_bias=False)])
        >>> graph = read_graph(qat_plugin.export_tflite(model, mode="float"))
        >>> [graph.shapes[t] for t, constant in enumerate(graph.constant) if constant]
        [(2, 4)]
    """
    flatbuffer = Flatbuffer(data)
    graph = flatbuffer.subgraph()
    tensors = graph.tensors or ()
    ops = graph.operators or ()
    return Graph(
        op_names=tuple(flatbuffer.op_name(op) for op in ops),
        op_inputs=tuple(tuple(i for i in _indices(op.inputs) if i >= 0) for op in ops),
        op_outputs=tuple(_indices(op.outputs) for op in ops),
        inputs=_indices(graph.inputs),
        outputs=_indices(graph.outputs),
        dtypes=tuple(dtype_name(t) for t in tensors),
        shapes=tuple(_indices(t.shape) for t in tensors),
        names=tuple(t.name.decode() for t in tensors),
        constant=tuple(flatbuffer.is_constant(t) for t in tensors),
    )
