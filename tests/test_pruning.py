"""Pruning: masks and schedules against hand values, training, QAT, export, errors."""

import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
from keras import ops

import qat_plugin
from qat_plugin import ConstantSparsity, PolynomialDecay, PrunedLayer
from qat_plugin.callbacks import PruningScheduler, model_sparsity
from qat_plugin.pruning.prune import pruned_layers
from qat_plugin.sparsity import (
    holds_n_of_m,
    is_update_step,
    magnitude_mask,
    n_of_m_mask,
    parse_structure,
    scheduled_sparsity,
)
from tests.conftest import images

L = keras.layers


def cnn(channels=8):
    """Every prunable class, with a Conv -> BN -> ReLU chain to fold."""
    return keras.Sequential(
        [
            keras.Input((12, 12, 4)),
            L.Conv2D(channels, 3, use_bias=False, name="conv"),
            L.BatchNormalization(name="bn"),
            L.ReLU(name="relu"),
            L.DepthwiseConv2D(3, activation="relu", name="depthwise"),
            L.SeparableConv2D(channels, 3, activation="relu", name="separable"),
            L.GlobalAveragePooling2D(name="pool"),
            L.Dense(16, activation="relu", name="hidden"),
            L.Dense(4, name="head"),
        ],
        name="cnn",
    )


def compile_fit(model, x, y, optimizer=None, epochs=1, batch_size=16, **kwargs):
    model.compile(
        optimizer or keras.optimizers.Adam(1e-2),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        **kwargs.pop("compile_kwargs", {}),
    )
    return model.fit(
        x, y, epochs=epochs, batch_size=batch_size, verbose=0, shuffle=False, **kwargs
    )


def kernels_of(layer):
    return [
        ops.convert_to_numpy(getattr(layer.layer, name)) for name in layer.kernel_names
    ]


def masks_of(layer):
    return [ops.convert_to_numpy(m) for m in layer.masks]


# -- schedules --------------------------------------------------------------


def test_polynomial_decay_matches_hand_values():
    schedule = PolynomialDecay(0.2, 0.8, begin_step=10, end_step=50, power=3, frequency=10)
    # s(t) = 0.8 + (0.2 - 0.8) * (1 - (t - 10) / 40) ** 3
    expected = {0: 0.2, 10: 0.2, 30: 0.8 - 0.6 * 0.125, 40: 0.8 - 0.6 / 64, 50: 0.8, 90: 0.8}
    for step, value in expected.items():
        assert schedule.sparsity_at(step) == pytest.approx(value)
    updates = [t for t in range(70) if schedule.updates_at(t)]
    assert updates == [10, 20, 30, 40, 50]
    # An end step off the frequency grid still gets its update.
    assert [t for t in range(60) if PolynomialDecay(
        0.0, 0.5, begin_step=0, end_step=25, frequency=10).updates_at(t)] == [0, 10, 20, 25]


def test_constant_sparsity_updates_every_frequency_steps_forever():
    schedule = ConstantSparsity(0.6, begin_step=5, frequency=4)
    assert [schedule.sparsity_at(t) for t in (0, 5, 10**6)] == [0.6, 0.6, 0.6]
    assert [t for t in range(20) if schedule.updates_at(t)] == [5, 9, 13, 17]


def test_graph_schedule_equals_python_schedule():
    for schedule in (
        PolynomialDecay(0.1, 0.9, begin_step=3, end_step=40, power=2, frequency=7),
        ConstantSparsity(0.5, begin_step=2, end_step=30, frequency=5),
    ):
        steps = ops.convert_to_tensor(schedule.step_parameters())
        values = ops.convert_to_tensor(schedule.sparsity_parameters())
        for t in range(0, 50):
            step = ops.convert_to_tensor(np.int32(t))
            assert float(scheduled_sparsity(step, steps, values)) == pytest.approx(
                schedule.sparsity_at(t), abs=1e-6
            )
            assert bool(is_update_step(step, steps)) == schedule.updates_at(t)


