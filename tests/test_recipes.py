"""Recipes: the TOML schema, validation, overrides, and every built-in end to end."""

import os

import keras
import numpy as np
import pytest

import qat_plugin
from qat_plugin import recipes
from qat_plugin.callbacks import PruningScheduler, QuantizationScheduler, current_phase
from qat_plugin.layers.linear import QuantizedLinear
from qat_plugin.recipes import RecipeError

REQUIRED = ("int8", "int8-per-tensor", "int16x8", "int8-pruned-50",
            "int8-sparse-2x4", "int8-mcu", "int8-fast")


def write(tmp_path, text, name="mine.toml"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


# -- the built-in files --------------------------------------------------


def test_every_required_recipe_ships_and_documents_itself():
    assert set(REQUIRED) <= set(recipes.names())
    for name in recipes.names():
        recipe = recipes.get(name)
        assert recipe.name == name and recipe.description
        with open(recipes.path_of(name)) as f:
            comments = [line for line in f if line.startswith("#")]
        text = "".join(comments)
        assert "For:" in text and "Trades:" in text, name


def test_builtin_recipes_promise_what_their_names_say():
    assert recipes.get("int8").quantization.per_channel
    assert not recipes.get("int8-per-tensor").quantization.per_channel
    assert recipes.get("int16x8").quantization.activation_bits == 16
    assert recipes.get("int8-pruned-50").pruning.sparsity == 0.5
    assert recipes.get("int8-sparse-2x4").pruning.structure == "2:4"
    assert recipes.get("int8-mcu").export.target == "mcu"
    assert recipes.get("int8-fast").schedule.is_trivial
    assert not recipes.get("int8").schedule.is_trivial
    for name in ("int8", "int8-fast", "int8-per-tensor", "int16x8", "int8-mcu"):
        assert not recipes.get(name).pruning.enabled


# -- validation ----------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ("[quantization]\nper_chanel = true\n",
         ["unknown key 'per_chanel'", "[quantization]", "Allowed keys:",
          "Did you mean 'per_channel'?"]),
        ("[export]\ntarget = 3\n", ["[export] 'target'", '"cpu", "gpu", "mcu"', "got 3"]),
        ("[export]\ntarget = \"tpu\"\n", ["[export] 'target'", '"mcu"', "'tpu'"]),
        ("[pruning]\nsparsity = 1.5\n", ["[pruning] 'sparsity'", "in [0.0, 1.0)", "1.5"]),
        ("[quantization]\nactivation_bits = 4\n", ["'activation_bits'", "8 or 16"]),
        ("[quantization]\nper_channel = 1\n", ["'per_channel'", "true or false"]),
        ("[schedule]\nbn_freeze = \"later\"\n", ["'bn_freeze'", '"never"']),
        ("[schedule]\nquantize_start = 2\nrange_freeze = 1\n",
         ["'range_freeze'", "before quantize_start"]),
        ("[pruning]\nstructure = \"4:2\"\n", ["'structure'", "N:M"]),
        ("extends = \"int9\"\n", ["'extends'", "Unknown recipe 'int9'", "Did you mean 'int8'?"]),
        ("scheduel = 1\n", ["unknown key 'scheduel'", "top level", "Did you mean 'schedule'?"]),
        ("quantization = 3\n", ["[quantization] must be a table"]),
        ("[export]\ntarget = \"mcu\"\n[quantization]\nactivation_bits = 16\n",
         ["mcu", "'activation_bits' must be 8"]),
        ("[quantization\n", ["not valid TOML"]),
        # Finite numbers only, refused where they are read (inf used to
        # pass and fail later with an OverflowError in prune()).
        ("[pruning]\nend = inf\n", ["[pruning] 'end'", "a finite number", "got inf"]),
        ("[pruning]\nbegin = nan\n", ["[pruning] 'begin'", "a finite number", "got nan"]),
        ("[schedule]\nrange_freeze = inf\n", ["[schedule] 'range_freeze'", "finite", "got inf"]),
        ("[schedule]\nquantize_start = -inf\n", ["'quantize_start'", "got -inf"]),
        ("[quantization]\nema_decay = nan\n", ["'ema_decay'", "got nan"]),
        ("[pruning]\npower = inf\n", ["'power'", "got inf"]),
        ("[pruning]\nend = 1e300\n", ["'end'", "in [0.0, 2147483647]"]),
        ("[pruning]\nfrequency = 99999999999999999999\n", ["'frequency'", "an integer in [1, "]),
        ("[pruning]\nstructure = \"\u00b2:4\"\n", ["'structure'", "N:M"]),
        ("[pruning]\nstructure = \"1:99999999\"\n", ["'structure'", "M <= 65536"]),
        ("description = [[[[[[[[[[1]]]]]]]]]]\n", ["nests tables or arrays deeper than 8"]),
        ("description = " + "[" * 5000 + "]" * 5000 + "\n", ["deeper than 8"]),
        ("description = \"" + "x" * 2000 + "\"\n[export]\ntarget = \"" + "y" * 5000 + "\"\n",
         ["'target' must be one of", "..."]),
    ],
)
def test_bad_files_name_the_file_the_key_and_the_allowed_values(tmp_path, text, expected):
    path = write(tmp_path, text)
    with pytest.raises(RecipeError) as error:
        recipes.load(path)
    message = str(error.value)
    assert path in message or "'extends'" in message
    for part in expected:
        assert part in message, (part, message)


