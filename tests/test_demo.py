"""The demo compares QAT with PTQ at the same training budget.

`run_demo` fine-tunes the float model for the QAT epochs without
quantization (the control) and adds the converter's PTQ of that model as
`ptq-int8-finetuned`; its summary is worded against that row and the
fine-tuned float model, not against the model before fine-tuning.
"""

import json

import keras
import numpy as np
import pytest

import qat_plugin
from qat_plugin.analysis.metrics import agreement
from qat_plugin.demo import run_demo


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    report, paths = run_demo(
        str(out), epochs=1, train_samples=512, eval_samples=64, batch_size=64,
        modes=("int8",), verbose=0,
    )
    return out, report, paths


@pytest.mark.slow
@pytest.mark.tf_only
def test_finetuned_ptq_row_sits_before_qat_in_table_json_and_files(demo):
    out, report, paths = demo
    names = [row.name for row in report.rows]
    assert names == ["ptq-int8", "ptq-int8-finetuned", "qat-int8"]
    saved = json.loads((out / "comparison.json").read_text())
    assert [c["name"] for c in saved["candidates"]] == names
    assert "| ptq-int8-finetuned |" in (out / "comparison.md").read_text()
    assert paths["ptq-int8-finetuned"] == str(out / "ptq-int8-finetuned.tflite")
    finetuned = qat_plugin.inspect_tflite(str(out / "ptq-int8-finetuned.tflite"))
    assert finetuned.is_fully_int8
    # A PTQ export of different weights than the 2-epoch model's.
    assert report["ptq-int8-finetuned"].tflite != report["ptq-int8"].tflite
    assert "ptq-int8-finetuned: layer-wise error against the fine-tuned float model" in (
        out / "layerwise.md"
    ).read_text()


@pytest.mark.slow
@pytest.mark.tf_only
def test_finetuned_ptq_agreement_is_against_the_float_model_like_the_others(demo):
    out, report, _ = demo
    from qat_plugin.data.datasets import fashion_mnist

    x_test = fashion_mnist().x_test[:64]
    float_model = keras.models.load_model(out / "float.keras")
    reference = float_model.predict(x_test, verbose=0)
    y_pred = qat_plugin.TFLiteModel(str(out / "ptq-int8-finetuned.tflite")).predict(x_test)
    assert report["ptq-int8-finetuned"].agreement == pytest.approx(agreement(reference, y_pred))
    assert np.isfinite(report["ptq-int8-finetuned"].metric)


@pytest.mark.slow
@pytest.mark.tf_only
def test_summary_compares_qat_with_the_same_training_budget(demo):
    out, report, _ = demo
    text = (out / "comparison.md").read_text()
    qat, ptq_finetuned = report["qat-int8"].metric, report["ptq-int8-finetuned"].metric
    assert f"QAT int8 scores {100 * qat:.2f}%" in text
    assert f"PTQ int8 of the fine-tuned float model {100 * ptq_finetuned:.2f}%" in text
    assert "Against that float model, quantization" in text
    assert f"(ptq-int8: {100 * report['ptq-int8'].metric:.2f}%)" in text