def test_schedule_errors_name_the_argument():
    with pytest.raises(ValueError, match="end_step \\(5\\) is before begin_step \\(10\\)"):
        PolynomialDecay(0.0, 0.5, begin_step=10, end_step=5)
    with pytest.raises(ValueError, match="end_step .* before begin_step"):
        ConstantSparsity(0.5, begin_step=10, end_step=3)
    with pytest.raises(ValueError, match="final_sparsity must be in \\[0, 1\\), got 1.0"):
        PolynomialDecay(0.0, 1.0)
    with pytest.raises(ValueError, match="initial_sparsity must be in \\[0, 1\\)"):
        PolynomialDecay(-0.1, 0.5)
    with pytest.raises(ValueError, match="frequency must be >= 1"):
        ConstantSparsity(0.5, frequency=0)


# -- masks ------------------------------------------------------------------


def test_magnitude_mask_hand_values():
    kernel = np.array([[0.1, -3.0, 0.5], [2.0, -0.2, 0.05]], "float32")
    mask = ops.convert_to_numpy(magnitude_mask(kernel, 0.5))
    np.testing.assert_array_equal(mask, [[0, 1, 1], [1, 0, 0]])
    mask = ops.convert_to_numpy(magnitude_mask(kernel, 0.0))
    np.testing.assert_array_equal(mask, np.ones_like(kernel))


def test_magnitude_mask_zeroes_exactly_the_smallest():
    kernel = np.random.default_rng(0).normal(size=(3, 3, 4, 8)).astype("float32")
    for sparsity in (0.1, 0.5, 0.75, 0.9):
        mask = ops.convert_to_numpy(magnitude_mask(kernel, sparsity))
        count = round(sparsity * kernel.size)
        assert int((mask == 0).sum()) == count
        order = np.argsort(np.abs(kernel).ravel())
        assert np.all(mask.ravel()[order[:count]] == 0)
        assert np.all(mask.ravel()[order[count:]] == 1)


def test_n_of_m_mask_hand_values():
    # Dense kernel [in=8, out=2]: groups of 4 run down the input axis.
    kernel = np.array(
        [[4, 1], [-1, 2], [0.5, 3], [3, -4], [1, 0.1], [2, 0.2], [3, 0.3], [4, 0.4]],
        "float32",
    )
    mask = ops.convert_to_numpy(n_of_m_mask(kernel, 2, 4))
    np.testing.assert_array_equal(
        mask, [[1, 0], [0, 0], [0, 1], [1, 1], [0, 0], [0, 0], [1, 1], [1, 1]]
    )
    assert ops.convert_to_numpy(n_of_m_mask(kernel, 1, 4)).sum() == 12


def test_n_of_m_mask_numpy_reference_on_conv_kernel():
    kernel = np.random.default_rng(1).normal(size=(3, 3, 8, 5)).astype("float32")
    for n in (1, 2, 3):
        mask = ops.convert_to_numpy(n_of_m_mask(kernel, n, 4))
        groups = np.moveaxis(np.abs(kernel), 2, -1).reshape(-1, 4)
        mask_groups = np.moveaxis(mask, 2, -1).reshape(-1, 4)
        expected = np.ones_like(groups)
        np.put_along_axis(expected, np.argsort(groups, axis=-1)[:, :n], 0, axis=-1)
        np.testing.assert_array_equal(mask_groups, expected)


def test_structure_parsing():
    assert parse_structure("unstructured") is None
    assert parse_structure("2:4") == (2, 4)
    assert parse_structure((1, 8)) == (1, 8)
    for bad in ("4:2", "2:2", "0:4", "2-4", "dense", (2, 4, 8)):
        with pytest.raises(ValueError, match="structure must be 'unstructured' or 'N:M'"):
            parse_structure(bad)


# -- prune_model and training ----------------------------------------------


def test_prune_model_wraps_every_prunable_layer_and_copies_weights():
    model = cnn()
    pruned = qat_plugin.prune_model(model, 0.5, skip=["head"])
    by_name = {layer.name: layer for layer in pruned.layers}
    wrapped = {name for name, layer in by_name.items() if isinstance(layer, PrunedLayer)}
    assert wrapped == {"conv", "depthwise", "separable", "hidden"}
    assert type(by_name["head"]) is L.Dense
    for name in wrapped:
        original = model.get_layer(name)
        for a, b in zip(original.get_weights(), by_name[name].layer.get_weights()):
            np.testing.assert_array_equal(a, b)
    x = np.random.default_rng(2).random((4, 12, 12, 4), dtype=np.float32)
    # Masks start at ones: before training the pruned model computes the same.
    np.testing.assert_allclose(pruned.predict(x, verbose=0), model.predict(x, verbose=0),
                               rtol=1e-5, atol=1e-5)
    assert all(not isinstance(layer, PrunedLayer) for layer in model.layers)