def test_error_messages_stay_short_for_huge_values(tmp_path):
    path = write(tmp_path, "[export]\ntarget = \"" + "y" * 100_000 + "\"\n")
    with pytest.raises(RecipeError) as error:
        recipes.load(path)
    assert path in str(error.value) and len(str(error.value)) < 500


def test_unreadable_files_are_recipe_errors_naming_the_file(tmp_path):
    latin = tmp_path / "latin.toml"
    latin.write_bytes('description = "caf\u00e9"\n'.encode("latin-1"))
    with pytest.raises(RecipeError, match=f"Recipe {latin} is not UTF-8 text "
                                          r"\(byte 0xe9 at offset 18\); .*save it as UTF-8"):
        recipes.load(latin)
    big = tmp_path / "big.toml"
    big.write_bytes(b"# " + b"x" * (1 << 20) + b"\n")
    with pytest.raises(RecipeError, match=f"Recipe {big} is larger than 1048576 bytes"):
        recipes.load(big)
    with pytest.raises(RecipeError, match=f"Recipe file {tmp_path} cannot be read"):
        recipes.load(str(tmp_path) + os.sep)
    with pytest.raises(RecipeError, match="does not exist"):
        recipes.load(tmp_path / "missing.toml")
    # UTF-8 text loads, and a file just under the limit is read in full.
    good = tmp_path / "good.toml"
    good.write_bytes('description = "caf\u00e9"\n'.encode() + b"#" * ((1 << 20) - 24) + b"\n")
    assert recipes.load(good).description == "caf\u00e9"


def test_non_finite_numbers_are_refused_in_python_too():
    recipe = recipes.get("int8-pruned-50")
    for value in (float("inf"), float("nan"), np.float64("inf")):
        with pytest.raises(RecipeError, match="'end' must be a finite number"):
            recipe.replace(pruning={"end": value})
    # The largest point a recipe holds becomes a step that never comes.
    late = recipe.replace(pruning={"begin": 2**31 - 1, "end": 2**31 - 1})
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(4)])
    pruned = late.prune(model, steps_per_epoch=1000)
    assert pruned.layers[0].schedule.begin_step == 2**31 - 2


def test_unknown_names_suggest_the_closest():
    with pytest.raises(RecipeError, match="Did you mean 'int8-mcu'"):
        recipes.get("int8-mcuu")
    with pytest.raises(RecipeError, match="Did you mean 'int8'"):
        qat_plugin.quantize_model(keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)]),
                                  recipe="int9")


