"""`prune_model` and `strip_pruning`: magnitude and N:M pruning of a Keras 3 model."""

import warnings

import keras
from keras.src.saving import serialization_lib

from qat_plugin.quantize.graph import LayerGraph
from qat_plugin.layers.linear import QuantizedLinear
from qat_plugin.config.constants import UNSTRUCTURED
from qat_plugin.layers.pruned import INPUT_CHANNEL_AXIS, PrunedLayer
from qat_plugin.registry import linear_class_names, linear_op_for
from qat_plugin.sparsity import (
    ConstantSparsity,
    PruningSchedule,
    format_structure,
    parse_structure,
)

_OPTIONS = ("sparsity", "structure", "schedule")


def prune_model(model, sparsity=None, *, structure=UNSTRUCTURED, schedule=None,
                skip=(), per_layer=None):
    """Returns a copy of `model` whose Conv/Dense kernels are magnitude-pruned in training.

    Every Dense, Conv1D/2D/3D, DepthwiseConv1D/2D and SeparableConv1D/2D
    layer (except those in `skip`) is wrapped in a `PrunedLayer`, which
    zeroes its smallest weights at the schedule's update steps while the
    model trains with `fit` and keeps them exactly zero through every
    optimizer step. The weights are copied; `model` is not changed.

    Then either fine-tune the pruned model and `quantize_model` it (the
    QAT model keeps the masks), or `quantize_model` it right away to prune
    and quantize in one run; `export_tflite` writes the zeros as int8
    zeros. `strip_pruning` gives back plain layers with zeros in them.

    Args:
        model: a Keras 3 Sequential or Functional model.
        sparsity: the fraction of each kernel to zero, in [0, 1):
            shorthand for `schedule=ConstantSparsity(sparsity)`.
        structure: `"unstructured"`, or `"N:M"`: N zeros in every M
            consecutive weights along the input channels (`"2:4"`: the
            pattern of sparse tensor cores). N:M fixes the sparsity at N/M
            and needs input channels that are a multiple of M: over the
            whole model, the layers that cannot hold the pattern (a 1- or
            3-channel image stem) are left dense with a warning and listed
            in the result's `pruning_skipped`, as NVIDIA's ASP does; a layer
            named in `per_layer` that cannot hold it raises.
        schedule: a `ConstantSparsity` or `PolynomialDecay` (its steps count
            each layer's training calls). Default: `ConstantSparsity` of the
            sparsity, masks computed at the first step and every 100 after.
        skip: names of layers to keep dense (the first conv and the
            classifier are common choices).
        per_layer: `{layer_name: {"sparsity"|"structure"|"schedule": ...}}`
            overriding the arguments above for single layers; naming a
            layer here prunes it.

    Returns:
        A new `keras.Model` of the same kind. Its `pruning_skipped` is a dict
        `{layer name: why}` of the prunable layers left dense because their
        shapes cannot hold the N:M pattern (empty when none were).

    Examples:
        >>> import keras, numpy as np, qat_plugin
        >>> model = keras.Sequential([
        ...     keras.Input((8,)), keras.layers.Dense(8, name="hidden"),
        ...     keras.layers.Dense(2, name="head")])
        >>> pruned = qat_plugin.prune_model(model, 0.5, skip=["head"])
        >>> pruned.compile("sgd", "mse")
        >>> _ = pruned.fit(np.ones((4, 8)), np.ones((4, 2)), verbose=0)
        >>> pruned.get_layer("hidden").sparsity()
        0.5

        Whole-model 2:4 leaves a 3-channel stem dense and says so:

        >>> import warnings
        >>> cnn = keras.Sequential([keras.Input((8, 8, 3)),
        ...     keras.layers.Conv2D(8, 3, name="stem"),
        ...     keras.layers.Conv2D(8, 1, name="pointwise")])
        >>> with warnings.catch_warnings(record=True):
        ...     sparse = qat_plugin.prune_model(cnn, structure="2:4")
        >>> dict(sparse.pruning_skipped)
        {'stem': "2:4 pruning groups the kernel's input channels by 4, but it has 3"}
    """
    graph = LayerGraph.from_model(model)
    layers = {node.name: node.layer for node in graph.nodes}
    skip = set(skip)
    per_layer = dict(per_layer or {})
    unknown = sorted((skip | set(per_layer)) - set(layers))
    if unknown:
        raise ValueError(
            f"skip/per_layer name layers that are not in model '{model.name}': "
            f"{unknown}. Layer names: {sorted(layers)}."
        )
    both = sorted(skip & set(per_layer))
    if both:
        raise ValueError(f"Layers {both} are both in skip and in per_layer.")
    for name, options in per_layer.items():
        if not isinstance(options, dict) or set(options) - set(_OPTIONS):
            raise ValueError(
                f"per_layer['{name}'] must be a dict with keys among "
                f"{list(_OPTIONS)}, got {options!r}."
            )
        if linear_op_for(layers[name]) is None:
            raise ValueError(
                f"per_layer names layer '{name}' "
                f"({type(layers[name]).__name__}), which has no kernel to "
                f"prune: prunable classes are {linear_class_names()}."
            )
    defaults = {"sparsity": sparsity, "structure": structure, "schedule": schedule}
    plans, skipped = {}, {}
    for name, layer in layers.items():
        if name in skip or linear_op_for(layer) is None:
            continue
        options = {**defaults, **per_layer.get(name, {})}
        plans[name] = _plan(name, **options)
        misfit = _n_of_m_misfit(layer, plans[name][1])
        if misfit and name in per_layer:
            raise ValueError(
                f"Layer '{name}': {misfit}. Prune it unstructured (per_layer="
                f"{{'{name}': {{'structure': 'unstructured', 'sparsity': 0.5}}}}) "
                f"or keep it dense (skip=['{name}'])."
            )
        if misfit:
            skipped[name] = misfit
            del plans[name]
    if skipped:
        warnings.warn(
            f"prune_model: left {len(skipped)} layer(s) of model '{model.name}' "
            f"dense, as their shapes cannot hold the pattern: {skipped}. "
            "The pruned model lists them in `pruning_skipped`; name a layer in "
            "per_layer to prune it another way.",
            stacklevel=2,
        )
    if not plans:
        cannot = f"; left dense as their shapes cannot hold N:M: {skipped}" if skipped else ""
        raise ValueError(
            f"Model '{model.name}' has no layer to prune: prunable classes "
            f"are {linear_class_names()}, minus skip={sorted(skip)}{cannot}."
        )
    copies = []

    def clone(layer):
        copy = type(layer).from_config(layer.get_config())
        copies.append((layer, copy))
        if layer.name in plans:
            schedule_, pattern = plans[layer.name]
            return PrunedLayer(copy, schedule_, format_structure(pattern))
        return copy

    with serialization_lib.ObjectSharingScope():  # Range groups stay shared.
        pruned = keras.models.clone_model(
            model, clone_function=clone, recursive=True
        )
    for original, copy in copies:
        copy.set_weights(original.get_weights())
    pruned.pruning_skipped = skipped
    return pruned


