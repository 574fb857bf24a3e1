"""`QuantizationMonitor`: per-epoch QAT health figures in the Keras logs.

The figures go to every callback after the monitor and to `History`; the
progress bar, which Keras always runs last, shows only `SUMMARY`: after
the fit's `History` has recorded an epoch, the other figures leave that
epoch's logs (an 11-layer model adds 28 of them, a 1,188-character line).
"""

import math

import keras
import numpy as np
from keras import ops, tree

from qat_plugin.callbacks.scheduler import current_phase
from qat_plugin.layers.base import quantized_layers
from qat_plugin.layers.modes import activation_probe
from qat_plugin.layers.linear import QuantizedLinear
from qat_plugin.quantize.calibration import nonfinite_batches, warn_nonfinite


def sqnr_db(pairs):
    """Signal-to-quantization-noise ratio in dB of `(float, quantized)` pairs.

    `10 log10(sum(w^2) / sum((w - q)^2))` over all pairs; `inf` when the
    quantized values equal the float ones.

    Examples:
        >>> import numpy as np
        >>> w = np.array([1.0, 2.0]); q = np.array([1.0, 2.1])
        >>> round(sqnr_db([(w, q)]), 2)
        26.99
    """
    signal = sum(float(np.sum(np.square(w, dtype="float64"))) for w, _ in pairs)
    noise = sum(
        float(np.sum(np.square(np.asarray(w, "float64") - q))) for w, q in pairs
    )
    if noise == 0.0:
        return math.inf
    if signal == 0.0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)


# The figures the progress bar shows; the rest go to the logs only.
SUMMARY = ("qat_worst_sqnr_db", "qat_clip_fraction", "qat_quantizing", "qat_bn_frozen",
           "qat_ranges_frozen")


def hide_from_progress_bar(history):
    """The set of log keys dropped after `history` records each epoch.

    `fit` calls its callbacks in list order with one logs dict per epoch and
    appends `History`, then the progress bar, at the end: keys put in the
    set leave the logs between the two, so `History` (and every callback
    before it) keeps them and the progress bar does not show them. The
    filter stays until `restore_progress_bar(history)`.

    Examples:
        >>> import keras
        >>> history = keras.callbacks.History()
        >>> history.set_model(keras.Sequential([keras.Input((1,))]))
        >>> history.on_train_begin()
        >>> hide_from_progress_bar(history).add("detail")
        >>> logs = {"loss": 1.0, "detail": 2.0}
        >>> history.on_epoch_end(0, logs)
        >>> logs, history.history
        ({'loss': 1.0}, {'loss': [1.0], 'detail': [2.0]})
        >>> restore_progress_bar(history)
    """
    installed = vars(history).get("on_epoch_end")
    if installed is not None and hasattr(installed, "hidden"):
        return installed.hidden
    record = history.on_epoch_end
    hidden = set()

    def on_epoch_end(epoch, logs=None):
        record(epoch, logs)
        for key in hidden:
            if logs is not None:
                logs.pop(key, None)

    on_epoch_end.hidden = hidden
    history.on_epoch_end = on_epoch_end
    return hidden


def restore_progress_bar(history):
    """Removes the filter of `hide_from_progress_bar(history)`, if any.

    Examples:
        >>> import keras
        >>> restore_progress_bar(keras.callbacks.History())
    """
    installed = vars(history).get("on_epoch_end")
    if installed is not None and hasattr(installed, "hidden"):
        del history.on_epoch_end


def sample_inputs(data, sample_size):
    """Returns the model inputs of the first `sample_size` samples of `data`.

    `data` is what `fit` accepts as `x` or `validation_data`: an array (or
    list/dict of arrays), an `(x, y[, sample_weight])` tuple, or an iterable
    of batches such as a `tf.data.Dataset` (its first batch is used).
    """
    if not isinstance(data, (tuple, list, dict, np.ndarray)) and hasattr(
        data, "__iter__"
    ):
        data = next(iter(data))
    if isinstance(data, tuple):
        data = data[0]
    return tree.map_structure(lambda a: np.asarray(a)[:sample_size], data)