def test_loading_never_executes_code(tmp_path):
    marker = tmp_path / "ran"
    payload = f"__import__('pathlib').Path({str(marker)!r}).touch()"
    recipe = recipes.load(write(tmp_path, f"description = {payload!r}\n"))
    assert recipe.description == payload and not marker.exists()
    with pytest.raises(RecipeError, match="'target' must be one of"):
        recipes.load(write(tmp_path, f"[export]\ntarget = {payload!r}\n", "b.toml"))
    assert not marker.exists()


def test_extends_overrides_single_fields_and_keeps_the_rest(tmp_path):
    path = write(tmp_path, 'extends = "int8-pruned-50"\n[pruning]\nsparsity = 0.75\n'
                           '[schedule]\nrange_freeze = "never"\n')
    recipe = recipes.load(path)
    base = recipes.get("int8-pruned-50")
    assert recipe.name == "mine" and recipe.source == path
    assert recipe.pruning.sparsity == 0.75
    assert recipe.pruning.end == base.pruning.end and recipe.description == base.description
    assert recipe.schedule.range_freeze is None and recipe.schedule.is_trivial
    assert recipe.quantization == base.quantization
    assert qat_plugin.recipes.resolve(path) == recipe


def test_extends_cycle_is_refused(tmp_path):
    # A user file can only extend built-in recipes, so a cycle needs a
    # built-in name pointing back; a self-named path is looked up as built-in.
    with pytest.raises(RecipeError, match="Unknown recipe 'mine'"):
        recipes.load(write(tmp_path, 'extends = "mine"\n'))


def test_replace_validates_like_a_file():
    recipe = recipes.get("int8")
    changed = recipe.replace(per_channel=False, pruning={"sparsity": 0.25})
    assert not changed.quantization.per_channel and changed.pruning.sparsity == 0.25
    assert changed.pruning.enabled and recipe.quantization.per_channel
    with pytest.raises(RecipeError, match=r"\[export\] 'target' must be one of"):
        recipe.replace(export={"target": "npu"})
    with pytest.raises(RecipeError, match="Did you mean 'weight_bits'"):
        recipe.replace(quantization={"weight_bit": 8})
    with pytest.raises(RecipeError, match="recipes.get"):
        recipe.replace(extends="int8-fast")
    assert recipe.replace(description="mine").description == "mine"


def test_callbacks_follow_the_model_phase():
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(4)])
    int8, fast = recipes.get("int8"), recipes.get("int8-fast")
    (scheduler,) = int8.callbacks()
    assert isinstance(scheduler, QuantizationScheduler)
    assert (scheduler.quantize_start, scheduler.bn_freeze, scheduler.range_freeze,
            scheduler.unit) == (0, None, 0.8, "epoch")
    assert fast.callbacks() == []
    pruned = qat_plugin.prune_model(model, 0.5)
    assert [type(c) for c in int8.callbacks(pruned)] == [PruningScheduler]
    qat = qat_plugin.quantize_model(pruned)
    assert [type(c) for c in int8.callbacks(qat)] == [QuantizationScheduler, PruningScheduler]


def test_epoch_pruning_schedule_needs_steps_per_epoch():
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(4)])
    with pytest.raises(RecipeError, match="steps_per_epoch"):
        recipes.get("int8-pruned-50").prune(model)
    assert recipes.get("int8").prune(model) is model


# -- every built-in recipe end to end ------------------------------------


def tiny_model():
    """Conv (4 input channels, so 2:4 fits) -> BN -> ReLU -> GAP -> Dense."""
    inputs = keras.Input((6, 6, 4))
    x = keras.layers.Conv2D(8, 3, use_bias=False, name="conv")(inputs)
    x = keras.layers.BatchNormalization(name="bn")(x)
    x = keras.layers.ReLU(name="relu")(x)
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    return keras.Model(inputs, keras.layers.Dense(4, name="head")(x))