def _plan(name, sparsity, structure, schedule):
    """Checks one layer's options; returns `(schedule, pattern)`."""
    try:
        pattern = parse_structure(structure)
    except ValueError as error:
        raise ValueError(f"Layer '{name}': {error}") from None
    if schedule is not None and sparsity is not None:
        raise ValueError(
            f"Layer '{name}': pass sparsity or schedule, not both (the "
            "schedule carries its own sparsity)."
        )
    if schedule is not None and not isinstance(schedule, PruningSchedule):
        raise TypeError(
            f"Layer '{name}': schedule must be a ConstantSparsity or "
            f"PolynomialDecay, got {type(schedule).__name__}."
        )
    if sparsity is not None:
        try:
            schedule = ConstantSparsity(sparsity, frequency=100)
        except (TypeError, ValueError) as error:
            raise type(error)(f"Layer '{name}': {error}") from None
    if schedule is None and pattern is None:
        raise ValueError(
            f"Layer '{name}': give a sparsity (e.g. prune_model(model, 0.5)) "
            "or a schedule for unstructured pruning."
        )
    return schedule, pattern


def _n_of_m_misfit(layer, pattern):
    """Why `layer`'s kernels cannot hold the N:M `pattern`, or None if they can.

    N:M groups M consecutive input channels: a channel count that is not a
    multiple of M (a 1- or 3-channel image stem) cannot hold the pattern.
    """
    if pattern is None:
        return None
    n, m = pattern
    for name in linear_op_for(layer).kernel_names:
        channels = getattr(layer, name).shape[INPUT_CHANNEL_AXIS]
        if channels % m:
            return (f"{n}:{m} pruning groups the {name}'s input channels by {m}, "
                    f"but it has {channels}")
    return None


def pruned_layers(model):
    """Every `PrunedLayer` in `model`, including those inside QAT layers."""
    return [
        layer
        for layer in model._flatten_layers(include_self=False, recursive=True)
        if isinstance(layer, PrunedLayer)
    ]


def strip_pruning(model):
    """Returns a copy of a pruned model with plain layers and the zeros kept.

    Each `PrunedLayer` becomes the layer it wraps, its kernels multiplied
    by their masks; every other layer is copied with its weights. The copy
    saves to `.keras` and loads with no `custom_objects` and no trace of
    the pruning machinery. A QAT model (from `quantize_model`) needs no
    stripping: `export_tflite` writes its pruned weights as int8 zeros.

    Examples:
        >>> import keras, numpy as np, qat_plugin
        >>> model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(4)])
        >>> pruned = qat_plugin.prune_model(model, 0.5)
        >>> _ = pruned(np.ones((1, 8)), training=True)  # computes the masks
        >>> plain = qat_plugin.strip_pruning(pruned)
        >>> kernel = keras.ops.convert_to_numpy(plain.layers[0].kernel)
        >>> type(plain.layers[0]).__name__, float((kernel == 0).mean())
        ('Dense', 0.5)
    """
    LayerGraph.from_model(model)  # Clear errors for unsupported models.
    copies = []

    def clone(layer):
        if isinstance(layer, QuantizedLinear) and layer.pruning is not None:
            raise ValueError(
                f"Layer '{layer.name}' is a QAT layer that prunes: export the "
                "QAT model with export_tflite (its pruned weights are written "
                "as int8 zeros), or strip_pruning before quantize_model."
            )
        source = layer.layer if isinstance(layer, PrunedLayer) else layer
        copy = type(source).from_config(source.get_config())
        copies.append((layer, copy))
        return copy

    with serialization_lib.ObjectSharingScope():  # Range groups stay shared.
        stripped = keras.models.clone_model(
            model, clone_function=clone, recursive=True
        )
    for original, copy in copies:
        if isinstance(original, PrunedLayer):
            copy.set_weights(original.stripped_weights())
        else:
            copy.set_weights(original.get_weights())
    return stripped
