"""The `qat-plugin` command starts light and stays quiet.

`--help`, `recipes` and `recipes show` are answered by the light
`qat_plugin_cli` entry point without importing TensorFlow or JAX, and a
wrong argument is refused before either loads: each case runs the entry
point that pyproject.toml declares in a fresh interpreter and reports what
`sys.modules` held at the end. An export through the command prints none
of TensorFlow's logs unless `--verbose`.
"""

import json
import os
import pathlib
import subprocess
import sys
import tomllib

import keras
import numpy as np
import pytest

from qat_plugin.config import constants
from qat_plugin import quiet, recipes
from qat_plugin_cli import arguments, quiet_stderr, recipe_list
from qat_plugin_cli.engine_files import module_constants

ROOT = pathlib.Path(__file__).resolve().parent.parent
ENTRY = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]["qat-plugin"]
# Runs the declared entry point with argv; prints what it imported, last.
WRAPPER = """
import importlib, json, sys
module, _, function = sys.argv[1].partition(":")
try:
    status = getattr(importlib.import_module(module), function)(sys.argv[2:])
except SystemExit as stop:
    status = stop.code
sys.stdout.flush()
print(json.dumps({"status": status, **{name: name in sys.modules for name in
                  ("tensorflow", "jax", "keras", "qat_plugin")}}))
"""


def environment(**extra):
    env = {k: v for k, v in os.environ.items() if k != quiet.VERBOSE_ENV}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    return {**env, **extra}


def run_entry(*argv):
    done = subprocess.run([sys.executable, "-c", WRAPPER, ENTRY, *argv], cwd=ROOT,
                          env=environment(), capture_output=True, text=True, timeout=120)
    *printed, last = done.stdout.rstrip("\n").split("\n")
    return json.loads(last), "\n".join(printed), done.stderr


@pytest.mark.parametrize("argv", [["--help"], ["recipes"], ["recipes", "show", "int8-mcu"],
                                  ["compare", "--help"]])
def test_help_and_recipes_import_neither_tensorflow_nor_jax(argv):
    report, out, err = run_entry(*argv)
    assert report["status"] in (0, None), err
    assert not report["tensorflow"] and not report["jax"], report
    assert not report["keras"] and not report["qat_plugin"], report
    if argv == ["recipes"]:
        assert "int8-mcu         mcu     int8 checked for TFLite Micro" in out
    if argv[:2] == ["recipes", "show"]:
        assert out + "\n" == (ROOT / "recipes" / "int8-mcu.toml").read_text()


@pytest.mark.parametrize("argv, status, message", [
    (["compare", "m.keras", "--data", "d.npz", "--modes", "int8,int4"], 2,
     "argument --modes: unknown mode 'int4'; choose from float, dynamic, float16, int8, int16x8."),
    (["compare", "m.keras", "--data", "d.npz", "--modes", ","], 2, "argument --modes: no mode"),
    (["compare", "missing.keras", "--data", "fashion_mnist"], 1, "model: no file at missing.keras"),
    (["compare", "pyproject.toml", "--data", "missing.npz"], 1, "--data: no file at missing.npz"),
    (["compare", "pyproject.toml", "--data", "fashion_mnist", "--threads", "0"], 2,
     "argument --threads: must be 1 or more"),
    (["demo", "--recipe", "int9"], 1, "Unknown recipe 'int9'"),
    (["demo", "--epochs", "0"], 2, "argument --epochs: must be 1 or more, got 0."),
    (["inspect", "missing.tflite"], 1, "No .tflite file at missing.tflite."),
    (["recipes", "show"], 1, "recipes show needs a NAME"),
    (["recipes", "show", "int8-mcuu"], 1, "Did you mean 'int8-mcu'?"),
])
def test_bad_arguments_are_refused_before_tensorflow_loads(argv, status, message):
    report, _, err = run_entry(*argv)
    assert report["status"] == status
    assert message in err
    assert not report["tensorflow"] and not report["jax"]


