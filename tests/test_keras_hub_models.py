"""keras-hub backbones through quantize_model with no `skip=`: int8 inside.

Random weights from constructor arguments (presets download). Each is
compared with the converter's PTQ export of the float model: no float op
the QAT export keeps that PTQ does not (PTQ keeps LayerNormalization's NEG
float), no more ops, and parity with LiteRT. keras-hub is a `dev` extra.
"""

import keras
import numpy as np
import pytest

import qat_plugin

keras_hub = pytest.importorskip("keras_hub")
H = keras_hub.models
L = keras.layers
SEQUENCE = 12

pytestmark = pytest.mark.slow


def _pooled(inputs, sequence):
    return keras.Model(inputs, L.Dense(4)(L.GlobalAveragePooling1D()(sequence)))


def bert():
    backbone = H.BertBackbone(vocabulary_size=50, num_layers=1, num_heads=2, hidden_dim=8,
                              intermediate_dim=16, max_sequence_length=SEQUENCE)
    names = ["token_ids", "segment_ids", "padding_mask"]
    inputs = {n: keras.Input((SEQUENCE,), dtype="int32", name=n) for n in names}
    return _pooled(inputs, backbone(inputs)["sequence_output"])


def whisper_encoder():
    backbone = H.WhisperBackbone(vocabulary_size=50, num_layers=1, num_heads=2,
                                 hidden_dim=8, intermediate_dim=16, num_mels=4,
                                 max_encoder_sequence_length=2 * SEQUENCE,
                                 max_decoder_sequence_length=4)
    encoder = keras.Model(backbone.input["encoder_features"],
                          backbone.output["encoder_sequence_output"])
    inputs = keras.Input((2 * SEQUENCE, 4))
    return _pooled(inputs, encoder(inputs))


def deit():
    backbone = H.DeiTBackbone(image_shape=(16, 16, 3), patch_size=8, num_layers=1,
                              num_heads=2, hidden_dim=8, intermediate_dim=16)
    inputs = keras.Input((16, 16, 3))
    return _pooled(inputs, backbone(inputs))


def mit():
    backbone = H.MiTBackbone(
        layerwise_depths=[1, 1], num_layers=2, layerwise_num_heads=[1, 2],
        layerwise_sr_ratios=[2, 1], max_drop_path_rate=0.0, hidden_dims=[8, 16],
        image_shape=(32, 32, 3), layerwise_patch_sizes=[7, 3], layerwise_strides=[4, 2])
    inputs = keras.Input((32, 32, 3))
    return keras.Model(inputs, L.Dense(4)(L.GlobalAveragePooling2D()(backbone(inputs))))


def mobilenet_v3():
    backbone = H.MobileNetBackbone(
        stackwise_expansion=[[1], [4]], stackwise_num_blocks=[1, 1],
        stackwise_num_filters=[[8], [16]], stackwise_kernel_size=[[3], [3]],
        stackwise_num_strides=[[2], [2]], stackwise_se_ratio=[[0.25], [None]],
        stackwise_activation=[["relu"], ["hard_swish"]], stackwise_padding=[[1], [1]],
        output_num_filters=16, depthwise_filters=8, depthwise_stride=2,
        depthwise_residual=False, squeeze_and_excite=0.5, last_layer_filter=16,
        image_shape=(32, 32, 3))
    inputs = keras.Input((32, 32, 3))
    return keras.Model(inputs, L.Dense(4)(L.GlobalAveragePooling2D()(backbone(inputs))))


def _data(model, count=16):
    rng = np.random.default_rng(0)
    if model.inputs[0].dtype != "int32":
        shape = (count,) + tuple(model.inputs[0].shape[1:])
        return rng.normal(size=shape).astype("float32")
    data = {}
    for tensor in model.inputs:
        values = rng.integers(1, 50, (count, SEQUENCE)).astype("int32")
        if "mask" in tensor.name:
            values = np.ones_like(values)
            values[:, -3:] = 0
        elif "segment" in tensor.name:
            values = np.zeros_like(values)
        data[tensor.name] = values
    return data


@pytest.mark.parametrize("make", [bert, whisper_encoder, deit, mit, mobilenet_v3],
                         ids=["bert", "whisper_encoder", "deit", "mit", "mobilenet_v3"])
def test_keras_hub_backbone_quantizes_with_no_more_float_ops_or_ops_than_ptq(make):
    model = make()
    x = _data(model)
    qat = qat_plugin.quantize_model(model)
    qat_plugin.calibrate(qat, x, batch_size=8)
    data = qat_plugin.export_tflite(qat)
    report = qat_plugin.inspect_tflite(data)
    ptq = qat_plugin.inspect_tflite(
        qat_plugin.export_tflite(model, mode="int8", representative_data=x))
    qat_float = {op.name for op in report.float_ops}
    assert qat_float <= {op.name for op in ptq.float_ops}
    assert not qat_float and not report.conversion_ops, report.summary()
    assert len(report.ops) <= len(ptq.ops)
    parity = qat_plugin.measure_parity(qat, data, x)
    assert parity.agreement[0] >= 0.9
