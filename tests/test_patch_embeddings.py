"""keras-hub's ViT and DeiT patch embeddings: fully int8, as the converter's PTQ.

Real converter and LiteRT, tiny models (16x16x3 images, patch 4 or 8,
width 8). Measured here (TF 2.21): PTQ of ViTPatchingAndEmbedding is
CONV_2D (kernel per channel), SHAPE, STRIDED_SLICE, PACK, RESHAPE, PACK,
TILE, CONCATENATION, ADD (9 ops; DeiT's two tokens a second TILE), the
conv output, the tokens and the CONCATENATION on one scale, the position
table int8 per tensor over its own range, the ADD with its own scale. The
QAT export reshapes to a constant shape: CONV_2D, RESHAPE, SHAPE,
STRIDED_SLICE, PACK, TILE, CONCATENATION, ADD (8 ops; 3 without a class
token), with the same scales.
"""

import keras
import keras_hub  # noqa: F401  (the registry's keras-hub rows)
import numpy as np
import pytest
from keras_hub.src.models.deit.deit_layers import DeiTEmbeddings
from keras_hub.src.models.vit.vit_layers import ViTPatchingAndEmbedding

import qat_plugin
from qat_plugin import registry
from qat_plugin.errors import UnsupportedLayerError
from qat_plugin.layers import PatchEmbedding, QuantizedPatchEmbedding
from qat_plugin.layers.patch_embedding import patch_embedding_like
from qat_plugin.tflite.interpreter import TFLiteModel
from tests.conftest import assert_keras_round_trip, assert_parity, images, qat_fit

L = keras.layers
SHAPE = (16, 16, 3)
WIDTH = 8


def vit(patch=4, **kwargs):
    return ViTPatchingAndEmbedding((16, 16), (patch, patch), WIDTH, name="embed", **kwargs)


def deit(patch=4, **kwargs):
    return DeiTEmbeddings((16, 16), (patch, patch), WIDTH, name="embed", **kwargs)


EMBEDDINGS = {
    "vit": vit,
    "vit_patch8": lambda: vit(8),
    "vit_no_class_token": lambda: vit(8, use_class_token=False),
    "deit": deit,
}


def _trained_looking(embed):
    """Tokens that are not zeros (DeiT initializes them to zeros)."""
    rng = np.random.default_rng(3)
    for name in ("class_token", "distillation_token"):
        token = getattr(embed, name, None)
        if token is not None and getattr(embed, "use_class_token", True):
            token.assign(0.5 * rng.normal(size=token.shape))


def model_with(make, head="gap"):
    inputs = keras.Input(SHAPE)
    embed = make()
    x = embed(inputs)
    _trained_looking(embed)
    if head == "embedding":
        return keras.Model(inputs, x)
    x = L.LayerNormalization()(x) if head == "ln" else L.GlobalAveragePooling1D()(x)
    return keras.Model(inputs, L.Dense(4)(x))


def data(n=64):
    return images(n, SHAPE)


def test_both_classes_have_the_patch_embedding_policy():
    for make in (vit, deit):
        assert registry.policy_for(make()) == registry.PATCH_EMBEDDING


def test_the_float_copy_computes_what_the_keras_hub_layer_computes():
    x, _ = data(8)
    for make in EMBEDDINGS.values():
        model = model_with(make, head="embedding")
        copy, weights = patch_embedding_like(model.get_layer("embed"))
        copy.build((None,) + SHAPE)
        copy.set_weights(weights())
        np.testing.assert_allclose(
            keras.ops.convert_to_numpy(copy(x)), model.predict(x, verbose=0), atol=1e-6
        )


def _concatenation_shares_one_scale(report, num_tokens):
    concat = [op for op in report.ops if op.name == "CONCATENATION"]
    if not num_tokens:
        return not concat
    concat, = concat
    scales = {t.scales for t in concat.inputs + concat.outputs}
    conv, = [op for op in report.ops if op.name == "CONV_2D"]
    return scales == {conv.outputs[0].scales} and len(conv.inputs[1].scales) == WIDTH


@pytest.mark.tf_only
@pytest.mark.parametrize(
    "kind, head",
    [("vit", "gap"), ("vit", "ln"), ("vit_patch8", "gap"), ("vit_no_class_token", "gap"),
     ("deit", "gap"), ("deit", "ln")],
)
def test_patch_embedding_is_fully_int8_with_no_more_ops_than_ptq(kind, head):
    model = model_with(EMBEDDINGS[kind], head)
    x, _ = data()
    ptq = qat_plugin.inspect_tflite(
        qat_plugin.export_tflite(model, mode="int8", representative_data=x)
    )
    qat = qat_plugin.quantize_model(model)
    assert isinstance(qat.get_layer("embed"), QuantizedPatchEmbedding)
    qat_plugin.calibrate(qat, x)
    tflite = qat_plugin.export_tflite(qat)
    report = qat_plugin.inspect_tflite(tflite)
    assert report.is_fully_int8 and not report.conversion_ops, report.summary()
    assert len(report.ops) <= len(ptq.ops)
    # SUB: LayerNormalization's `x - mean` (tests/test_layer_normalization.py).
    assert set(report.op_counts) <= set(ptq.op_counts) | {"SUB"}
    num_tokens = qat.get_layer("embed").layer.num_tokens
    assert _concatenation_shares_one_scale(report, num_tokens)
    # Pooling and Dense: within a step; LayerNormalization's chain of nine
    # requantizing ops: within its own bound (3 steps).
    assert_parity(qat, tflite, x, max_steps=1.0 if head == "gap" else 3.0)


