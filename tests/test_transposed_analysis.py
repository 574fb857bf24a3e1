"""Pruning and the layer-wise analysis on models with Conv2DTranspose.

Real converter and LiteRT, tiny models.
"""

import keras
import numpy as np
import pytest

import qat_plugin
from qat_plugin.analysis.layerwise import layerwise_error
from qat_plugin.pruning.prune import pruned_layers
from qat_plugin.sparsity import ConstantSparsity
from tests.conftest import images
from tests.test_transposed_conv import unet_block


def _fit(model, x, y, epochs=1):
    model.compile(keras.optimizers.Adam(1e-3),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x, y, epochs=epochs, batch_size=32, verbose=0)
    return model


@pytest.mark.parametrize("structure", ["unstructured", "2:4"])
def test_pruning_a_transposed_conv_holds_through_training_and_export(structure):
    x, y = images(64, (12, 12, 1))
    pruned = qat_plugin.prune_model(
        unet_block(), structure=structure,
        schedule=ConstantSparsity(0.5, begin_step=0, end_step=0),
    )
    assert "up" in {layer.name for layer in pruned_layers(pruned)}
    _fit(pruned, x, y)
    up = pruned.get_layer("up")
    kernel = keras.ops.convert_to_numpy(up.layer.kernel)
    assert (kernel == 0).mean() == pytest.approx(0.5, abs=0.05)
    qat = qat_plugin.quantize_model(pruned, recipe="int8")
    qat_plugin.calibrate(qat, x)
    report = qat_plugin.inspect_tflite(qat_plugin.export_tflite(qat))
    assert report.is_fully_int8
    transposed = [w for w in report.weights if w.op == "TRANSPOSE_CONV"]
    assert len(transposed) == 1
    assert transposed[0].zero_fraction >= 0.45


def test_layerwise_error_rows_for_a_transposed_conv():
    x, y = images(64, (12, 12, 1))
    model = _fit(unet_block(), x, y)
    qat = qat_plugin.quantize_model(model)
    qat_plugin.calibrate(qat, x)
    data = qat_plugin.export_tflite(qat)
    # Against the QAT model the row is the transposed conv's own layer;
    # against the float model, the last layer of its fused chain
    # (Conv2DTranspose -> BatchNormalization -> ReLU), as for any conv.
    for reference, layer in ((qat, "up"), (model, "re_lu_1")):
        report = layerwise_error(reference, data, x, max_samples=32)
        rows = [row for row in report.rows if row.op == "TRANSPOSE_CONV"]
        assert [row.layer for row in rows] == [layer]
        assert rows[0].dtype == "int8"
        assert np.isfinite(rows[0].sqnr_db) and rows[0].sqnr_db > 15