@pytest.mark.parametrize(
    "optimizer",
    [
        lambda: keras.optimizers.Adam(1e-2, weight_decay=1e-2),
        lambda: keras.optimizers.SGD(0.05, momentum=0.9, weight_decay=1e-2),
    ],
    ids=["adam", "sgd_momentum"],
)
def test_pruned_weights_stay_exactly_zero_through_training(optimizer):
    x, y = images(96, (12, 12, 4))
    # Masks are computed at step 0 and then frozen; momentum, Adam moments
    # and weight decay keep pushing the pruned weights, the mask must win.
    pruned = qat_plugin.prune_model(
        cnn(), schedule=ConstantSparsity(0.5, begin_step=0, end_step=0)
    )
    compile_fit(pruned, x, y, optimizer(), epochs=1)
    first = {layer.name: masks_of(layer) for layer in pruned_layers(pruned)}
    before = {layer.name: kernels_of(layer) for layer in pruned_layers(pruned)}
    compile_fit(pruned, x, y, optimizer(), epochs=2)
    for layer in pruned_layers(pruned):
        for mask, old_mask, kernel, old in zip(
            masks_of(layer), first[layer.name], kernels_of(layer), before[layer.name]
        ):
            np.testing.assert_array_equal(mask, old_mask)
            assert (mask == 0).mean() == pytest.approx(0.5, abs=0.5 / mask.size + 1e-9)
            assert np.all(kernel[mask == 0] == 0.0), layer.name
            assert not np.allclose(kernel[mask == 1], old[mask == 1])  # it trained


def test_two_of_four_holds_on_every_group_after_training():
    x, y = images(64, (12, 12, 4))
    pruned = qat_plugin.prune_model(cnn(), structure="2:4", schedule=ConstantSparsity(
        0.5, frequency=2))
    compile_fit(pruned, x, y, epochs=1)
    layers = pruned_layers(pruned)
    assert {layer.name for layer in layers} == {
        "conv", "depthwise", "separable", "hidden", "head"}
    for layer in layers:
        for kernel in kernels_of(layer):
            groups = np.moveaxis(kernel, -2, -1).reshape(-1, 4)
            assert np.all((groups == 0).sum(axis=1) == 2), layer.name
            assert holds_n_of_m(kernel, 2, 4, axis=-2)


def test_polynomial_schedule_in_graph_with_steps_per_execution():
    x, y = images(64, (12, 12, 4))
    schedule = PolynomialDecay(0.0, 0.8, begin_step=0, end_step=6, power=1, frequency=2)
    results = []
    for steps_per_execution in (1, 3):
        keras.utils.set_random_seed(0)
        pruned = qat_plugin.prune_model(cnn(), schedule=schedule)
        history = compile_fit(
            pruned, x, y, epochs=2, batch_size=16,
            compile_kwargs={"steps_per_execution": steps_per_execution},
            callbacks=[PruningScheduler()],
        )
        hidden = pruned.get_layer("hidden")
        assert int(ops.convert_to_numpy(hidden.pruning_step)) == 8
        # Updates at steps 0, 2, 4, 6 (end): the last one sets 0.8.
        assert hidden.sparsity() == pytest.approx(0.8, abs=1 / 128)
        assert history.history["sparsity"][-1] == pytest.approx(0.8, abs=0.01)
        # After epoch 1 (steps 0..3), the last update was step 2: s = 0.8 * 2/6.
        assert history.history["sparsity"][0] == pytest.approx(0.8 / 3, abs=0.01)
        results.append(masks_of(hidden)[0])
    np.testing.assert_array_equal(results[0], results[1])