@pytest.mark.tf_only
@pytest.mark.parametrize("kind", ["vit", "deit"])
def test_the_embedding_output_is_the_int8_graph_s(kind):
    model = model_with(EMBEDDINGS[kind], head="embedding")
    x, _ = data()
    qat = qat_plugin.quantize_model(model)
    qat_plugin.calibrate(qat, x)
    tflite = qat_plugin.export_tflite(qat)
    report = qat_plugin.inspect_tflite(tflite)
    assert [op.name for op in report.ops] == [
        "CONV_2D", "RESHAPE", "SHAPE", "STRIDED_SLICE", "PACK", "TILE",
        "CONCATENATION", "ADD"]
    tile, = [op for op in report.ops if op.name == "TILE"]
    add, = [op for op in report.ops if op.name == "ADD"]
    tokens, table = tile.inputs[0], add.inputs[1]
    # The tokens: int8 constants on the CONCATENATION's grid.
    assert tokens.dtype == "int8" and tokens.shape[1] == (2 if kind == "deit" else 1)
    assert tokens.scales == add.inputs[0].scales
    # The table: int8 per tensor over its own range.
    positions = qat.get_layer("embed").layer.positions.numpy()
    low, high = min(positions.min(), 0.0), max(positions.max(), 0.0)
    assert table.dtype == "int8" and len(table.scales) == 1
    np.testing.assert_allclose(table.scales[0], (high - low) / 255, rtol=1e-4)
    # Measured: every value equal but one of 8704 (ViT), 2 steps off (a
    # tie rounded apart in the requantized conv output, then in the ADD).
    assert_parity(qat, tflite, x, max_steps=2.0)
    steps = np.abs(qat.predict(x, verbose=0) - TFLiteModel(tflite).predict(x)) / (
        add.outputs[0].scales[0])
    assert np.mean(steps < 0.5) >= 0.999


@pytest.mark.parametrize("kind", ["vit", "deit"])
def test_weights_are_copied_and_the_untrained_qat_model_matches_the_float_one(kind):
    model = model_with(EMBEDDINGS[kind], head="embedding")
    x, _ = data(32)
    qat = qat_plugin.quantize_model(model)
    layer = qat.get_layer("embed").layer
    _, weights = patch_embedding_like(model.get_layer("embed"))
    for got, want in zip(layer.get_weights(), weights()):
        np.testing.assert_array_equal(got, want)
    assert len(layer.trainable_weights) == 4  # tokens, table, kernel, bias
    want = model.predict(x, verbose=0)
    # Unobserved ranges: only the kernel and the table are on their grids.
    np.testing.assert_allclose(qat.predict(x, verbose=0), want, atol=0.02)
    qat_plugin.calibrate(qat, x)
    steps = np.abs(qat.predict(x, verbose=0) - want) / (np.ptp(want) / 255)
    assert steps.max() <= 3.0


@pytest.mark.tf_only
def test_training_moves_every_weight_and_the_export_follows():
    model = model_with(deit)
    x, y = data()
    qat = qat_fit(model, x, y, epochs=2)
    trained = qat.get_layer("embed").layer
    _, float_weights = patch_embedding_like(model.get_layer("embed"))
    for got, before in zip(trained.get_weights(), float_weights()):
        assert np.abs(got - before).max() > 0
    assert_parity(qat, qat_plugin.export_tflite(qat), x, max_steps=1.0)


@pytest.mark.parametrize("kind", ["vit", "deit"])
def test_qat_model_round_trips_through_keras_file(kind, tmp_path):
    model = model_with(EMBEDDINGS[kind], head="ln")
    x, _ = data(32)
    qat = qat_plugin.quantize_model(model)
    qat_plugin.calibrate(qat, x)
    restored = assert_keras_round_trip(qat, x, tmp_path / "qat.keras")
    assert type(restored.get_layer("embed")) is QuantizedPatchEmbedding
    assert isinstance(restored.get_layer("embed").layer, PatchEmbedding)


def test_channels_first_is_refused_with_a_clear_error():
    inputs = keras.Input((3, 16, 16))
    x = vit(data_format="channels_first")(inputs)
    model = keras.Model(inputs, L.GlobalAveragePooling1D()(x))
    with pytest.raises(UnsupportedLayerError, match="channels_last"):
        qat_plugin.quantize_model(model)
