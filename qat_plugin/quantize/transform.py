"""`quantize_model`: rebuilds a Keras 3 model with fake-quant for QAT."""

import contextlib

import keras

from qat_plugin import registry
from qat_plugin.config import resolve
from qat_plugin.config.recipe_files import BUILTIN_DIR
from qat_plugin.errors import RecipeError, UnsupportedLayerError, UnsupportedModelError
from qat_plugin.layers.base import QuantizedLayer
from qat_plugin.layers.pruned import PrunedLayer
from qat_plugin.quantize.build import Builder
from qat_plugin.quantize.builders import check_recurrent_inputs
from qat_plugin.quantize.graph import LayerGraph
from qat_plugin.quantize.plan import make_plan


def quantize_model(model, recipe="int8", *, skip=()):
    """Returns a copy of `model` ready for quantization-aware training.

    The copy computes what the fully-int8 TFLite model will compute: one
    fake-quant on each tensor that is int8 on the device and none elsewhere.
    Conv/Dense kernels are folded with the BatchNormalization after them and
    fake-quantized per output channel; ReLU/ReLU6 are fused into the op
    before them; the tensors around a Concatenate, Maximum or Minimum
    share one range (a `RangeGroup`); pooling, reshapes and padding keep
    their input's range. Nested models are
    inlined, shared layers stay shared. `keras.ops` calls that a Functional
    model records (`x + 3.0`, `ops.silu(x)`) quantize like the matching
    layers, and constants the converter folds into a Conv/Dense (a
    following `+ c`, Inception-ResNet's residual scale, ConvNeXt's
    LayerScale) are folded into its quantized weights here too. Custom
    layers quantize as declared with `register_layer`. `model` and its
    weights are not changed. Train the copy with `fit` (a small learning
    rate, starting from the trained float weights), or set its ranges with
    `calibrate`, then export it with `export_tflite`.

    Args:
        model: a Keras 3 Sequential or Functional model (nested models,
            shared layers and several inputs/outputs are fine).
        recipe: a built-in recipe name (see `qat_plugin.recipes.names()`),
            a path to a recipe TOML file, or a `Recipe`. A recipe with a
            `[pruning]` section needs a model pruned by its `prune` (or by
            `prune_model`): `quantize_model` does not prune, and refuses
            an unpruned model rather than ignore the section.
        skip: names of layers (or one name) to keep out of QAT (no fake-quant, no
            fusion). The export holds a float island with QUANTIZE /
            DEQUANTIZE around it wherever a skipped layer's output feeds
            another skipped layer; a lone skipped op between two int8
            tensors the converter still quantizes on its own (with
            post-training weight scales). `inspect_tflite(...).float_ops`
            lists what stays float. A skipped layer without weights is
            the float model's layer itself (never rebuilt from its
            config, so a Lambda or a layer whose `from_config` fails can
            be skipped); one with weights is a copy with its weights. A
            Lambda named here is kept float, not traced into its ops.

    Returns:
        A new Functional `keras.Model`.

    Examples:
        >>> import keras, qat_plugin
        >>> model = keras.Sequential([
        ...     keras.Input((8, 8, 1)),
        ...     keras.layers.Conv2D(4, 3),
        ...     keras.layers.BatchNormalization(),
        ...     keras.layers.ReLU(),
        ...     keras.layers.GlobalAveragePooling2D(),
        ...     keras.layers.Dense(2),
        ... ])
        >>> qat = qat_plugin.quantize_model(model)
        >>> [type(layer).__name__ for layer in qat.layers][1:]
        ['FakeQuant', 'QuantizedLinear', 'QuantizeOutputWrapper', 'QuantizedLinear']
    """
    config = resolve(recipe)
    # One name is a name, not a sequence of one-letter names.
    try:
        skip = {skip} if isinstance(skip, str) else set(skip)
    except TypeError:  # Not iterable, or unhashable items.
        raise TypeError(
            f"skip must be a layer name or a list of layer names, got {skip!r}."
        ) from None
    graph = LayerGraph.from_model(model, keep=skip)
    _check_float(model, graph)
    _check_sizes(model, graph)
    _check_pruned(model, graph, config)
    known = {node.name for node in graph.nodes}
    unknown = sorted(skip - known, key=repr)
    if unknown:
        raise ValueError(
            f"skip names layers that are not in model '{model.name}': "
            f"{unknown}. Layer names: {sorted(known)}."
        )
    check_recurrent_inputs(graph, skip)
    _check_registered(graph, skip)
    with _float32_policy():
        return Builder(make_plan(graph, skip), config.quantization).build()


