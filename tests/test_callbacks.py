"""The QAT callbacks in real `fit` runs: schedule switches, monitor, export."""

import functools
import json
import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
from keras import ops

import qat_plugin
from qat_plugin.callbacks import (
    QuantizationMonitor,
    QuantizationScheduler,
    TFLiteExport,
    current_phase,
)
from qat_plugin.layers import QuantizedLinear
from qat_plugin.config.constants import NEVER
from qat_plugin.errors import UnwritablePathError

BATCH = 4
STEPS = 12


def float_model():
    inputs = keras.Input((6, 6, 1), name="pixels")
    x = keras.layers.Conv2D(3, 3, use_bias=False, name="conv")(inputs)
    x = keras.layers.BatchNormalization(name="bn")(x)
    x = keras.layers.ReLU(name="relu")(x)
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    outputs = keras.layers.Dense(2, name="logits")(x)
    return keras.Model(inputs, outputs)


def data(n=STEPS * BATCH, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 6, 6, 1)).astype("float32")
    y = (x.mean(axis=(1, 2, 3)) > 0).astype("int64")
    return x, y


def qat_model(steps_per_execution=1):
    keras.utils.set_random_seed(0)
    model = qat_plugin.quantize_model(float_model())
    model.compile(
        keras.optimizers.SGD(0.05),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        steps_per_execution=steps_per_execution,
    )
    return model


def variables(model):
    return {v.path: ops.convert_to_numpy(v).copy() for v in model.variables}


class StepRecorder(keras.callbacks.Callback):
    """Records the state the schedule changes after every batch."""

    def __init__(self, probe):
        super().__init__()
        self.probe = probe
        self.records = []

    def on_train_batch_end(self, batch, logs=None):
        conv = self.model.get_layer("conv")
        logits = self.model.get_layer("logits")
        self.records.append(
            {
                "step": int(ops.convert_to_numpy(conv.qat_step)),
                "bn_mean": ops.convert_to_numpy(conv.batch_norm.moving_mean).copy(),
                "range": [
                    float(ops.convert_to_numpy(v))
                    for v in (
                        conv.output_quantizer.range_min,
                        conv.output_quantizer.range_max,
                    )
                ],
                "on_grid": on_int8_grid(self.model, logits, self.probe),
            }
        )


def on_int8_grid(model, layer, probe):
    """True when `layer`'s inference output lies on its int8 grid."""
    sub = keras.Model(model.inputs[0], layer.output)
    y = ops.convert_to_numpy(sub(probe, training=False))
    low, high = [float(ops.convert_to_numpy(v)) for v in layer.output_quantizer.current_range()]
    codes = y / ((high - low) / 255)
    return bool(np.abs(codes - np.round(codes)).max() < 1e-3)


def changed(records, key):
    """Per step, whether `key` changed during it (step 0 against step 1...)."""
    values = [np.asarray(r[key]) for r in records]
    return [not np.array_equal(a, b) for a, b in zip(values, values[1:])]


def test_each_switch_happens_at_the_step_asked_for():
    x, y = data()
    model = qat_model()
    recorder = StepRecorder(x[:8])
    scheduler = QuantizationScheduler(quantize_start=3, bn_freeze=5, range_freeze=7)
    model.fit(
        x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0,
        validation_data=data(16, seed=1), callbacks=[scheduler, recorder],
    )
    records = recorder.records
    # Validation ran with training=False: only the 12 training steps count.
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    # After k steps inference uses step k's phase: fake-quant from step 3.
    assert [r["on_grid"] for r in records] == [k >= 3 for k in range(1, STEPS + 1)]
    # changed()[i] compares after step i+1 with after step i+2: step i+1 ran.
    assert changed(records, "bn_mean") == [i < 5 for i in range(1, STEPS)]
    assert changed(records, "range") == [i < 7 for i in range(1, STEPS)]
    assert current_phase(model) == {
        "step": STEPS, "quantizing": True, "bn_frozen": True, "ranges_frozen": True,
    }


def test_default_quantized_model_quantizes_from_the_first_step():
    x, y = data()
    model = qat_model()
    recorder = StepRecorder(x[:8])
    model.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0,
              callbacks=[recorder])
    assert all(r["on_grid"] for r in recorder.records)
    assert all(changed(recorder.records, "bn_mean"))