def run_recipe(name):
    """What a user does with a recipe: 64 samples, batch 16 (4 steps/epoch)."""
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    x = rng.random((64, 6, 6, 4), dtype=np.float32)
    y = (x.mean(axis=(1, 2, 3)) * 16).astype("int64") % 4
    recipe = recipes.get(name)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    model = recipe.prune(tiny_model(), steps_per_epoch=4)
    if recipe.pruning.enabled:
        model.compile(keras.optimizers.Adam(1e-3), loss)
        model.fit(x, y, batch_size=16, epochs=recipe.pruning.epochs, verbose=0,
                  shuffle=False, callbacks=recipe.callbacks(model))
    qat = recipe.quantize(model)
    qat.compile(keras.optimizers.Adam(1e-3), loss)
    qat.fit(x, y, batch_size=16, epochs=1, verbose=0, shuffle=False,
            callbacks=recipe.callbacks(qat))
    data = recipe.export_tflite(qat)
    return recipe, qat, data, x


def check_runs_like_keras(qat, data, x):
    keras_out = qat.predict(x, verbose=0)
    runner = qat_plugin.TFLiteModel(data)
    tflite_out = runner.predict(x)
    (step,) = runner.output_steps()
    assert np.abs(keras_out - tflite_out).max() <= 2 * step + 1e-6


def conv_weight(report):
    (weight,) = [w for w in report.weights if w.op == "CONV_2D"]
    return weight


@pytest.mark.slow
@pytest.mark.parametrize("name", REQUIRED)
def test_every_builtin_recipe_end_to_end(name):
    recipe, qat, data, x = run_recipe(name)
    check_runs_like_keras(qat, data, x)
    targets = ("cpu", "mcu") if name != "int16x8" else ("cpu",)
    report = qat_plugin.inspect_tflite(data, targets=targets)
    for check in report.targets:
        assert check.compatible, check.summary()
    phase = current_phase(qat)
    assert phase["step"] == 4  # the QAT fit; pruning steps count in the pruned layers
    assert phase["ranges_frozen"] == (recipe.schedule.range_freeze is not None)

    conv = conv_weight(report)
    if name == "int16x8":
        assert {t.dtype for t in report.inputs + report.outputs} == {"int16"}
        activations = {t.dtype for op in report.ops for t in op.outputs}
        assert activations == {"int16"}, activations
        assert not report.target("cpu").notes[0].startswith("XNNPACK delegates 4")
    else:
        assert report.is_fully_int8
    if name == "int8-per-tensor":
        assert all(len(w.tensor.scales) == 1 for w in report.weights)
        check_per_tensor_values(qat, report)
    else:
        assert len(conv.tensor.scales) == 8  # one per output channel
    if name == "int8-pruned-50":
        assert conv.zero_fraction == pytest.approx(0.5, abs=0.01)
        assert report.weight_sparsity == pytest.approx(0.5, abs=0.02)
    if name == "int8-sparse-2x4":
        assert all(w.is_2_4 for w in report.weights)
    if name == "int8-mcu":
        arena = report.target("mcu").arena
        # Input 6x6x4 int8 (144 B) and the conv's 4x4x8 output (128 B) are
        # alive together while the conv runs: the peak.
        assert arena.peak_live_bytes == 144 + 128


def check_per_tensor_values(qat, report):
    """The int8 weights in the file are the trained ones on one grid."""
    (layer,) = [l for l in qat.layers if isinstance(l, QuantizedLinear) and l.name.startswith("conv")]
    (kernel,) = layer.export_constants()["kernels"]  # [h, w, in, out], snapped
    scale = np.abs(kernel).max() / 127
    trained = np.round(kernel / scale).astype(np.int8)
    conv = conv_weight(report)
    assert conv.tensor.scales[0] == pytest.approx(scale, rel=1e-5)
    np.testing.assert_array_equal(conv.values, np.transpose(trained, (3, 0, 1, 2)))


