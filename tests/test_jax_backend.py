"""QAT on JAX computes what it computes on TensorFlow, and exports through TensorFlow.

The same case (`backend_case.run_case`: same NumPy initial weights, same
batches, every schedule switch inside the run) trains once on TensorFlow
and once on the other backend: JAX when pytest runs on TensorFlow, else the
backend pytest runs with (JAX, or torch where it is installed). The run on
pytest's own backend happens in this process, the other in a child process,
so this file runs unchanged under any `KERAS_BACKEND`.
"""

import os
import subprocess
import sys

import keras
import numpy as np
import pytest

import qat_plugin
from qat_plugin.tflite.convert import export_on_tensorflow
from qat_plugin.tflite.tensorflow_process import run_on_tensorflow
from tests import backend_case
from tests.tflite_parity import compare_tflite

pytestmark = pytest.mark.slow

HERE = os.path.dirname(os.path.abspath(__file__))
# The backend compared with TensorFlow.
OTHER = "jax" if keras.backend.backend() == "tensorflow" else keras.backend.backend()


def _run_case(backend, out_dir, other_model=None):
    if backend == keras.backend.backend():
        backend_case.run_case(out_dir, other_model)
        return
    command = [sys.executable, os.path.join(HERE, "backend_case.py"), out_dir]
    if other_model is not None:
        command.append(other_model)
    completed = subprocess.run(
        command,
        env=dict(os.environ, KERAS_BACKEND=backend),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert completed.returncode == 0, completed.stderr[-4000:]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Trains on `OTHER`, then on TensorFlow (which also exports OTHER's file)."""
    pytest.importorskip(OTHER)
    folders = {b: str(tmp_path_factory.mktemp(b)) for b in (OTHER, "tensorflow")}
    _run_case(OTHER, folders[OTHER])
    _run_case(
        "tensorflow",
        folders["tensorflow"],
        other_model=os.path.join(folders[OTHER], "model.keras"),
    )
    return folders


def _read(folder, name):
    with open(os.path.join(folder, name), "rb") as f:
        return f.read()


def test_training_matches_tensorflow(runs):
    other_vars = dict(np.load(os.path.join(runs[OTHER], "variables.npz")))
    tf_vars = dict(np.load(os.path.join(runs["tensorflow"], "variables.npz")))
    assert sorted(other_vars) == sorted(tf_vars)
    for path, tf_value in tf_vars.items():
        if path.endswith(("qat_step", "qat_schedule")):
            np.testing.assert_array_equal(other_vars[path], tf_value, err_msg=path)
        else:
            np.testing.assert_allclose(
                other_vars[path], tf_value, rtol=1e-4, atol=1e-5, err_msg=path
            )
    assert all(
        int(v) == backend_case.STEPS for p, v in tf_vars.items() if p.endswith("qat_step")
    )
    # The observers ran on both: every range is a real one.
    assert all(
        float(tf_vars[p.replace("_min", "_max")]) > float(v)
        for p, v in tf_vars.items()
        if p.endswith("_min")
    )


def test_export_equals_tensorflow_export_of_same_file(runs):
    exported = _read(runs[OTHER], "model.tflite")
    assert exported == _read(runs["tensorflow"], "other.tflite")
    assert qat_plugin.inspect_tflite(exported).is_fully_int8


def test_export_matches_tensorflow_trained_export(runs):
    x, _ = backend_case.batches()
    parity = compare_tflite(
        _read(runs["tensorflow"], "model.tflite"),
        _read(runs[OTHER], "model.tflite"),
        x[0],
    )
    assert parity.ops_equal, parity.summary()
    assert parity.max_scale_rel_diff < 1e-4, parity.summary()
    assert parity.max_weight_steps <= 1.0, parity.summary()
    assert parity.max_bias_steps <= 1.0, parity.summary()
    # Dequantized outputs carry float rounding: one step may read 1.0001.
    assert parity.max_output_steps <= 1.0 + 1e-3, parity.summary()


def _dense_qat_model():
    model = keras.Sequential(
        [keras.Input((4,), name="features"), keras.layers.Dense(2, name="dense")]
    )
    return qat_plugin.quantize_model(model)


def test_missing_tensorflow_says_what_to_install(monkeypatch):
    qat = _dense_qat_model()
    monkeypatch.setitem(sys.modules, "tensorflow", None)
    with pytest.raises(ModuleNotFoundError, match=r'pip install "tensorflow'):
        run_on_tensorflow(qat_plugin.export_tflite, qat)


def test_unpicklable_arguments_are_refused_before_starting(tmp_path):
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    samples = (np.zeros((1, 4), "float32") for _ in range(2))
    with pytest.raises(ValueError, match="must pickle"):
        export_on_tensorflow(model, mode="int8", representative_data=samples)


def test_error_in_tensorflow_process_reaches_caller(tmp_path):
    path = tmp_path / "never.tflite"
    with pytest.raises(qat_plugin.ExportError, match="never observed") as info:
        export_on_tensorflow(_dense_qat_model(), path)
    assert "Raised in the TensorFlow process" in str(info.value.__cause__)
    assert os.listdir(tmp_path) == []


def test_layer_class_from_main_is_refused_with_what_to_do():
    class Scale(keras.layers.Layer):
        def call(self, x):
            return 2.0 * x

    Scale.__module__ = "__main__"  # As if defined in a script.
    model = keras.Sequential([keras.Input((4,)), Scale(name="scale")])
    with pytest.raises(ValueError, match="'scale' is a Scale defined in __main__"):
        run_on_tensorflow(qat_plugin.export_tflite, model)