def test_the_light_listing_reads_what_the_engine_loads():
    assert recipe_list.names() == recipes.names()
    for name in recipes.names():
        recipe = recipes.get(name)
        assert recipe_list.summary(name) == (recipe.description, recipe.export.target), name
        assert recipe_list.path_of(name) == recipes.path_of(name)
    assert module_constants("qat_plugin.config.constants", ["MODES"]) == {"MODES": constants.MODES}
    assert arguments.mode_list(",".join(constants.MODES)) == constants.MODES
    assert quiet_stderr.VERBOSE_ENV == quiet.VERBOSE_ENV
    for value in ("", "0", "1", "yes", "off", "True"):
        os.environ[quiet.VERBOSE_ENV] = value
        try:
            assert quiet_stderr.verbose_from_env() == quiet.is_verbose(), value
        finally:
            del os.environ[quiet.VERBOSE_ENV]


def test_the_stderr_filter_keeps_all_but_tensorflow_lines(capfd):
    with quiet_stderr.TensorFlowLogFilter():
        os.write(2, b"W0000 00:00:1796302607.711724   17246 cuda_executor.cc:1] failed call "
                    b"to cuInit: CUDA error (303)\nkept line\nF0000 00:00:1.1 1 x.cc:1] fatal\n"
                    b"INFO: Created TensorFlow Lite XNNPACK delegate for CPU.\nno newline")
    assert capfd.readouterr().err == "kept line\nF0000 00:00:1.1 1 x.cc:1] fatal\nno newline"


def test_converter_quiet_drops_the_logs_but_keeps_them_for_an_error(capfd, monkeypatch):
    import logging
    import warnings

    monkeypatch.delenv(quiet.VERBOSE_ENV, raising=False)
    with quiet.converter_quiet():
        os.write(2, b"fully_quantize: 0, inference_type: 6\n")
        logging.getLogger("absl").warning("trackable_obj ... is deprecated")
        warnings.warn_explicit("Statistics for quantized inputs were expected", UserWarning,
                               "convert.py", 846, module="tensorflow.lite.python.convert")
    assert capfd.readouterr().err == ""
    with pytest.raises(RuntimeError), quiet.converter_quiet():
        os.write(2, b"error: 'tfl.custom' op is neither a custom op nor a flex op\n")
        raise RuntimeError("ConverterError")
    assert "neither a custom op" in capfd.readouterr().err
    monkeypatch.setenv(quiet.VERBOSE_ENV, "1")
    with quiet.converter_quiet():
        os.write(2, b"fully_quantize: 0\n")
    assert capfd.readouterr().err == "fully_quantize: 0\n"


# TensorFlow's and the converter's chatter, as measured before the fix.
NOISE = ("cuInit", "oneDNN", "absl", "deprecated", "I0000", "Statistics for quantized",
         "fully_quantize", "Created TensorFlow Lite", "cpu_feature_guard")


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("quiet")
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)], name="tiny")
    model.save(folder / "float.keras")
    x = np.random.default_rng(0).random((32, 4), dtype=np.float32)
    np.savez(folder / "eval.npz", x=x, y=np.arange(32) % 3, x_calibration=x[:8])
    return folder


@pytest.mark.slow
@pytest.mark.parametrize("verbose", [False, True])
def test_an_export_prints_no_tensorflow_logs_unless_verbose(tiny_files, verbose):
    argv = ["compare", "float.keras", "--data", "eval.npz", "--modes", "int8",
            "--latency-runs", "1"] + (["--verbose"] if verbose else [])
    done = subprocess.run([sys.executable, "-m", "qat_plugin_cli", *argv], cwd=tiny_files,
                          env=environment(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "| ptq-int8 |" in done.stdout
    printed = done.stdout + done.stderr
    if verbose:
        assert "deprecated" in printed  # absl's trackable_obj warning, back
    else:
        assert [word for word in NOISE if word in printed] == [], done.stderr
        assert "qat-plugin: exporting int8 and measuring" in done.stderr
