"""Bad model files (empty, garbage, truncated) fail naming the file and what is expected."""

import keras
import numpy as np
import pytest

import qat_plugin
from qat_plugin.errors import ModelFileError
from qat_plugin.tflite.inspection import inspect_tflite
from qat_plugin.tflite.interpreter import TFLiteModel


@pytest.fixture(scope="module")
def tflite_bytes():
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    return qat_plugin.export_tflite(model, mode="float")


@pytest.mark.parametrize("load", [TFLiteModel, inspect_tflite], ids=["TFLiteModel", "inspect"])
def test_an_empty_file_names_the_file_and_says_it_is_empty(tmp_path, load):
    path = tmp_path / "empty.tflite"
    path.write_bytes(b"")
    expected = r"^No \.tflite model in .*empty\.tflite.: it is empty \(0 bytes\)"
    with pytest.raises(ModelFileError, match=expected) as info:
        load(str(path))
    assert "TFLite flatbuffer" in str(info.value)
    with pytest.raises(ModelFileError, match=r"^No \.tflite model in the bytes given: it is empty"):
        load(b"")


@pytest.mark.parametrize("load", [TFLiteModel, inspect_tflite], ids=["TFLiteModel", "inspect"])
def test_garbage_names_the_file_and_the_expected_format(tmp_path, load):
    path = tmp_path / "garbage.tflite"
    path.write_bytes(b"this is not a flatbuffer at all")
    expected = r"^No \.tflite model in '.*garbage\.tflite': its 31 bytes start b'this is '"
    with pytest.raises(ModelFileError, match=expected) as info:
        load(path)
    assert "file identifier b'TFL3'" in str(info.value)
    with pytest.raises(ModelFileError, match=r"^No \.tflite model in the bytes given: its 31 bytes"):
        load(b"this is not a flatbuffer at all")


@pytest.mark.parametrize("load", [TFLiteModel, inspect_tflite], ids=["TFLiteModel", "inspect"])
def test_a_truncated_file_is_refused_by_litert_naming_the_file(tmp_path, tflite_bytes, load):
    path = tmp_path / "half.tflite"
    path.write_bytes(tflite_bytes[: len(tflite_bytes) // 2])
    with pytest.raises(ModelFileError, match=r"LiteRT cannot read '.*half\.tflite'") as info:
        load(str(path))
    assert "not a valid Flatbuffer" in str(info.value)
    with pytest.raises(ModelFileError, match="LiteRT cannot read the bytes given"):
        load(tflite_bytes[: len(tflite_bytes) // 2])


def test_a_folder_is_refused_naming_it(tmp_path):
    with pytest.raises(ModelFileError, match="is a folder"):
        TFLiteModel(str(tmp_path))


def test_a_valid_file_still_loads(tmp_path, tflite_bytes):
    path = tmp_path / "ok.tflite"
    path.write_bytes(tflite_bytes)
    assert TFLiteModel(path).predict(np.ones((1, 4), "float32")).shape == (1, 2)
    assert inspect_tflite(str(path)).size_bytes == len(tflite_bytes)


def test_layerwise_error_names_a_truncated_file(tmp_path, tflite_bytes):
    from qat_plugin.analysis.layerwise import layerwise_error

    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    path = tmp_path / "cut.tflite"
    path.write_bytes(tflite_bytes[:100])
    with pytest.raises(ModelFileError, match=r"LiteRT cannot read '.*cut\.tflite'"):
        layerwise_error(model, str(path), np.ones((2, 4), "float32"))