def test_pruning_scheduler_sets_a_new_schedule_without_rebuilding():
    x, y = images(32, (12, 12, 4))
    pruned = qat_plugin.prune_model(cnn(), 0.25)
    compile_fit(pruned, x, y, epochs=1)
    assert model_sparsity(pruned) == pytest.approx(0.25, abs=0.01)
    scheduler = PruningScheduler(ConstantSparsity(0.75, begin_step=0, frequency=1))
    compile_fit(pruned, x, y, epochs=1, callbacks=[scheduler])
    assert model_sparsity(pruned) == pytest.approx(0.75, abs=0.01)
    with pytest.raises(ValueError, match="has no pruned layers"):
        compile_fit(cnn(), x, y, callbacks=[PruningScheduler()])
    with pytest.raises(TypeError, match="ConstantSparsity or PolynomialDecay"):
        PruningScheduler(0.5)


# -- errors -----------------------------------------------------------------


def test_prune_model_errors_name_the_layer_or_argument():
    with pytest.raises(ValueError, match="Layer 'conv': sparsity must be in \\[0, 1\\)"):
        qat_plugin.prune_model(cnn(), 1.0)
    with pytest.raises(ValueError, match="must be in \\[0, 1\\), got -0.5"):
        qat_plugin.prune_model(cnn(), -0.5)
    six_channels = keras.Sequential([keras.Input((8, 8, 6)), L.Conv2D(4, 3, name="conv")])
    with pytest.raises(ValueError, match="Layer 'conv': 2:4 pruning .* input channels by 4, but it has 6"):
        qat_plugin.prune_model(six_channels, structure="2:4", per_layer={"conv": {}})
    with pytest.warns(UserWarning), pytest.raises(
            ValueError, match="no layer to prune.*'conv'.*but it has 6"):
        qat_plugin.prune_model(six_channels, structure="2:4")
    with pytest.raises(ValueError, match="per_layer names layer 'pool' .*no kernel to prune"):
        qat_plugin.prune_model(cnn(), 0.5, per_layer={"pool": {"sparsity": 0.5}})
    with pytest.raises(ValueError, match="Layer 'relu' \\(ReLU\\) has no kernel to prune"):
        PrunedLayer(L.ReLU(name="relu"), ConstantSparsity(0.5))
    with pytest.raises(ValueError, match="not in model 'cnn': \\['nope'\\]"):
        qat_plugin.prune_model(cnn(), 0.5, skip=["nope"])
    with pytest.raises(ValueError, match="Layer 'conv': 2:4 structure fixes the sparsity at 0.5"):
        qat_plugin.prune_model(cnn(), structure="2:4", schedule=PolynomialDecay(0.0, 0.5))
    with pytest.raises(ValueError, match="Layer 'conv': give a sparsity"):
        qat_plugin.prune_model(cnn())
    with pytest.raises(ValueError, match="Layer 'head': structure must be"):
        qat_plugin.prune_model(cnn(), 0.5, per_layer={"head": {"structure": "4:2"}})


def image_net(channels):
    """An image model whose stem sees `channels` channels (1: grey, 3: RGB)."""
    return keras.Sequential([
        keras.Input((8, 8, channels)),
        L.Conv2D(8, 3, name="stem"),
        L.DepthwiseConv2D(3, name="depthwise"),  # 8 channels: fits 2:4
        L.GlobalAveragePooling2D(name="pool"),
        L.Dense(6, name="hidden"),
        L.Dense(4, name="head"),  # 6 input channels: cannot hold 2:4
    ], name=f"net{channels}")


@pytest.mark.parametrize("channels", [1, 3])
def test_whole_model_2_4_skips_and_reports_the_layers_that_cannot_hold_it(channels):
    with pytest.warns(UserWarning, match="left 2 layer.*'stem'.*'head'") as caught:
        pruned = qat_plugin.prune_model(image_net(channels), structure="2:4")
    assert len(caught) == 1
    assert dict(pruned.pruning_skipped) == {
        "stem": f"2:4 pruning groups the kernel's input channels by 4, but it has {channels}",
        "head": "2:4 pruning groups the kernel's input channels by 4, but it has 6",
    }
    assert {l.name for l in pruned_layers(pruned)} == {"depthwise", "hidden"}
    x, y = images(32, (8, 8, channels))
    compile_fit(pruned, x, y)
    for layer in pruned_layers(pruned):
        for kernel, mask in zip(kernels_of(layer), masks_of(layer)):
            assert holds_n_of_m(np.moveaxis(kernel * mask, -2, -1), 2, 4)
    # The skipped layers stay plain and dense; the model quantizes and exports.
    assert type(pruned.get_layer("stem")) is L.Conv2D
    qat = qat_plugin.quantize_model(pruned)
    qat_plugin.calibrate(qat, x)
    report = qat_plugin.inspect_tflite(qat_plugin.export_tflite(qat))
    assert report.is_fully_int8