def count_training_traces(monkeypatch):
    """Counts graph-mode (traced) training calls of QuantizedLinear."""
    import tensorflow as tf

    traces = []
    original = QuantizedLinear.call

    @functools.wraps(original)
    def call(self, inputs, training=False):
        if training and not tf.executing_eagerly():
            traces.append(self.name)
        return original(self, inputs, training=training)

    monkeypatch.setattr(QuantizedLinear, "call", call)
    return traces


class MoveRangeFreeze(keras.callbacks.Callback):
    """Rewrites a threshold mid-fit, as a user's own callback might."""

    def on_train_batch_end(self, batch, logs=None):
        if batch == 5:
            self.model.get_layer("conv").qat_schedule.assign([3, 5, 9])


@pytest.mark.tf_only
@pytest.mark.parametrize("steps_per_execution", [1, 4])
def test_switches_and_schedule_changes_never_retrace(monkeypatch, steps_per_execution):
    traces = count_training_traces(monkeypatch)
    x, y = data()
    model = qat_model(steps_per_execution)
    scheduler = QuantizationScheduler(quantize_start=3, bn_freeze=5, range_freeze=7)
    model.fit(x, y, batch_size=BATCH, epochs=2, shuffle=False, verbose=0,
              callbacks=[scheduler, MoveRangeFreeze()])
    # One trace of the train function: each QuantizedLinear called once.
    assert sorted(traces) == ["conv", "logits"]
    assert int(ops.convert_to_numpy(model.get_layer("conv").qat_step)) == 2 * STEPS


def final_variables(schedule, steps_per_execution):
    x, y = data()
    model = qat_model(steps_per_execution)
    model.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0,
              callbacks=[QuantizationScheduler(*schedule)])
    return variables(model)


def test_steps_per_execution_4_switches_inside_an_execution():
    # 3, 5 and 7 fall inside the executions of steps 0-3 and 4-7.
    one = final_variables((3, 5, 7), 1)
    four = final_variables((3, 5, 7), 4)
    shifted = final_variables((4, 6, 8), 4)
    assert one.keys() == four.keys()
    for path in one:
        np.testing.assert_allclose(four[path], one[path], rtol=1e-5, atol=1e-6,
                                   err_msg=path)
    differs = [p for p in one if not np.allclose(shifted[p], one[p], rtol=1e-5, atol=1e-6)]
    assert any("moving_mean" in p for p in differs)
    assert any("output_max" in p for p in differs)


