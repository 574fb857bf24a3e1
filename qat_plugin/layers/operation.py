"""A Keras layer that runs one `keras.ops` operation a Functional model recorded."""

import importlib

import keras
from keras import tree

# Stands for the i-th tensor input in an argument template.
_TENSOR_KEY = "qat_plugin_tensor_input"


def argument_template(args, kwargs):
    """Replaces the tensors of a recorded call by numbered placeholders.

    Returns `(template, tensors)`: a `[args, kwargs]` structure that
    `OperationLayer` fills back in, and the tensors in placeholder order.
    """
    tensors = []

    def replace(value):
        if isinstance(value, keras.KerasTensor):
            tensors.append(value)
            return {_TENSOR_KEY: len(tensors) - 1}
        return value

    # The traversal order is `tree.flatten`'s, the order of a Keras node's
    # `arguments.keras_tensors`.
    template = tree.map_structure(replace, [list(args), dict(kwargs)])
    return template, tensors


def _fill(template, tensors):
    if isinstance(template, dict):
        if set(template) == {_TENSOR_KEY}:
            return tensors[template[_TENSOR_KEY]]
        return {k: _fill(v, tensors) for k, v in template.items()}
    if isinstance(template, (list, tuple)):
        return type(template)(_fill(v, tensors) for v in template)
    return template


@keras.saving.register_keras_serializable(package="qat_plugin")
class OperationLayer(keras.layers.Layer):
    """Calls a `keras.ops` operation (`x + 3.0`, `ops.multiply`, ...) as a layer.

    A Functional model records `keras.ops` calls on symbolic tensors as
    graph nodes whose operation is not a layer (for example the `x + 3.0`
    and `* (1 / 6)` of MobileNetV3's hard sigmoid). `quantize_model` rebuilds
    such a node as this layer so that it can be wrapped, serialized and
    given a fake-quant like any other layer. The layer takes the list of
    tensor arguments; the constant arguments are kept in `arguments`.

    Args:
        operation: the `keras.src.ops` `Operation` to run (its class and
            config are copied).
        arguments: the call's `[args, kwargs]` with each tensor replaced by a
            placeholder, as made by `argument_template`; by default the
            operation takes the tensors as its positional arguments.

    Examples:
        >>> import numpy as np
        >>> from keras.src.ops.numpy import Add
        >>> x = keras.Input((2,))
        >>> template, tensors = argument_template((x, 3.0), {})
        >>> layer = OperationLayer(Add(), arguments=template)
        >>> keras.ops.convert_to_numpy(layer([np.ones((1, 2), "float32")])).tolist()
        [[4.0, 4.0]]
    """

    def __init__(self, operation, arguments=None, **kwargs):
        if isinstance(operation, dict):
            operation = _deserialize_operation(operation)
        kwargs.setdefault("name", operation.name)
        super().__init__(**kwargs)
        self.operation = type(operation).from_config(operation.get_config())
        self.arguments = arguments

    def _arguments(self, inputs):
        tensors = list(inputs) if isinstance(inputs, (list, tuple)) else [inputs]
        if self.arguments is None:
            return tensors, {}
        args, kwargs = _fill(self.arguments, tensors)
        return args, kwargs

    def call(self, inputs):
        args, kwargs = self._arguments(inputs)
        return self.operation(*args, **kwargs)

    def compute_output_spec(self, inputs):
        args, kwargs = self._arguments(inputs)
        return self.operation.compute_output_spec(*args, **kwargs)

    def compute_output_shape(self, input_shape):
        is_single = all(d is None or isinstance(d, int) for d in input_shape)
        shapes = [input_shape] if is_single else list(input_shape)
        tensors = [keras.KerasTensor(tuple(shape)) for shape in shapes]
        spec = self.compute_output_spec(tensors)
        return tree.map_structure(lambda t: t.shape, spec)

    def get_config(self):
        config = super().get_config()
        cls = type(self.operation)
        config["operation"] = {
            "module": cls.__module__,
            "class_name": cls.__name__,
            "config": self.operation.get_config(),
        }
        config["arguments"] = self.arguments
        return config


def _deserialize_operation(config):
    module = config["module"]
    if not module.startswith("keras."):
        raise ValueError(
            f"OperationLayer only restores keras.ops operations, got module "
            f"{module!r}."
        )
    cls = getattr(importlib.import_module(module), config["class_name"])
    return cls.from_config(config["config"])