def test_whole_model_pruning_reports_nothing_when_every_layer_fits(recwarn):
    pruned = qat_plugin.prune_model(cnn(), structure="2:4")
    assert dict(pruned.pruning_skipped) == {}
    assert not [w for w in recwarn if "prune_model" in str(w.message)]
    unstructured = qat_plugin.prune_model(image_net(3), 0.5)
    assert dict(unstructured.pruning_skipped) == {}
    assert len(pruned_layers(unstructured)) == 4


def test_a_named_layer_that_cannot_hold_2_4_raises_and_can_be_pruned_otherwise():
    with pytest.raises(ValueError, match="Layer 'stem': 2:4 pruning .* but it has 3. Prune it unstructured"):
        qat_plugin.prune_model(image_net(3), structure="2:4", per_layer={"stem": {}})
    with pytest.warns(UserWarning, match="'head'"):
        pruned = qat_plugin.prune_model(
            image_net(3), structure="2:4",
            per_layer={"stem": {"structure": "unstructured", "sparsity": 0.5}})
    assert dict(pruned.pruning_skipped).keys() == {"head"}
    assert pruned.get_layer("stem").structure == "unstructured"


def test_quantize_model_refuses_a_pruning_recipe_for_an_unpruned_model():
    model = cnn()
    for name in ("int8-pruned-50", "int8-sparse-2x4"):
        with pytest.raises(qat_plugin.RecipeError,
                           match=f"Recipe '{name}' prunes .* model 'cnn' has no pruned layers.*"
                                 f"qat_plugin.recipes.get\('{name}'\).*recipe.prune\(model"):
            qat_plugin.quantize_model(model, recipe=name)
    pruned = qat_plugin.prune_model(model, 0.5)
    qat = qat_plugin.quantize_model(pruned, recipe="int8-pruned-50")
    assert len(pruned_layers(qat)) == len(pruned_layers(pruned))


# -- QAT, export, save/load -------------------------------------------------


@pytest.mark.parametrize("structure,sparsity", [("unstructured", 0.5),
                                                ("unstructured", 0.75),
                                                ("2:4", None)])
def test_prune_then_qat_export_keeps_sparsity_in_int8_weights(structure, sparsity):
    x, y = images(96, (12, 12, 4))
    pruned = qat_plugin.prune_model(cnn(), sparsity, structure=structure)
    compile_fit(pruned, x, y, epochs=1)
    qat = qat_plugin.quantize_model(pruned)
    conv = qat.get_layer("conv")
    assert isinstance(conv, qat_plugin.QuantizedLinear) and conv.batch_norm is not None
    assert conv.pruning is not None
    compile_fit(qat, x, y, keras.optimizers.Adam(1e-3), epochs=1)
    report = qat_plugin.inspect_tflite(qat_plugin.export_tflite(qat))
    assert report.is_fully_int8
    target = 0.5 if sparsity is None else sparsity
    assert len(report.weights) == 6  # conv, depthwise, 2 separable, hidden, head
    assert report.weight_sparsity == pytest.approx(target, abs=0.01)
    for weight in report.weights:
        # At least the masked zeros; a kept weight may also round to 0.
        size = np.prod(weight.tensor.shape)
        assert weight.zero_fraction >= target - 1 / size, weight.tensor.name
        if structure == "2:4":
            assert weight.is_2_4, weight.tensor.name
    assert 0 < report.gzip_size_bytes < report.size_bytes


