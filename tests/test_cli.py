"""The `qat-plugin` command, run in-process through `main()`."""

import json
import os

import keras
import numpy as np
import pytest

import qat_plugin
from qat_plugin_cli import main
from tests.conftest import images

L = keras.layers


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli")
    keras.utils.set_random_seed(4)
    x, y = images(48)
    model = keras.Sequential(
        [keras.Input((12, 12, 1)), L.Conv2D(4, 3, activation="relu"),
         L.GlobalAveragePooling2D(), L.Dense(4)],
        name="tiny",
    )
    model.save(folder / "float.keras")
    np.savez(folder / "eval.npz", x=x, y=y, x_calibration=x[:16])
    qat_plugin.export_tflite(model, folder / "int8.tflite", mode="int8", representative_data=x)
    return folder, model, x, y


def test_inspect_prints_ops_and_json(saved, capsys):
    folder, *_ = saved
    assert main(["inspect", str(folder / "int8.tflite")]) == 0
    out = capsys.readouterr().out
    assert "fully int8: yes" in out and "CONV_2D" in out
    assert main(["inspect", str(folder / "int8.tflite"), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["fully_int8"] and data["float_ops"] == []
    assert data["inputs"][0]["dtype"] == "int8"


def test_inspect_missing_file_fails_clearly(tmp_path, capsys):
    assert main(["inspect", str(tmp_path / "none.tflite")]) == 1
    assert "qat-plugin: error: No .tflite file at" in capsys.readouterr().err


def test_compare_prints_table_and_writes_report(saved, capsys, tmp_path):
    folder, model, x, y = saved
    status = main([
        "compare", str(folder / "float.keras"), "--data", str(folder / "eval.npz"),
        "--modes", "float,int8", "--latency-runs", "3", "--output", str(tmp_path / "out"),
        "--layerwise",
    ])
    assert status == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| float |") or line.startswith("| ptq-int8 |")]
    assert len(rows) == 2
    int8 = qat_plugin.TFLiteModel(str(tmp_path / "out" / "ptq-int8.tflite")).predict(x)
    assert f"{100 * np.mean(int8.argmax(1) == y):.2f}%" in rows[1]
    assert "ptq-int8: layer-wise error" in out
    for name in ("comparison.md", "comparison.json", "comparison.png", "float.tflite"):
        assert os.path.exists(tmp_path / "out" / name)


def test_compare_without_calibration_data_says_how_to_give_it(saved, capsys, tmp_path):
    folder, model, x, y = saved
    np.savez(tmp_path / "plain.npz", x=x, y=y)
    status = main(["compare", str(folder / "float.keras"), "--data", str(tmp_path / "plain.npz")])
    assert status == 1
    assert "pass representative_data" in capsys.readouterr().err
    status = main(["compare", str(folder / "float.keras"), "--data", str(tmp_path / "none.npz")])
    assert status == 1
    assert "--data: no file at" in capsys.readouterr().err


def test_unknown_recipe_fails_before_training(capsys, tmp_path):
    assert main(["demo", "--output", str(tmp_path), "--recipe", "int9"]) == 1
    assert "Unknown recipe 'int9'" in capsys.readouterr().err


@pytest.mark.slow
def test_demo_runs_end_to_end_on_a_small_subset(tmp_path, capsys):
    out = tmp_path / "demo"
    status = main([
        "demo", "--output", str(out), "--epochs", "1", "--train-samples", "512",
        "--eval-samples", "64",
    ])
    assert status == 0
    printed = capsys.readouterr().out
    for row in ("| float |", "| ptq-int8 |", "| qat-int8 |"):
        assert row in printed
    report = json.loads((out / "comparison.json").read_text())
    assert [c["name"] for c in report["candidates"]][-1] == "qat-int8"
    assert report["candidates"][-1]["fully_int8"]
    assert qat_plugin.inspect_tflite(str(out / "qat-int8.tflite")).is_fully_int8
    for name in ("comparison.md", "comparison.png", "layerwise.md", "float.keras", "qat.keras"):
        assert (out / name).exists(), name


@pytest.mark.parametrize("flag", ["--latency-runs", "--max-samples", "--threads"])
@pytest.mark.parametrize("value", ["0", "-3", "two"])
def test_compare_counts_must_be_positive_naming_the_flag(saved, capsys, flag, value):
    folder, *_ = saved
    with pytest.raises(SystemExit) as exit_info:
        main(["compare", str(folder / "float.keras"), "--data", str(folder / "eval.npz"),
              flag, value])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {flag}:" in err
    assert ("must be 1 or more" if value != "two" else "expected a whole number") in err


def test_inspect_arena_must_be_positive(saved, capsys):
    folder, *_ = saved
    with pytest.raises(SystemExit):
        main(["inspect", str(folder / "int8.tflite"), "--arena", "0"])
    assert "argument --arena: must be 1 or more, got 0." in capsys.readouterr().err


def test_max_samples_evaluates_only_the_first_samples(saved, capsys):
    folder, *_ = saved
    status = main(["compare", str(folder / "float.keras"), "--data", str(folder / "eval.npz"),
                   "--modes", "float", "--latency-runs", "1", "--max-samples", "5", "--json"])
    assert status == 0
    assert json.loads(capsys.readouterr().out)["num_samples"] == 5


@pytest.mark.parametrize("content", [b"", b"garbage, not a zip archive"], ids=["empty", "garbage"])
@pytest.mark.parametrize("flag", ["model", "--qat"])
def test_compare_names_a_corrupt_keras_file(saved, capsys, tmp_path, content, flag):
    folder, *_ = saved
    bad = tmp_path / "corrupt.keras"
    bad.write_bytes(content)
    model = str(bad) if flag == "model" else str(folder / "float.keras")
    extra = ["--qat", str(bad)] if flag == "--qat" else []
    status = main(["compare", model, "--data", str(folder / "eval.npz"), *extra])
    assert status == 1
    err = capsys.readouterr().err
    assert f"qat-plugin: error: {flag} '{bad}' is not a valid .keras file" in err
    assert "zip archive" in err and "File not found" not in err


def test_compare_names_a_zip_that_holds_no_keras_model(saved, capsys, tmp_path):
    import zipfile

    folder, *_ = saved
    bad = tmp_path / "other.keras"
    with zipfile.ZipFile(bad, "w") as archive:
        archive.writestr("readme.txt", "not a model")
    assert main(["compare", str(bad), "--data", str(folder / "eval.npz")]) == 1
    assert f"model '{bad}' is a zip archive but not a .keras model: it has no config.json" \
        in capsys.readouterr().err


def test_inspect_names_an_empty_tflite_file(capsys, tmp_path):
    empty = tmp_path / "empty.tflite"
    empty.write_bytes(b"")
    assert main(["inspect", str(empty)]) == 1
    assert f"qat-plugin: error: No .tflite model in '{empty}': it is empty (0 bytes)" \
        in capsys.readouterr().err