@contextlib.contextmanager
def _float32_policy():
    """Layers made inside compute in float32, whatever the global policy.

    Fake-quant mimics integer arithmetic, which float16 and bfloat16 cannot
    hold exactly: under `mixed_float16` / `mixed_bfloat16` the QAT model's
    quantizers, observers and layers stay in float32 (as the scales of
    Keras' own quantized layers do), and layers copied from a model built
    under such a policy are copied as float32, so the export holds no
    float16 op or CAST.
    """
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("float32")
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous)


def _check_pruned(model, graph, config):
    """Refuses a pruning recipe for a model with no pruned layers."""
    if not config.pruning.enabled or any(
        isinstance(node.layer, PrunedLayer) for node in graph.nodes
    ):
        return
    recipe = (f"qat_plugin.recipes.get('{config.name}')" if config.source.startswith(BUILTIN_DIR)
              else f"qat_plugin.recipes.load('{config.source}')" if config.source
              else "recipe")
    raise RecipeError(
        f"Recipe '{config.name}' prunes ([pruning] section), but model "
        f"'{model.name}' has no pruned layers and quantize_model does not "
        f"prune. Prune it first: `recipe = {recipe}`, `pruned = "
        "recipe.prune(model, steps_per_epoch=...)`, fine-tune `pruned` with "
        "`recipe.callbacks(pruned)`, then `recipe.quantize(pruned)` (or use "
        "qat_plugin.prune_model). For a dense QAT model use recipe 'int8'."
    )


def _check_sizes(model, graph):
    """Refuses a model input with a dimension of size 0: it holds no values to observe."""
    for graph_input in graph.inputs:
        shape = tuple(graph_input.tensor.shape)
        if 0 in shape[1:]:
            raise UnsupportedModelError(
                f"Model '{model.name}': input '{graph_input.name}' has shape "
                f"{shape}, with a dimension of size 0; it holds no values, so "
                "no activation range can be observed and no int8 scale set. "
                "Drop the input or give it at least one value per sample."
            )


def _check_float(model, graph):
    """Refuses a model whose layers are quantized already, saying by whom."""
    qat = [node.name for node in graph.nodes if isinstance(node.layer, QuantizedLayer)]
    if qat:
        raise UnsupportedModelError(
            f"Model '{model.name}' is already a QAT model (quantize_model built "
            f"its layers {qat[:3]}): train or export it as it is, or call "
            "quantize_model on the float model it came from."
        )
    by_keras = {
        node.name: node.layer.quantization_mode
        for node in graph.nodes
        if getattr(node.layer, "quantization_mode", None)
    }
    if by_keras:
        names = list(by_keras)[:3]
        raise UnsupportedModelError(
            f"Model '{model.name}' was quantized by Keras (model.quantize("
            f"'{by_keras[names[0]]}'): layers {names}); its int weights cannot "
            "train with fake-quant. Call quantize_model on the float model, "
            "before model.quantize()."
        )


def _check_registered(graph, skip):
    """Raises one `UnsupportedLayerError` naming every layer with no policy.

    A layer is named once (a shared layer or op has several calls); the
    message gives each one's class, where a `keras.ops` call's class lives
    (only under `keras.src.ops`), and the one `skip=` list that gets past
    them all.
    """
    missing = {}
    for node in graph.nodes:
        if node.name in skip or registry.policy_for(node.layer) is not None:
            continue
        missing.setdefault(node.name, node.layer)
    if not missing:
        return
    lines = []
    for name, layer in missing.items():
        cls = type(layer)
        where = f"{cls.__module__}.{cls.__name__}"
        if name in graph.untraced:
            lines.append(
                f"  - '{name}': class {where}, a composite layer that cannot be "
                f"quantized inside: {graph.untraced[name]}"
            )
        elif isinstance(layer, keras.layers.Layer):
            lines.append(f"  - '{name}': class {where}")
        else:
            lines.append(
                f"  - '{name}': a keras.ops call recorded by the Functional API, "
                f"operation class {where} (it exists only there: "
                f"`from {cls.__module__} import {cls.__name__}` for "
                "register_layer)"
            )
    names = list(missing)
    classes = sorted({type(layer).__name__ for layer in missing.values()})
    raise UnsupportedLayerError(
        f"{len(names)} layer{'s' if len(names) > 1 else ''} of model "
        f"'{graph.name}' {'have' if len(names) > 1 else 'has'} no quantization "
        "policy:\n" + "\n".join(lines) + f"\nKeep {'them' if len(names) > 1 else 'it'} in float with "
        f"quantize_model(..., skip={names!r}), or declare how each class "
        f"({', '.join(classes)}) quantizes with "
        "qat_plugin.register_layer(cls, policy) where policy is a "
        "qat_plugin.LayerQuantization(weights=..., ...) or one of "
        "'passthrough', 'output', 'shared_scale', 'float'."
    )