@keras.saving.register_keras_serializable(package="qat_plugin")
class QuantizationMonitor(keras.callbacks.Callback):
    """Adds per-epoch figures that help judge quantization-aware training.

    At the end of each epoch it adds to `logs`, and so to `History`,
    `CSVLogger` and `keras.callbacks.TensorBoard` (place it before those in
    the callback list), the figures below. The progress bar shows only the
    summary (`SUMMARY`: worst SQNR, clip fraction and the phase flags); the
    per-layer figures, `qat_step` and `qat_nonfinite_batches` are in the
    logs and `History` only (they leave the logs after `History` records
    the epoch, so `on_train_end` does not get them):

    - `qat_step`, `qat_quantizing`, `qat_bn_frozen`, `qat_ranges_frozen`:
      the schedule phase of the epoch's last step (flags are 0 or 1).
    - `qat_worst_sqnr_db` and, with `per_layer`, `qat_sqnr_db/<layer>`:
      weight quantization error as a signal-to-noise ratio in dB, comparing
      each Conv/Dense kernel folded with BatchNorm with its int8
      fake-quantized version (higher is better; 8-bit per-channel weights
      typically give 35-45 dB). The worst layer's name is kept in
      `worst_sqnr_layer`.
    - With `data`: `qat_clip_fraction` and, with `per_layer`,
      `qat_clip_fraction/<layer>`: the fraction of activation values outside
      the range they are quantized to (saturated by the int8 kernel).
    - `qat_nonfinite_batches`: the batches holding NaN or inf that the range
      observers skipped so far (the most any layer skipped); an epoch that
      adds some also warns, naming the layers.

    The clipping figures come from one inference pass over a held sample
    (the first `sample_size` samples of `data`, for instance the validation
    data) through the quantized model, recording the tensor entering each
    activation fake-quant; so the cost is one small `predict` per epoch
    and does not touch the train function.

    Args:
        data: samples for the clipping figures (see `sample_inputs`), or
            None to skip them.
        sample_size: how many samples of `data` to run.
        per_layer: also log one figure per layer.

    Examples:
        >>> import keras, numpy as np, qat_plugin
        >>> from qat_plugin.callbacks import QuantizationMonitor
        >>> x, y = np.random.rand(16, 4).astype("float32"), np.zeros((16, 2))
        >>> model = keras.Sequential([keras.Input((4,), name="pixels"),
        ...                           keras.layers.Dense(2, name="logits")])
        >>> qat = qat_plugin.quantize_model(model)
        >>> qat.compile("sgd", "mse")
        >>> monitor = QuantizationMonitor(data=x)
        >>> history = qat.fit(x, y, epochs=1, verbose=0, callbacks=[monitor])
        >>> sorted(k for k in history.history if k.startswith("qat_"))[:4]
        ['qat_bn_frozen', 'qat_clip_fraction', 'qat_clip_fraction/logits', 'qat_clip_fraction/pixels_quantize']
        >>> history.history["qat_sqnr_db/logits"][0] > 30
        True
    """

    def __init__(self, data=None, sample_size=256, per_layer=True):
        super().__init__()
        if not isinstance(sample_size, int) or sample_size < 1:
            raise ValueError(
                "QuantizationMonitor: sample_size must be a positive int, got "
                f"{sample_size!r}."
            )
        self.sample = None if data is None else sample_inputs(data, sample_size)
        self.sample_size = sample_size
        self.per_layer = per_layer
        self.worst_sqnr_layer = None
        self._nonfinite = {}
        self._hidden = set()

    def on_train_begin(self, logs=None):
        self._nonfinite = nonfinite_batches(self.model)
        history = getattr(self.model, "history", None)
        self._hidden = (hide_from_progress_bar(history)
                        if isinstance(history, keras.callbacks.History) else set())

    def on_epoch_end(self, epoch, logs=None):
        figures = self.measure()
        self._nonfinite = warn_nonfinite(
            self.model, f"QuantizationMonitor, epoch {epoch + 1}", since=self._nonfinite)
        if logs is not None:
            logs.update(figures)
            self._hidden.update(key for key in figures if key not in SUMMARY)

    def on_train_end(self, logs=None):
        history = getattr(self.model, "history", None)
        if isinstance(history, keras.callbacks.History):
            restore_progress_bar(history)

    def measure(self):
        """Returns the figures as a dict of floats (see the class docstring)."""
        if not quantized_layers(self.model):
            raise ValueError(
                f"QuantizationMonitor: model '{self.model.name}' has no "
                "quantized layers; pass the model returned by "
                "qat_plugin.quantize_model."
            )
        phase = current_phase(self.model)
        figures = {
            "qat_step": float(phase["step"]),
            "qat_quantizing": float(phase["quantizing"]),
            "qat_bn_frozen": float(phase["bn_frozen"]),
            "qat_ranges_frozen": float(phase["ranges_frozen"]),
            "qat_nonfinite_batches": float(max(
                nonfinite_batches(self.model).values(), default=0)),
        }
        figures.update(self._weight_figures())
        if self.sample is not None:
            figures.update(self._clip_figures())
        return figures

    def _weight_figures(self):
        per_layer = {
            layer.name: sqnr_db(layer.folded_kernel_pairs())
            for layer in quantized_layers(self.model)
            if isinstance(layer, QuantizedLinear)
        }
        if not per_layer:
            return {}
        self.worst_sqnr_layer = min(per_layer, key=per_layer.get)
        figures = {"qat_worst_sqnr_db": per_layer[self.worst_sqnr_layer]}
        if self.per_layer:
            figures.update({f"qat_sqnr_db/{k}": v for k, v in per_layer.items()})
        return figures

    def _clip_figures(self):
        with activation_probe() as records:
            self.model(self.sample, training=False)
        clipped, total = {}, {}
        for layer, quantizer, x, range_min, range_max in records:
            if not bool(ops.convert_to_numpy(quantizer.observed)):
                continue
            values = ops.convert_to_numpy(x)
            outside = int(np.count_nonzero(
                (values < ops.convert_to_numpy(range_min))
                | (values > ops.convert_to_numpy(range_max))
            ))
            clipped[layer.name] = clipped.get(layer.name, 0) + outside
            total[layer.name] = total.get(layer.name, 0) + values.size
        if not total:
            return {}
        figures = {
            "qat_clip_fraction": sum(clipped.values()) / sum(total.values())
        }
        if self.per_layer:
            figures.update(
                {f"qat_clip_fraction/{k}": clipped[k] / total[k] for k in total}
            )
        return figures

    def get_config(self):
        return {"sample_size": self.sample_size, "per_layer": self.per_layer}

    @classmethod
    def from_config(cls, config):
        return cls(**config)
