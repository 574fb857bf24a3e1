"""Which Keras layer each tensor of a converted model stands for.

Tensors are matched to layers by name: the converter names a tensor after
the TensorFlow ops that produced it, which carry the Keras layer names
(`model/conv/Relu6;model/conv/BiasAdd`). A Conv -> BatchNormalization ->
ReLU chain is one int8 op, so its tensor stands for the last layer of the
chain (found with the same fusion rules as `quantize_model`), which is also
where a QAT model's fused layer ends. Model outputs (`Identity`,
`Identity_1`, ...) stand for the layers producing the model's outputs.
`LayerMatcher` matches one tensor name; `match_tensors` walks the ops of an
interpreter and matches all their outputs.
"""

import re

import keras

from qat_plugin.quantize.fusion import find_fusions
from qat_plugin.quantize.graph import LayerGraph


class LayerMatcher:
    """Finds the reference model's layer a converter tensor stands for.

    Only the model's top-level layers with one output tensor are candidates
    (`layers`, in topological order; `order` maps their names to positions).

    Args:
        model: the reference Keras model (float or QAT).

    Examples:
        >>> import keras
        >>> from qat_plugin.analysis.matching import LayerMatcher
        >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, name="fc"),
        ...     keras.layers.Softmax(name="probs")])
        >>> matcher = LayerMatcher(model)
        >>> matcher.match("sequential/fc/BiasAdd"), matcher.match("Identity")
        ('fc', 'probs')
    """

    def __init__(self, model):
        self.layers = _probe_layers(model)
        self.order = {layer.name: i for i, layer in enumerate(self.layers)}
        self.tails = _fusion_tails(model)
        self.output_layers = [t._keras_history.operation.name for t in model.outputs]

    def match(self, tensor_name, output_position=None):
        """The layer's name, or None; `output_position` for model outputs."""
        found = re.fullmatch(r"Identity(?:_(\d+))?", tensor_name)
        if output_position is None and found:
            output_position = int(found.group(1) or 0)
        if output_position is not None and output_position < len(self.output_layers):
            names = {self.output_layers[output_position]}
        else:
            names = _layer_names_in(tensor_name, self.order)
        names = {self.tails.get(n, n) for n in names} & set(self.order)
        return max(names, key=self.order.get) if names else None


def match_tensors(runner, matcher, keep=None, own_name_only=False):
    """Maps each matched layer to `(op name, tensor detail)` of the op output standing for it.

    The ops are walked in execution order; when several write a value of
    the same layer (a requantize after it), the last one wins.

    Args:
        runner: a `TFLiteModel` (without XNNPACK, whose delegate replaces
            the ops it runs with one `DELEGATE` op).
        matcher: a `LayerMatcher` of the reference model.
        keep: optional `callable(layer name, tensor detail) -> bool`; the
            tensors it refuses are not matched.
        own_name_only: match only the first part of a `;`-joined tensor
            name (`Relu;add;convolution`: the op's own output; the others,
            fused into it, may name neighbouring layers).

    Examples:
        >>> import keras, qat_plugin
        >>> from qat_plugin.analysis.matching import LayerMatcher, match_tensors
        >>> from qat_plugin.tflite.interpreter import TFLiteModel
        >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, name="fc")])
        >>> tflite = qat_plugin.export_tflite(model, mode="float")
        >>> runner = TFLiteModel(tflite, use_xnnpack=False)
        >>> {layer: op for layer, (op, _) in match_tensors(runner, LayerMatcher(model)).items()}
        {'fc': 'FULLY_CONNECTED'}
    """
    interpreter = runner.interpreter
    details = {d["index"]: d for d in interpreter.get_tensor_details()}
    model_outputs = {d["index"]: i for i, d in enumerate(runner.output_details)}
    matches = {}
    # The LiteRT interpreter lists its ops only through this method.
    for op in interpreter._get_ops_details():
        for index in op["outputs"]:
            if index < 0:
                continue
            detail = details[index]
            name = detail["name"].split(";")[0] if own_name_only else detail["name"]
            layer = matcher.match(name, model_outputs.get(index))
            if layer is not None and (keep is None or keep(layer, detail)):
                matches[layer] = (op["op_name"], detail)
    return matches


def _layer_names_in(tensor_name, layer_names):
    """The Keras layer names mentioned in a converter tensor name.

    Only name scopes count: the last component of `model/conv/add_1` is a
    TensorFlow op name, which may equal a layer's name (`add_1`).
    """
    found = set()
    for part in tensor_name.split(";"):
        for component in part.split("/")[:-1]:
            if component in layer_names:
                found.add(component)
            else:
                # TensorFlow uniquifies name scopes as `<name>_<n>`.
                base = re.sub(r"_\d+$", "", component)
                if base in layer_names:
                    found.add(base)
    return found


def _fusion_tails(model):
    """Maps each layer name to the name of the last layer of its fused chain."""
    try:
        graph = LayerGraph.from_model(model)
    except Exception:  # Subclassed or unusual models: no fusion known.
        return {}
    tails = {}
    for fusion in {id(f): f for f in find_fusions(graph, skip=()).values()}.values():
        for node in [fusion.head] + fusion.absorbed:
            tails[node.name] = fusion.tail.name
    return tails


def _probe_layers(model):
    """Top-level layers with one output tensor, in topological order."""
    layers = []
    for layer in model.layers:
        if isinstance(layer, keras.layers.InputLayer):
            continue
        try:
            output = layer.output
        except (AttributeError, ValueError):  # Called several times or never.
            continue
        if isinstance(output, keras.KerasTensor):
            layers.append(layer)
    return layers
