"""The mcu target on TensorFlow Lite Micro itself (the `mcu` extra, `tflite-micro`).

Every test here runs the real runtime; without the wheel (no aarch64 or
macOS build) they are skipped, and pytest -rs prints why.
"""

import re
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest

pytest.importorskip(
    "tflite_micro",
    reason="tflite-micro: no wheel for this machine (pip install 'qat-plugin[mcu]' "
    "where one exists); the TensorFlow Lite Micro tests are skipped",
)

import qat_plugin  # noqa: E402
from qat_plugin.errors import ExportError  # noqa: E402
from qat_plugin.tflite.arena import arena_plan  # noqa: E402
from qat_plugin.tflite.mcu_target import check_mcu  # noqa: E402
from qat_plugin.tflite.micro import (  # noqa: E402
    TFLM_BUILTIN_OPS,
    micro_builtin_ops,
    run_micro,
    sample_inputs,
)
from qat_plugin.tflite.targets import check_target  # noqa: E402

layers = keras.layers

# Loads a model in TFLM with a given arena, runs one zero input and prints
# TFLM's own allocation report to stderr: an independent reading of what the
# runtime allocates (no qat_plugin code involved).
_TFLM_SCRIPT = """
import sys, numpy as np
from tflite_micro import runtime
data = open(sys.argv[1], "rb").read()
interpreter = runtime.Interpreter.from_bytes(data, arena_size=int(sys.argv[2]))
detail = interpreter.get_input_details(0)
interpreter.set_input(np.zeros(detail["shape"], detail["dtype"]), 0)
interpreter.invoke()
interpreter.print_allocations()
"""


def tflm(path, arena):
    """Runs `_TFLM_SCRIPT` in a fresh process; returns (exit code, stderr)."""
    done = subprocess.run([sys.executable, "-c", _TFLM_SCRIPT, str(path), str(arena)],
                          capture_output=True, text=True, timeout=120)
    return done.returncode, done.stderr


def observed(qat, shape, seed=0):
    x = np.random.default_rng(seed).random((16,) + shape, dtype=np.float32)
    qat(x, training=True)
    return qat


def tiny_cnn():
    """Conv, depthwise, a residual ADD, average pooling, Dense and softmax."""
    inputs = keras.Input((8, 8, 2))
    x = layers.Conv2D(4, 3, padding="same", activation="relu")(inputs)
    y = layers.DepthwiseConv2D(3, padding="same", activation="relu")(x)
    x = layers.Add()([x, y])
    x = layers.AveragePooling2D(2)(x)
    x = layers.GlobalAveragePooling2D()(x)
    outputs = layers.Dense(3, activation="softmax")(x)
    return keras.Model(inputs, outputs)


def export(model, recipe="int8-mcu", **kwargs):
    qat = observed(qat_plugin.quantize_model(model, recipe), tuple(model.input_shape[1:]))
    return qat, qat_plugin.export_tflite(qat, **kwargs)


@pytest.fixture(scope="module")
def cnn_file(tmp_path_factory):
    _, data = export(tiny_cnn())
    path = tmp_path_factory.mktemp("micro") / "cnn.tflite"
    path.write_bytes(data)
    return path


def test_the_op_list_is_the_wheels_registrations():
    assert micro_builtin_ops() == TFLM_BUILTIN_OPS
    assert {"BATCH_MATMUL", "SUM", "DIV", "SELECT_V2", "LOG_SOFTMAX"} <= TFLM_BUILTIN_OPS
    assert "GELU" not in micro_builtin_ops()


def test_report_arena_is_the_arena_tflm_allocates(cnn_file):
    check = check_target(cnn_file, "mcu")
    assert check.compatible, check.summary()
    run = check.micro
    code, log = tflm(cnn_file, 1 << 20)
    assert code == 0, log
    total = int(re.search(r"Arena allocation total (\d+) bytes", log).group(1))
    head = int(re.search(r"Arena allocation head (\d+) bytes", log).group(1))
    assert run.arena_bytes == total and run.head_bytes == head
    assert f"arena: {total} bytes allocated by TFLM" in check.summary()
    # The offline plan of the activations is TFLM's head, byte for byte.
    assert check.arena.arena_bytes == head
    # The smallest arena runs; one byte less does not (an error or a crash).
    assert tflm(cnn_file, run.smallest_arena_bytes)[0] == 0
    assert tflm(cnn_file, run.smallest_arena_bytes - 1)[0] != 0
    assert run.smallest_arena_bytes >= total - 16  # alignment slack at most
    assert check.arena_bytes == run.smallest_arena_bytes
    assert "TensorFlow Lite Micro 0.dev" in check.summary()
    assert run.seconds_per_inference > 0 and run.relative_latency > 0