def test_prune_and_qat_together_then_save_load_and_export():
    x, y = images(96, (12, 12, 4))
    schedule = PolynomialDecay(0.0, 0.6, begin_step=0, end_step=8, frequency=2)
    qat = qat_plugin.quantize_model(qat_plugin.prune_model(cnn(), schedule=schedule))
    history = compile_fit(qat, x, y, keras.optimizers.Adam(1e-3), epochs=2,
                          callbacks=[PruningScheduler()])
    assert history.history["sparsity"][-1] == pytest.approx(0.6, abs=0.01)
    data = qat_plugin.export_tflite(qat)
    report = qat_plugin.inspect_tflite(data)
    assert report.weight_sparsity == pytest.approx(0.6, abs=0.01)
    path = os.path.join(pytest.importorskip("tempfile").mkdtemp(), "qat.keras")
    qat.save(path)
    loaded = keras.models.load_model(path)
    np.testing.assert_allclose(loaded.predict(x, verbose=0), qat.predict(x, verbose=0),
                               atol=1e-6)
    assert loaded.get_layer("hidden").pruning.sparsity() == pytest.approx(0.6, abs=0.01)
    assert qat_plugin.export_tflite(loaded) == data
    with pytest.raises(ValueError, match="'conv' is a QAT layer that prunes"):
        qat_plugin.strip_pruning(qat)


def test_pruned_and_stripped_models_save_and_load_without_custom_objects(tmp_path):
    x, y = images(64, (12, 12, 4))
    model = cnn()
    pruned = qat_plugin.prune_model(model, 0.5, per_layer={"head": {"sparsity": 0.25}})
    compile_fit(pruned, x, y, epochs=1)
    pruned.save(tmp_path / "pruned.keras")
    loaded = keras.models.load_model(tmp_path / "pruned.keras")
    np.testing.assert_allclose(loaded.predict(x, verbose=0), pruned.predict(x, verbose=0),
                               atol=1e-6)
    assert int(ops.convert_to_numpy(loaded.get_layer("head").pruning_step)) == 4
    assert loaded.get_layer("head").sparsity() == pytest.approx(0.25, abs=0.02)
    # The reloaded kernel keeps its zeros through further training.
    compile_fit(loaded, x, y, keras.optimizers.SGD(0.1, momentum=0.9), epochs=1)
    for layer in pruned_layers(loaded):
        for kernel, mask in zip(kernels_of(layer), masks_of(layer)):
            assert np.all(kernel[mask == 0] == 0)

    stripped = qat_plugin.strip_pruning(pruned)
    assert not pruned_layers(stripped)
    assert type(stripped.get_layer("separable")) is L.SeparableConv2D
    np.testing.assert_allclose(stripped.predict(x, verbose=0), pruned.predict(x, verbose=0),
                               atol=1e-5)
    for layer in pruned_layers(pruned):
        plain = stripped.get_layer(layer.name)
        for name, mask in zip(layer.kernel_names, masks_of(layer)):
            kernel = ops.convert_to_numpy(getattr(plain, name))
            np.testing.assert_array_equal(kernel == 0, mask == 0)
    stripped.save(tmp_path / "stripped.keras")
    reloaded = keras.models.load_model(tmp_path / "stripped.keras")
    np.testing.assert_allclose(reloaded.predict(x, verbose=0),
                               stripped.predict(x, verbose=0), atol=1e-6)


def test_sparse_weights_export_runs_without_xnnpack_and_matches_dense():
    x, y = images(64, (12, 12, 4))
    model = keras.Sequential([
        keras.Input((12, 12, 4)),
        L.Conv2D(16, 3, activation="relu"),
        L.GlobalAveragePooling2D(),
        L.Dense(32, activation="relu"),
        L.Dense(4),
    ])
    qat = qat_plugin.quantize_model(qat_plugin.prune_model(model, 0.8))
    compile_fit(qat, x, y, keras.optimizers.Adam(1e-3), epochs=1)
    dense = qat_plugin.export_tflite(qat)
    sparse = qat_plugin.export_tflite(qat, sparse_weights=True)
    report = qat_plugin.inspect_tflite(sparse)
    assert report.op_counts["DENSIFY"] >= 1 and report.is_fully_int8
    assert all(w.sparse_encoded for w in report.weights)
    for got, expected in zip(report.weights, qat_plugin.inspect_tflite(dense).weights):
        np.testing.assert_array_equal(got.values, expected.values)
        assert got.zero_fraction == pytest.approx(0.8, abs=0.01)
    expected = qat_plugin.TFLiteModel(dense, use_xnnpack=False).predict(x)
    np.testing.assert_array_equal(
        qat_plugin.TFLiteModel(sparse, use_xnnpack=False).predict(x), expected)
    with pytest.raises(ValueError, match="sparse_weights=True applies to QAT models"):
        qat_plugin.export_tflite(model, sparse_weights=True)


