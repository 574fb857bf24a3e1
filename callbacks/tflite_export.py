"""`TFLiteExport`: writes the int8 .tflite during `fit` and scores it."""

import os
import tempfile
import warnings

import keras

from qat_plugin.distribution import is_primary_process
from qat_plugin.analysis.metrics import top1_accuracy
from qat_plugin.errors import UnwritablePathError
from qat_plugin.layers.base import is_quantized
from qat_plugin.tflite.convert import export_tflite
from qat_plugin.tflite.input_shapes import export_input_specs
from qat_plugin.files import check_writable, write_bytes_atomic
from qat_plugin.tflite.interpreter import TFLiteModel

MODES = ("auto", "min", "max")


@keras.saving.register_keras_serializable(package="qat_plugin")
class TFLiteExport(keras.callbacks.Callback):
    """Exports the fully-int8 .tflite of a QAT model during `fit`.

    Without `save_best_only` the model is exported after the last epoch
    (also when training stops early). With `save_best_only=True` it is
    exported at each epoch whose `monitor` value improves, as
    `keras.callbacks.ModelCheckpoint` does. The file is written atomically:
    readers never see a partial file.

    Training is never lost to the export. When training begins, the folder
    of `filepath` is created and checked writable, so a bad path fails
    before the first epoch (`UnwritablePathError` naming it). An export
    that fails later (a converter error, a disk that filled up, a
    `filepath` key missing from the logs, a `monitor` not in the logs)
    does not end `fit`: the trained model is saved beside the target as
    `<name>.unexported.keras` (in a new temporary folder if that folder
    cannot be written), a warning names the error and that file, the error
    is kept in `export_error` and the file's path in `rescued_path`, and
    `fit` returns its `History`.

    With `validation_data`, each exported model runs in the LiteRT
    interpreter on it and `int8_accuracy` is added to the epoch's `logs`
    (so to the progress bar, `History` and TensorBoard), and kept in
    `self.int8_accuracy`. `monitor="int8_accuracy"` exports and scores the
    model at every epoch and keeps the best file.

    Args:
        filepath: path of the .tflite; may hold `{epoch}` and log keys, as
            in `ModelCheckpoint` (e.g. `"model-{epoch:02d}.tflite"`).
            Missing folders are created.
        monitor: the log key to track with `save_best_only`.
        mode: `"auto"`, `"min"` or `"max"`; `"auto"` maximizes accuracy-like
            keys (containing "acc", or starting with "fmeasure") and
            minimizes others.
        save_best_only: export only when `monitor` improves.
        validation_data: `(x, y)` arrays to score the exported model on.
        batch_size: interpreter batch size.
        input_shape: the fixed shape of inputs of undefined size, as in
            `export_tflite(..., input_shape=...)`. A model with such an input
            and no `input_shape` fails when training begins (an
            `ExportError` naming the input), not after the last epoch.

    Examples:
        >>> import os, tempfile, keras, numpy as np, qat_plugin
        >>> from qat_plugin.callbacks import TFLiteExport
        >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
        >>> qat = qat_plugin.quantize_model(model)
        >>> qat.compile("adam", "sparse_categorical_crossentropy")
        >>> x = np.random.rand(32, 4).astype("float32"); y = np.arange(32) % 3
        >>> path = os.path.join(tempfile.mkdtemp(), "model.tflite")
        >>> export = TFLiteExport(path, validation_data=(x, y))
        >>> history = qat.fit(x, y, epochs=2, verbose=0, callbacks=[export])
        >>> os.path.exists(path), len(history.history["int8_accuracy"])
        (True, 1)
    """

    def __init__(
        self,
        filepath,
        monitor="val_loss",
        mode="auto",
        save_best_only=False,
        validation_data=None,
        batch_size=256,
        input_shape=None,
    ):
        super().__init__()
        filepath = os.fspath(filepath)
        if not filepath.endswith(".tflite"):
            raise ValueError(
                f"TFLiteExport: filepath must end with .tflite, got {filepath!r}."
            )
        if mode not in MODES:
            raise ValueError(
                f"TFLiteExport: mode must be one of {MODES}, got {mode!r}."
            )
        if validation_data is not None and (
            not isinstance(validation_data, (tuple, list))
            or len(validation_data) != 2
        ):
            raise ValueError(
                "TFLiteExport: validation_data must be an (x, y) tuple of "
                f"arrays, got {type(validation_data).__name__}."
            )
        if monitor.startswith("int8_") and validation_data is None:
            raise ValueError(
                f"TFLiteExport: monitor={monitor!r} is measured on the "
                "exported model; pass validation_data=(x, y)."
            )
        self.filepath = filepath
        self.monitor = monitor
        self.mode = mode
        self.save_best_only = save_best_only
        self.validation_data = validation_data
        self.batch_size = batch_size
        self.input_shape = input_shape
        if mode == "auto":
            name = monitor.lower()
            mode = "max" if "acc" in name or name.startswith("fmeasure") else "min"
        self._greater_is_better = mode == "max"
        self.best = None
        self.int8_accuracy = None
        self.last_path = None
        self.export_error = None
        self.rescued_path = None
        self._exported_last_epoch = False

    def on_train_begin(self, logs=None):
        if not is_quantized(self.model):
            raise ValueError(
                f"TFLiteExport: model '{self.model.name}' is not a QAT model; "
                "pass the model returned by qat_plugin.quantize_model (export "
                "float models with qat_plugin.export_tflite(model, mode=...))."
            )
        export_input_specs(self.model, self.input_shape)  # Fails before epoch 1.
        if is_primary_process():
            self._check_folder()
        self.best = None
        self.export_error = None
        self.rescued_path = None
        self._exported_last_epoch = False

    def on_epoch_end(self, epoch, logs=None):
        logs = {} if logs is None else logs
        self._exported_last_epoch = False
        if self.save_best_only:
            self._keeping_the_model(self._export_if_best, epoch, logs)
        elif epoch + 1 >= self.params.get("epochs", 0) or self.model.stop_training:
            self._keeping_the_model(self._export, epoch, logs)

    def on_train_end(self, logs=None):
        if not self.save_best_only and not self._exported_last_epoch:
            logs = {} if logs is None else logs
            self._keeping_the_model(self._export, self._last_epoch(), logs)

    def _check_folder(self):
        """Creates `filepath`'s folder (up to a `{...}` part) and checks it is writable."""
        folder = os.path.dirname(os.path.abspath(self.filepath))
        static = folder.split("{", 1)[0]
        if static != folder:
            static = os.path.dirname(static)
        try:
            os.makedirs(static, exist_ok=True)
        except OSError as error:
            raise UnwritablePathError(
                f"TFLiteExport: cannot create the folder {static} for "
                f"{self.filepath} ({error.strerror or error}). Choose a "
                "filepath in a folder that can be written."
            ) from None
        check_writable(os.path.join(static, os.path.basename(self.filepath)))

    def _keeping_the_model(self, export, epoch, logs):
        """Runs `export`; if it fails, saves the model, warns and goes on."""
        try:
            export(epoch, logs)
        except Exception as error:  # Whatever failed, the training stays.
            self.export_error = error
            self._exported_last_epoch = True  # Tried: on_train_end does not retry.
            if is_primary_process():
                self._rescue(self._path(epoch, logs, default=self.filepath), error)

    def _rescue(self, target, error):
        name = os.path.basename(target)[: -len(".tflite")] + ".unexported.keras"
        saved, problem = None, ""
        for folder in (os.path.dirname(os.path.abspath(target)), None):
            try:
                folder = folder or tempfile.mkdtemp(prefix="qat_plugin-")
                os.makedirs(folder, exist_ok=True)
                saved = os.path.join(folder, name)
                self.model.save(saved)
                break
            except Exception as save_error:
                saved, problem = None, f" Saving the model failed too: {save_error}."
        self.rescued_path = saved
        kept = (f"The trained model is saved in {saved}; export it with "
                f"qat_plugin.export_tflite(keras.saving.load_model({saved!r}), path). "
                if saved else problem + " ")
        warnings.warn(
            f"TFLiteExport could not export {target}: {type(error).__name__}: "
            f"{error} {kept}Training goes on and fit returns its History; the "
            "error is in this callback's export_error.",
            stacklevel=2,
        )

    def _last_epoch(self):
        history = getattr(self.model, "history", None)
        epochs = getattr(history, "epoch", None)
        return epochs[-1] if epochs else 0

    def _export_if_best(self, epoch, logs):
        data = None
        if self.monitor.startswith("int8_"):
            data = export_tflite(self.model, input_shape=self.input_shape)
            logs.update(self._score(data))
        current = logs.get(self.monitor)
        if current is None:
            raise KeyError(
                f"TFLiteExport: monitor={self.monitor!r} is not in the logs; "
                f"available keys: {sorted(logs)}. Pass validation data to "
                "fit() for val_ keys."
            )
        current = float(current)
        if self.best is not None and not (
            current > self.best if self._greater_is_better else current < self.best
        ):
            return
        self.best = current
        self._export(epoch, logs, data)

    def _path(self, epoch, logs, default=None):
        """`filepath` with the epoch and logs filled in (`default` if they cannot be)."""
        try:
            return self.filepath.format(epoch=epoch + 1, **logs)
        except (KeyError, IndexError, ValueError) as error:
            if default is not None:
                return default
            raise KeyError(
                f"TFLiteExport: cannot format filepath {self.filepath!r}: "
                f"{error} is not a log key; keys: {sorted(logs)}."
            ) from None

    def _export(self, epoch, logs, data=None):
        if data is None:
            data = export_tflite(self.model, input_shape=self.input_shape)
            logs.update(self._score(data))
        path = self._path(epoch, logs)
        if is_primary_process():  # one writer in multi-process training
            directory = os.path.dirname(os.path.abspath(path))
            os.makedirs(directory, exist_ok=True)
            write_bytes_atomic(path, data)
        self.last_path = path
        self._exported_last_epoch = True

    def _score(self, data):
        if self.validation_data is None:
            return {}
        x, y = self.validation_data
        predictions = TFLiteModel(data).predict(x, batch_size=self.batch_size)
        self.int8_accuracy = top1_accuracy(y, predictions)
        return {"int8_accuracy": self.int8_accuracy}

    def get_config(self):
        return {
            "filepath": self.filepath,
            "monitor": self.monitor,
            "mode": self.mode,
            "save_best_only": self.save_best_only,
            "batch_size": self.batch_size,
            "input_shape": self.input_shape,
        }

    @classmethod
    def from_config(cls, config):
        return cls(**config)
