"""QAT models through `.keras` files and `BackupAndRestore`, schedule included."""

import keras
import numpy as np
import pytest
from keras import ops

import qat_plugin
from qat_plugin.callbacks import QuantizationScheduler, current_phase
from tests.test_callbacks import BATCH, STEPS, data, qat_model


def assert_same_variables(got, want):
    """Compares two models' variables in order (a loaded model's paths differ)."""
    assert [v.name for v in got.variables] == [v.name for v in want.variables]
    for a, b in zip(got.variables, want.variables):
        np.testing.assert_allclose(ops.convert_to_numpy(a), ops.convert_to_numpy(b),
                                   rtol=1e-5, atol=1e-6, err_msg=b.path)


def test_keras_file_round_trip_needs_no_custom_objects(tmp_path):
    x, y = data()
    model = qat_model()
    model.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0,
              callbacks=[QuantizationScheduler(3, 5, 7)])
    path = tmp_path / "qat.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert [type(layer) for layer in loaded.layers] == [
        type(layer) for layer in model.layers
    ]
    # Model variables (schedule, step counters, ranges, BN stats) by path.
    assert_same_variables(loaded, model)
    assert current_phase(loaded) == current_phase(model)
    np.testing.assert_array_equal(
        loaded.predict(x, verbose=0), model.predict(x, verbose=0)
    )
    # The loaded model's export is byte-for-byte the original's.
    assert qat_plugin.export_tflite(loaded) == qat_plugin.export_tflite(model)


class Interrupt(keras.callbacks.Callback):
    """Raises mid-epoch, as a preempted job would stop."""

    def __init__(self, epoch, batch):
        super().__init__()
        self.at = (epoch, batch)
        self.epoch = None

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_begin(self, batch, logs=None):
        if (self.epoch, batch) == self.at:
            raise RuntimeError("interrupted")


@pytest.mark.parametrize("steps_per_execution", [1, 4])
def test_backup_and_restore_resumes_the_schedule_exactly(tmp_path, steps_per_execution):
    x, y = data()
    # The switches fall in epochs 1 and 2: the interruption (epoch 1, batch
    # 8) comes after quantization started and before the freezes.
    def schedule():
        return QuantizationScheduler(quantize_start=1, bn_freeze=1.75,
                                     range_freeze=2.5, unit="epoch")

    fit = dict(batch_size=BATCH, epochs=4, shuffle=False, verbose=0)

    uninterrupted = qat_model(steps_per_execution)
    uninterrupted.fit(x, y, callbacks=[schedule()], **fit)

    backup = str(tmp_path / "backup")
    first = qat_model(steps_per_execution)
    with pytest.raises(RuntimeError, match="interrupted"):
        first.fit(x, y, callbacks=[
            schedule(), keras.callbacks.BackupAndRestore(backup), Interrupt(1, 8),
        ], **fit)
    assert current_phase(first)["step"] == STEPS + 8

    # A new process would build the model again; BackupAndRestore restores
    # the end of epoch 0 (weights, optimizer, step counters, ranges) and
    # fit starts again at epoch 1.
    resumed = qat_model(steps_per_execution)
    resumed.fit(x, y, callbacks=[
        keras.callbacks.BackupAndRestore(backup), schedule(),
    ], **fit)
    assert current_phase(resumed) == current_phase(uninterrupted) == {
        "step": 4 * STEPS, "quantizing": True, "bn_frozen": True,
        "ranges_frozen": True,
    }
    assert_same_variables(resumed, uninterrupted)
    schedule_steps = ops.convert_to_numpy(resumed.get_layer("conv").qat_schedule)
    assert schedule_steps.tolist() == [STEPS, 21, 30]


def test_loading_a_qat_file_without_importing_qat_plugin_names_the_class_and_package(tmp_path):
    import subprocess
    import sys

    qat = qat_model()
    qat.save(tmp_path / "qat.keras")
    script = ("import keras\ntry:\n    keras.models.load_model(r'%s')\n"
              "except TypeError as error:\n    print(str(error)[:400])\n" % (tmp_path / "qat.keras"))
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=300, env={**__import__("os").environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    message = result.stdout
    assert "Could not locate class 'QATModel'" in message, result.stderr[-2000:]
    assert "make sure they are all imported" in message
    assert "{'module': 'qat_plugin', 'class_name': 'QATModel'" in message
    assert isinstance(keras.models.load_model(tmp_path / "qat.keras"), qat_plugin.QATModel)