def test_sparse_weights_export_refuses_what_the_converter_corrupts():
    # The converter's 1x16 blocks drop weights of an 8-input FULLY_CONNECTED.
    x, y = images(32, (12, 12, 4))
    qat = qat_plugin.quantize_model(qat_plugin.prune_model(cnn(), 0.5))
    compile_fit(qat, x, y, keras.optimizers.Adam(1e-3), epochs=1)
    with pytest.raises(qat_plugin.ExportError,
                       match="changed the int8 values of weight tensor '.*hidden"):
        qat_plugin.export_tflite(qat, sparse_weights=True)


def run_script(script, **env):
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)],
        capture_output=True, text=True, timeout=300, env=dict(os.environ, **env),
    )
    assert result.returncode == 0 and "OK" in result.stdout, result.stderr[-3000:]


@pytest.mark.slow
@pytest.mark.tf_only
def test_pruning_under_mirrored_strategy():
    run_script(
        """
        import os
        os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
        import tensorflow as tf
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
        import keras, numpy as np, qat_plugin
        from qat_plugin.pruning.prune import pruned_layers
        x = np.random.default_rng(0).random((64, 8), dtype=np.float32)
        y = (x.sum(axis=1) > 4).astype("int64")
        with tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"]).scope():
            model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(16),
                                      keras.layers.Dense(2)])
            pruned = qat_plugin.prune_model(model, schedule=qat_plugin.PolynomialDecay(
                0.0, 0.75, begin_step=0, end_step=3, frequency=1))
            pruned.compile(keras.optimizers.SGD(0.1, momentum=0.9),
                           keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        pruned.fit(x, y, batch_size=16, epochs=2, verbose=0)
        for layer in pruned_layers(pruned):
            mask = layer.masks[0].numpy()
            assert layer.pruning_step.numpy() == 8, layer.pruning_step.numpy()
            assert abs((mask == 0).mean() - 0.75) < 0.02, (mask == 0).mean()
            assert np.all(layer.layer.kernel.numpy()[mask == 0] == 0)
        print("OK")
        """
    )


@pytest.mark.slow
def test_prune_and_qat_on_jax_then_export_on_tensorflow(tmp_path):
    path = tmp_path / "jax_qat.keras"
    run_script(
        f"""
        import keras, numpy as np, qat_plugin
        from qat_plugin.callbacks import PruningScheduler
        from qat_plugin.pruning.prune import pruned_layers
        assert keras.backend.backend() == "jax"
        rng = np.random.default_rng(0)
        x = rng.random((64, 8, 8, 4), dtype=np.float32)
        y = rng.integers(0, 4, 64)
        model = keras.Sequential([
            keras.Input((8, 8, 4)), keras.layers.Conv2D(8, 3, use_bias=False),
            keras.layers.BatchNormalization(), keras.layers.ReLU(),
            keras.layers.Flatten(), keras.layers.Dense(4)])
        qat = qat_plugin.quantize_model(qat_plugin.prune_model(model, structure="2:4"))
        qat.compile(keras.optimizers.SGD(0.05, momentum=0.9),
                    keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        qat.fit(x, y, batch_size=16, epochs=2, verbose=0, callbacks=[PruningScheduler()])
        for layer in pruned_layers(qat):
            mask = keras.ops.convert_to_numpy(layer.masks[0])
            kernel = keras.ops.convert_to_numpy(layer.layer.kernel)
            assert (mask == 0).mean() == 0.5 and np.all(kernel[mask == 0] == 0)
        qat.save({str(path)!r})
        print("OK")
        """,
        KERAS_BACKEND="jax",
    )
    report = qat_plugin.inspect_tflite(qat_plugin.export_tflite(keras.models.load_model(path)))
    assert report.is_fully_int8 and len(report.weights) == 2
    assert all(w.is_2_4 and w.zero_fraction >= 0.5 for w in report.weights)
