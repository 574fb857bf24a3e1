"""Deployment targets: cpu (XNNPACK), gpu, mcu (TFLM op set, arena plan), export checks.

The mcu checks that run TensorFlow Lite Micro itself are in test_micro.py.
"""

import warnings

import keras
import numpy as np
import pytest

import qat_plugin
from qat_plugin.errors import ExportError
from qat_plugin.tflite.flatbuffer import read_graph
from qat_plugin.tflite.arena import ARENA_ALIGNMENT, arena_plan
from qat_plugin.tflite.mcu_target import check_mcu
from qat_plugin.tflite.micro import TFLM_BUILTIN_OPS
from qat_plugin.tflite.targets import check_target, xnnpack_partition


def observed(qat, shape, seed=0):
    """Runs one training call so the activation ranges are observed."""
    x = np.random.default_rng(seed).random((8,) + shape, dtype=np.float32)
    qat(x, training=True)
    return qat


def small_int8(recipe="int8"):
    """Conv 3x3 valid (6x6x2 -> 4x4x4) -> MaxPool 2 -> GAP -> Dense 3."""
    model = keras.Sequential([
        keras.Input((6, 6, 2)),
        keras.layers.Conv2D(4, 3),
        keras.layers.MaxPooling2D(2),
        keras.layers.GlobalAveragePooling2D(),
        keras.layers.Dense(3),
    ])
    return qat_plugin.export_tflite(
        observed(qat_plugin.quantize_model(model, recipe), (6, 6, 2))
    )


def test_arena_matches_a_hand_computed_plan():
    data = small_int8()
    report = qat_plugin.inspect_tflite(data, targets=("mcu",))
    assert [op.name for op in report.ops] == [
        "CONV_2D", "MAX_POOL_2D", "MEAN", "FULLY_CONNECTED"]
    plan = report.target("mcu").arena
    # int8 activations, batch 1: input 6*6*2 = 72 B, conv 4*4*4 = 64 B,
    # pool 2*2*4 = 16 B, mean 4 B, dense 3 B. Live while each op runs:
    # conv 72 + 64 = 136, pool 64 + 16 = 80, mean 16 + 4 = 20, dense 4 + 3 = 7.
    assert plan.peak_live_bytes == 136
    # TFLM's int8 MEAN asks for three scratch buffers while it runs (op 2):
    # 4 int32 accumulators (16 B), the input rank (4 int32, 16 B) and the 2
    # axes (8 B). TFLM's greedy plan: 16-byte aligned, largest first, the
    # later buffer first among equals, each at the lowest offset free during
    # its lifetime: input [0, 80) at op 0; conv output [80, 144) at ops 0-1;
    # the scratch buffers [0, 16), [16, 32), [32, 48) at op 2; dense [0, 16)
    # at op 3; mean [48, 64) at ops 2-3; pool [64, 80) at ops 1-2.
    # Arena: 144 B, as TFLM's print_allocations() says (test_micro.py).
    assert plan.arena_bytes == 144
    placed = sorted((size, first, last, offset)
                    for _, _, size, first, last, offset in plan.tensors)
    assert placed == [(3, 3, 3, 0), (4, 2, 3, 48), (8, 2, 2, 0), (16, 1, 2, 64),
                      (16, 2, 2, 16), (16, 2, 2, 32), (64, 0, 1, 80), (72, 0, 0, 0)]
    assert ARENA_ALIGNMENT == 16
    # Weights: conv 4*3*3*2 int8 + 4 int32 bias, MEAN axes (2 int32),
    # dense 3*4 int8 (the converter leaves out its all-zero, untrained bias).
    assert plan.weight_bytes == 72 + 16 + 8 + 12
    assert plan == arena_plan(data)


def test_mcu_target_names_an_op_outside_the_tflm_op_set():
    model = keras.Sequential([
        keras.Input((6, 6, 2)), keras.layers.Conv2D(4, 3),
        keras.layers.Activation("gelu"), keras.layers.GlobalAveragePooling2D(),
        keras.layers.Dense(3),
    ])
    qat = observed(qat_plugin.quantize_model(model), (6, 6, 2))
    data = qat_plugin.export_tflite(qat)
    assert "GELU" not in TFLM_BUILTIN_OPS
    estimate = check_mcu(data, use_runtime=False)
    assert ("GELU", "not in TensorFlow Lite Micro's builtin op set") in estimate.offending
    assert estimate.notes[0].startswith("estimate (TensorFlow Lite Micro not installed")
    check = check_target(data, "mcu")  # the runtime's own op lookup, when installed
    assert not check.compatible and "GELU" in [op for op, _ in check.offending]
    assert check_target(data, "cpu").compatible
    with pytest.raises(ExportError, match=r"does not meet target 'mcu'(.|\n)*- GELU: not"):
        qat_plugin.export_tflite(qat, target="mcu")


def test_a_failing_target_writes_nothing(tmp_path):
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    path = tmp_path / "model.tflite"
    with pytest.raises(ExportError, match="float32"):
        qat_plugin.export_tflite(model, path, target="mcu")
    assert not path.exists()