def test_outputs_are_bit_exact_with_litert_reference_kernels(cnn_file):
    run = run_micro(cnn_file, num_samples=16)
    assert run.runs and run.num_samples == 16
    assert run.max_diff_steps == 0 and run.bit_exact
    assert "bit-exact with LiteRT's reference kernels on 8 random inputs" in (
        check_target(cnn_file, "mcu").summary())


def test_export_under_arena_limit_starts_in_tflm_with_that_arena(tmp_path):
    qat, data = export(tiny_cnn())
    needed = check_target(data, "mcu").micro.smallest_arena_bytes
    path = tmp_path / "fits.tflite"
    qat_plugin.export_tflite(qat, path, target="mcu", arena_limit=needed)
    assert tflm(path, needed)[0] == 0
    refused = tmp_path / "refused.tflite"
    with pytest.raises(ExportError, match=(
        rf"- arena: needs {needed} bytes, over the limit of {needed - 1}; the peak "
        r"is at op \d+ \((CONV_2D|DEPTHWISE_CONV_2D|ADD)\) with '.+' \(\d+ B\)"
    )):
        qat_plugin.export_tflite(qat, refused, target="mcu", arena_limit=needed - 1)
    assert not refused.exists()


def test_arena_limit_belongs_to_the_mcu_target():
    model = keras.Sequential([keras.Input((4,)), layers.Dense(2)])
    with pytest.raises(ValueError, match="arena_limit applies to target='mcu'"):
        qat_plugin.export_tflite(model, target="cpu", arena_limit=1000)
    with pytest.raises(ValueError, match="arena_limit applies to target='mcu'"):
        qat_plugin.export_tflite(model, arena_limit=1000)
    with pytest.raises(ValueError, match="positive number of bytes"):
        check_target(qat_plugin.export_tflite(model), "mcu", arena_limit=-5)


def test_estimate_is_at_or_above_what_tflm_needs(cnn_file):
    mlp = keras.Sequential([keras.Input((20,)), layers.Dense(16, activation="relu"),
                            layers.Dense(4)])
    for data in (cnn_file.read_bytes(), export(mlp)[1]):
        run, plan = run_micro(data), arena_plan(data)
        assert plan.arena_bytes == run.head_bytes
        assert plan.estimated_bytes >= max(run.arena_bytes, run.smallest_arena_bytes)
        # ... and not far above it (within a quarter on these tiny models).
        assert plan.estimated_bytes <= 1.25 * max(run.arena_bytes, run.smallest_arena_bytes)


def test_an_op_tflm_does_not_register_is_refused_by_the_runtime():
    model = keras.Sequential([keras.Input((6,)), layers.Dense(4),
                              layers.Activation("gelu"), layers.Dense(2)])
    _, data = export(model, recipe="int8")
    check = check_target(data, "mcu")
    assert ("GELU", "not registered in TensorFlow Lite Micro (the runtime's own op "
            "resolver)") in check.offending
    assert not check.micro.runs and check.micro.missing_ops == ("GELU",)


def test_int16x8_runs_in_tflm_within_two_steps_of_litert():
    model = keras.Sequential([keras.Input((12,)), layers.Dense(8, activation="relu"),
                              layers.Dense(3)])
    _, data = export(model, recipe="int16x8")
    assert [x.dtype.name for x in sample_inputs(data)] == ["int16"]
    check = check_target(data, "mcu")
    assert check.compatible, check.summary()
    # Measured: TFLM's int16 FULLY_CONNECTED rounds some requantized values
    # one step away from LiteRT's reference kernel (about 1 value in 10 of
    # the first layer); the second layer compounds it to 2 steps of 65536.
    # The report says so instead of calling it bit-exact.
    run = check.micro
    assert run.runs and 0 < run.max_diff_steps <= 2
    assert (f"differ from LiteRT's reference kernels by up to {run.max_diff_steps} steps"
            in check.summary())
    assert check_mcu(data, use_runtime=False).offending == ()


def test_a_crash_in_tflm_stays_in_the_worker(cnn_file):
    # Too small an arena crashes TFLM (SIGSEGV) at some sizes; the worker
    # tries each size in a forked child, so a crash costs one try.
    crash = next(size for size in range(16, 4096, 16) if tflm(cnn_file, size)[0] < 0)
    run = run_micro(cnn_file, arena=crash)
    assert run.runs and run.smallest_arena_bytes == run_micro(cnn_file).smallest_arena_bytes


@pytest.mark.slow
def test_estimate_covers_tflm_on_the_mlperf_tiny_models():
    # The four architectures of benchmarks/mcu.py, untrained, QAT-exported
    # with the ranges of one observed batch (benchmarks/mcu.py trains them).
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import mcu

    for builder in mcu.MODELS:
        _, data = export(builder())
        run, plan = run_micro(data, num_samples=2), arena_plan(data)
        assert run.bit_exact, model.name
        assert plan.arena_bytes == run.head_bytes, model.name
        assert plan.estimated_bytes >= max(run.arena_bytes, run.smallest_arena_bytes), model.name