def test_recipes_file_round_trip_through_quantize_model(tmp_path):
    path = write(tmp_path, 'extends = "int8"\n[quantization]\nper_channel = false\n')
    model = keras.Sequential([keras.Input((4, 4, 2)), keras.layers.Conv2D(3, 2, name="c")])
    qat = qat_plugin.quantize_model(model, recipe=path)
    assert not qat.get_layer("c").per_channel
    assert os.path.basename(recipes.load(path).source) == "mine.toml"


# -- the command line ----------------------------------------------------


def test_cli_lists_and_shows_recipes(capsys):
    from qat_plugin.cli import main

    assert main(["recipes"]) == 0
    listing = capsys.readouterr().out
    for name in REQUIRED:
        assert f"\n{name} " in listing
    assert recipes.get("int8-mcu").description in listing
    assert main(["recipes", "show", "int8-mcu"]) == 0
    with open(recipes.path_of("int8-mcu")) as f:
        assert capsys.readouterr().out == f.read()
    assert main(["recipes", "show", "int8-mcuu"]) == 1
    assert "Did you mean 'int8-mcu'?" in capsys.readouterr().err
    assert main(["recipes", "show"]) == 1
    assert "needs a NAME" in capsys.readouterr().err


def test_n_of_m_structure_fixes_the_sparsity(tmp_path):
    with pytest.raises(RecipeError, match="fixes the sparsity at 0.5"):
        recipes.load(write(tmp_path, '[pruning]\nstructure = "2:4"\nsparsity = 0.7\n'))
    with pytest.raises(RecipeError, match="'end' = 0.1 comes before 'begin'"):
        recipes.load(write(tmp_path, '[pruning]\nbegin = 0.5\nend = 0.1\n', "b.toml"))


def test_n_of_m_pruning_skips_layers_it_cannot_group():
    model = keras.Sequential([
        keras.Input((6, 6, 1)), keras.layers.Conv2D(8, 3, name="stem"),
        keras.layers.Conv2D(8, 3, name="body"), keras.layers.GlobalAveragePooling2D(),
        keras.layers.Dense(4, name="head"),
    ])
    with pytest.warns(UserWarning, match="'stem'"):
        pruned = recipes.get("int8-sparse-2x4").prune(model, steps_per_epoch=4)
    names = {layer.name for layer in pruned.layers if isinstance(layer, qat_plugin.PrunedLayer)}
    assert names == {"body", "head"}
    assert list(pruned.pruning_skipped) == ["stem"]


def test_a_pruning_recipe_on_an_unpruned_model_says_how_to_prune_first(tmp_path):
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(4)])
    recipe = recipes.get("int8-pruned-50")
    for given in ("int8-pruned-50", recipe):
        with pytest.raises(RecipeError, match="has no pruned layers and quantize_model "
                                              "does not prune"):
            qat_plugin.quantize_model(model, recipe=given)
    with pytest.raises(RecipeError, match="has no pruned layers"):
        recipe.quantize(model)
    path = write(tmp_path, 'extends = "int8-pruned-50"\n')
    with pytest.raises(RecipeError, match=f"qat_plugin.recipes.load\\('{path}'\\)"):
        qat_plugin.quantize_model(model, recipe=path)
    # The recipe's own workflow, and a dense model with pruning turned off.
    assert recipe.quantize(recipe.prune(model, steps_per_epoch=4)).built
    dense = recipe.replace(pruning={"sparsity": 0.0})
    assert not dense.pruning.enabled and qat_plugin.quantize_model(model, dense).built


def test_resolve_gives_a_recipe_with_its_workflow_for_recipe_data():
    from qat_plugin.config import RecipeConfig

    data = RecipeConfig(name="mine")
    recipe = recipes.resolve(data)
    assert isinstance(recipe, recipes.Recipe) and recipe.name == "mine"
    assert recipes.resolve(recipe) is recipe
