"""Property-based tests: the recipe loader, schedules, sparsity and `skip=`.

Whatever a user or a hostile file passes, the result is a valid object or a
clear error of the kind documented, never an exception from deep inside.
"""

import json
import math
import os
import tempfile

import keras
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from keras import ops

import qat_plugin
from qat_plugin import ConstantSparsity, PolynomialDecay, recipes
from qat_plugin.callbacks import QuantizationScheduler
from qat_plugin.config import RecipeConfig
from qat_plugin.config.constants import NEVER, UNSTRUCTURED
from qat_plugin.errors import RecipeError
from qat_plugin.layers.base import QuantizedLayer
from qat_plugin.sparsity import magnitude_mask

FAST = settings(max_examples=60, deadline=None,
                suppress_health_check=[HealthCheck.too_slow])
FOLDER = tempfile.mkdtemp(prefix="qat_properties-")


def load_bytes(data):
    path = os.path.join(FOLDER, "recipe.toml")
    with open(path, "wb") as f:
        f.write(data)
    return recipes.load(path)


def valid_or_recipe_error(data):
    """Loads `data`: a valid recipe or a RecipeError naming the file."""
    try:
        recipe = load_bytes(data)
    except RecipeError as error:
        assert os.path.join(FOLDER, "recipe.toml") in str(error)
        assert len(str(error)) < 2000
        return None
    assert isinstance(recipe, RecipeConfig)
    for section in (recipe.quantization, recipe.schedule, recipe.pruning):
        for value in vars(section).values():
            if isinstance(value, float):
                assert math.isfinite(value)
    return recipe


# -- the recipe loader -----------------------------------------------------

SCHEMA = {
    "quantization": ["weight_bits", "per_channel", "activation_bits", "ema_decay"],
    "schedule": ["unit", "quantize_start", "bn_freeze", "range_freeze"],
    "pruning": ["sparsity", "structure", "schedule", "unit", "begin", "end",
                "frequency", "power", "epochs"],
    "export": ["target", "sparse_weights", "allow_select_tf_ops"],
}
NICE_STRINGS = ["epoch", "step", "never", "2:4", "1:2", "unstructured", "constant",
                "polynomial", "cpu", "mcu", "any", "int8", "int8-fast", "4:2", ""]
scalars = st.one_of(
    st.booleans(),
    st.integers(-3, 10),
    st.integers(),
    st.floats(allow_nan=True, allow_infinity=True),
    st.floats(0, 1),
    st.sampled_from(NICE_STRINGS),
    st.text(max_size=8),
)
values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=3),
    st.dictionaries(st.text(max_size=4), inner, max_size=2)), max_leaves=6)
keys = st.one_of(st.sampled_from(sum(SCHEMA.values(), [])), st.text(min_size=1, max_size=6))
sections = st.dictionaries(st.sampled_from(list(SCHEMA)),
                           st.dictionaries(keys, values, max_size=4), max_size=4)
top_level = st.dictionaries(st.sampled_from(["description", "extends", "name"]),
                            st.one_of(st.sampled_from(NICE_STRINGS), values), max_size=2)


def toml_value(value):
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf") \
            if math.isinf(value) else repr(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return json.dumps(value)  # A JSON string is a TOML basic string.
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return "{" + ", ".join(f"{json.dumps(k)} = {toml_value(v)}" for k, v in value.items()) + "}"


def toml_text(top, tables):
    lines = [f"{key} = {toml_value(value)}" for key, value in top.items()]
    for name, table in tables.items():
        lines.append(f"[{name}]")
        lines += [f"{json.dumps(key)} = {toml_value(value)}" for key, value in table.items()]
    return "\n".join(lines) + "\n"


@FAST
@given(top_level, sections)
def test_recipe_structures_load_or_raise_recipe_errors(top, tables):
    text = toml_text(top, tables)
    recipe = valid_or_recipe_error(text.encode("utf-8", "surrogatepass"))
    if recipe is not None:  # What loaded is what the file said.
        for name, table in tables.items():
            for key, value in table.items():
                loaded = getattr(getattr(recipe, name), key)
                assert loaded == (None if value == "never" else value)


@FAST
@given(st.text(alphabet=st.sampled_from('[]{}="\'.,:#\n \t=abc01-+_einfa\\'), max_size=80))
def test_toml_ish_text_loads_or_raises_recipe_errors(text):
    valid_or_recipe_error(text.encode("utf-8", "surrogatepass"))


@FAST
@given(st.binary(max_size=64))
def test_arbitrary_bytes_load_or_raise_recipe_errors(data):
    valid_or_recipe_error(data)


@FAST
@given(st.sampled_from(list(SCHEMA)), st.dictionaries(keys, values, max_size=3))
def test_replace_gives_a_recipe_or_a_recipe_error(section, fields):
    try:
        recipe = recipes.get("int8").replace(**{section: fields})
    except RecipeError:
        return
    assert getattr(recipe, section) is not None


# -- schedules and sparsity ------------------------------------------------

points = st.one_of(st.none(), st.integers(-5, 2**40), st.floats(allow_nan=True),
                   st.booleans(), st.text(max_size=3))


@FAST
@given(points, points, points, st.sampled_from(["step", "epoch", "steps", None]),
       st.one_of(st.none(), st.integers(-2, 10**6)))