def test_mcu_takes_int16x8_as_tflm_does_and_gpu_refuses_it():
    data = small_int8("int16x8")
    assert {"int16", "int64"} <= set(read_graph(data).dtypes)  # int64 biases
    assert check_mcu(data, use_runtime=False).offending == ()
    gpu = check_target(data, "gpu")
    assert not gpu.compatible and "int16" in gpu.offending[0][1]


def test_cpu_reports_what_xnnpack_takes():
    delegated, left = xnnpack_partition(small_int8())
    assert delegated == ["CONV_2D", "MAX_POOL_2D", "MEAN", "FULLY_CONNECTED"]
    assert left == []
    # XNNPACK has no int16x8 kernels: everything stays on TFLite's own.
    delegated, left = xnnpack_partition(small_int8("int16x8"))
    assert delegated == [] and len(left) == 4
    check = check_target(small_int8("int16x8"), "cpu")
    assert check.compatible and "XNNPACK delegates 0 of 4 ops" in check.notes[0]


def test_gpu_check_passes_an_int8_model():
    check = check_target(small_int8(), "gpu")
    assert check.compatible, check.summary()


def test_unknown_target_is_refused():
    with pytest.raises(ValueError, match="one of"):
        check_target(small_int8(), "tpu")
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    with pytest.raises(ValueError, match="target must be None or one of"):
        qat_plugin.export_tflite(model, target="npu")


@keras.saving.register_keras_serializable(package="qat_plugin_tests")
class CumulativeProduct(keras.layers.Layer):
    """A layer whose op (tf.Cumprod) has no TFLite builtin."""

    def call(self, x):
        return keras.ops.cumprod(x, axis=-1)


def test_float_island_without_builtin_ops_needs_select_tf_ops():
    model = keras.Sequential([
        keras.Input((6,)), keras.layers.Dense(4),
        CumulativeProduct(name="cumprod"), keras.layers.Dense(2),
    ])
    qat = observed(qat_plugin.quantize_model(model, skip=["cumprod"]), (6,))
    with pytest.raises(ExportError, match=r"Cumprod(.|\n)*allow_select_tf_ops=True"):
        qat_plugin.export_tflite(qat)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        data = qat_plugin.export_tflite(qat, allow_select_tf_ops=True, target="cpu")
    (warning,) = [w for w in caught if "Select TF ops" in str(w.message)]
    assert "FlexCumprod" in str(warning.message)
    assert f"the file is {len(data)} bytes" in str(warning.message)
    assert "Flex delegate" in str(warning.message)
    for target in ("gpu", "mcu"):
        check = check_target(data, target)
        assert not check.compatible
        assert "FlexCumprod" in [op for op, _ in check.offending]
    assert not check_target(data, "cpu").compatible  # Flex not allowed there


def test_cli_inspect_reports_targets(tmp_path, capsys):
    import json

    from qat_plugin.cli import main

    path = tmp_path / "model.tflite"
    path.write_bytes(small_int8())
    assert main(["inspect", str(path), "--target", "mcu", "--target", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "mcu: compatible" in out and "\n  arena: " in out
    assert "  0 CONV_2D                   136 B <- peak: input_layer 72" in out
    assert "XNNPACK delegates 4 of 4 ops" in out
    assert main(["inspect", str(path), "--target", "mcu", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["targets"]["mcu"]["compatible"] is True


def test_cli_inspect_checks_an_arena_limit(tmp_path, capsys):
    from qat_plugin.cli import main

    path = tmp_path / "model.tflite"
    path.write_bytes(small_int8())
    needed = check_target(path, "mcu").arena_bytes  # TFLM's, or the estimate
    assert main(["inspect", str(path), "--arena", str(needed)]) == 0
    assert "mcu: compatible" in capsys.readouterr().out
    assert main(["inspect", str(path), "--arena", str(needed - 1)]) == 1
    out = capsys.readouterr().out
    assert "mcu: NOT compatible" in out
    assert f"- arena: needs {needed} bytes, over the limit of {needed - 1}" in out
    with pytest.raises(ValueError, match="arena_limit applies to target 'mcu'"):
        qat_plugin.inspect_tflite(path, targets="cpu", arena_limit=100)


def test_int16x8_concatenate_is_refused_before_training_with_a_way_out():
    inputs = keras.Input((6, 6, 2))
    a = keras.layers.Conv2D(4, 3, padding="same")(inputs)
    b = keras.layers.Conv2D(4, 1)(inputs)
    x = keras.layers.Concatenate(name="join")([a, b])
    model = keras.Model(inputs, keras.layers.Dense(3)(keras.layers.GlobalAveragePooling2D()(x)))
    with pytest.raises(qat_plugin.errors.UnsupportedLayerError,
                       match=r"Layer 'join' concatenates 16-bit(.|\n)*recipe 'int8'(.|\n)*"
                             r"mode='int16x8'"):
        qat_plugin.quantize_model(model, "int16x8")
    observed(qat_plugin.quantize_model(model, "int8"), (6, 6, 2))  # 8-bit converts
    # The way out the message names: the converter's int16x8 PTQ converts it.
    x = np.random.default_rng(0).random((8, 6, 6, 2), dtype=np.float32)
    data = qat_plugin.export_tflite(model, mode="int16x8", representative_data=x,
                                    calibration_steps=8)
    assert "CONCATENATION" in read_graph(data).op_names
    assert check_target(data, "mcu").compatible
