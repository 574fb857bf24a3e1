"""compare() and the layer-wise error report, checked against direct interpreter runs."""

import gzip
import json
import math

import keras
import numpy as np
import pytest
import tensorflow as tf

import qat_plugin
from qat_plugin.analysis.layerwise import error_stats, layerwise_error, ptq_local_error
from tests.conftest import images, qat_fit

L = keras.layers


def conv_net():
    inputs = keras.Input((12, 12, 1), name="image")
    x = L.Conv2D(8, 3, use_bias=False, name="conv")(inputs)
    x = L.BatchNormalization(name="bn")(x)
    x = L.ReLU(6.0, name="relu")(x)
    x = L.GlobalAveragePooling2D(name="pool")(x)
    return keras.Model(inputs, L.Dense(4, name="logits")(x), name="conv_net")


@pytest.fixture(scope="module")
def trained():
    keras.utils.set_random_seed(3)
    x, y = images(96)
    model = conv_net()
    model.compile(
        keras.optimizers.Adam(1e-2),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    model.fit(x, y, epochs=2, batch_size=32, verbose=0)
    qat = qat_fit(model, x, y)
    report = qat_plugin.analysis.compare(
        model, qat, eval_data=(x, y), representative_data=x,
        modes=("float", "dynamic", "int8"), warmup_runs=1, latency_runs=5,
        batch_size=40,
    )
    return model, qat, x, y, report


def test_report_numbers_match_a_direct_interpreter_run(trained):
    model, _, x, y, report = trained
    assert [r.name for r in report.rows] == ["float", "ptq-dynamic", "ptq-int8", "qat-int8"]
    reference = model.predict(x, verbose=0).argmax(1)
    for row in report.rows:
        predictions = qat_plugin.TFLiteModel(row.tflite).predict(x)
        assert row.metric == pytest.approx(np.mean(predictions.argmax(1) == y))
        assert row.agreement == pytest.approx(np.mean(predictions.argmax(1) == reference))
        assert row.size_bytes == len(row.tflite)
        assert row.gzip_bytes == len(gzip.compress(row.tflite, compresslevel=9))
        assert row.fully_int8 == qat_plugin.inspect_tflite(row.tflite).is_fully_int8
        assert 0 < row.latency_ms_median <= row.latency_ms_p90
        assert row.export_seconds > 0
    assert report["float"].agreement == 1.0
    assert [r.fully_int8 for r in report.rows] == [False, False, True, True]
    assert report.num_samples == 96 and report.metric_name == "top-1 accuracy"
    assert report.settings["num_threads"] == 1 and report.settings["xnnpack"]


def test_markdown_and_json_carry_the_rows(trained):
    report = trained[-1]
    markdown = report.to_markdown()
    row = report["qat-int8"]
    line = [l for l in markdown.splitlines() if l.startswith("| qat-int8 |")][0]
    assert f"{100 * row.metric:.2f}%" in line and f"{row.size_bytes / 1024:.1f}" in line
    assert "Latency: 5 single-sample invokes after 1 warm-up, XNNPACK on, 1 thread(s)" in markdown
    data = json.loads(report.to_json())
    assert [c["name"] for c in data["candidates"]] == [r.name for r in report.rows]
    assert data["candidates"][3]["metric"] == row.metric
    assert "tflite" not in data["candidates"][0]


def test_plot_is_a_png_that_matplotlib_reads(trained, tmp_path):
    import matplotlib.image

    report = trained[-1]
    paths = report.save(tmp_path / "out", references={"float (Keras)": 0.5})
    with open(paths["plot"], "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    pixels = matplotlib.image.imread(paths["plot"])
    assert pixels.ndim == 3 and pixels.shape[0] > 200 and pixels.shape[1] > 300
    assert pixels.std() > 0  # Not a blank image.
    with open(paths["qat-int8"], "rb") as f:
        assert f.read() == report["qat-int8"].tflite
    assert json.loads(open(paths["json"]).read())["num_samples"] == 96
    assert open(paths["markdown"]).read().startswith("| candidate |")


def test_streamed_eval_data_and_user_metrics(trained):
    model, _, x, y, report = trained
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(10)

    def mean_true_class_score(y_true, y_pred):
        return float(np.mean(y_pred[np.arange(len(y_true)), y_true]))

    by_function = qat_plugin.analysis.compare(
        model, eval_data=dataset, modes=("float",), metric=mean_true_class_score,
        latency_runs=2, warmup_runs=0,
    )
    outputs = qat_plugin.TFLiteModel(report["float"].tflite).predict(x)
    assert by_function.metric_name == "mean_true_class_score"
    assert by_function["float"].metric == pytest.approx(mean_true_class_score(y, outputs))

    metric = keras.metrics.SparseTopKCategoricalAccuracy(k=2, name="top2")
    by_metric = qat_plugin.analysis.compare(
        model, eval_data=(x, y), modes=("float",), metric=metric, latency_runs=2
    )
    top2 = np.mean([label in np.argsort(o)[-2:] for o, label in zip(outputs, y)])
    assert by_metric.metric_name == "top2"
    assert by_metric["float"].metric == pytest.approx(top2)
    assert "| float | 0." in by_metric.to_markdown()  # Not shown as a percentage.


def test_progress_bar_when_asked(trained, capsys):
    model, _, x, y, _ = trained
    qat_plugin.analysis.compare(model, eval_data=(x, y), modes=("float",), batch_size=32,
                       latency_runs=1, verbose=1)
    out = capsys.readouterr().out
    assert "Evaluating float" in out and "96/96" in out


def test_bad_arguments_fail_before_any_export(trained):
    model, qat, x, y, _ = trained
    with pytest.raises(ValueError, match="targets are needed"):
        qat_plugin.analysis.compare(model, eval_data=x, modes=("float",))
    with pytest.raises(ValueError, match=r"modes \['int8'\] calibrate"):
        qat_plugin.analysis.compare(model, eval_data=(x, y), modes=("int8",))
    with pytest.raises(ValueError, match="unknown \\['int4'\\]"):
        qat_plugin.analysis.compare(model, eval_data=(x, y), modes=("int4",))
    with pytest.raises(ValueError, match="is a QAT model"):
        qat_plugin.analysis.compare(qat, eval_data=(x, y), modes=("float",))
    with pytest.raises(ValueError, match=r"96 samples but 95 targets"):
        qat_plugin.analysis.compare(model, eval_data=(x, y[:-1]), modes=("float",))


def test_layerwise_error_matches_a_direct_computation(trained):
    model, qat, x, _, report = trained
    ptq = layerwise_error(model, report["ptq-int8"].tflite, x, max_samples=32)
    # Conv -> BN -> ReLU6 is one CONV_2D, compared with the ReLU6's output.
    assert [r.layer for r in ptq.rows] == ["relu", "pool", "logits"]
    assert [r.op for r in ptq.rows] == ["CONV_2D", "MEAN", "FULLY_CONNECTED"]
    # The report runs the builtin kernels (XNNPACK rounds a few values apart).
    runner = qat_plugin.TFLiteModel(report["ptq-int8"].tflite, use_xnnpack=False)
    rmse, sqnr = error_stats(model.predict(x[:32], verbose=0), runner.predict(x[:32]))
    assert ptq["logits"].rmse == pytest.approx(rmse, rel=1e-5)
    assert ptq["logits"].sqnr_db == pytest.approx(sqnr, rel=1e-5)
    assert all(r.dtype == "int8" and r.scale > 0 for r in ptq.rows)
    assert all(r.sqnr_db > 15 for r in ptq.rows)
    # The QAT export names its fused layer after the conv: it maps to the ReLU6.
    against_float = layerwise_error(model, report["qat-int8"].tflite, x, max_samples=32)
    assert [r.layer for r in against_float.rows] == ["relu", "pool", "logits"]
    against_qat = layerwise_error(qat, report["qat-int8"].tflite, x, max_samples=32)
    # The QAT Keras model and its export agree to within a step or so.
    assert all(r.rmse_in_steps < 1.5 for r in against_qat.rows)
    data = against_qat.to_dict()
    assert data["num_samples"] == 32 and len(data["layers"]) == len(against_qat.rows)
    assert "| logits | FULLY_CONNECTED | int8 |" in str(against_float)


def test_error_stats_reference_values():
    assert error_stats([1.0, 2.0], [1.0, 2.0]) == (0.0, math.inf)
    rmse, sqnr = error_stats([1.0, -1.0], [1.1, -0.9])
    assert rmse == pytest.approx(0.1) and sqnr == pytest.approx(20.0)


def test_ptq_local_error_from_the_quantization_debugger(trained):
    model, _, x, _, _ = trained
    rows = ptq_local_error(model, x, x[:16], calibration_steps=32)
    by_layer = {r["layer"]: r for r in rows if r["layer"]}
    assert {"relu", "pool", "logits"} <= set(by_layer)
    for row in by_layer.values():
        assert row["scale"] > 0 and 0 <= row["rmse_in_steps"] < 2


def binary_data(n=200, seed=5):
    """Inputs away from 0 and the label `x > 0`: a Dense(1) with weight 4 is exactly right."""
    rng = np.random.default_rng(seed)
    x = rng.uniform(0.1, 1.0, (n, 1)).astype("float32") * rng.choice([-1.0, 1.0], (n, 1))
    return x.astype("float32"), (x[:, 0] > 0).astype("int64")


def binary_model(activation):
    model = keras.Sequential(
        [keras.Input((1,)), L.Dense(1, activation=activation, name="score")],
        name=f"binary_{activation or 'logits'}",
    )
    model.layers[0].set_weights([np.full((1, 1), 4.0, "float32"), np.zeros(1, "float32")])
    return model


@pytest.mark.parametrize("activation", [None, "sigmoid"], ids=["logits", "probabilities"])
def test_an_exactly_right_binary_classifier_scores_1_in_float_and_int8(activation):
    x, y = binary_data()
    model = binary_model(activation)
    report = qat_plugin.analysis.compare(
        model, eval_data=(x, y), representative_data=x, modes=("float", "int8"),
        warmup_runs=0, latency_runs=1,
    )
    assert report["ptq-int8"].fully_int8
    for row in report.rows:
        assert row.metric == 1.0, row.name
        assert row.agreement == 1.0, row.name
    # The int8 file's dequantized outputs are on the model's scale: logits or probabilities.
    outputs = qat_plugin.TFLiteModel(report["ptq-int8"].tflite).predict(x)
    threshold = 0.0 if activation is None else 0.5
    assert np.array_equal((outputs[:, 0] > threshold).astype("int64"), y)


def test_from_logits_overrides_the_final_activation_and_is_asked_for_when_unclear():
    x, y = binary_data()
    logits = binary_model(None)
    # Read as probabilities, logits in (0, 0.5] fall on the wrong side.
    as_probabilities = qat_plugin.analysis.compare(
        logits, eval_data=(x, y), modes=("float",), from_logits=False,
        warmup_runs=0, latency_runs=1,
    )
    expected = np.mean((logits.predict(x, verbose=0)[:, 0] > 0.5) == y)
    assert as_probabilities["float"].metric == pytest.approx(expected) and expected < 1
    with pytest.raises(ValueError, match=r"layer 'score' with activation 'tanh'.*from_logits=True"):
        qat_plugin.analysis.compare(binary_model("tanh"), eval_data=(x, y), modes=("float",))
    tanh = qat_plugin.analysis.compare(
        binary_model("tanh"), eval_data=(x, y), modes=("float",), from_logits=True,
        warmup_runs=0, latency_runs=1,
    )
    assert tanh["float"].metric == 1.0


def test_labels_that_cannot_be_scored_fail_before_any_export(trained):
    model, _, x, y, _ = trained
    compare = qat_plugin.analysis.compare
    names = np.array(["cat", "dog", "owl", "emu"])[y]
    with pytest.raises(ValueError, match=r"eval_data \(its labels\): labels of dtype <U3 \(e.g. '"):
        compare(model, eval_data=(x, names), modes=("float",))
    with pytest.raises(ValueError, match=r"one-hot labels 3 wide, but the model outputs 4 class"):
        compare(model, eval_data=(x, np.eye(3)[y % 3]), modes=("float",))
    with pytest.raises(ValueError, match=r"class labels must be whole numbers from 0 to 3 .* got 7"):
        compare(model, eval_data=(x, np.where(y == 0, 7, y)), modes=("float",))
    one_hot = compare(model, eval_data=(x, np.eye(4)[y]), modes=("float",), latency_runs=1)
    sparse = compare(model, eval_data=(x, y), modes=("float",), latency_runs=1)
    assert one_hot["float"].metric == sparse["float"].metric


def test_top1_accuracy_checks_its_labels():
    from qat_plugin.analysis.metrics import top1_accuracy

    scores = np.array([[0.1, 0.9], [0.8, 0.2], [0.4, 0.6]])
    assert top1_accuracy(np.array([1, 0, 1]), scores) == 1.0
    assert top1_accuracy(np.array([[0, 1], [1, 0], [0, 1]]), scores) == 1.0
    assert top1_accuracy(np.array([True, False, True]), scores[:, 1:]) == 1.0
    with pytest.raises(ValueError, match=r"y_true: 2 labels for 3 samples"):
        top1_accuracy(np.array([1, 0]), scores)
    with pytest.raises(ValueError, match=r"y_true: labels of dtype <U1"):
        top1_accuracy(np.array(["a", "b", "a"]), scores)
    with pytest.raises(ValueError, match=r"y_true: one-hot labels 3 wide, but the model outputs 2"):
        top1_accuracy(np.eye(3), scores)
    with pytest.raises(ValueError, match=r"from 0 to 1 for 1 output unit\(s\), got 0.5"):
        top1_accuracy(np.array([0.5, 0, 1]), scores[:, 1:])


def test_bad_counts_fail_before_any_export(trained):
    model, _, x, y, _ = trained
    for name in ("latency_runs", "batch_size", "num_threads"):
        with pytest.raises(ValueError, match=f"{name} must be a whole number of 1 or more, got 0"):
            qat_plugin.analysis.compare(model, eval_data=(x, y), modes=("float",), **{name: 0})
    with pytest.raises(ValueError, match="warmup_runs must be a whole number of 0 or more"):
        qat_plugin.analysis.compare(model, eval_data=(x, y), modes=("float",), warmup_runs=-1)