def test_scheduler_arguments_make_a_valid_schedule_or_a_clear_error(
        start, bn, ranges, unit, steps_per_epoch):
    try:
        scheduler = QuantizationScheduler(start, bn, ranges, unit=unit,
                                          steps_per_epoch=steps_per_epoch)
    except (TypeError, ValueError) as error:
        assert str(error).startswith(("QuantizationScheduler:", "bn_freeze", "range_freeze")), error
        return
    steps = scheduler.schedule_steps(steps_per_epoch or 7)
    assert all(isinstance(s, int) and 0 <= s <= NEVER for s in steps)
    assert steps[1] >= steps[0] and steps[2] >= steps[0]


sparsities = st.one_of(st.floats(-1, 2), st.sampled_from([math.nan, math.inf, -math.inf]),
                       st.integers(-1, 2), st.booleans(), st.text(max_size=2))
step_args = st.one_of(st.integers(-3, 2**33), st.floats(0, 10), st.booleans())


@FAST
@given(sparsities, sparsities, step_args, step_args, st.floats(0, 5), step_args,
       st.integers(0, 2**32))
def test_sparsity_schedules_are_valid_or_raise_naming_the_argument(
        initial, final, begin, end, power, frequency, step):
    for make in (lambda: ConstantSparsity(final, begin, end, frequency),
                 lambda: PolynomialDecay(initial, final, begin, end, power, frequency)):
        try:
            schedule = make()
        except (TypeError, ValueError) as error:
            assert any(name in str(error) for name in (
                "sparsity", "begin_step", "end_step", "frequency")), error
            continue
        value = schedule.sparsity_at(step)
        assert 0.0 <= value < 1.0
        assert min(schedule.initial_sparsity, schedule.final_sparsity) - 1e-9 <= value
        assert value <= max(schedule.initial_sparsity, schedule.final_sparsity) + 1e-9


@FAST
@given(st.integers(1, 6), st.integers(1, 6), st.floats(0, 0.999), st.integers(0, 2**16))
def test_magnitude_mask_zeroes_exactly_the_smallest(rows, cols, sparsity, seed):
    kernel = np.random.default_rng(seed).normal(size=(rows, cols)).astype("float32")
    mask = ops.convert_to_numpy(magnitude_mask(ops.convert_to_tensor(kernel), sparsity))
    zeros = int((mask == 0).sum())
    assert zeros == round(sparsity * kernel.size)
    if 0 < zeros < kernel.size:  # Every zeroed weight is no larger than a kept one.
        assert np.abs(kernel[mask == 0]).max() <= np.abs(kernel[mask == 1]).min()


def tiny_model():
    inputs = keras.Input((4, 4, 4), name="pixels")
    x = keras.layers.Conv2D(4, 3, name="conv")(inputs)
    x = keras.layers.ReLU(name="relu")(x)
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    return keras.Model(inputs, keras.layers.Dense(2, name="head")(x), name="tiny")


MODEL = tiny_model()
NAMES = [layer.name for layer in MODEL.layers if not isinstance(layer, keras.layers.InputLayer)]


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sparsities, st.sampled_from([UNSTRUCTURED, "2:4", "1:2", "3:4", "4:2", "2:5", "x"]))
def test_prune_model_arguments_prune_or_raise_naming_a_layer(sparsity, structure):
    try:
        pruned = qat_plugin.prune_model(MODEL, sparsity, structure=structure)
    except (TypeError, ValueError) as error:
        assert "Layer '" in str(error) or "no layer to prune" in str(error), error
        return
    assert {layer.name for layer in qat_plugin.pruning.pruned_layers(pruned)} | set(
        pruned.pruning_skipped) == {"conv", "head"}


skips = st.one_of(
    st.sampled_from(NAMES), st.text(max_size=6),
    st.lists(st.one_of(st.sampled_from(NAMES), st.text(max_size=4), st.integers()), max_size=3),
    st.frozensets(st.sampled_from(NAMES), max_size=3),
    st.integers(), st.none(), st.lists(st.lists(st.integers(), max_size=1), min_size=1, max_size=2),
)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(skips)
def test_skip_keeps_the_named_layers_float_or_raises_naming_the_unknown(skip):
    names = {skip} if isinstance(skip, str) else skip
    try:
        qat = qat_plugin.quantize_model(MODEL, skip=skip)
    except ValueError as error:
        assert "skip names layers that are not in model 'tiny'" in str(error)
        assert not set(names) <= set(NAMES)
        return
    except TypeError as error:
        assert str(error).startswith("skip must be a layer name or a list of layer names")
        return
    assert set(names) <= set(NAMES)
    quantized = {layer.name for layer in qat.layers if isinstance(layer, QuantizedLayer)}
    for name in set(names) & {"conv", "head"}:
        assert name not in quantized and type(qat.get_layer(name)) is type(MODEL.get_layer(name))


def test_the_tiny_model_quantizes_its_conv_and_head():
    # The property above relies on these two layers being quantized unskipped.
    qat = qat_plugin.quantize_model(MODEL)
    quantized = {layer.name for layer in qat.layers if isinstance(layer, QuantizedLayer)}
    assert {"conv", "head"} <= quantized
