"""The Keras names of a model's inputs and outputs, written into its .tflite file.

The converter names a file's input and output tensors after the TensorFlow
ops that produce them (`functional_1/a_quantize_1/FakeQuantWithMinMaxVars;...`,
`Identity_1`). `export_tflite` renames them after the Keras model: the key
of a dict input or output, else the name of the `Input` layer or of the
layer that computes the output. So a dict of inputs finds its tensors by
the keys the Keras model takes, in LiteRT and in `TFLiteModel.predict`.

Examples:
    >>> import keras, qat_plugin
    >>> from ai_edge_litert.interpreter import Interpreter
    >>> a, b = keras.Input((4,), name="first"), keras.Input((3,), name="second")
    >>> joined = keras.layers.Concatenate()([a, b])
    >>> out = keras.layers.Dense(2, name="logits")(joined)
    >>> model = keras.Model({"first": a, "second": b}, out)
    >>> interpreter = Interpreter(model_content=qat_plugin.export_tflite(model))
    >>> [d["name"] for d in interpreter.get_input_details()]
    ['first', 'second']
    >>> [d["name"] for d in interpreter.get_output_details()]
    ['logits']
"""

from keras import tree

from qat_plugin.tflite.flatbuffer import Flatbuffer


def _names(structure, tensors):
    """The name of each of `tensors` (flattened `structure`), made unique."""
    if isinstance(structure, dict):
        names = [
            "/".join(str(part) for part in path)
            for path, _ in tree.flatten_with_path(structure)
        ]
    else:
        names = [t._keras_history.operation.name for t in tensors]
    unique, seen = [], {}
    for name in names:
        count = seen.get(name, 0)
        seen[name] = count + 1
        unique.append(name if count == 0 else f"{name}_{count}")
    return unique


def keras_io_names(model):
    """The Keras names of `model`'s inputs and outputs, in the file's order.

    Returns:
        `(input_names, output_names)`: for a dict input or output its key
        (a path joined with "/" for nested dicts), else the name of the
        `Input` layer or of the layer that computes the output, with `_1`,
        `_2`, ... added where a name repeats.

    Examples:
        >>> import keras
        >>> from qat_plugin.tflite.io_names import keras_io_names
        >>> inputs = keras.Input((4,), name="features")
        >>> outputs = {"score": keras.layers.Dense(1)(inputs)}
        >>> keras_io_names(keras.Model(inputs, outputs))
        (['features'], ['score'])
    """
    inputs = getattr(model, "_inputs_struct", None)
    outputs = getattr(model, "_outputs_struct", None)
    return (
        _names(inputs if inputs is not None else model.inputs, model.inputs),
        _names(outputs if outputs is not None else model.outputs, model.outputs),
    )


def with_keras_io_names(data, model):
    """Returns .tflite `data` with its input and output tensors named after `model`.

    The converter keeps the order of the traced function's arguments and
    results, which are `model.inputs` and the flattened outputs; a file
    whose counts differ from the model's is returned unchanged.

    Examples:
        >>> import keras, qat_plugin
        >>> from qat_plugin.tflite.flatbuffer import read_graph
        >>> from qat_plugin.tflite.io_names import with_keras_io_names
        >>> inputs = keras.Input((4,), name="features")
        >>> model = keras.Model(inputs, keras.layers.Dense(2, name="logits")(inputs))
        >>> graph = read_graph(with_keras_io_names(qat_plugin.export_tflite(model), model))
        >>> graph.names[graph.inputs[0]], graph.names[graph.outputs[0]]
        ('features', 'logits')
    """
    input_names, output_names = keras_io_names(model)
    flatbuffer = Flatbuffer(data)
    graph = flatbuffer.subgraph()
    if len(graph.inputs) != len(input_names) or len(graph.outputs) != len(output_names):
        return data
    wanted = list(zip(graph.inputs, input_names)) + list(zip(graph.outputs, output_names))
    if all(graph.tensors[i].name.decode() == name for i, name in wanted):
        return data
    for index, name in wanted:
        graph.tensors[index].name = name.encode()
    return flatbuffer.to_bytes()