MIRRORED_SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    import keras, numpy as np
    from keras import ops
    sys.path.insert(0, sys.argv[1])
    from tests.test_callbacks import StepRecorder, data, float_model
    import qat_plugin
    from qat_plugin.callbacks import QuantizationScheduler

    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    keras.utils.set_random_seed(0)
    with strategy.scope():
        model = qat_plugin.quantize_model(float_model())
        model.compile(keras.optimizers.SGD(0.05),
                      keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x, y = data(96)
    recorder = StepRecorder(x[:8])
    model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0,
              callbacks=[QuantizationScheduler(3, 5, 7), recorder])
    conv = model.get_layer("conv")
    def per_replica(variable):
        return [np.asarray(v.numpy()).tolist() for v in variable.value.values]
    print("RESULT" + json.dumps({
        "replicas": strategy.num_replicas_in_sync,
        "records": [dict(r, bn_mean=r["bn_mean"].tolist()) for r in recorder.records],
        "qat_step": per_replica(conv.qat_step),
        "range_max": per_replica(conv.output_quantizer.range_max),
        "bn_mean": per_replica(conv.batch_norm.moving_mean),
    }))
    """
)


@pytest.mark.slow
@pytest.mark.tf_only
def test_schedule_under_mirrored_strategy_on_two_cpus():
    # steps_per_execution > 1 is not combined with MirroredStrategy: Keras
    # 3.15 / TF 2.21 fail there even for a float model ("You must feed a
    # value for placeholder tensor", keras-team/keras#19246).
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run(
        [sys.executable, "-c", MIRRORED_SCRIPT, root],
        capture_output=True, text=True, timeout=600, cwd=root,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    line = [l for l in done.stdout.splitlines() if l.startswith("RESULT")][-1]
    result = json.loads(line[len("RESULT"):])
    assert result["replicas"] == 2
    records = result["records"]
    # "only_first_replica": the step counter counts global steps, not
    # replica calls; "mean": both replicas hold the same range and BN stats.
    assert result["qat_step"] == [STEPS, STEPS]
    assert result["range_max"][0] == result["range_max"][1]
    assert result["bn_mean"][0] == result["bn_mean"][1]
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    assert [r["on_grid"] for r in records] == [k >= 3 for k in range(1, STEPS + 1)]
    assert changed(records, "bn_mean") == [i < 5 for i in range(1, STEPS)]
    assert changed(records, "range") == [i < 7 for i in range(1, STEPS)]


def test_epoch_points_become_steps_and_shared_layers_scale():
    a = keras.Input((3,), name="a")
    b = keras.Input((3,), name="b")
    shared = keras.layers.Dense(3, name="shared")
    outputs = keras.layers.Dense(1, name="head")(
        keras.layers.Add(name="sum")([shared(a), shared(b)])
    )
    keras.utils.set_random_seed(0)
    model = qat_plugin.quantize_model(keras.Model([a, b], outputs))
    model.compile("sgd", "mse")
    x = np.random.default_rng(0).normal(size=(32, 3)).astype("float32")
    scheduler = QuantizationScheduler(quantize_start=1, bn_freeze=1.5, unit="epoch")
    model.fit([x, x], x[:, :1], batch_size=4, epochs=2, verbose=0,
              callbacks=[scheduler])
    schedule = {
        name: ops.convert_to_numpy(model.get_layer(name).qat_schedule).tolist()
        for name in ("shared", "head")
    }
    assert schedule == {"head": [8, 12, NEVER], "shared": [16, 24, NEVER]}
    assert int(ops.convert_to_numpy(model.get_layer("shared").qat_step)) == 32
    assert current_phase(model)["step"] == 16


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"quantize_start": -1}, ValueError, "quantize_start=-1 is negative"),
        ({"bn_freeze": -2}, ValueError, "bn_freeze=-2 is negative"),
        ({"quantize_start": 5, "bn_freeze": 3}, ValueError,
         "bn_freeze=3 comes before quantize_start=5"),
        ({"quantize_start": 5, "range_freeze": 4}, ValueError,
         "range_freeze=4 comes before quantize_start=5"),
        ({"quantize_start": 1.5}, TypeError, "quantize_start must be None or an int"),
        ({"quantize_start": None}, ValueError, "quantize_start cannot be None"),
        ({"unit": "epochs"}, ValueError, "unit must be one of"),
        ({"unit": "epoch", "steps_per_epoch": 0}, ValueError, "steps_per_epoch"),
    ],
)
def test_invalid_schedules_are_rejected(kwargs, error, message):
    with pytest.raises(error, match=message):
        QuantizationScheduler(**kwargs)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"quantize_start": 24}, r"quantize_start=24 \(steps\) is step 24, at or past "
         r"the end of training \(step 24: 2 epochs of 12 steps\)"),
        ({"range_freeze": 2, "unit": "epoch"}, r"range_freeze=2 \(epochs\) is step 24"),
    ],
)
def test_points_past_the_end_of_training_are_rejected(kwargs, message):
    x, y = data()
    model = qat_model()
    with pytest.raises(ValueError, match=message):
        model.fit(x, y, batch_size=BATCH, epochs=2, verbose=0,
                  callbacks=[QuantizationScheduler(**kwargs)])
    assert int(ops.convert_to_numpy(model.get_layer("conv").qat_step)) == 0


def test_epoch_schedule_on_data_of_unknown_length_asks_for_steps_per_epoch():
    import tensorflow as tf

    x, y = data()
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(BATCH).filter(
        lambda a, b: True
    )
    model = qat_model()
    with pytest.raises(ValueError, match="Pass steps_per_epoch="):
        model.fit(dataset, epochs=1, verbose=0,
                  callbacks=[QuantizationScheduler(1, unit="epoch")])
    model.fit(dataset, epochs=2, verbose=0, callbacks=[
        QuantizationScheduler(1, unit="epoch", steps_per_epoch=STEPS)])
    assert ops.convert_to_numpy(model.get_layer("conv").qat_schedule)[0] == STEPS


def test_scheduler_rejects_a_float_model():
    x, y = data()
    model = float_model()
    model.compile("sgd", "sparse_categorical_crossentropy")
    with pytest.raises(ValueError, match="has no quantized layers"):
        model.fit(x, y, epochs=1, verbose=0, callbacks=[QuantizationScheduler()])


def numpy_sqnr(w, q):
    return 10 * np.log10(np.sum(w.astype("float64") ** 2) / np.sum((w - q) ** 2.0))


def test_monitor_figures_match_numpy_references():
    x, y = data()
    model = qat_model()
    monitor = QuantizationMonitor(data=(x, y), sample_size=20)
    history = model.fit(
        x, y, batch_size=BATCH, epochs=2, shuffle=False, verbose=0,
        callbacks=[QuantizationScheduler(3, 5, 15), monitor],
    )
    logs = {k: v[-1] for k, v in history.history.items()}
    # Phase of each epoch's last step (11 then 23): ranges froze at 15.
    assert history.history["qat_ranges_frozen"] == [0.0, 1.0]
    assert history.history["qat_bn_frozen"] == [1.0, 1.0]
    assert logs["qat_step"] == 2 * STEPS
    # Weight SQNR: the Dense kernel against its own int8 snap.
    kernel = ops.convert_to_numpy(model.get_layer("logits").layer.kernel)
    scale = np.abs(kernel).max(axis=0, keepdims=True) / 127
    want = numpy_sqnr(kernel, np.round(kernel / scale) * scale)
    assert logs["qat_sqnr_db/logits"] == pytest.approx(want, rel=1e-4)
    assert logs["qat_worst_sqnr_db"] == min(logs["qat_sqnr_db/conv"], want)
    assert monitor.worst_sqnr_layer in ("conv", "logits")
    # Clipping at the input fake-quant: the sample against its range.
    quantizer = model.get_layer("pixels_quantize").output_quantizer
    low, high = [float(ops.convert_to_numpy(v)) for v in quantizer.current_range()]
    want = np.mean((x[:20] < low) | (x[:20] > high))
    assert want > 0
    assert logs["qat_clip_fraction/pixels_quantize"] == pytest.approx(want)
    assert 0 < logs["qat_clip_fraction"] < 1


def test_monitor_without_data_logs_weights_and_phase_only():
    x, y = data()
    model = qat_model()
    history = model.fit(x, y, batch_size=BATCH, epochs=1, verbose=0,
                        callbacks=[QuantizationMonitor(per_layer=False)])
    keys = sorted(k for k in history.history if k.startswith("qat_"))
    assert keys == ["qat_bn_frozen", "qat_nonfinite_batches", "qat_quantizing", "qat_ranges_frozen",
                    "qat_step", "qat_worst_sqnr_db"]


def test_monitor_shows_a_summary_in_the_progress_bar_and_keeps_the_rest_in_the_logs(
        tmp_path, capsys):
    from qat_plugin.callbacks.monitor import SUMMARY

    x, y = data()
    model = qat_model()
    seen = {}
    recorder = keras.callbacks.LambdaCallback(on_epoch_end=lambda epoch, logs: seen.update(logs))
    # A CSVLogger (or keras.callbacks.TensorBoard, not installed here) after
    # the monitor gets the same logs as the recorder.
    csv = keras.callbacks.CSVLogger(str(tmp_path / "log.csv"))
    history = model.fit(x, y, batch_size=BATCH, epochs=2, verbose=2,
                        callbacks=[QuantizationMonitor(data=x), recorder, csv])
    bar = capsys.readouterr().out
    per_layer = ("qat_sqnr_db/logits", "qat_sqnr_db/conv", "qat_clip_fraction/pixels_quantize")
    # The progress bar: the loss and the summary, none of the per-layer figures.
    assert all(f"{key}:" in bar for key in SUMMARY), bar
    assert "qat_sqnr_db/" not in bar and "qat_clip_fraction/" not in bar, bar
    assert "qat_step" not in bar and "qat_nonfinite_batches" not in bar, bar
    # History, and the callbacks after the monitor, get every figure.
    for key in (*SUMMARY, *per_layer, "qat_step", "qat_nonfinite_batches"):
        assert len(history.history[key]) == 2, key
        assert key in seen, key
    columns = (tmp_path / "log.csv").read_text().splitlines()[0].split(",")
    assert set(per_layer) <= set(columns), columns
    # The filter lasts for the fit only.
    assert "on_epoch_end" not in vars(history)


def interpreter_accuracy(path, x, y):
    predictions = qat_plugin.TFLiteModel(path).predict(x)
    return float(np.mean(predictions.argmax(1) == y))


def test_export_at_the_end_scores_the_file_in_the_interpreter(tmp_path):
    x, y = data()
    model = qat_model()
    path = tmp_path / "out" / "model.tflite"
    export = TFLiteExport(path, validation_data=(x, y))
    history = model.fit(x, y, batch_size=BATCH, epochs=2, verbose=0,
                        callbacks=[export])
    assert len(history.history["int8_accuracy"]) == 1
    assert history.history["int8_accuracy"][0] == interpreter_accuracy(path, x, y)
    assert qat_plugin.inspect_tflite(str(path)).is_fully_int8
    assert os.listdir(path.parent) == ["model.tflite"]  # no temporary file left


class StopAfterFirstEpoch(keras.callbacks.Callback):
    def on_epoch_end(self, epoch, logs=None):
        self.model.stop_training = True


def test_export_happens_when_training_stops_early(tmp_path):
    x, y = data()
    model = qat_model()
    path = tmp_path / "model.tflite"
    # Placed after the export, the stop is only seen at on_train_end.
    export = TFLiteExport(path, validation_data=(x, y))
    history = model.fit(x, y, batch_size=BATCH, epochs=5, verbose=0,
                        callbacks=[export, StopAfterFirstEpoch()])
    assert history.epoch == [0]
    assert export.int8_accuracy == interpreter_accuracy(path, x, y)


class Score(keras.callbacks.Callback):
    def __init__(self, values):
        super().__init__()
        self.values = values

    def on_epoch_end(self, epoch, logs=None):
        logs["score"] = self.values[epoch]


def test_export_best_only_writes_the_improving_epochs(tmp_path):
    x, y = data()
    model = qat_model()
    export = TFLiteExport(tmp_path / "m-{epoch}.tflite", monitor="score",
                          mode="max", save_best_only=True)
    model.fit(x, y, batch_size=BATCH, epochs=4, verbose=0,
              callbacks=[Score([1.0, 3.0, 2.0, 3.5]), export])
    assert sorted(os.listdir(tmp_path)) == ["m-1.tflite", "m-2.tflite", "m-4.tflite"]
    assert export.best == 3.5


def test_export_best_by_int8_accuracy_logs_it_every_epoch(tmp_path):
    x, y = data()
    model = qat_model()
    export = TFLiteExport(tmp_path / "best.tflite", monitor="int8_accuracy",
                          save_best_only=True, validation_data=(x, y))
    history = model.fit(x, y, batch_size=BATCH, epochs=3, verbose=0,
                        callbacks=[export])
    scores = history.history["int8_accuracy"]
    assert len(scores) == 3
    assert export.best == max(scores)
    assert interpreter_accuracy(tmp_path / "best.tflite", x, y) == max(scores)


def test_export_errors_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match="must end with .tflite"):
        TFLiteExport(tmp_path / "model.keras")
    with pytest.raises(ValueError, match="pass validation_data"):
        TFLiteExport(tmp_path / "m.tflite", monitor="int8_accuracy")
    x, y = data()
    float_net = float_model()
    float_net.compile("sgd", "sparse_categorical_crossentropy")
    with pytest.raises(ValueError, match="is not a QAT model"):
        float_net.fit(x, y, epochs=1, verbose=0,
                      callbacks=[TFLiteExport(tmp_path / "m.tflite")])
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize(
    "callback",
    [
        QuantizationScheduler(1, 2.5, None, unit="epoch", steps_per_epoch=10),
        QuantizationMonitor(sample_size=64, per_layer=False),
        TFLiteExport("best.tflite", monitor="val_accuracy", save_best_only=True),
    ],
)
def test_callback_configs_round_trip(callback):
    config = keras.saving.serialize_keras_object(callback)
    restored = keras.saving.deserialize_keras_object(config)
    assert type(restored) is type(callback)
    assert restored.get_config() == callback.get_config()


# -- training is never lost to the export ----------------------------------


class EpochRecorder(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.epochs = []

    def on_epoch_begin(self, epoch, logs=None):
        self.epochs.append(epoch)


@pytest.mark.parametrize("filepath,message", [
    ("/proc/qat/model.tflite", "cannot create the folder /proc/qat for /proc/qat/model.tflite"),
    ("/proc/model.tflite", "Cannot write /proc/model.tflite: its folder /proc is not writable"),
])
def test_export_to_an_unwritable_folder_fails_before_the_first_epoch(filepath, message):
    x, y = data()
    model = qat_model()
    recorder = EpochRecorder()
    with pytest.raises(UnwritablePathError, match=message):
        model.fit(x, y, batch_size=BATCH, epochs=2, verbose=0,
                  callbacks=[recorder, TFLiteExport(filepath)])
    assert recorder.epochs == []
    assert current_phase(model)["step"] == 0


def test_export_creates_missing_folders_up_to_a_placeholder(tmp_path):
    x, y = data()
    model = qat_model()
    export = TFLiteExport(tmp_path / "a" / "b" / "run-{epoch}" / "m.tflite")
    model.fit(x, y, batch_size=BATCH, epochs=1, verbose=0, callbacks=[export])
    assert export.last_path == str(tmp_path / "a" / "b" / "run-1" / "m.tflite")
    assert qat_plugin.inspect_tflite(export.last_path).is_fully_int8
    assert export.export_error is None and export.rescued_path is None


class FolderBecomesAFile(keras.callbacks.Callback):
    """Replaces the export's folder by a file before the last export."""

    def __init__(self, folder):
        super().__init__()
        self.folder = folder

    def on_epoch_end(self, epoch, logs=None):
        if epoch + 1 == self.params["epochs"]:
            os.rmdir(self.folder)
            open(self.folder, "w").close()


def check_rescued(model, export, history, epochs, caught):
    """`fit` returned its History; the rescued .keras is the trained model."""
    assert history.epoch == list(range(epochs))
    (warning,) = [w for w in caught if "TFLiteExport could not export" in str(w.message)]
    assert export.rescued_path in str(warning.message)
    x, _ = data(8, seed=1)
    restored = keras.saving.load_model(export.rescued_path)
    np.testing.assert_array_equal(restored.predict(x, verbose=0), model.predict(x, verbose=0))


def test_an_export_failing_at_the_end_keeps_the_trained_model(tmp_path):
    x, y = data()
    model = qat_model()
    folder = tmp_path / "out"
    export = TFLiteExport(folder / "model.tflite")
    with pytest.warns(UserWarning) as caught:
        history = model.fit(x, y, batch_size=BATCH, epochs=2, verbose=0,
                            callbacks=[FolderBecomesAFile(folder), export])
    assert isinstance(export.export_error, OSError)
    # Its folder is a file now: the model went to a new temporary folder.
    assert os.path.basename(export.rescued_path) == "model.unexported.keras"
    assert not export.rescued_path.startswith(str(tmp_path))
    check_rescued(model, export, history, 2, caught)


def test_a_monitor_or_filepath_key_missing_from_the_logs_keeps_the_model(tmp_path):
    x, y = data()
    for export in (TFLiteExport(tmp_path / "m.tflite", save_best_only=True),
                   TFLiteExport(tmp_path / "m-{nope}.tflite")):
        model = qat_model()
        with pytest.warns(UserWarning) as caught:
            history = model.fit(x, y, batch_size=BATCH, epochs=1, verbose=0,
                                callbacks=[export])
        assert isinstance(export.export_error, KeyError)
        assert "is not" in str(export.export_error)
        assert os.path.dirname(export.rescued_path) == str(tmp_path)
        check_rescued(model, export, history, 1, caught)
    assert sorted(os.listdir(tmp_path)) == ["m-{nope}.unexported.keras", "m.unexported.keras"]


def test_monitor_reports_and_warns_about_skipped_nonfinite_batches():
    model = keras.Sequential([keras.Input((4,), name="x"), keras.layers.Dense(2, name="head")])
    qat = qat_plugin.quantize_model(model)
    qat.compile(keras.optimizers.SGD(0.0), "mse")
    x = np.random.default_rng(0).random((32, 4), dtype=np.float32)
    x[20, 0] = np.inf  # the second of two batches
    y = np.zeros((32, 2), "float32")
    with pytest.warns(UserWarning, match=r"QuantizationMonitor, epoch 1: .* skipped batches "
                                         r"holding NaN or inf .*'x_quantize': 1"):
        history = qat.fit(x, y, batch_size=16, epochs=1, verbose=0, shuffle=False,
                          callbacks=[QuantizationMonitor()])
    assert history.history["qat_nonfinite_batches"] == [1.0]
    clean = x[:16]
    history = qat.fit(clean, y[:16], epochs=1, verbose=0, callbacks=[QuantizationMonitor()])
    assert history.history["qat_nonfinite_batches"] == [1.0]  # so far, no new warning
